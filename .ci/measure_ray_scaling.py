"""Side by side in one process: local eval, then eval --ray on a local cluster of 1 and of 2 CPUs.

Usage: python .ci/measure_ray_scaling.py ARTIFACT_DIR --limit 64 [--threads 1] [--shard-images 16] [--json OUT]
Every run uses the same runtime thread count; the script fails unless every metric of every artifact
is bit-identical across the three runs. Images/s counts inferences (images x artifacts) over the
wall time of `evaluate_paths`, which includes the Ray workers' start-up and artifact loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from edge_convnext.distributed import RayExecutor
from edge_convnext.evaluate import EvalOptions, EvalRun, evaluate_paths
from edge_convnext.fileio import write_json_atomic


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shard-images", type=int, default=16)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows: list[dict[str, object]] = []
    runs: list[EvalRun] = []

    def measure(name: str, **kw: object) -> None:
        t0 = time.perf_counter()
        run = evaluate_paths([a.artifacts], EvalOptions(limit=a.limit, threads=a.threads, **kw))  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
        n = sum(r.images for r in run.results)
        # Per-shard cost outside the runtime: sha256 check, artifact load, image decoding.
        overhead = sum(r.wall_seconds - (r.seconds_per_image or 0) * r.images for r in run.results)
        shards = sum(run.shards.values()) - run.shards.get("failed", 0)
        rows.append({"run": name, "inferences": n, "wall_s": round(wall, 1), "images_per_s": round(n / wall, 2),
                     "shards": shards, "overhead_s_per_shard": round(overhead / max(1, shards), 2)})
        runs.append(run)
        print(rows[-1], file=sys.stderr)

    measure("local (in-process)")
    for cpus in (1, 2):
        with RayExecutor("local", num_cpus=cpus):
            measure(f"--ray, {cpus} worker CPU(s)", ray="local", shard_images=a.shard_images)
    for run in runs[1:]:
        for x, y in zip(runs[0].results, run.results):
            assert x.status == y.status == "ok", (x.reason, y.reason)
            assert (x.fidelity, x.top1, x.top5, x.images) == (y.fidelity, y.top1, y.top5, y.images), x.recipe
    base = rows[1]["images_per_s"]
    for r in rows:
        r["vs_1_worker"] = round(float(r["images_per_s"]) / float(base), 2)  # type: ignore[arg-type]
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
           "load_average_1min": os.getloadavg()[0], "threads_per_task": a.threads, "images": a.limit,
           "artifacts": [r.recipe for r in runs[0].results], "identical_metrics": True, "rows": rows,
           "synthetic_weights": runs[0].synthetic}
    print(json.dumps(out, indent=2))
    if a.json:
        write_json_atomic(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
