"""The source version a run was launched from."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_state(where: Path) -> dict[str, str]:
    """Commit and dirty flag of the git checkout holding ``where``; empty outside a checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": str(dirty).lower()}
