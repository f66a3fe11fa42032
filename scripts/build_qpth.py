"""Build a wheel of qpth 0.0.18 (Amos & Kolter's differentiable batched QP solver) from its PyPI sdist, once, into a
cache folder, without its numpy < 2 and cvxpy requirements.

Why: MetaOptNet's SVM head (Lee et al. 2019; ``metalab.algorithms.MetaOptNet``) solves its dual QP with qpth's
primal-dual interior-point solver, which is pure PyTorch. But qpth's metadata pins ``numpy>=1,<2`` (metalab runs on
numpy 2, which pandas and MLflow need) and requires ``cvxpy``, and ``import qpth`` imports its cvxpy solver eagerly
(``qpth/solvers/__init__.py``: ``from . import cvxpy``), although only ``QPFunction(solver=QPSolvers.CVXPY)`` uses
it. We verify the sdist's sha256, drop those two requirements from ``setup.py`` and that one import, and build a
wheel with ``pip wheel --no-build-isolation`` (the pinned setuptools of this venv). metalab uses the default solver
(``QPSolvers.PDIPM_BATCHED``); the CVXPY one is left unusable.

Usage: python scripts/build_qpth.py CACHE_DIR   (prints the wheel's path)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.0.18"
SDIST = f"qpth-{VERSION}.tar.gz"
SDIST_SHA256 = "ade478c6bf5ab60b7f86435c8893812c2c5938083fe8bccd775bb23d613fa3c5"
SDIST_BYTES = 16_082
# (file in the sdist, text to remove): the numpy < 2 and cvxpy requirements, and the eager cvxpy import.
PATCHES = (("setup.py", "'numpy>=1,<2',"), ("setup.py", "'cvxpy>=1.1.0'"),
           ("qpth/solvers/__init__.py", "from . import cvxpy"))


def fail(message: str) -> None:
    print(f"build_qpth: {message}", file=sys.stderr)
    raise SystemExit(1)


def verify_sdist(path: Path) -> None:
    """Refuse to build anything but the exact sdist we reviewed."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != SDIST_BYTES or digest != SDIST_SHA256:
        fail(f"{path.name} does not match the pinned release (sha256 {digest}, {len(data)} bytes; "
             f"expected {SDIST_SHA256}, {SDIST_BYTES} bytes). Delete it and run `make setup` again.")


def download_sdist(cache: Path) -> Path:
    target = cache / SDIST
    if not target.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"qpth=={VERSION}", "--dest", str(cache)], check=True)
    verify_sdist(target)
    return target


def patch_source(source: Path) -> None:
    """Remove each of :data:`PATCHES` from the unpacked sdist, refusing a source that no longer has them."""
    for name, removed in PATCHES:
        path = source / name
        text = path.read_text()
        if removed not in text:
            fail(f"{name} no longer contains {removed!r} as expected; the sdist has changed.")
        path.write_text(text.replace(removed, ""))


def build_wheel(sdist: Path, cache: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="qpth-build-") as tmp:
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = Path(tmp) / f"qpth-{VERSION}"
        for stale in source.glob("*.egg-info"):  # the sdist's own metadata still lists the dropped requirements
            for file in stale.iterdir():
                file.unlink()
            stale.rmdir()
        patch_source(source)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(cache), str(source)], check=True)
    return find_wheel(cache)


def find_wheel(cache: Path) -> Path:
    wheels = sorted(cache.glob(f"qpth-{VERSION}-py3-none-any.whl"))
    return wheels[-1] if wheels else Path()


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        fail("usage: build_qpth.py CACHE_DIR")
    cache = Path(argv[0]).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    wheel = find_wheel(cache)
    if not wheel.name:
        wheel = build_wheel(download_sdist(cache), cache)
        if not wheel.name:
            fail(f"pip reported success but no qpth wheel is in {cache}")
    print(wheel)


if __name__ == "__main__":
    main(sys.argv[1:])
