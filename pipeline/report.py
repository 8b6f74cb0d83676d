"""report.json: what this run did and what the whole output now holds."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from pipeline.coco import DatasetTotals
from pipeline.labels import Category
from pipeline.storage import OutputStore

REPORT_JSON = "report.json"


@dataclass
class RunCounts:
    """Counted by the driver as shard results stream in; at the end `ok`, `failed` and
    `error_types` are set from what the run committed."""

    committed_before: int = 0  # images (segmented or failed) committed by earlier runs
    ok: int = 0
    failed: int = 0
    wall_seconds: float = 0.0
    error_types: Counter = field(default_factory=Counter)
    stage_seconds: Counter = field(default_factory=Counter)  # summed over workers: where time goes

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    @property
    def images_per_second(self) -> float:
        return self.processed / self.wall_seconds if self.wall_seconds > 0 else 0.0


def build_report(run: RunCounts, totals: DatasetTotals, errors: Counter, categories: Sequence[Category],
                 settings: dict) -> dict:
    """`errors`: (run_id, error_type) -> committed failed images, as `committed_errors` counts them."""
    names = {c.id: c.name for c in categories}
    error_types: Counter = Counter()
    for (_, error_type), n in errors.items():
        error_types[error_type] += n
    return {
        "run": {
            "run_id": settings["run_id"],
            "committed_before": run.committed_before, "processed": run.processed,
            "ok": run.ok, "failed": run.failed, "wall_seconds": round(run.wall_seconds, 3),
            "images_per_second": round(run.images_per_second, 3),
            "error_types": dict(run.error_types.most_common()),
            "stage_seconds": {k.removeprefix("seconds_"): round(v, 3) for k, v in run.stage_seconds.items()},
        },
        "dataset": {
            "images": totals.images, "errors": sum(error_types.values()),
            "error_types": dict(error_types.most_common()),
            "segments_per_category": {names.get(k, str(k)): v for k, v in sorted(totals.segments.items())},
            "pixels_per_category": {names.get(k, str(k)): v for k, v in sorted(totals.pixels.items())},
        },
        "settings": settings,
    }


def write_report(store: OutputStore, report: dict) -> None:
    store.write_bytes(REPORT_JSON, json.dumps(report, indent=2).encode())
