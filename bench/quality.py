"""Panoptic quality of the full pipeline with the bundled checkpoint on held-out generated scenes.

    .venv/bin/python bench/quality.py [--count 100] [--seed 2]

Generates scenes never used in training (training uses seed 0), runs the pipeline end to end on
their image files (decode, resize, batch, infer, post-process, PNG), and scores its COCO panoptic
output against the ground truth with `pipeline.pq`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.pq import evaluate_coco_panoptic  # noqa: E402
from pipeline.run import ExecutionConfig, RunConfig, run  # noqa: E402
from pipeline.scenes import generate_scenes  # noqa: E402


def measure(count: int, seed: int, work: Path, batch_size: int = 8) -> dict:
    truth = generate_scenes(work / "truth", count, seed)
    output = work / "out"
    start = time.monotonic()
    run(RunConfig(input=str(truth / "images"), output=str(output),
                  execution=ExecutionConfig(batch_size=batch_size)), progress=lambda line: None)
    seconds = time.monotonic() - start
    result = evaluate_coco_panoptic(truth / "panoptic.json", truth / "panoptic",
                                    output / "coco" / "panoptic.json", output / "panoptic")
    return {"images": count, "seconds": seconds, **{name: q for name, q in result.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = measure(args.count, args.seed, Path(work))
    print(f"{result['images']} held-out scenes (seed {args.seed}), pipeline wall time {result['seconds']:.1f} s")
    for name in ("all", "things", "stuff"):
        q = result[name]
        print(f"{name:7s} PQ {q.pq:.3f}  SQ {q.sq:.3f}  RQ {q.rq:.3f}  ({q.categories} categories)")


if __name__ == "__main__":
    main()
