#!/bin/sh
# PID 1 of a fireclaw guest (no systemd): mount what a Linux userland expects,
# set the hostname and the network from the kernel command line, run the guest
# daemon as a child, and power the VM off when it exits.
#
# Kernel command line (all optional):
#   fireclaw.hostname=NAME   default: /etc/hostname of the image
#   fireclaw.ip=ADDR/PREFIX  address for eth0 (no address: eth0 stays down)
#   fireclaw.gw=ADDR         default route
#   fireclaw.dns=ADDR        nameserver written to /run/resolv.conf
#   fireclaw.port=NAME       the daemon's virtio-serial port: waited for (named) first
# The guest daemon itself reads fireclaw.url= or fireclaw.port=, fireclaw.vm_id=,
# fireclaw.token=.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

say() {
    echo "fireclaw-init: $*"
}

mounted() {
    # /proc/mounts may not exist yet: then nothing is mounted.
    grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null
}

mounted /proc || mount -t proc -o nosuid,nodev,noexec proc /proc
mounted /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mounted /dev || mount -t devtmpfs -o nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mounted /dev/shm || mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp

# A read-only root (the default) gets fresh writable places for this boot.
root_mode=rw
while read -r _dev dir _type opts _rest; do
    if [ "$dir" = / ]; then
        case ",$opts," in
            *,ro,*) root_mode=ro ;;
            *) root_mode=rw ;;
        esac
    fi
done </proc/mounts
if [ "$root_mode" = ro ]; then
    mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /var/tmp
    mount -t tmpfs -o nosuid,nodev,mode=700 tmpfs /root
    mount -t tmpfs -o nosuid,nodev,mode=750,uid=1000,gid=1000 tmpfs /home/agent
fi

hostname=$(cat /etc/hostname 2>/dev/null)
ip_addr=
gateway=
dns=
port=
for word in $(cat /proc/cmdline); do
    case "$word" in
        fireclaw.hostname=*) hostname=${word#*=} ;;
        fireclaw.ip=*) ip_addr=${word#*=} ;;
        fireclaw.gw=*) gateway=${word#*=} ;;
        fireclaw.dns=*) dns=${word#*=} ;;
        fireclaw.port=*) port=${word#*=} ;;
    esac
done
[ -n "$hostname" ] && echo "$hostname" >/proc/sys/kernel/hostname

ip link set lo up
if [ -n "$ip_addr" ]; then
    if ip link set eth0 up && ip addr add "$ip_addr" dev eth0; then
        if [ -n "$gateway" ] && ! ip route add default via "$gateway"; then
            say "cannot add the default route via $gateway"
        fi
    else
        say "cannot configure eth0 with $ip_addr"
    fi
fi
: >/run/resolv.conf
[ -n "$dns" ] && echo "nameserver $dns" >/run/resolv.conf

# The port's driver names it in the background once loaded; bounded like the
# initramfs's wait for the root disk.
port_named() {
    grep -qx "$1" /sys/class/virtio-ports/*/name 2>/dev/null
}
if [ -n "$port" ]; then
    tries=0
    while ! port_named "$port" && [ "$tries" -lt 200 ]; do
        sleep 0.05
        tries=$((tries + 1))
    done
    port_named "$port" || say "no virtio-serial port named $port after 10 s"
fi

# The daemon runs as root (it mounts the workspace and sets the clock); what it
# starts for an agent or a run (harness, tools, commands) runs as the agent user.
cd /
HOME=/root
LANG=C.UTF-8
FIRECLAW_SET_CLOCK=1
export HOME LANG FIRECLAW_SET_CLOCK
/opt/fireclaw/bin/guest-daemon </dev/null &
daemon=$!
# As PID 1 this shell inherits every orphan; while it waits, the shell reaps
# whichever child exits, so orphans do not pile up as zombies.
wait "$daemon"
status=$?
say "guest daemon exited with status $status; powering off"
sync
exec busybox poweroff -f
