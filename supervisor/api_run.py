"""The lines of a ``POST /run`` answer, made from the pool's run events (sans-I/O).

Each event of the run (``pool/runs.py``) becomes zero or one JSON line, in order::

    RunStarted(vm)              {"vm": "<name>"}
    RunOutput(stream, data)     {"stream": "stdout" | "stderr", "data": "<base64>"}
    RunExited(code, error)      {"stream": "stderr", "data": "<base64 of error + newline>"}
                                when the guest could not start the command (like a
                                shell: the reason on stderr, 126 or 127 as the status),
                                then the last line {"exit": code}
    RunFailed(reason)           the last line {"error": "<vm> was lost during the run: <reason>"}

The server (``api.py``) writes each line as it comes and ``last`` at the end.
"""

from __future__ import annotations

import base64

from fireclaw.pool.runs import RunEvent, RunExited, RunFailed, RunOutput, RunStarted
from fireclaw.supervisor.api_http import one_line


class RunLines:
    """Turns one run's events into its lines; ``last`` is set once the run is over."""

    def __init__(self) -> None:
        self.vm = ""
        #: The line that ends the answer: the exit code, or why the run failed.
        self.last: dict[str, object] | None = None

    def lines(self, event: RunEvent) -> list[dict[str, object]]:
        """The lines to write now for ``event``."""
        match event:
            case RunStarted(vm=vm):
                self.vm = vm
                return [{"vm": vm}]
            case RunOutput(stream=stream, data=data):
                return [_output(stream, data)]
            case RunExited(code=code, error=error):
                self.last = {"exit": code}
                return [_output("stderr", f"{error}\n".encode())] if error else []
            case RunFailed(reason=reason):
                self.last = {"error": one_line(f"{self.vm} was lost during the run: {reason}")}
                return []


def _output(stream: str, data: bytes) -> dict[str, object]:
    return {"stream": stream, "data": base64.b64encode(data).decode("ascii")}
