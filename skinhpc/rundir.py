"""The files of a fold's run directory that several stages read (training writes them; the
launcher, the report and the ensemble read them). Torch-free, so the launcher on a login node can
import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.json"
"""Written last by a fold's training: its presence with status done means the fold is finished."""
LOG_NAME = "log.jsonl"
"""One JSON object per finished epoch."""


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished_metrics(fold_dir: Path) -> dict[str, Any] | None:
    """The fold's metrics.json when training finished (status done), else None."""
    metrics = read_json(Path(fold_dir) / METRICS_NAME)
    return metrics if metrics is not None and metrics.get("status") == "done" else None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The epoch lines of a log.jsonl; none when it is missing. Unparseable lines (a line cut by a
    crash) are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "epoch" in entry:
            out.append(entry)
    return out
