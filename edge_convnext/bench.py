"""``edge-convnext bench``: measured latency per artifact, and ratios against its format's fp32 recipe.

Speed goals are checked here, by printed measurements, never by timed tests. Each artifact runs one input
(``--image``, preprocessed, else a fixed random tensor: latency of these graphs does not depend on the
pixels) ``warmup`` times, then ``runs`` times.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_convnext.errors import RuntimeUnavailable
from edge_convnext.evaluate import find_artifacts
from edge_convnext.manifest import manifest_path, read_manifest
from edge_convnext.preprocessing import Preprocessing, preprocess_file
from edge_convnext.runners import open_runner


@dataclass
class Timing:
    recipe: str
    format: str
    runner: str
    size_mb: float
    load_s: float
    median_ms: float
    p90_ms: float
    status: str = "ok"


def time_calls(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` over ``runs`` timed calls after ``warmup`` untimed ones, sorted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)


def _image(m_pre: dict, sample: Path | None) -> np.ndarray:
    if sample is None:
        return np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    return preprocess_file(sample, Preprocessing.from_dict(m_pre))[None]


def bench(paths: Sequence[Path], runs: int = 20, warmup: int = 3, threads: int | None = None,
          image: Path | None = None) -> list[Timing]:
    out = []
    for path in find_artifacts(paths):
        m = read_manifest(manifest_path(path))
        t0 = time.perf_counter()
        try:
            runner = open_runner(path, m, threads=threads)
        except RuntimeUnavailable as e:
            out.append(Timing(m.recipe, m.format, "-", m.size_bytes / 1e6, 0, 0, 0, f"not runnable here: {e}"))
            continue
        load_s = time.perf_counter() - t0
        x = _image(m.preprocessing, image)
        times = [1000 * t for t in time_calls(lambda: runner.run(x), runs, warmup)]
        out.append(Timing(m.recipe, m.format, runner.name, m.size_bytes / 1e6, load_s, statistics.median(times),
                          times[min(len(times) - 1, int(0.9 * len(times)))]))
    return out


def table(timings: Sequence[Timing], threads: int | None) -> str:
    fp32 = {t.format: t.median_ms for t in timings if t.recipe.endswith("fp32") and t.status == "ok"
            and "portable" not in t.recipe}
    head = f"{'recipe':<26} {'runtime':<16} {'MB':>6} {'load s':>7} {'median ms':>10} {'p90 ms':>8} {'vs fp32':>8}"
    lines = [f"threads: {threads or 'runtime default'}; peak RSS {_peak_rss_mb():.0f} MB", head, "-" * len(head)]
    for t in timings:
        if t.status != "ok":
            lines.append(f"{t.recipe:<26} {t.status}")
            continue
        ratio = f"{t.median_ms / fp32[t.format]:.2f}x" if t.format in fp32 else "-"
        lines.append(f"{t.recipe:<26} {t.runner:<16} {t.size_mb:>6.1f} {t.load_s:>7.2f} {t.median_ms:>10.1f} "
                     f"{t.p90_ms:>8.1f} {ratio:>8}")
    return "\n".join(lines)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
