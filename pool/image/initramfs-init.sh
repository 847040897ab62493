#!/bin/busybox sh
# First userspace of a fireclaw guest: load the virtio drivers the kernel has
# as modules, wait for the root disk, mount it and hand over to its init.
#
# Kernel command line: root=/dev/DISK (default /dev/vda), ro (default) or rw,
# init=PATH (default /sbin/fireclaw-init).

/bin/busybox --install -s /bin
PATH=/bin
export PATH

mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys

fail() {
    echo "fireclaw-initramfs: $*"
    poweroff -f
}

root=/dev/vda
mode=ro
init=/sbin/fireclaw-init
for word in $(cat /proc/cmdline); do
    case "$word" in
        root=/dev/*) root=${word#root=} ;;
        ro | rw) mode=$word ;;
        init=/*) init=${word#init=} ;;
    esac
done

while read -r module; do
    [ -n "$module" ] && { insmod "/lib/modules/$module" || fail "cannot load $module"; }
done </lib/modules/load-order

# Bounded: a VM whose disk never shows up powers off instead of hanging.
tries=0
while [ ! -b "$root" ]; do
    [ "$tries" -ge 300 ] && fail "no root disk $root after 30 s"
    usleep 100000
    tries=$((tries + 1))
done

mount -t ext4 -o "$mode" "$root" /newroot || fail "cannot mount $root"
[ -x "/newroot$init" ] || fail "$root has no $init"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot "$init"
