"""Shared fixtures: the repository root and the bundled sample converted once per test session."""

from __future__ import annotations

import os

# DeepSpeed picks its accelerator at import: CPU everywhere in the tests, before anything imports it.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    """The repository root (jobs/, configs/, skinhpc/)."""
    return REPO_DIR


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled 426-image sample converted (jpg, max 320 px: stored 150x200) into a session tmp dir.

    Converted once per session by ``jobs/convert.py`` in a fresh process, so no FFCV state of the
    test process is involved. Treat it as read-only: every test of the session shares it.
    """
    import skinhpc

    out = tmp_path_factory.mktemp("sample-data") / "data"
    cmd = [sys.executable, str(REPO_DIR / "jobs" / "convert.py"), "--images", str(skinhpc.SAMPLE_IMAGES),
           "--metadata", str(skinhpc.SAMPLE_METADATA), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"converting the bundled sample failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return out
