"""Rerun of a finished job: it must run no forward pass; how long does it take?

    .venv/bin/python bench/rerun.py [--images 1000]

Generates N scenes, runs the job on them once (timed), then runs the same command again and
times it. The rerun lists the input, reads the committed keys, finds nothing to do, and rebuilds
coco/panoptic.json and report.json from the committed tables. Prints both wall times and how
many images the rerun processed (must be 0: no Predictor is started, so no forward pass).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.run import ExecutionConfig, RunConfig, run  # noqa: E402
from pipeline.scenes import generate_scenes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder = generate_scenes(Path(work) / "scenes", args.images, seed=13) / "images"
        config = RunConfig(input=str(folder), output=str(Path(work) / "out"), execution=ExecutionConfig())
        times, reports = [], []
        for _ in range(2):
            start = time.perf_counter()
            reports.append(run(config, progress=lambda _: None))
            times.append(time.perf_counter() - start)
    first, rerun = reports
    print(f"{args.images} images; first run {times[0]:.1f} s ({first['run']['processed']} processed); "
          f"rerun {times[1]:.2f} s ({rerun['run']['processed']} processed, "
          f"{rerun['run']['committed_before']} already committed, dataset {rerun['dataset']['images']} images)")
    if rerun["run"]["processed"]:
        raise SystemExit("the rerun processed images: resume is broken")


if __name__ == "__main__":
    main()
