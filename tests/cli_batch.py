"""Run many ``metalab-train`` command lines in one process, each as the console entry point runs it.

``python -m tests.cli_batch`` reads ``[{"args": [...], "cwd": "..."}, ...]`` (JSON) on stdin and prints, per command,
its exit status and everything written to file descriptors 1 and 2 (redirected at the descriptor level, so
warnings, logging and C extensions are caught too). tests/test_cli.py's bad-input cases run here: one start-up (~10 s
of imports) for the ~45 cases instead of one each, while a few of them still run as their own processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def captured(descriptor: int) -> Iterator[tempfile.SpooledTemporaryFile]:
    """Everything written to ``descriptor`` (1 or 2) inside, in a temporary file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(descriptor)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), descriptor)
        try:
            yield sink
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved, descriptor)
            os.close(saved)


def run(args: list[str], cwd: str) -> dict[str, object]:
    """Exit status, stdout and stderr of ``metalab-train ARGS`` in ``cwd``, run in this process."""
    from metalab.train import cli

    sys.argv, status = ["metalab-train", *args], 0
    os.chdir(cwd)
    with captured(1) as out, captured(2) as err:
        try:
            cli()
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        out.seek(0)
        err.seek(0)
        return {"status": status, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


def main() -> None:
    commands = json.load(sys.stdin)
    results = [run(command["args"], command["cwd"]) for command in commands]
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
