"""Read ``swarm.yaml`` and the role templates it names into a ``Config``.

A role in ``swarm.yaml`` names a template (``roles/<template>.yaml``, by
default the role's own name) and may override any template field. Overrides of
``resources``, ``restart`` (and ``restart.backoff``) and ``pool`` merge field by
field over the template; every other field replaces the template's value. The
template is validated on its own first, so an error in the merged role is the
override's fault and is reported against ``swarm.yaml``.

``irc.restart`` merges the same way over the IRC server's own default policy
(``IRC_RESTART``: a shorter backoff than a role's); ``models.managed.restart``
over ``MODEL_SERVER_RESTART``. ``models.api_key_file`` and
``models.managed.model`` are paths relative to swarm.yaml; ``budget.roles``
names roles of the file.

Exceptions::

    ConfigError     anything wrong with swarm.yaml or a template: unreadable,
                    not YAML, not a mapping, a field missing, unknown, out of
                    range or inconsistent, an unknown template. str() is one
                    line: "<file>: <field.path>: <what>" (errors.py words it).

A program that gives up because of a ConfigError exits with ``EX_CONFIG``
(guest_daemon/exits.py, also ``fireclaw.config.EX_CONFIG``).
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib
import re
from collections.abc import Mapping
from importlib.resources.abc import Traversable
from typing import Annotated, Any, Final, Literal

import msgspec
import yaml
from fireclaw.config.cli_harness import CliHarnessBase
from fireclaw.config.cluster import ClusterSpec
from fireclaw.config.common import POLICY_ALIASES, ROLE_NAME_PATTERN, NonEmptyStr
from fireclaw.config.errors import ConfigError, convert, show
from fireclaw.config.http import HttpSpec
from fireclaw.config.irc import IRC_RESTART, IrcSpec
from fireclaw.config.llm import MODEL_SERVER_RESTART, BudgetSpec, ModelsSpec
from fireclaw.config.model import Backend, Config, ControlSpec, NetworkSpec, Role, StopSpec
from fireclaw.guest_daemon.clis import SPECS
from msgspec import Meta

try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

__all__ = ["ConfigError", "load_config", "parse_config"]

# Far above any real config; keeps a wrong path (a log, an image) from being slurped.
MAX_FILE_BYTES: Final = 1 << 20

_ROLE_NAME_RE: Final = re.compile(ROLE_NAME_PATTERN)
_PACKAGED_TEMPLATES: Final = "fireclaw.roles"


# Which overrides merge into the template's value instead of replacing it.
_MergeSpec = Mapping[str, "_MergeSpec"]
_MERGED: Final[_MergeSpec] = {"resources": {}, "restart": {"backoff": {}}, "pool": {}}


class _SwarmFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """swarm.yaml as written. Role entries stay raw until merged with their template."""

    version: Literal[1]
    backend: Backend = "auto"
    state_dir: NonEmptyStr = "state"
    roles_dir: NonEmptyStr | None = None
    control: ControlSpec = msgspec.field(default_factory=ControlSpec)
    stop: StopSpec = msgspec.field(default_factory=StopSpec)
    task_max_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    irc: IrcSpec = msgspec.field(default_factory=IrcSpec)
    network: NetworkSpec = msgspec.field(default_factory=NetworkSpec)
    models: ModelsSpec | None = None
    budget: BudgetSpec = msgspec.field(default_factory=BudgetSpec)
    http: HttpSpec | None = None
    cluster: ClusterSpec | None = None
    roles: dict[str, Any]


class _Loader(_SafeLoader):
    """Safe YAML loader that rejects a key given twice in one mapping.

    PyYAML keeps the last value silently, so a role listed twice would quietly
    lose its first entry.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the swarm file at ``path``; raise ConfigError if it is not usable.

    Blocking file I/O: from trio, call it through ``trio.to_thread.run_sync``.
    """
    shown = os.fspath(path)
    return parse_config(_read(pathlib.Path(shown), shown), path=pathlib.Path(shown))


def parse_config(text: str, *, path: str | os.PathLike[str]) -> Config:
    """Validate ``text`` as the swarm file at ``path``; raise ConfigError if it is not usable.

    ``path`` names the file in errors and anchors relative paths (``state_dir``,
    ``roles_dir``, the default ``roles/`` folder). Templates are read from disk,
    so this blocks like ``load_config``.
    """
    shown = os.fspath(path)
    file = pathlib.Path(shown).resolve()
    raw = _parse_yaml(text, shown)
    _refuse_inline_secrets(raw, shown)
    _prepare_irc(raw)
    _prepare_models(raw)
    swarm = convert(raw, _SwarmFile, shown, "")
    base = file.parent
    templates = _TemplateDir(_templates_dir(swarm.roles_dir, base, shown))
    roles: dict[str, Role] = {}
    nick_owner: dict[str, str] = {}
    for name, entry in swarm.roles.items():
        role = _build_role(name, entry, templates, shown)
        other = nick_owner.setdefault(role.nick_pattern, name)
        if other != name:
            raise ConfigError(
                shown,
                f"roles.{name}.nick_pattern",
                f"{role.nick_pattern!r} is also the nick pattern of role {other!r}",
            )
        roles[name] = role
    for name in swarm.budget.roles:
        if name not in roles:
            raise ConfigError(
                shown, f"budget.roles.{name}", f"no role {name!r} (roles: {', '.join(roles)})"
            )
    models = swarm.models
    for name, role in roles.items():
        if role.harness.kind == "chat" and models is None:
            raise ConfigError(
                shown,
                f"roles.{name}.harness.kind",
                "chat asks a model: add a models: section (server: managed runs one here)",
            )
        if isinstance(role.harness, CliHarnessBase):
            _check_cli(role.harness, models is not None, shown, f"roles.{name}.harness")
            if role.harness.secrets_dir is not None:
                folder = (base / pathlib.Path(role.harness.secrets_dir).expanduser()).resolve()
                harness = msgspec.structs.replace(role.harness, secrets_dir=str(folder))
                roles[name] = msgspec.structs.replace(role, harness=harness)
            if role.harness.accounts:
                accounts = tuple(
                    msgspec.structs.replace(
                        a,
                        secrets_dir=str(
                            (base / pathlib.Path(a.secrets_dir).expanduser()).resolve()
                        ),
                    )
                    for a in role.harness.accounts
                )
                harness = msgspec.structs.replace(role.harness, accounts=accounts)
                roles[name] = msgspec.structs.replace(role, harness=harness)
    api_key_path = model_path = None
    if models is not None and models.api_key_file is not None:
        api_key_path = (base / pathlib.Path(models.api_key_file).expanduser()).resolve()
    if models is not None and models.managed.model is not None:
        model_path = (base / pathlib.Path(models.managed.model).expanduser()).resolve()
    return Config(
        path=file,
        state_dir=(base / pathlib.Path(swarm.state_dir).expanduser()).resolve(),
        backend=swarm.backend,
        control=swarm.control,
        stop=swarm.stop,
        task_max_attempts=swarm.task_max_attempts,
        irc=_anchor_irc(swarm.irc, base),
        network=swarm.network,
        roles=roles,
        models=models,
        budget=swarm.budget,
        http=_anchor_http(swarm.http, base),
        api_key_path=api_key_path,
        model_path=model_path,
        cluster=_anchor_cluster(swarm.cluster, base),
    )


def _check_cli(harness: CliHarnessBase, has_models: bool, shown: str, where: str) -> None:
    """A CLI harness the swarm can run: a model server for a CLI that goes through
    the gateway, its own key among ``secrets`` for one that cannot."""
    spec = SPECS[harness.kind]
    if spec.gateway is not None and not has_models:
        raise ConfigError(
            shown,
            f"{where}.kind",
            f"{harness.kind} asks a model through the VM's gateway: add a models: section"
            " (server: managed runs one here)",
        )
    if spec.gateway is None and spec.key_env and spec.key_env not in harness.secrets:
        raise ConfigError(
            shown,
            f"{where}.secrets",
            f"{harness.kind} cannot go through the VM's gateway and needs its own key:"
            f" name {spec.key_env} in secrets and put its file in secrets_dir",
        )


_INLINE_SECRET: Final = (
    "a secret is never written in swarm.yaml: put it in a file only its owner may read"
    " (chmod 600) and name it with password_file"
)


def _refuse_inline_secrets(raw: dict[str, Any], shown: str) -> None:
    """One clear line for a password written inline (``irc.password``,
    ``irc.sasl.password``, an operator's ``password``), saying what to use instead."""
    cluster = raw.get("cluster")
    if isinstance(cluster, dict) and "password" in cluster:
        raise ConfigError(shown, "cluster.password", f"{_INLINE_SECRET}, or set PGPASSFILE")
    link = cluster.get("irc") if isinstance(cluster, dict) else None
    peers = link.get("peers") if isinstance(link, dict) else None
    for n, peer in enumerate(peers if isinstance(peers, list) else ()):
        if isinstance(peer, dict) and "password" in peer:
            raise ConfigError(shown, f"cluster.irc.peers[{n}].password", _INLINE_SECRET)
    irc = raw.get("irc")
    if not isinstance(irc, dict):
        return
    if "password" in irc:
        raise ConfigError(
            shown, "irc.password", f"{_INLINE_SECRET}, or an env var with password_env"
        )
    sasl = irc.get("sasl")
    if isinstance(sasl, dict) and "password" in sasl:
        raise ConfigError(
            shown, "irc.sasl.password", f"{_INLINE_SECRET}, or an env var with password_env"
        )
    managed = irc.get("managed")
    operators = managed.get("operators") if isinstance(managed, dict) else None
    for n, op in enumerate(operators if isinstance(operators, list) else ()):
        if isinstance(op, dict) and "password" in op:
            raise ConfigError(shown, f"irc.managed.operators[{n}].password", _INLINE_SECRET)


def _anchor_irc(irc: IrcSpec, base: pathlib.Path) -> IrcSpec:
    """``irc`` with every ``password_file`` (the server's, SASL's, each managed
    operator's) made absolute, relative to ``base``, swarm.yaml's folder. The
    files are read when the supervisor starts, not here: a config names a
    secret, it never holds one."""

    def anchored(file: str | None) -> str | None:
        return None if file is None else str((base / pathlib.Path(file).expanduser()).resolve())

    managed = irc.managed
    operators = tuple(
        msgspec.structs.replace(op, password_file=anchored(op.password_file))
        for op in managed.operators
    )
    sasl = irc.sasl
    return msgspec.structs.replace(
        irc,
        password_file=anchored(irc.password_file),
        sasl=None
        if sasl is None
        else msgspec.structs.replace(sasl, password_file=anchored(sasl.password_file)),
        managed=msgspec.structs.replace(managed, operators=operators),
    )


def _anchor_cluster(cluster: ClusterSpec | None, base: pathlib.Path) -> ClusterSpec | None:
    """``cluster`` with ``password_file`` and each IRC peer's made absolute,
    relative to ``base``."""
    if cluster is None:
        return None

    def anchored(file: str) -> str:
        return str((base / pathlib.Path(file).expanduser()).resolve())

    link = cluster.irc
    if link is not None:
        peers = tuple(
            msgspec.structs.replace(peer, password_file=anchored(peer.password_file))
            for peer in link.peers
        )
        link = msgspec.structs.replace(link, peers=peers)
    password_file = None if cluster.password_file is None else anchored(cluster.password_file)
    return msgspec.structs.replace(cluster, password_file=password_file, irc=link)


def _anchor_http(http: HttpSpec | None, base: pathlib.Path) -> HttpSpec | None:
    """``http`` with each token ``file`` made absolute, relative to ``base``."""
    if http is None:
        return None
    tokens = tuple(
        msgspec.structs.replace(t, file=str((base / pathlib.Path(t.file).expanduser()).resolve()))
        for t in http.tokens
    )
    return msgspec.structs.replace(http, tokens=tokens)


def _templates_dir(roles_dir: str | None, base: pathlib.Path, shown: str) -> Traversable:
    if roles_dir is not None:
        found = (base / pathlib.Path(roles_dir).expanduser()).resolve()
        if not found.is_dir():
            raise ConfigError(shown, "roles_dir", f"no such directory: {found}")
        return found
    beside = base / "roles"
    if beside.is_dir():
        return beside
    return importlib.resources.files(_PACKAGED_TEMPLATES)


class _TemplateDir:
    """Role templates from one directory, each read and validated once per load."""

    def __init__(self, root: Traversable) -> None:
        self.root = root
        self._raw: dict[str, dict[str, Any]] = {}

    def get(self, name: str, *, shown: str, field: str) -> dict[str, Any]:
        """The validated raw mapping of template ``name``; errors blame ``shown``:``field``."""
        if name in self._raw:
            return self._raw[name]
        file = self.root.joinpath(f"{name}.yaml")
        if not file.is_file():
            raise ConfigError(shown, field, f"no template {name!r} in {self.root}")
        file_shown = str(file)
        raw = _parse_yaml(_read(file, file_shown), file_shown)
        _normalise_policy(raw)
        _default_harness_kind(raw)
        template = convert(raw, Role, file_shown, "")
        if template.name != name:
            raise ConfigError(
                file_shown, "name", f"expected {name!r} (the file's name), got {template.name!r}"
            )
        self._raw[name] = raw
        return raw


def _build_role(name: object, entry: object, templates: _TemplateDir, shown: str) -> Role:
    if not isinstance(name, str) or not _ROLE_NAME_RE.match(name):
        raise ConfigError(shown, "roles", f"role name {name!r} must match {ROLE_NAME_PATTERN}")
    where = f"roles.{name}"
    if entry is None:  # `worker:` with nothing under it: the template as is
        entry = {}
    if not isinstance(entry, dict):
        raise ConfigError(shown, where, f"expected mapping, got {show(entry)}")
    overrides = dict(entry)
    if "name" in overrides:
        raise ConfigError(shown, f"{where}.name", "a role's name is its key under roles")
    template = overrides.pop("template", name)
    if not isinstance(template, str) or not _ROLE_NAME_RE.match(template):
        raise ConfigError(
            shown, f"{where}.template", f"expected a name matching {ROLE_NAME_PATTERN}"
        )
    raw = templates.get(template, shown=shown, field=f"{where}.template")
    _normalise_policy(overrides)
    merged = _merge(raw, overrides, _MERGED)
    _default_harness_kind(merged)
    merged["name"] = name
    if isinstance(merged.get("nick_pattern"), str):
        merged["nick_pattern"] = merged["nick_pattern"].replace("{role}", name)
    return convert(merged, Role, shown, where)


def _merge(base: dict[str, Any], over: dict[str, Any], spec: _MergeSpec) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        nested = spec.get(key)
        current = out.get(key)
        if nested is not None and isinstance(value, dict) and isinstance(current, dict):
            out[key] = _merge(current, value, nested)
        else:
            out[key] = value
    return out


def _normalise_policy(raw: dict[str, Any]) -> None:
    """Rewrite a systemd-style restart policy to its OTP name, in place."""
    restart = raw.get("restart")
    if not isinstance(restart, dict) or "policy" not in restart:
        return
    policy = restart["policy"]
    if policy is False:  # YAML 1.1 reads a bare `no` as false
        policy = "no"
    if isinstance(policy, str):
        policy = POLICY_ALIASES.get(policy, policy)
    raw["restart"] = {**restart, "policy": policy}


def _default_harness_kind(raw: dict[str, Any]) -> None:
    """A ``harness`` mapping without ``kind`` is a ``command`` harness (as before
    there were kinds); set it in place so the tagged union can tell."""
    harness = raw.get("harness")
    if isinstance(harness, dict) and "kind" not in harness:
        raw["harness"] = {"kind": "command", **harness}


def _prepare_irc(raw: dict[str, Any]) -> None:
    """Normalise ``irc.restart`` in place: policy aliases, and fields not given taken
    from the IRC server's own defaults (a shorter backoff than a role's)."""
    irc = raw.get("irc")
    if not isinstance(irc, dict) or not isinstance(irc.get("restart"), dict):
        return
    irc = dict(irc)
    _normalise_policy(irc)
    irc["restart"] = _merge(msgspec.to_builtins(IRC_RESTART), irc["restart"], _MERGED["restart"])
    raw["irc"] = irc


def _prepare_models(raw: dict[str, Any]) -> None:
    """Normalise ``models.managed.restart`` in place, as ``_prepare_irc`` does."""
    models = raw.get("models")
    if not isinstance(models, dict) or not isinstance(models.get("managed"), dict):
        return
    managed = dict(models["managed"])
    if not isinstance(managed.get("restart"), dict):
        return
    _normalise_policy(managed)
    managed["restart"] = _merge(
        msgspec.to_builtins(MODEL_SERVER_RESTART), managed["restart"], _MERGED["restart"]
    )
    raw["models"] = {**models, "managed": managed}


def _read(file: Traversable, shown: str) -> str:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(shown, None, f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(shown, None, f"larger than {MAX_FILE_BYTES} bytes; not a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(shown, None, f"not UTF-8 text (bad byte at offset {exc.start})") from exc


def _parse_yaml(text: str, shown: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only
    except yaml.MarkedYAMLError as exc:
        what = " ".join(p for p in (exc.problem, f"({exc.context})" if exc.context else "") if p)
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise ConfigError(
            shown, None, f"invalid YAML: {what or exc}", line=line, column=column
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(shown, None, f"invalid YAML: {exc}") from exc
    if data is None:
        raise ConfigError(shown, None, "empty document; expected a mapping")
    if not isinstance(data, dict):
        raise ConfigError(shown, None, f"expected a mapping at the top level, got {show(data)}")
    return data
