"""Per-op profile of a ``.pte`` from ExecuTorch's own events (ETDump), read with ``executorch.devtools.Inspector``.

The program is loaded a second time with ETDump enabled (``_load_for_executorch(..., enable_etdump=True)``)
and run ``warmup + runs`` times. The XNNPACK delegate in the pip wheel records one event per XNNPACK
operator ("Fully Connected (NC, QS8, QC8W) GEMM #31", "Convolution (NHWC, F32) DWConv #3", ...); ops
outside a delegate are recorded as the runtime's kernel calls. Kinds are the event names without their
``#n``; the first ``warmup`` runs (XNNPACK's first run sets up its workspace) are dropped per event.

The time a ``DELEGATE_CALL`` spends outside the operators it contains is reported as its own kind
"(delegate call, outside its ops)", so the kinds add up to the profiled run. Events carry no torch
module scope without an ETRecord from the build, so there is no per-layer table for ``.pte`` files.
Needs torch (the ExecuTorch Python runtime does) and ``executorch.devtools``.
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_convnext.errors import ArtifactError, RuntimeUnavailable, first_line
from edge_convnext.profiling import NOT_PROFILED_COREML, OpTime, Profile

_RUNTIME_EVENTS = {"Method::execute", "Method::init", "Program::load_method", "DELEGATE_CALL", "OPERATOR_CALL"}
_INDEX = re.compile(r"\s*#(\d+)$")


def profile_pte(path: Path, threads: int | None, runs: int = 10, warmup: int = 2) -> Profile:
    """Profile ``forward`` of ``path``: per-op medians from ETDump, against the un-profiled median."""
    path = Path(path)
    try:
        import torch
        from executorch.extension.pybindings import portable_lib
    except ImportError as e:
        raise RuntimeUnavailable(f"profiling {path} needs the ExecuTorch runtime ({e}); "
                                 "install it with: pip install 'edge-convnext[executorch-runtime]'") from e
    from edge_convnext.runners.executorch import delegate_backends
    from edge_convnext.runners.executorch_coreml import COREML_BACKEND

    if COREML_BACKEND in delegate_backends(path):
        return Profile(str(path), "-", status=NOT_PROFILED_COREML, runtime="executorch-coreml-emulated")
    threads = threads or os.cpu_count() or 1
    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(int(threads))
    x = torch.from_numpy(np.random.default_rng(0).uniform(0.0, 1.0, (1, 3, 224, 224)).astype(np.float32))

    try:
        plain = portable_lib._load_for_executorch(str(path))
        with tempfile.TemporaryDirectory(prefix="edge-convnext-etdump-") as tmp:
            dump = Path(tmp) / "forward.etdp"
            profiled = portable_lib._load_for_executorch(str(path), enable_etdump=True, debug_buffer_size=0)
            # Alternate the un-profiled and the profiled program run by run, so that both see the same load.
            times = []
            for i in range(warmup + runs):
                t = time.perf_counter()
                plain.forward([x])
                if i >= warmup:
                    times.append(time.perf_counter() - t)
                profiled.forward([x])
            profiled.write_etdump_result_to_file(str(dump))
            events = read_etdump(dump)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: ExecuTorch could not load or run it with ETDump ({first_line(e)}); "
                            "rebuild it with `edge-convnext convert`") from e
    whole_ms = 1000 * statistics.median(times)
    return _profile(path, events, threads, runs, warmup, whole_ms)


def read_etdump(path: Path) -> list[tuple[str, bool, list[float]]]:
    """(event name, delegated?, ms per run) for every event of the "Execute" blocks of an ETDump file."""
    try:
        from executorch.devtools import Inspector
    except ImportError as e:
        raise RuntimeUnavailable(f"reading an ETDump needs executorch.devtools ({e}); pip install executorch") from e
    inspector = Inspector(etdump_path=str(path))
    out = []
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for ev in block.events:
            raw = list(ev.perf_data.raw) if ev.perf_data is not None else []
            out.append((str(ev.name), bool(ev.is_delegated_op), [float(v) for v in raw]))
    return out


def _profile(path: Path, events: list[tuple[str, bool, list[float]]], threads: int, runs: int, warmup: int,
             whole_ms: float) -> Profile:
    """Fold ETDump events into a `Profile` (dropping each event's first ``warmup`` runs)."""

    def timed(raw: list[float]) -> float:
        kept = raw[warmup:] if len(raw) > warmup else raw
        return float(statistics.median(kept)) if kept else 0.0

    ops: list[OpTime] = []
    execute = 0.0
    calls: list[list[float]] = []  # DELEGATE_CALL events, ms per run
    inside: list[list[float]] = []  # delegated op events, ms per run
    seen: dict[str, int] = {}
    for i, (name, delegated, raw) in enumerate(events):
        if name == "Method::execute":
            execute = timed(raw)
        elif name == "DELEGATE_CALL":
            calls.append(raw)
        elif name not in _RUNTIME_EVENTS:
            if delegated:
                inside.append(raw)
            kind = _INDEX.sub("", name)
            seen[kind] = seen.get(kind, 0) + 1
            if not _INDEX.search(name):  # kernel calls outside a delegate carry no "#n": number them alike
                name = f"{name} #{seen[kind]}"
            ops.append(OpTime(name, kind, round(timed(raw), 4), None,
                              "delegated" if delegated else "outside any delegate", i))
    # A delegate's own time around its operators (argument copies, its runtime's per-call setup), per run:
    # the calls' time minus the time of the operators inside them in that same run.
    n = min((len(r) for r in calls + inside), default=0)
    per_run = [sum(r[k] for r in calls) - sum(r[k] for r in inside) for k in range(min(warmup, n - 1), n)] if calls else []
    outside = float(statistics.median(per_run)) if per_run else 0.0
    if outside > 0:
        ops.append(OpTime("(delegate call, outside its ops)", "(delegate call, outside its ops)", round(outside, 4)))
    delegate_calls = timed([sum(r[k] for r in calls) for k in range(n)]) if calls else 0.0
    if not ops:
        raise ArtifactError(f"{path}: its ETDump holds no op events; this ExecuTorch build records none "
                            "(XNNPACK needs ENABLE_XNNPACK_PROFILING)")
    total = sum(o.ms for o in ops)
    prof = Profile(str(path), "ExecuTorch ETDump events (XNNPACK per-operator profiling, runtime kernel events)",
                   runtime="executorch", threads=threads, runs=runs, whole_ms=round(whole_ms, 3),
                   total_ms=round(total, 3), ops=ops)
    prof.extra = {"profiled_run_ms": round(execute, 3), "events": len(ops), "delegate_call_ms": round(delegate_calls, 3)}
    prof.notes.append(f"profiled run (Method::execute, median) {execute:.1f} ms: the per-op timestamps cost "
                      f"{execute - whole_ms:+.1f} ms against the un-profiled run")
    return prof
