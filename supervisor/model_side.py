"""The supervisor's model side: the managed model server, or an upstream URL
and its key (read from a file or the environment, never from swarm.yaml), the
budgets, and the route every VM's model gateway takes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
from fireclaw.config import Config
from fireclaw.config.llm import parse_base_url
from fireclaw.pool.gateway import UpstreamError, fetch_models
from fireclaw.pool.gateway_core import Limits, ModelRoute, Upstream
from fireclaw.pool.group import RoleGroup
from fireclaw.pool.runtime import Runtime
from fireclaw.supervisor.budget import Budgets
from fireclaw.supervisor.modelserver import ManagedModelServer, ModelServerError
from fireclaw.supervisor.state import Store

log = logging.getLogger("fireclaw.supervisor")

#: Seconds the model server has to list its models at start, reload or invoke.
MODELS_TIMEOUT: Final = 30.0


class ModelSide:
    """The model side of ``Supervisor`` (``daemon.py``). What it reads and sets
    is the supervisor's; the declarations below name it for the type checker."""

    config: Config
    state_dir: Path
    store: Store
    rt: Runtime
    budgets: Budgets
    modelserver: ManagedModelServer | None
    _upstream: Upstream | None
    groups: dict[str, RoleGroup]

    if TYPE_CHECKING:

        def _on_event(self, kind: str, subject: str, detail: dict[str, object]) -> None: ...

    async def _start_models(self, root: trio.Nursery) -> None:
        """Bring up the model side: the managed model server (or the upstream URL and
        its key), the budgets, and the route every VM's gateway takes. Raises
        ModelServerError (one line) when it cannot start or a role names a model
        the server does not serve."""
        spec = self.config.models
        if spec is None:
            return
        if spec.is_managed:
            self.modelserver = ManagedModelServer(
                spec.managed,
                self.config.model_path,
                self.state_dir,
                on_event=self._on_event,
                registry=self.store,
            )
            await root.start(self.modelserver.run)
        else:
            scheme, host, port, prefix = parse_base_url(spec.server)
            key = await trio.to_thread.run_sync(self._read_api_key)
            self._upstream = Upstream(scheme, host, port, prefix, api_key=key)
        problem = await self.check_models(self.config)
        if problem is not None:
            raise ModelServerError(problem)
        root.start_soon(self.budgets.run)
        self.rt.models = ModelRoute(
            upstream=self.upstream,
            meter=self.budgets,
            limits=Limits(
                max_request_bytes=spec.max_request_bytes,
                max_concurrent=spec.max_concurrent,
                call_timeout=spec.call_timeout,
            ),
            on_refused=self._account_refused,
        )

    def _account_refused(self, role: str, account: str, retry_after: float | None) -> None:
        """A gateway's upstream answered 429 to ``role``'s ``account``: it rests."""
        group = self.groups.get(role)
        if group is not None:
            group.account_refused(account, retry_after=retry_after, kind="rate_limit")

    def _read_api_key(self) -> str | None:
        """The upstream's API key, from the file or the environment variable the config
        names. Raises ModelServerError (naming the file or variable, never the key)."""
        spec, path = self.config.models, self.config.api_key_path
        assert spec is not None
        if path is not None:
            try:
                key = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelServerError(f"models.api_key_file: cannot read {path}: {exc}") from None
            if not key or any(ch in key for ch in "\r\n\x00"):
                raise ModelServerError(f"models.api_key_file: {path} holds no usable key")
            return key
        if spec.api_key_env is not None:
            key = os.environ.get(spec.api_key_env, "").strip()
            if not key:
                raise ModelServerError(f"models.api_key_env: ${spec.api_key_env} is not set")
            return key
        return None

    def upstream(self) -> Upstream | None:
        """Where model calls go now; None while the managed server is not serving."""
        if self.modelserver is None:
            return self._upstream
        url = self.modelserver.url
        if url is None or self.modelserver.state != "running":
            return None
        scheme, host, port, prefix = parse_base_url(url)
        return Upstream(scheme, host, port, prefix)

    async def check_models(self, config: Config, extra: str | None = None) -> str | None:
        """One line naming a role's model (or ``extra``) the model server does not
        serve, or the server's failure to say; None when all are served."""
        if config.models is None:
            return None
        up = self.upstream()
        if up is None:
            return "the model server is not running"
        served: list[str] | None = None
        with trio.move_on_after(MODELS_TIMEOUT):
            try:
                served = await fetch_models(up)
            except UpstreamError as exc:
                return str(exc)
        if served is None:
            return f"the model server did not list its models within {MODELS_TIMEOUT:g}s"
        wanted = [(f"roles.{r.name}.model", r.model) for r in config.roles.values()]
        if extra is not None:
            wanted.append(("model", extra))
        for where, model in wanted:
            if model not in served:
                return (
                    f"{where}: {model!r} is not a model the model server serves"
                    f" (it serves: {', '.join(served) or 'none'})"
                )
        return None
