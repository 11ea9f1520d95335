"""Time the emulator on one package: ``python -m edge_convnext.coreml_emulator.bench PATH.mlpackage``.

Feeds a fixed random input of the spec shapes and prints load time and ms/image (median of the
timed runs divided by the batch size). ``--threads`` sets `CoreMLEmulator.blas_threads` (default 1;
0 leaves NumPy's BLAS at its own thread count).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from edge_convnext.bench import time_calls
from edge_convnext.coreml_emulator.emulator import CoreMLEmulator
from edge_convnext.errors import EdgeConvNextError


def bench(
    path: str, precision: str = "auto", runs: int = 10, warmup: int = 2, threads: int | None = 1
) -> dict[str, float]:
    """Load ``path`` and time ``runs`` predictions after ``warmup`` untimed ones."""
    t0 = time.perf_counter()
    emu = CoreMLEmulator(path, precision=precision)  # type: ignore[arg-type]
    load_s = time.perf_counter() - t0
    emu.blas_threads = threads
    rng = np.random.default_rng(0)
    # Image features take 8-bit pixel values; other inputs uniform [0, 1).
    feeds = {n: rng.integers(0, 256, s).astype(np.float32) if n in emu.image_inputs else rng.random(s, dtype=np.float32)
             for n, s in emu.input_shapes.items()}
    batch = next(iter(emu.input_shapes.values()))[0] if emu.input_shapes else 1
    times = time_calls(lambda: emu.predict(feeds), runs, warmup)
    return {
        "load_s": load_s,
        "ms_per_image": statistics.median(times) * 1e3 / max(batch, 1),
        "min_ms_per_image": min(times) * 1e3 / max(batch, 1),
        "batch": float(batch),
        "ops": float(sum(n for op, n in emu.ops_used.items() if op != "const")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_convnext.coreml_emulator.bench", description=__doc__)
    parser.add_argument("path", nargs="+", help=".mlpackage path(s)")
    parser.add_argument("--precision", choices=("auto", "fp32"), default="auto")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads during predict; 0: the library's own")
    args = parser.parse_args(argv)
    for path in args.path:
        try:
            r = bench(path, args.precision, args.runs, args.warmup, args.threads or None)
        except EdgeConvNextError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        threads = args.threads or "library default"
        print(
            f"{path}: precision={args.precision} threads={threads} {r['ms_per_image']:.1f} ms/image "
            f"(median of {args.runs}, min {r['min_ms_per_image']:.1f}, batch {int(r['batch'])}, "
            f"{int(r['ops'])} non-const ops, load {r['load_s']:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
