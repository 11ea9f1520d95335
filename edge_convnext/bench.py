"""``edge-convnext bench``: latency, load time, peak memory and fidelity, side by side, in one run.

Speed goals are checked here, by printed measurements, never by timed tests. Every row runs in a process
of its own (``python -m edge_convnext.bench JOB``), one after the other: latency measured in a process
that just ran other runtimes (or torch conversions) is not the latency a device process sees (LiteRT
was measured 77 ms instead of 41 ms that way), and a process's peak RSS is then the row's own.

Per row: median and p90 latency of ``runs`` timed batch-1 calls after ``warmup`` untimed ones, on one
preprocessed evaluation image; the load time (in a fresh process: importing the runtime included);
the process's peak RSS (interpreter, NumPy and the runtime included); and fidelity against the stored float reference on the first ``fidelity_images``
evaluation images (speed is never reported without accuracy). Ratios are to ONNX Runtime fp32 when the
peers run (``--peers``: ONNX Runtime and PyTorch eager on the same weights, see `edge_convnext.peers`),
else to each format's fp32 artifact. Without ``--peers`` only NumPy, Pillow and the artifacts' runtimes
are needed, so a Raspberry Pi prints the same table with its own numbers.

``--profile`` adds, per artifact and in a further process of its own, where the time of a run goes
(`edge_convnext.profiling`): per op kind, per layer and the slowest ops, against the un-profiled median
measured in that same process. Profiling a ``.tflite`` needs the light install only.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.errors import EdgeConvNextError, MissingExtra, RuntimeUnavailable, first_line
from edge_convnext.evaluate import find_artifacts
from edge_convnext.manifest import manifest_path, read_manifest
from edge_convnext.metrics import compare
from edge_convnext.reference import REFERENCE_FILE, load_reference

BASELINE = "onnxruntime-fp32"
_WORKER_TIMEOUT_S = 1800


@dataclass
class BenchRow:
    """One artifact or peer, measured in its own process."""

    name: str
    kind: str  # "artifact" or "peer"
    runtime: str = "-"
    precision: str = "-"
    format: str = "-"
    size_mb: float | None = None
    load_s: float | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    peak_rss_mb: float | None = None
    fidelity: dict[str, Any] | None = None
    status: str = "ok"
    profile: dict[str, Any] | None = None  # `edge_convnext.profiling.Profile.to_dict`, with --profile

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BenchOptions:
    runs: int = 20
    warmup: int = 3
    threads: int | None = None
    fidelity_images: int = 32
    data: Path | None = None
    peers: bool = False
    weights: str | None = None  # peers: default, the reference's recorded weights source
    profile: bool = False  # also profile each artifact, in a process of its own (`edge_convnext.profiling`)
    extra: dict[str, Any] = field(default_factory=dict)


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


def bench(paths: Sequence[Path], opts: BenchOptions, echo: Callable[[str], None] = lambda s: None) -> list[BenchRow]:
    """Every artifact in ``paths`` (and the peers with ``opts.peers``), each in its own process."""
    artifacts = find_artifacts(paths)
    reference = artifacts[0].parent / REFERENCE_FILE
    common = {"runs": opts.runs, "warmup": opts.warmup, "threads": opts.threads, "reference": str(reference),
              "data": str(opts.data) if opts.data else None, "fidelity_images": opts.fidelity_images}
    jobs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edge-convnext-bench-") as tmp:
        if opts.peers:
            jobs += _peer_jobs(reference, opts, Path(tmp), echo)
        jobs += [{"kind": "artifact", "path": str(a)} for a in artifacts]
        rows = []
        for i, job in enumerate(jobs, 1):
            label = job.get("path") or job["peer"]
            echo(f"[{i}/{len(jobs)}] bench {Path(label).name}")
            rows.append(_run_worker({**common, **job}))
            if opts.profile and job["kind"] == "artifact" and rows[-1].status == "ok":  # a failed row says why
                echo(f"[{i}/{len(jobs)}] profile {Path(label).name}")
                rows[-1].profile = _run_profile({**common, "kind": "profile", "path": job["path"]})
    return rows


def _peer_jobs(reference: Path, opts: BenchOptions, tmp: Path, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    from edge_convnext.peers import export_onnx

    ref = load_reference(reference)
    weights = opts.weights or ref.weights.get("source")
    if not weights:
        raise EdgeConvNextError(f"{reference}: records no weights source; pass --weights for the peers")
    sha = ref.meta.get("weights_sha256")
    echo(f"peers: exporting {weights} to ONNX (opset 18)")
    onnx_path = export_onnx(weights, sha, tmp / "convnext.onnx")
    return [{"kind": "peer", "peer": "onnxruntime-fp32", "onnx": str(onnx_path)},
            {"kind": "peer", "peer": "pytorch-eager-fp32", "weights": weights, "weights_sha256": sha}]


def _run_process(job: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """Run one job in a fresh ``python -m edge_convnext.bench JOB`` -> (its JSON result, or None and the error)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "edge_convnext.bench", json.dumps(job)], capture_output=True,
                              text=True, timeout=_WORKER_TIMEOUT_S, env={**os.environ, "TQDM_DISABLE": "1"})
    except subprocess.TimeoutExpired:
        return None, f"error: no result within {_WORKER_TIMEOUT_S} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"error: {tail}"
    return json.loads(lines[-1]), "ok"


def _run_worker(job: dict[str, Any]) -> BenchRow:
    name = Path(job["path"]).stem if job["kind"] == "artifact" else job["peer"]
    result, status = _run_process(job)
    return BenchRow(**result) if result is not None else BenchRow(name, job["kind"], status=status)


def _run_profile(job: dict[str, Any]) -> dict[str, Any]:
    """The artifact's profile (`Profile.to_dict`) from a process of its own; its status says why when there is none."""
    from edge_convnext.profiling import Profile

    result, status = _run_process(job)
    return result if result is not None else Profile(job["path"], "-", status=status).to_dict()


def _profile_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Profile one artifact in this process (the body of a ``"kind": "profile"`` job)."""
    from edge_convnext.profiling import Profile, profile_artifact

    path = Path(job["path"])
    try:
        prof = profile_artifact(path, job.get("threads"), runs=max(3, int(job["runs"])), warmup=max(1, int(job["warmup"])))
    except (RuntimeUnavailable, MissingExtra) as e:  # e.g. ExecuTorch not installed, or tflite-runtime only
        prof = Profile(str(path), "-", status=f"not profiled here: {first_line(e)}")
    return prof.to_dict()


def _worker(job: dict[str, Any]) -> BenchRow:
    """Measure one artifact or peer in this process (the body of ``python -m edge_convnext.bench JOB``)."""
    from edge_convnext.dataset import load_subset
    from edge_convnext.preprocessing import Preprocessing, preprocess_file

    reference = load_reference(Path(job["reference"]))
    subset = load_subset(Path(job["data"]) if job.get("data") else None)
    by_id = {s.image_id: s for s in subset.samples}
    ids = reference.image_ids[: max(1, int(job["fidelity_images"]))]
    pre = Preprocessing.from_dict(reference.meta["preprocessing"])
    x = np.stack([preprocess_file(by_id[i].path, pre) for i in ids])
    threads = job.get("threads")

    t0 = time.perf_counter()
    if job["kind"] == "artifact":
        from edge_convnext.runners import open_runner

        path = Path(job["path"])
        m = read_manifest(manifest_path(path))
        row = BenchRow(m.recipe, "artifact", precision=m.precision, format=m.format, size_mb=m.size_bytes / 1e6)
        try:
            runner: Any = open_runner(path, m, threads=threads)
        except RuntimeUnavailable as e:
            row.status = f"not runnable here: {first_line(e)}"
            return row
    else:
        from edge_convnext.peers import OnnxRuntimePeer, TorchEagerPeer

        row = BenchRow(job["peer"], "peer", precision="fp32", format=job["peer"].split("-")[0])
        if job["peer"] == "onnxruntime-fp32":
            runner = OnnxRuntimePeer(Path(job["onnx"]), threads)
            row.size_mb = Path(job["onnx"]).stat().st_size / 1e6
        else:
            runner = TorchEagerPeer(job["weights"], job.get("weights_sha256"), threads)
    row.load_s = round(time.perf_counter() - t0, 3)
    row.runtime = runner.name
    got = runner.run(x)
    fid = compare(reference.logits[reference.rows(ids)], got)
    row.fidelity = {"images": fid.images, "sqnr_db": round(fid.sqnr_db, 2), "top1_agreement": fid.top1_agreement}
    one = x[:1]
    times = [1000 * t for t in time_calls(lambda: runner.run(one), int(job["runs"]), int(job["warmup"]))]
    row.median_ms = round(statistics.median(times), 2)
    row.p90_ms = round(times[min(len(times) - 1, int(0.9 * len(times)))], 2)
    row.peak_rss_mb = round(_peak_rss_mb(), 1)
    return row


def ratios(rows: Sequence[BenchRow]) -> list[float | None]:
    """Per row (same order): median latency over ONNX Runtime fp32's when measured, else over the first
    fp32 artifact of its format; None for rows without a measurement."""
    ok = [r for r in rows if r.status == "ok" and r.median_ms]
    base = next((r.median_ms for r in ok if r.name == BASELINE), None)
    fp32: dict[str, float] = {}
    for r in ok:
        if r.kind == "artifact" and r.precision == "fp32" and "portable" not in r.name:
            fp32.setdefault(r.format, r.median_ms)  # type: ignore[arg-type]
    out: list[float | None] = []
    for r in rows:
        ref = base if base else fp32.get(r.format)
        out.append(r.median_ms / ref if r in ok and ref else None)
    return out


def table(rows: Sequence[BenchRow], threads: int | None) -> str:
    """Markdown table of the rows, with the ratio column named after its baseline."""
    rel = ratios(rows)
    against = "vs ORT fp32" if any(r.name == BASELINE and r.status == "ok" for r in rows) else "vs format fp32"
    head = (f"| what | runtime | MB | load s | median ms | p90 ms | {against} | peak RSS MB | SQNR dB | agree@1 |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"threads: {threads or 'runtime default'}; each row in its own process; fidelity against the stored "
             "float reference", "", head]
    for r, x in zip(rows, rel):
        if r.status != "ok":
            lines.append(f"| {r.name} | {r.status} |  |  |  |  |  |  |  |  |")
            continue
        f = r.fidelity or {}
        ratio = f"{x:.2f}x" if x is not None else "-"
        size = f"{r.size_mb:.1f}" if r.size_mb is not None else "-"
        lines.append(f"| {r.name} | {r.runtime} | {size} | {r.load_s:.2f} | {r.median_ms:.1f} | {r.p90_ms:.1f} | "
                     f"{ratio} | {r.peak_rss_mb:.0f} | {f.get('sqnr_db', float('nan')):.1f} | "
                     f"{100 * f.get('top1_agreement', float('nan')):.1f}% ({f.get('images')}) |")
    return "\n".join(lines)


def plot(rows: Sequence[BenchRow], path: Path, subtitle: str) -> None:
    """PNG of top-1 agreement against median latency (the speed/fidelity trade-off), written atomically."""
    from edge_convnext.report import Point, scatter_png

    pts = [Point(r.name + (" (emulated)" if "emulated" in r.runtime else ""), r.median_ms,
                 100 * r.fidelity["top1_agreement"], r.format)
           for r in rows if r.status == "ok" and r.fidelity and r.median_ms]
    scatter_png(pts, path, "Top-1 agreement with the float reference vs latency (batch 1)", subtitle,
                "median latency (ms, log scale)")


def _peak_rss_mb() -> float:
    """This process's peak resident set size, MB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own memory.
    ``ru_maxrss`` would not do there: Linux carries it across fork and exec, so every worker would
    report at least the parent's size. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB otherwise).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024.0


def profiles(rows: Sequence[BenchRow], top: int = 10) -> str:
    """Markdown: each profiled row's profile (`edge_convnext.profiling.render`), "" when none was asked for."""
    from edge_convnext.profiling import Profile, render

    parts = [render(Profile.from_dict(r.profile), top=top, name=r.name) for r in rows if r.profile is not None]
    return "\n\n".join(parts)


def latency_ms(path: Path, threads: int | None, runs: int = 20, warmup: int = 3) -> float | None:
    """Median batch-1 latency (ms) of one artifact (its manifest beside it), measured in a fresh process on a
    constant mid-grey image: for build-time comparisons (e.g. what an accuracy target's float layers
    cost); None when it cannot run here."""
    result, _ = _run_process({"kind": "latency", "path": str(path), "threads": threads, "runs": runs, "warmup": warmup})
    return None if result is None else result.get("median_ms")


def _latency_worker(job: dict[str, Any]) -> dict[str, Any]:
    from edge_convnext.runners import open_runner

    path = Path(job["path"])
    try:
        runner = open_runner(path, read_manifest(manifest_path(path)), threads=job.get("threads"))
    except RuntimeUnavailable as e:
        return {"median_ms": None, "status": f"not runnable here: {first_line(e)}"}
    x = np.full((1, 3, 224, 224), 0.5, dtype=np.float32)
    times = time_calls(lambda: runner.run(x), int(job["runs"]), int(job["warmup"]))
    return {"median_ms": round(1000 * statistics.median(times), 2)}


_WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "profile": _profile_worker,
    "latency": _latency_worker,
}

if __name__ == "__main__":  # the worker: one job as JSON on the command line, one JSON line out
    try:
        job = json.loads(sys.argv[1])
        out = _WORKERS[job["kind"]](job) if job["kind"] in _WORKERS else _worker(job).to_dict()
    except EdgeConvNextError as e:
        print(f"edge-convnext bench: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(out))
