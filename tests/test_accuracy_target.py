"""``convert --min-sqnr/--min-agreement``: the fewest, most sensitive layers stay float until the target is met."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import convert_tiny  # noqa: E402
import numpy as np  # noqa: E402

from converters.accuracy_target import AccuracyTarget, estimate, smallest_k  # noqa: E402
from edge_convnext.manifest import read_manifest  # noqa: E402

pytestmark = pytest.mark.convert


@pytest.mark.parametrize("need", [1, 2, 3, 5, 8, 13, 20])
def test_smallest_k_finds_the_first_k_that_meets(need):
    calls = []

    def meets(k: int) -> bool:
        calls.append(k)
        return k >= need

    assert smallest_k(list(range(20)), AccuracyTarget(1.0), meets) == need
    assert len(calls) <= 2 * 5 + 2  # doubling then bisection: logarithmic


def test_smallest_k_says_when_nothing_meets():
    assert smallest_k(list(range(7)), AccuracyTarget(1.0), lambda k: False) is None


def test_a_target_needs_a_bound_and_a_fraction():
    with pytest.raises(ValueError, match="needs"):
        AccuracyTarget()
    with pytest.raises(ValueError, match="fraction"):
        AccuracyTarget(min_agreement=95)
    with pytest.raises(ValueError, match="confidence"):
        AccuracyTarget(30.0, confidence=1.0)


def test_the_target_is_judged_on_a_lower_confidence_bound():
    """64 held-out images whose SQNR is exactly 36 dB: the point estimate meets 36 dB, the 90 % lower bound
    does not (its spread comes from images that differ in error), and 0.5 judges about the number itself."""
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(64, 1000)) * 3
    noise = rng.normal(size=(64, 1000)) * rng.uniform(0.2, 2.0, size=(64, 1))  # some images much worse
    noise -= noise.mean(axis=1, keepdims=True)
    ref -= ref.mean(axis=1, keepdims=True)
    noise *= np.sqrt(np.sum(ref**2) / np.sum(noise**2) / 10**3.6)  # 36 dB over all images
    e = estimate(ref, ref + noise, 0.9)
    assert e.fidelity.sqnr_db == pytest.approx(36.0, abs=0.05)
    assert 34.5 < e.sqnr_low_db < 35.95  # a few tenths of a dB below, not a token margin
    assert not AccuracyTarget(36.0).met(e) and AccuracyTarget(e.sqnr_low_db - 0.01).met(e)
    median = estimate(ref, ref + noise, 0.5)
    assert abs(median.sqnr_low_db - 36.0) < 0.2
    assert e.agreement_low <= e.fidelity.top1_agreement


def test_convert_keeps_sensitive_layers_float_until_the_target_is_met(tmp_path):
    convert_tiny(tmp_path / "base", "tflite-int8", reference_images=8, parity_images=4, calibration_images=32)
    base = read_manifest(tmp_path / "base" / "tflite-int8.json")
    convert_tiny(tmp_path / "t", "tflite-int8", reference_images=8, parity_images=4, calibration_images=32,
                 target=AccuracyTarget(min_sqnr_db=43.0))
    m = read_manifest(tmp_path / "t" / "tflite-int8.json")
    rec = m.lowering["accuracy_target"]
    assert rec["min_sqnr_db"] == 43.0 and rec["before"]["sqnr_db"] < 43.0  # the tiny int8 model: ~38 dB
    chosen = rec["float_layers"]
    assert chosen, "a 43 dB target on int8 must keep layers float"
    # the most sensitive first, as ranked; every one recorded in the plan with its reason
    sens = rec["sensitivity_alone_sqnr_db"]
    assert [sens[n] for n in chosen] == sorted(sens[n] for n in chosen)
    reasons = {f["name"]: f["reason"] for f in m.lowering["float_layers"]["float_layers"]}
    assert all(reasons[n] == "accuracy target" for n in chosen)
    # the artifact really has more float fully-connected/conv ops than the recipe's default
    def float_compute(man):
        return sum(v for k, v in man.lowering["ops_by_dtype"].items()
                   if k.split(" ")[0] in ("FULLY_CONNECTED", "CONV_2D") and "w:float32" in k)
    assert float_compute(m) == float_compute(base) + len(chosen)
    assert rec["after"]["sqnr_db"] > rec["before"]["sqnr_db"]
    assert rec["met"] == (rec["after"]["sqnr_low_db"] >= 43.0)
    assert rec["after"]["sqnr_low_db"] < rec["after"]["sqnr_db"] and rec["confidence"] == 0.9
    assert rec["cost"]["bytes"] > 0 and set(rec["cost"]["latency_ms"]) >= {"without", "with"}
    assert rec["after"]["images"] >= 8  # held-out calibration images (test_quant_choices checks they are not evaluation ones)


def test_float_recipes_ignore_the_target(tmp_path):
    convert_tiny(tmp_path, "tflite-fp32", reference_images=8, parity_images=4, target=AccuracyTarget(min_sqnr_db=60.0))
    assert "accuracy_target" not in read_manifest(tmp_path / "tflite-fp32.json").lowering


def test_a_centred_recipe_with_every_layer_float_again_is_the_float_model(tiny_weights, tiny_calibration):
    """`coreml-w8a8` centres its pwconv2 inputs (a Shift, W c in the bias): layers the target makes float take
    the float model's weights and bias, which must carry the same centring, or the block is off by W c."""
    torch = pytest.importorskip("torch")
    from converters.accuracy_target import with_float_layers
    from converters.model import export_model
    from converters.prepare import Preparation
    from edge_convnext.recipes import get_recipe

    model = export_model(tiny_weights.model, tiny_weights.preprocessing).eval()
    prep = Preparation(model, tiny_calibration, 8)
    prep.held_out()
    p = prep.prepare(get_recipe("coreml-w8a8"))
    assert p.ranges_choice["centered_inputs"]["centers"] and p.plan.quantized
    back = with_float_layers(p.model, p.float_model, p.plan.quantized)
    x = torch.from_numpy(np.concatenate(list(tiny_calibration(2))))
    with torch.no_grad():
        ref, got, rounded = model(x).log(), back(x).log(), p.model(x).log()
    assert (rounded - ref).abs().max().item() > 1e-3  # the rounded weights differ: the check below can fail
    assert (got - ref).abs().max().item() <= 1e-4
