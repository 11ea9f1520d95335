"""``eval --ray`` and ``--results``: sharded numbers equal local ones exactly; lost workers, resumes, corruption.

Tiny ``convnext-test`` artifacts (tflite-fp32 and executorch-xnnpack-fp32) and float reference on a local Ray cluster with
``num_cpus=2``. A worker is killed for real (``os._exit`` mid-shard, `edge_convnext.distributed.TEST_EXIT_ENV`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("ray")

from converters.build import ConvertOptions, convert  # noqa: E402
from edge_convnext.distributed import TEST_EXIT_ENV, RayExecutor  # noqa: E402
from edge_convnext.errors import EdgeConvNextError  # noqa: E402
from edge_convnext.evaluate import EvalOptions, EvalRun, evaluate_paths, merge_shards, prepare_job  # noqa: E402
from edge_convnext.reference import load_reference  # noqa: E402
from edge_convnext.report import write_reports  # noqa: E402
from edge_convnext.shards import ShardResult, plan_shards  # noqa: E402

pytestmark = pytest.mark.convert
IMAGES = 24  # 3 shards of 8 per artifact
THREADS = 1


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts")
    report = convert(ConvertOptions(weights="random:0:convnext-test", recipes="tflite-fp32,executorch-xnnpack-fp32",
                                    out=out, reference_images=IMAGES, parity_images=2, calibration_images=4),
                     echo=lambda s: None)
    assert report.ok, [o.error for o in report.outcomes]
    return out


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def cluster(fault_dir):
    """One local Ray cluster (2 CPUs) for the module; its workers see the fault-injection directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv(TEST_EXIT_ENV, str(fault_dir))
    with RayExecutor("local", num_cpus=2) as ex:
        yield ex
    mp.undo()


@pytest.fixture(scope="module")
def local_run(built) -> EvalRun:
    return evaluate_paths([built], EvalOptions(threads=THREADS))


def _ray(built: Path, **kw) -> EvalRun:
    return evaluate_paths([built], EvalOptions(threads=THREADS, ray="local", shard_images=8, **kw))


def assert_same_numbers(a: EvalRun, b: EvalRun) -> None:
    """Exact equality of every metric (full float precision, not the rounded JSON)."""
    assert [r.recipe for r in a.results] == [r.recipe for r in b.results]
    for x, y in zip(a.results, b.results):
        assert x.status == y.status == "ok", (x.reason, y.reason)
        assert (x.images, x.failed_ids, x.top1, x.top5, x.reference_top1, x.reference_top5) == \
               (y.images, y.failed_ids, y.top1, y.top5, y.reference_top1, y.reference_top5)
        assert x.fidelity == y.fidelity, x.recipe


def test_ray_gives_exactly_the_local_numbers(built, cluster, local_run):
    run = _ray(built)
    assert_same_numbers(local_run, run)
    assert run.shards == {"computed": 6, "failed": 0}
    assert {r.runner for r in run.results} == {"litert", "executorch"}


def test_killed_worker_is_retried_and_the_report_is_complete(built, cluster, fault_dir, local_run, tmp_path):
    (fault_dir / "once").touch()
    run = _ray(built, results=tmp_path / "results")
    assert (fault_dir / "once.taken").exists(), "no worker took the exit"
    (fault_dir / "once.taken").unlink()
    assert_same_numbers(local_run, run)
    assert run.shards["failed"] == 0 and run.shards["computed"] == 6


def test_resumed_run_recomputes_only_what_is_missing(built, cluster, local_run, tmp_path):
    results = tmp_path / "results"
    first = _ray(built, results=results)
    files = sorted(results.rglob("*.shard"))
    assert first.shards["computed"] == 6 and len(files) == 6
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = _ray(built, results=results)
    assert again.shards == {"reused": 6, "failed": 0, "corrupted": 0}
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # nothing rewritten
    assert_same_numbers(local_run, again)
    files[2].unlink()  # as if the run had been killed before that shard finished
    resumed = _ray(built, results=results)
    assert resumed.shards == {"reused": 5, "computed": 1, "failed": 0, "corrupted": 0}
    assert_same_numbers(local_run, resumed)


def test_corrupted_shard_file_is_detected_and_recomputed(built, local_run, tmp_path):
    results = tmp_path / "results"  # the local path keeps shards the same way (one per artifact)
    evaluate_paths([built], EvalOptions(threads=THREADS, results=results))
    victim = sorted(results.rglob("*.shard"))[0]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    run = evaluate_paths([built], EvalOptions(threads=THREADS, results=results))
    assert run.shards == {"reused": 1, "computed": 1, "failed": 0, "corrupted": 1}
    assert_same_numbers(local_run, run)
    assert evaluate_paths([built], EvalOptions(threads=THREADS, results=results)).shards["reused"] == 2


def test_other_thread_count_is_not_reused(built, tmp_path):
    results = tmp_path / "results"
    evaluate_paths([built / "tflite-fp32.tflite"], EvalOptions(threads=1, limit=8, results=results))
    run = evaluate_paths([built / "tflite-fp32.tflite"], EvalOptions(threads=2, limit=8, results=results))
    assert run.shards == {"computed": 1, "failed": 0, "corrupted": 0}


def test_shard_failing_every_retry_is_reported_never_dropped(built, cluster, fault_dir, tmp_path):
    (fault_dir / "always").touch()
    try:
        run = evaluate_paths([built / "tflite-fp32.tflite"], EvalOptions(threads=THREADS, limit=16, ray="local",
                                                                         shard_images=8, ray_retries=1))
    finally:
        (fault_dir / "always").unlink()
    assert [r.recipe for r in run.errors] == ["tflite-fp32"]  # the CLI exits 1 on run.errors
    assert run.shards["failed"] == 2
    write_reports(run, None, junit_path=tmp_path / "junit.xml")
    junit = (tmp_path / "junit.xml").read_text()
    assert "2 of 2 shards failed" in junit and "tflite-fp32 images 0-7" in junit and "after 1 retries" in junit


def test_shards_from_different_kernels_are_not_merged(built, tmp_path):
    ref = load_reference(built / "reference.npz")
    job = prepare_job(built / "tflite-fp32.tflite", ref)
    from edge_convnext.dataset import load_subset

    by_id = {s.image_id: s for s in load_subset().samples}
    shards = plan_shards(job, [by_id[i] for i in ref.image_ids[:16]], 8)
    parts = [ShardResult("ok", runner="litert", ids=[s.image_id for s in sh.samples],
                         logits=ref.logits[ref.rows([s.image_id for s in sh.samples])], identity={"cpu": c})
             for sh, c in zip(shards, ("avx2", "avx512"))]
    r = merge_shards(job, shards, parts, ref)
    assert r.status == "error" and "different runtimes, thread counts or CPUs" in r.reason
    parts[1].identity = {"cpu": "avx2"}
    r = merge_shards(job, shards, parts, ref)
    assert r.status == "ok" and r.fidelity.sqnr_db == float("inf") and r.images == 16
    assert np.isclose(r.fidelity.top1_agreement, 1.0)


def test_budget_is_refused_with_ray(built):
    with pytest.raises(EdgeConvNextError, match="--budget is refused with --ray"):
        evaluate_paths([built], EvalOptions(ray="local", budget_s=10.0))


def test_local_eval_does_not_import_ray(built):
    code = (
        "import sys\n"
        "from edge_convnext.cli import main\n"
        f"rc = main(['eval', {str(built / 'tflite-fp32.tflite')!r}, '--limit', '3'])\n"
        "assert rc == 0, rc\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_float_reference_on_ray_equals_local(cluster, tiny_weights, subset):
    import torch

    from converters.reference import compute_reference, reference_samples

    samples = reference_samples(subset, 32)
    default = torch.get_num_threads()
    torch.set_num_threads(1)  # the same torch thread count as each Ray task below
    try:
        local = compute_reference(tiny_weights, samples, {})
    finally:
        torch.set_num_threads(default)
    sharded = compute_reference(tiny_weights, samples, {}, ray="local", threads=1, shard_images=16)
    assert sharded.image_ids == local.image_ids and np.array_equal(sharded.labels, local.labels)
    assert np.array_equal(sharded.logits, local.logits)


def test_unreachable_cluster_address_fails_fast():
    from edge_convnext.distributed import _check_reachable

    with pytest.raises(EdgeConvNextError, match="127.0.0.1:1: nothing answers there"):
        _check_reachable("127.0.0.1:1", timeout_s=2.0)
    _check_reachable("local")  # resolved by Ray itself
