"""Record the HTTP requests a coding-agent CLI sends to its model endpoint.

    python tests/data/cli_requests/capture.py LISTEN_PORT UPSTREAM_PORT OUT_DIR

Listens on 127.0.0.1:LISTEN_PORT and passes every request on to the model
server at 127.0.0.1:UPSTREAM_PORT, and its answer back as it arrives. Each
request is written to OUT_DIR as ``NN-METHOD-path.json``: the method, the
target, the headers (the values of ``authorization`` and ``x-api-key``
replaced by ``<redacted>``) and the body, byte for byte, as a string. The
upstream's answer goes to ``NN-...answer`` beside it. Plain standard
library, so it runs with any python3.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import json
import sys
import threading
from pathlib import Path

SECRET_HEADERS = {"authorization", "x-api-key"}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    listen, upstream, out = int(argv[0]), int(argv[1]), Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    numbers = itertools.count(1)
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _pass(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with lock:
                number = next(numbers)
            slug = self.path.split("?", 1)[0].strip("/").replace("/", "_") or "root"
            name = f"{number:02d}-{self.command}-{slug}"
            headers = [
                [k, "<redacted>" if k.lower() in SECRET_HEADERS else v]
                for k, v in self.headers.items()
            ]
            record = {
                "method": self.command,
                "target": self.path,
                "headers": headers,
                "body": body.decode("utf-8"),
            }
            (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
            up = http.client.HTTPConnection("127.0.0.1", upstream, timeout=3600)
            sent = {k: v for k, v in self.headers.items() if k.lower() not in ("host",)}
            up.request(self.command, self.path, body=body or None, headers=sent)
            answer = up.getresponse()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(key, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            with open(out / f"{name}.answer", "wb") as kept:
                while chunk := answer.read1(65536):
                    kept.write(chunk)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            up.close()
            self.close_connection = True

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", listen), Handler)
    print("listening", listen, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
