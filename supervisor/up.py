"""``fireclaw-swarm up``: the process around the ``Supervisor`` (``daemon.py``).

It loads the config, takes the state dir's pidfile lock (asking a running
supervisor to hand its VMs over first, with ``--handover``), opens the state
store and runs the supervisor under ``trio.run`` until it stops; the lock is
released and the store closed on every way out. Exit codes: 0 after a
graceful stop, 78 on a bad config at start, 1 when another instance holds the
lock or the state cannot be opened.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Final

import msgspec
import trio
from fireclaw.config import EX_CONFIG, Config, ConfigError, load_config
from fireclaw.config.cluster import ClusterFlags
from fireclaw.pool.drivers import BackendUnavailable
from fireclaw.supervisor import ballast
from fireclaw.supervisor.daemon import API_NAME, DB_NAME, LOCK_NAME, Supervisor
from fireclaw.supervisor.pidfile import AlreadyRunning, PidLock
from fireclaw.supervisor.state import StateError, Store

log = logging.getLogger("fireclaw.supervisor")

#: ``up --handover`` waits for the old supervisor's lock this long past its fleet deadline.
HANDOVER_MARGIN: Final = 30.0


def run_up(
    config_path: str,
    state_dir: str | None,
    *,
    handover: bool = False,
    cluster: ClusterFlags | None = None,
) -> int:
    """``fireclaw-swarm up``: run the supervisor in the foreground until stopped.

    With ``handover``, a supervisor already running on the state dir is asked to
    exit and leave its VMs running (``down --leave-vms``); this one waits for its
    lock, then starts and adopts them: an upgrade without stopping the fleet.
    With ``cluster`` (``--cluster DSN --host NAME``), it runs as a host of a
    fleet, as the config's ``cluster:`` section would say."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        config = with_cluster_flags(load_config(config_path), cluster)
    except ConfigError as exc:
        print(f"fireclaw-swarm: {exc}", file=sys.stderr)
        return EX_CONFIG
    except ValueError as exc:  # the command line's cluster flags
        print(f"fireclaw-swarm: {exc}", file=sys.stderr)
        return EX_CONFIG
    sdir = Path(state_dir).resolve() if state_dir else config.state_dir
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        lock = PidLock(sdir / LOCK_NAME)
        try:
            lock.acquire()
        except AlreadyRunning as exc:
            if not handover:
                raise
            _ask_to_hand_over(sdir, exc)
            # A process backend's holder stops its fleet first: up to its deadline.
            lock.acquire(wait=config.stop.fleet_deadline + HANDOVER_MARGIN)
    except AlreadyRunning as exc:
        print(f"fireclaw-swarm: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fireclaw-swarm: cannot use state dir {sdir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        try:
            store = _open_store(sdir, config)
        except StateError as exc:
            print(f"fireclaw-swarm: {exc}", file=sys.stderr)
            return 1
        try:
            supervisor = Supervisor(config, sdir, store, cluster_flags=cluster)
        except BackendUnavailable as exc:
            print(f"fireclaw-swarm: {config.path.name}: backend: {exc}", file=sys.stderr)
            return EX_CONFIG
        try:
            trio.run(supervisor.serve)
        finally:
            store.close()
        if supervisor.startup_error is not None:
            print(f"fireclaw-swarm: {supervisor.startup_error}", file=sys.stderr)
            return 1
    finally:
        lock.release()
    return 0


def with_cluster_flags(config: Config, flags: ClusterFlags | None) -> Config:
    """``config`` with the command line's cluster flags in its ``cluster:``
    section. Raises ValueError (one line naming the flag)."""
    if flags is None:
        return config
    return msgspec.structs.replace(config, cluster=flags.spec(config.cluster))


def _open_store(state_dir: Path, config: Config) -> Store:
    """The state database, opened in the ballast's room if the disk is full
    (see ``ballast``); the ballast made again when there is room for it. In a
    cluster, the shared state is in PostgreSQL, over this host's own database."""
    if config.cluster is not None:
        # Imported here: a single host runs without psycopg ever being loaded.
        from fireclaw.supervisor.state_pg import PgStore

        cluster = config.cluster
        password = None if cluster.password_file is None else Path(cluster.password_file)
        shared = PgStore.connect(
            cluster.database,
            host=cluster.host or socket.gethostname(),
            local=state_dir / DB_NAME,
            password_file=password,
        )
        log.info("cluster: host %s, shared state in %s", shared.host, shared.database)
        return shared
    try:
        store = Store.open(state_dir / DB_NAME)
    except StateError:
        if not ballast.disk_full(state_dir):
            raise
        freed = ballast.release(state_dir)
        if not freed:
            raise
        log.warning(
            "state disk %s is full: its %d-byte ballast was released to start;"
            " make room there, or tasks are refused once that room is used too",
            state_dir,
            freed,
        )
        return Store.open(state_dir / DB_NAME)
    why = ballast.ensure(state_dir)
    if why is not None:
        log.warning("no ballast in %s (room to start on a full disk): %s", state_dir, why)
    return store


def _ask_to_hand_over(state_dir: Path, holder: AlreadyRunning) -> None:
    """Ask the supervisor holding ``state_dir`` to exit, leaving its VMs running."""
    from fireclaw.supervisor.client import ApiClient, ApiError, SwarmNotRunning

    try:
        ApiClient(state_dir / API_NAME).post("/down", {"leave_vms": True})
    except ApiError as exc:
        if exc.status is not None or isinstance(exc, SwarmNotRunning):
            raise AlreadyRunning(holder.pid, holder.path) from exc
        # The connection went with the supervisor before its answer came: it took
        # the request. Its lock tells when it is gone.
    who = f"pid {holder.pid}" if holder.pid else "the running supervisor"
    print(f"fireclaw-swarm: {who} is handing its VMs over; waiting for it", file=sys.stderr)
