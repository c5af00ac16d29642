"""Download, upload and conversion folded into one job-like progress for ``status.job``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...images import VMImage

PROGRESS_SPAN = {"download": (0, 10), "upload": (10, 30), "convert": (30, 95)}


def job_percent(job: dict[str, Any]) -> int:
    return int(((job.get("progress") or {}).get("percent")) or 0)


class Progress:
    """Folds download, upload and conversion into one job-like progress for ``status.job``."""

    def __init__(self, sink: Callable[[dict[str, Any]], None] | None, image: VMImage) -> None:
        self.sink = sink
        self.image = image

    def __call__(self, phase: str, percent: int, description: str, job: dict[str, Any] | None = None) -> None:
        """``job``: the TrueNAS job of this phase (upload, conversion); the download is the client's own (id 0)."""
        if self.sink is None:
            return
        low, high = PROGRESS_SPAN[phase]
        overall = low + (high - low) * max(0, min(100, percent)) // 100
        self.sink(
            {
                "id": int((job or {}).get("id") or 0),
                "method": str((job or {}).get("method") or f"download {self.image.product} {self.image.version}"),
                "state": "RUNNING",
                "progress": {"percent": overall, "description": description, "extra": None},
            }
        )
