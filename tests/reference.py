"""Reference data for tests. RAM's checkpoint key listings are vendored in tests/data/reference (with their
licence); RAM's tag list ships in ram_model/data. SceneGraphParser's parses of COCO captions (4.4 MB) live
beside the repository, not in it: `<repo>/../shared` on the development machines.

`RAM_SHARED_DIR` points elsewhere; `RAM_BENCH_DIR` points at the bench folder alone (as for
benchmarks/parse.py). A test that needs a file that is absent skips and says which file and how to
provide it (`pytest -rs` prints the reason; pyproject's addopts include it), so a fresh clone, as CI
makes it, still passes.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    return Path(os.environ.get("RAM_SHARED_DIR") or REPO.parent / "shared")


def bench_dir() -> Path:
    return Path(os.environ.get("RAM_BENCH_DIR") or shared_dir() / "bench")


def vendored(name: str) -> Path:
    """A reference file kept in the repository (tests/data/reference)."""
    return REPO / "tests" / "data" / "reference" / name


def shared_file(path: Path) -> Path:
    """`path` when it exists; otherwise the calling test skips, naming the file and the variables."""
    if not path.is_file():
        pytest.skip(f"shared reference file {path} is absent (it lives outside the repository, in "
                    f"<repo>/../shared; set RAM_SHARED_DIR, or RAM_BENCH_DIR for bench/, to where it is)")
    return path
