"""A spec-checking stand-in for Firecracker's API, for the firecracker driver's contract tests.

``SpecChecker`` loads Firecracker's OpenAPI 2 document
(../shared/reference/firecracker-api-v1.16.1.yaml, beside the repository) and
judges each request as the real API server would: the method and path must be
an operation of the spec, the body must match that operation's schema (a
small JSON-schema check of the spec's definitions: required fields, types,
enums, minimum/maximum, and no field the definition does not declare unless
it says ``additionalProperties: true``: Firecracker's parser refuses unknown
fields), and the call must come in an order Firecracker takes (snapshot/load
only on a fresh process, pre-boot calls only before InstanceStart, which comes
once and after a boot source, snapshot/create only while paused, ...). It
answers as the spec says: 204, 200 with a body for GETs, or 400 with a
``fault_message``. Its order rules are written here from the spec's own words,
apart from the driver's table in pool/drivers/firecracker_api.py, so that the
one checks the other.

File paths in bodies are resolved against ``root`` (the jail's root, where a
real Firecracker would be chrooted) and must exist; a snapshot it is asked to
create is written there, recording the interfaces the VM had and the disk
paths its drives were given, so that a load can check its
``network_overrides`` against the one, and find each disk at the same path
in its own root (as Firecracker reopens them: a snapshot cannot rename a
disk) by the other.

``serve(sock_path, checker, log)`` runs it on a unix socket (http.server in
this thread) and appends each exchange to ``log`` as one JSON line.
"""

from __future__ import annotations

import json
import re
import socketserver
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import yaml

SPEC_PATH = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "firecracker-api-v1.16.1.yaml"
)

#: Calls Firecracker takes only before the guest starts (the spec's "Pre-boot only").
PRE_BOOT = {
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/entropy"),
    ("PUT", "/mmds/config"),
    ("PUT", "/vsock"),
    ("PUT", "/cpu-config"),
    ("PUT", "/serial"),
    ("PUT", "/balloon"),
    ("PUT", "/pmem/{id}"),
}
#: What snapshot/load still accepts having been configured before it.
BEFORE_LOAD_OK = {("PUT", "/logger"), ("PUT", "/metrics")}
_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "number": (int, float),
}


class Violation(Exception):
    """The request breaks the spec; the message is the fault_message."""


@dataclass
class Exchange:
    method: str
    path: str
    body: Any
    status: int
    fault: str = ""


@dataclass
class VmModel:
    """What the checker knows of the VM, to judge the order of calls."""

    state: str = "Not started"  # InstanceInfo.state
    configured: list[str] = field(default_factory=list)
    loaded: bool = False
    boot_source: bool = False
    ifaces: list[str] = field(default_factory=list)
    mmds: Any = None
    #: drive id -> path_on_host, as configured (or as the loaded snapshot had them).
    drives: dict[str, str] = field(default_factory=dict)


def load_spec(path: Path = SPEC_PATH) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        spec: dict[str, Any] = yaml.safe_load(f)
    return spec


class SpecChecker:
    def __init__(self, spec: dict[str, Any], root: Path | None = None) -> None:
        self.spec = spec
        self.root = root
        self.vm = VmModel()
        self.exchanges: list[Exchange] = []
        self._routes = [
            (re.compile("^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(p)) + "$"), p)
            for p in spec["paths"]
        ]

    # --- schema ------------------------------------------------------------------------

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            name = schema["$ref"].removeprefix("#/definitions/")
            schema = self.spec["definitions"][name]
        return schema

    def check_value(self, schema: dict[str, Any], value: Any, where: str) -> None:
        """Raise Violation where ``value`` does not match ``schema``."""
        schema = self.resolve(schema)
        kind = schema.get("type")
        if kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                raise Violation(f"{where}: expected an integer, got {json.dumps(value)}")
        elif kind is not None:
            expected = _TYPES[kind]
            if not isinstance(value, expected) or (kind == "number" and isinstance(value, bool)):
                raise Violation(f"{where}: expected {kind}, got {json.dumps(value)}")
        if "enum" in schema and value not in schema["enum"]:
            raise Violation(f"{where}: {json.dumps(value)} is not one of {schema['enum']}")
        if "minimum" in schema and value < schema["minimum"]:
            raise Violation(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise Violation(f"{where}: {value} is above the maximum {schema['maximum']}")
        if kind == "array":
            for n, item in enumerate(value):
                self.check_value(schema.get("items", {}), item, f"{where}[{n}]")
        if kind == "object":
            props: dict[str, Any] = schema.get("properties", {})
            for name in schema.get("required", []):
                if name not in value:
                    raise Violation(f"{where}: missing required field {name!r}")
            if schema.get("additionalProperties") is not True:
                unknown = sorted(set(value) - set(props))
                if unknown:
                    raise Violation(f"{where}: unknown field {unknown[0]!r}")
            for name, item in value.items():
                if name in props:
                    self.check_value(props[name], item, f"{where}.{name}")

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any], dict[str, str]]:
        for pattern, template in self._routes:
            found = pattern.match(path)
            if found is not None:
                operations = self.spec["paths"][template]
                if method.lower() not in operations:
                    raise Violation(f"invalid request method {method} for {template}")
                return template, operations[method.lower()], found.groupdict()
        raise Violation(f"invalid path {path}")

    def check_request(self, method: str, path: str, raw: bytes) -> tuple[str, Any]:
        """The template and the decoded body of a request the spec allows; else Violation."""
        template, op, params = self.operation(method, path)
        body_param = next((p for p in op.get("parameters", []) if p["in"] == "body"), None)
        if not raw:
            if body_param is not None and body_param.get("required"):
                raise Violation(f"{method} {template}: a body is required")
            return template, None
        if body_param is None:
            raise Violation(f"{method} {template}: takes no body")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise Violation(f"{method} {template}: body is not JSON: {exc}") from None
        self.check_value(body_param["schema"], body, "body")
        for name, value in params.items():  # Firecracker: the path's id is the body's id
            if name in body and body[name] != value:
                raise Violation(f"the id from the path ({value}) does not match the body's")
        return template, body

    # --- order -------------------------------------------------------------------------

    def check_order(self, method: str, template: str, body: Any) -> None:
        vm = self.vm
        call = (method, template)
        if call in PRE_BOOT and (vm.state != "Not started" or vm.loaded):
            raise Violation(f"{method} {template} is pre-boot only; the VM is {vm.state}")
        if template == "/snapshot/load":
            if vm.state != "Not started" or vm.loaded:
                raise Violation("snapshot/load is only accepted on a fresh Firecracker process")
            if any(c not in BEFORE_LOAD_OK for c in map(tuple, vm.configured)):
                raise Violation("snapshot/load after configuring resources")
            if ("mem_file_path" in body) == ("mem_backend" in body):
                raise Violation("exactly one of mem_file_path and mem_backend must be given")
        if template == "/actions" and body["action_type"] == "InstanceStart":
            if vm.state != "Not started" or vm.loaded:
                raise Violation("InstanceStart: the microVM is already running")
            if not vm.boot_source:
                raise Violation("InstanceStart: no boot source configured")
        if template == "/actions" and body["action_type"] == "SendCtrlAltDel":
            if vm.state != "Running":
                raise Violation("SendCtrlAltDel: the microVM is not running")
        if template == "/vm":
            want = {"Paused": "Running", "Resumed": "Paused"}[body["state"]]
            if vm.state != want:
                raise Violation(f"cannot set the VM {body['state']} when it is {vm.state}")
        if template == "/snapshot/create" and vm.state != "Paused":
            raise Violation("snapshot/create: the microVM must be paused")
        if template == "/mmds/config":
            missing = [i for i in body["network_interfaces"] if i not in vm.ifaces]
            if missing:
                raise Violation(f"mmds/config: no network interface {missing[0]!r}")

    def check_files(self, template: str, body: Any) -> None:
        if self.root is None or body is None:
            return
        keys = {
            "/boot-source": ("kernel_image_path", "initrd_path"),
            "/drives/{drive_id}": ("path_on_host",),
            "/snapshot/load": ("snapshot_path", "mem_file_path"),
        }.get(template, ())
        paths = [body[k] for k in keys if k in body]
        if template == "/snapshot/load" and "mem_backend" in body:
            paths.append(body["mem_backend"]["backend_path"])
        if template == "/snapshot/create":
            paths = [str(Path(body[k]).parent) for k in ("snapshot_path", "mem_file_path")]
        for path in paths:
            if not (self.root / path.lstrip("/")).exists():
                raise Violation(f"{path}: no such file or directory (in the jail)")

    def apply(self, method: str, template: str, body: Any) -> None:
        vm = self.vm
        if (method, template) in PRE_BOOT or (template == "/mmds" and vm.state == "Not started"):
            vm.configured.append([method, template])
        if template == "/boot-source":
            vm.boot_source = True
        if template == "/network-interfaces/{iface_id}" and body["iface_id"] not in vm.ifaces:
            vm.ifaces.append(body["iface_id"])
        if template == "/drives/{drive_id}" and "path_on_host" in body:
            vm.drives[body["drive_id"]] = body["path_on_host"]
        if template == "/mmds":
            vm.mmds = body
        if template == "/actions" and body["action_type"] == "InstanceStart":
            vm.state = "Running"
        if template == "/vm":
            vm.state = "Paused" if body["state"] == "Paused" else "Running"
        if template == "/snapshot/create" and self.root is not None:
            state = {"ifaces": vm.ifaces, "drives": vm.drives}
            (self.root / body["snapshot_path"]).write_text(json.dumps(state))
            (self.root / body["mem_file_path"]).write_bytes(b"\0" * 4096)
        if template == "/snapshot/load":
            if self.root is not None:
                vm.drives = json.loads((self.root / body["snapshot_path"]).read_text())["drives"]
            vm.loaded = True
            vm.state = "Running" if body.get("resume_vm") else "Paused"

    def check_overrides(self, body: Any) -> None:
        if self.root is None:
            return
        saved = json.loads((self.root / body["snapshot_path"]).read_text())
        for override in body.get("network_overrides", []):
            if override["iface_id"] not in saved["ifaces"]:
                raise Violation(f"network_overrides: the snapshot has no {override['iface_id']}")
        for drive, path in saved.get("drives", {}).items():
            if not (self.root / path.lstrip("/")).is_file():
                raise Violation(f"snapshot/load: drive {drive}: {path}: no such file (in the jail)")

    # --- answers -----------------------------------------------------------------------

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, bytes]:
        """Judge one request; (status, body) as Firecracker answers it."""
        body: Any = None
        try:
            template, body = self.check_request(method, path, raw)
            if method == "GET":
                status, answer = 200, self.get(template)
            else:
                self.check_order(method, template, body)
                self.check_files(template, body)
                if template == "/snapshot/load":
                    self.check_overrides(body)
                self.apply(method, template, body)
                status, answer = 204, b""
        except Violation as exc:
            fault = str(exc)
            self.exchanges.append(Exchange(method, path, body, 400, fault))
            return 400, json.dumps({"fault_message": fault}).encode()
        self.exchanges.append(Exchange(method, path, body, status))
        return status, answer

    def get(self, template: str) -> bytes:
        if template == "/":
            info = {"id": "fake", "state": self.vm.state, "vmm_version": "1.16.1"}
            info["app_name"] = "Firecracker (spec-checking fake)"
            self.check_value({"$ref": "#/definitions/InstanceInfo"}, info, "answer")
            return json.dumps(info).encode()
        if template == "/version":
            return json.dumps({"firecracker_version": "1.16.1"}).encode()
        raise Violation(f"GET {template} is not served by this checker")


class _Server(socketserver.UnixStreamServer):
    checker: SpecChecker
    log: Path
    on_exchange: Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, answer = self.server.checker.handle(self.command, self.path, raw)
        exchange = self.server.checker.exchanges[-1]
        with open(self.server.log, "a", encoding="utf-8") as log:
            log.write(json.dumps(asdict(exchange)) + "\n")
        try:
            self.send_response(status)
            if answer:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            if answer:
                self.wfile.write(answer)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client went away once it had its answer
        self.server.on_exchange(exchange)

    do_GET = do_PUT = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # every exchange is in the log file


def serve(sock_path: Path, checker: SpecChecker, log: Path, on_exchange: Any) -> None:
    """Serve ``checker`` on ``sock_path`` until the process ends."""
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    server = _Server(str(sock_path), _Handler)
    server.checker, server.log, server.on_exchange = checker, log, on_exchange
    server.serve_forever()


def read_log(log: Path) -> list[Exchange]:
    if not log.exists():
        return []
    return [Exchange(**json.loads(line)) for line in log.read_text().splitlines()]
