"""Record one run of a coding-agent CLI exactly as its spec starts it.

    python tests/data/cli_streams/record.py CLI URL MODEL WORKSPACE OUT PROMPT [SESSION]

Builds ``SPECS[CLI].invocation(PROMPT, workspace=WORKSPACE, model=MODEL,
gateway=URL, session=SESSION)``, writes its files, makes its state dirs,
runs its argv in WORKSPACE with stdin from /dev/null and only ``PATH``,
``LANG`` and the spec's environment, saves stdout to OUT (stderr to
OUT.err), and prints the exit code, the time taken and the events the spec
reads from OUT. The CLI must be on ``PATH``; URL is any server speaking the
spec's wire API (the swarm's gateway, or the managed model server itself:
``python -m fireclaw.supervisor.modelserver --port 18431``). An empty
SESSION resumes a CLI that finds its session by itself (aider).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from fireclaw.guest_daemon.clis import SPECS

#: Seconds a run may take (a loaded 2-core machine reads prompts at ~20 tokens/s).
RUN_TIMEOUT = 900


def main(argv: list[str]) -> int:
    if len(argv) not in (6, 7):
        print(__doc__, file=sys.stderr)
        return 2
    cli, url, model, workspace, out, prompt = argv[:6]
    session = argv[6] if len(argv) == 7 else None
    spec = SPECS[cli]
    run = spec.invocation(prompt, workspace=workspace, model=model, session=session, gateway=url)
    for path in spec.state_env(workspace).values():
        os.makedirs(path, exist_ok=True)
    for path, body in run.files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as file:
            file.write(body)
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **run.env}
    print("argv:", run.argv, file=sys.stderr)
    start = time.monotonic()
    with open(out, "wb") as stdout, open(out + ".err", "wb") as stderr:
        try:
            code: object = subprocess.run(
                run.argv,
                cwd=workspace,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                timeout=RUN_TIMEOUT,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            code = f"killed after {RUN_TIMEOUT} s"
    print(f"exit {code} after {time.monotonic() - start:.0f} s", file=sys.stderr)
    parser = spec.parser()
    with open(out, "rb") as recorded:
        for event in parser.feed(recorded.read()) + parser.close():
            print(repr(event))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
