"""A FAKE claude-code, for end-to-end tests of questions on IRC: a test double.

Installed under the real CLI's name (``claude``) in a folder on the swarm's
PATH, with the paths below filled in (``install``). Each run notes its argv in
the log, one JSON line, then replays a stream the real CLI writes
(tests/data/cli_streams/claude-code/): a run started afresh, the one that stops
at its turn limit after a permission was denied (written from claude-code's
docs: ``doc-max-turns-denied.jsonl``); a run started with ``--resume ID``, the
captured answer of a resumed session (``spec-resume.jsonl``) with its session
id made the one it was given, as the real CLI keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

STREAMS: Final = Path(__file__).parent / "data" / "cli_streams" / "claude-code"
ASKS: Final = STREAMS / "doc-max-turns-denied.jsonl"
RESUMED: Final = STREAMS / "spec-resume.jsonl"
#: The session id in ``spec-resume.jsonl``, replaced by the one resumed.
RECORDED_SESSION: Final = "b4fa4049-adf6-4329-a56d-4be0153ba777"

PROGRAM: Final = """\
#!{python}
# A FAKE claude-code (tests/fake_claude_code.py): notes its argv, replays a recorded stream.
import json, sys
argv = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(argv) + "\\n")
if "--resume" in argv:
    session = argv[argv.index("--resume") + 1]
    text = open({resumed!r}, encoding="utf-8").read().replace({recorded!r}, session)
else:
    text = open({asks!r}, encoding="utf-8").read()
sys.stdout.write(text)
"""


def install(folder: Path, python: str) -> Path:
    """Write the fake as ``folder/claude`` with copies of its streams (the agent
    user may not read the repository), and an empty log anyone may append to;
    returns the log."""
    log = folder / "claude-runs.jsonl"
    log.touch()
    log.chmod(0o666)
    asks, resumed = folder / ASKS.name, folder / RESUMED.name
    for source, copy in ((ASKS, asks), (RESUMED, resumed)):
        copy.write_bytes(source.read_bytes())
        copy.chmod(0o644)
    program = folder / "claude"
    program.write_text(
        PROGRAM.format(
            python=python,
            log=str(log),
            resumed=str(resumed),
            asks=str(asks),
            recorded=RECORDED_SESSION,
        )
    )
    program.chmod(0o755)
    return log


def runs(log: Path) -> list[list[str]]:
    """The argv of each run so far."""
    return [json.loads(line) for line in log.read_text().splitlines()]
