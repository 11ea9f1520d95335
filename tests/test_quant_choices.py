"""Choices on held-out calibration images: the float-layer plan, LayerNorm migration, activation ranges."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import convert_tiny  # noqa: E402
from converters import rewrites  # noqa: E402
from converters.act_quant import (  # noqa: E402
    ESTIMATORS,
    Observation,
    Point,
    fake_quant,
    fake_quant_rows,
    floor_gelu_inputs,
    gelu,
    gelu_floor,
    gelu_producers,
    observe,
    qparams,
    simulate,
    static_points,
)
from converters.calibrate import HeldOut, choose, measure  # noqa: E402
from converters.model import export_model  # noqa: E402
from converters.quant_plan import QuantPlan  # noqa: E402
from converters.smoothing import activation_absmax, norm_pairs, smooth  # noqa: E402
from edge_convnext.errors import EdgeConvNextError  # noqa: E402

pytestmark = pytest.mark.convert


@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
    """The tiny export model (probabilities out) after the LiteRT/ExecuTorch rewrites."""
    model = export_model(tiny_weights.model, tiny_weights.preprocessing)
    return rewrites.apply(model, ["fold_layer_scale", "split_depthwise"])[0]


@pytest.fixture(scope="module")
def images(tiny_calibration):
    return list(tiny_calibration(40))


@pytest.fixture(scope="module")
def logits_model(tiny_weights):
    return export_model(tiny_weights.model, tiny_weights.preprocessing, probabilities=False)


def test_the_plan_resolves_patterns_in_network_order_and_refuses_unknown_ones(tiny_model):
    plan = QuantPlan.for_model(tiny_model, ["classifier", "stages.*.dwconv.*", "embeddings.patch_embeddings"])
    assert plan.float_layers[0] == "embeddings.patch_embeddings" and plan.float_layers[-1] == "classifier"
    assert len([n for n in plan.float_layers if ".dwconv." in n]) == 3 * 5  # three pieces per block
    assert set(plan.quantized) | set(plan.float_layers) == set(plan.layers)
    assert not set(plan.quantized) & set(plan.float_layers)
    more = plan.with_float(["stages.0.layers.0.pwconv1"], "accuracy target")
    assert more.reasons["stages.0.layers.0.pwconv1"] == "accuracy target" and more.reasons["classifier"] == "recipe"
    with pytest.raises(EdgeConvNextError, match="matches no"):
        QuantPlan.for_model(tiny_model, ["stages.*.mlp.*"])


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_smoothing_is_float_equal_and_flattens_the_channel_ranges(logits_model, images, alpha):
    pairs = norm_pairs(logits_model)
    assert [p.layer for p in pairs][-1] == "classifier" and len(pairs) == 3 + 5 + 1
    amax = activation_absmax(logits_model, pairs, images[:8])
    before = {k: v.clone() for k, v in logits_model.state_dict().items()}
    smoothed, n = smooth(logits_model, amax, alpha, pairs)
    assert n == len(pairs)
    x = torch.from_numpy(np.concatenate(images[8:12]))
    with torch.no_grad():
        ref, got = logits_model(x), smoothed(x)
    assert ref.std() > 1.0 and (got - ref).abs().max().item() <= 1e-4
    assert all(torch.equal(before[k], v) for k, v in logits_model.state_dict().items())  # input untouched
    # the migrated activations' channel ranges are flatter: max/median of the per-channel maxima drops
    after = activation_absmax(smoothed, pairs, images[:8])
    spread = lambda a: float(a.max() / a.median())  # noqa: E731
    assert np.mean([spread(after[p.layer]) for p in pairs]) < np.mean([spread(amax[p.layer]) for p in pairs])


def test_smoothing_strength_zero_changes_nothing_and_out_of_range_is_refused(logits_model, images):
    amax = activation_absmax(logits_model, norm_pairs(logits_model), images[:2])
    same, n = smooth(logits_model, amax, 0.0)
    assert n == 0 and all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), logits_model.state_dict().values()))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        smooth(logits_model, amax, 1.5)


def test_fake_quant_matches_the_tflite_int8_grid():
    scale, zp = qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255) and -128 <= zp <= 127
    t = torch.linspace(-2.0, 5.0, 1001)
    q = fake_quant(t, -1.0, 3.0)
    steps = (q / scale + zp)
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # on the grid
    assert float(q.min()) >= -1.0 - scale and float(q.max()) <= 3.0 + scale  # clipped to the range
    inside = (t > -0.9) & (t < 2.9)
    assert float((q[inside] - t[inside]).abs().max()) <= scale / 2 + 1e-6
    rows = torch.randn(5, 64) * torch.arange(1, 6)[:, None]
    r = fake_quant_rows(rows)  # each row on its own grid: the error scales with the row's range
    err = (r - rows).abs().amax(1) / (rows.amax(1) - rows.amin(1))
    assert float(err.max()) <= 0.5 / 255 + 1e-6


def test_range_estimators_clip_outliers_that_min_max_keeps():
    obs = Observation()
    g = torch.Generator().manual_seed(0)
    values = torch.randn(20000, generator=g)
    values[:3] = torch.tensor([40.0, -30.0, 35.0])  # rare outliers
    obs.add(values, per_image=50000, g=g)
    lo, hi = ESTIMATORS["minmax"].range(obs)
    assert (lo, hi) == (-30.0, 40.0)
    for name in ("percentile 99.99", "mse"):
        lo2, hi2 = ESTIMATORS[name].range(obs)
        assert -30.0 < lo2 < 0.0 < hi2 < 40.0, name


def test_the_static_simulation_quantizes_inputs_and_outputs_and_leaves_float_layers_alone(tiny_model, images):
    plan = QuantPlan.for_model(tiny_model, ["stages.*.dwconv.*", "classifier"])
    obs = observe(tiny_model, static_points(plan.quantized), images[:4])
    ranges = {p: ESTIMATORS["minmax"].range(o) for p, o in obs.items()}
    seen = {}
    pw1 = dict(tiny_model.named_modules())["stages.0.layers.0.pwconv1"]
    dw = dict(tiny_model.named_modules())["stages.0.layers.0.dwconv.centre"]
    x = torch.from_numpy(images[0])
    with torch.no_grad(), simulate(tiny_model, "static", plan.quantized, ranges):
        # registered after the simulation's own pre-hooks, so they see what the layers see
        hooks = [pw1.register_forward_pre_hook(lambda m, i: seen.__setitem__("pw1", i[0].clone())),
                 dw.register_forward_pre_hook(lambda m, i: seen.__setitem__("dw", i[0].clone()))]
        tiny_model(x)
    for h in hooks:
        h.remove()
    scale, zp = qparams(*ranges[Point("stages.0.layers.0.pwconv1", "input")])
    steps = seen["pw1"] / scale + zp
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # a quantized layer's input is on its grid
    dw_steps = seen["dw"] / 1e-3
    assert not torch.allclose(dw_steps, dw_steps.round(), atol=1e-3)  # a float layer's input is not
    with torch.no_grad():  # the hooks are gone after the context
        assert torch.equal(tiny_model(x), tiny_model(x))


def test_gelu_floor_clamps_only_where_gelu_is_within_the_fraction_of_a_step(tiny_model, images):
    """The pre-GELU range's low end is raised where |GELU| is a fraction of its output grid's step; simulated,
    GELU's output then moves by less than that fraction of a step, and the other points keep their ranges."""
    assert gelu(-0.7517916) == pytest.approx(-0.16997, abs=1e-5)
    for limit in (1e-4, 3e-3, 0.05):
        x = gelu_floor(limit)
        assert x < -0.75 and abs(gelu(x)) == pytest.approx(limit, rel=1e-6)
    assert gelu_floor(0.5) == pytest.approx(-0.7517916)  # deeper than GELU's minimum: no clamp below it matters

    plan = QuantPlan.for_model(tiny_model, ["stages.*.dwconv.*", "classifier"])
    pairs = gelu_producers(tiny_model, plan.quantized)
    assert pairs and all(k.endswith(".pwconv1") and v == k.replace("pwconv1", "pwconv2") for k, v in pairs.items())
    obs = observe(tiny_model, static_points(plan.quantized), images[:4])
    ranges = {p: ESTIMATORS["minmax"].range(o) for p, o in obs.items()}
    floored, floors = floor_gelu_inputs(ranges, pairs, 0.25)
    assert set(floors) <= set(pairs) and floors
    for p, r in ranges.items():
        if p.where == "output" and p.layer in floors:
            step = (ranges[Point(pairs[p.layer], "input")][1] - ranges[Point(pairs[p.layer], "input")][0]) / 255
            assert floored[p] == (pytest.approx(floors[p.layer], abs=1e-4), r[1]) and floored[p][0] > r[0]
            assert abs(gelu(floored[p][0])) == pytest.approx(0.25 * step, rel=1e-3)
        else:
            assert floored[p] == r
    layer = next(iter(floors))
    act = dict(tiny_model.named_modules())[layer.replace("pwconv1", "act")]
    seen = {}
    with torch.no_grad():
        for key, rr in (("plain", ranges), ("floored", floored)):
            with simulate(tiny_model, "static", plan.quantized, rr):
                h = act.register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, (i[0].clone(), o.clone())))
                tiny_model(torch.from_numpy(images[0]))
                h.remove()
    (x0, y0), (x1, _) = seen["plain"], seen["floored"]
    assert float(x1.min()) >= floored[Point(layer, "output")][0] - 1e-6 > float(x0.min())  # clamped at the floor
    consumer = ranges[Point(pairs[layer], "input")]
    clamp = (torch.nn.functional.gelu(x0.clamp_min(floored[Point(layer, "output")][0])) - y0).abs().max()
    assert float(clamp) <= 0.25 * (consumer[1] - consumer[0]) / 255 + 1e-6  # GELU moved by < a quarter step


def test_gelu_floor_on_a_symmetric_grid_centres_the_floored_ranges(tiny_weights, tiny_calibration, monkeypatch):
    """Core ML's symmetric W8A8: the floored candidate's pre-GELU outputs are centred (a floor alone would not
    change a symmetric grid's step), recorded, float-equal, and the float model takes the same centring."""
    from converters import prepare as prep_mod
    from converters.calibrate import Choice
    from converters.centering import Restore, Shift
    from edge_convnext.recipes import get_recipe

    real = prep_mod.choose
    asked = []

    def floored_wins(candidates, data, log=lambda s: None):  # the choice itself is tested elsewhere
        got = real(candidates, data, log)
        asked.append(sorted(got.measured))
        return Choice("minmax, GELU floor", got.measured) if "minmax, GELU floor" in got.measured else got

    monkeypatch.setattr(prep_mod, "choose", floored_wins)
    model = export_model(tiny_weights.model, tiny_weights.preprocessing).eval()
    prep = prep_mod.Preparation(model, tiny_calibration, 8)
    base = get_recipe("coreml-w8a8")
    assert base.options["activation_ranges"]["gelu_floor"] == 0.25
    plain = {k: v for k, v in base.options.items() if k not in ("smoothing", "weight_rounding")}
    p = prep.prepare(dataclasses.replace(base, options={
        **plain, "activation_ranges": {"estimators": ("minmax",), "gelu_floor": 0.25}}))
    assert asked == [["minmax", "minmax, GELU floor"]]
    rec = p.ranges_choice
    floors, outs, ins = rec["gelu_floor"]["floors"], rec["centered_outputs"]["centers"], rec["centered_inputs"]["centers"]
    assert floors and set(outs) == set(floors) and all(k.endswith("pwconv1") for k in outs)
    assert set(ins) == {k.replace("pwconv1", "pwconv2") for k in outs}
    for layer, c in outs.items():
        lo, hi = p.activation_ranges[Point(layer, "output")]
        assert lo == pytest.approx(-hi) and lo + c == pytest.approx(floors[layer], abs=1e-4)  # centred floored range
    shifts = sorted(m.c for m in p.model.modules() if isinstance(m, Shift))
    restores = sorted(m.c for m in p.model.modules() if isinstance(m, Restore))
    assert shifts == sorted(ins.values()) and restores == sorted(outs.values())
    assert sorted(m.c for m in p.float_model.modules() if isinstance(m, (Shift, Restore))) == sorted(shifts + restores)
    x = torch.from_numpy(next(iter(tiny_calibration(1))))
    with torch.no_grad():
        assert (p.float_model(x) - model(x)).abs().max().item() <= 1e-5  # exact in float


def test_gelu_floor_is_refused_for_fractions_outside_a_step_and_without_estimators(tiny_weights, tiny_calibration):
    from converters.prepare import Preparation
    from edge_convnext.recipes import get_recipe

    prep = Preparation(export_model(tiny_weights.model, tiny_weights.preprocessing).eval(), tiny_calibration, 8)
    lite = get_recipe("tflite-int8")
    assert lite.options["activation_ranges"]["gelu_floor"] == 0.25
    bad = {k: v for k, v in lite.options.items() if k not in ("smoothing", "weight_rounding")}  # fail before any work
    bad["activation_ranges"] = {**bad["activation_ranges"], "gelu_floor": 2.0}
    with pytest.raises(EdgeConvNextError, match=r"tflite-int8: gelu_floor is a fraction of a quantization step in \(0, 1\]"):
        prep.prepare(dataclasses.replace(lite, options=bad))
    bad["activation_ranges"] = {"gelu_floor": 0.25}  # no estimators: nothing to floor, refused rather than ignored
    with pytest.raises(EdgeConvNextError, match="tflite-int8: gelu_floor needs activation range estimators"):
        prep.prepare(dataclasses.replace(lite, options=bad))


def test_held_out_images_are_disjoint_from_statistics_and_evaluation(tiny_model, tiny_calibration, subset):
    images = list(tiny_calibration(40))
    ids = list(tiny_calibration.used_ids)
    data = HeldOut.split(images, ids, tiny_model, fit=24, held=16)
    assert len(data.fit) == 24 and len(data.held) == 16 and not set(data.fit_ids) & set(data.held_ids)
    assert data.held_ids == ids[-16:]
    evaluation = {s.image_id for s in subset.split("evaluation")}
    assert not (set(data.fit_ids) | set(data.held_ids)) & evaluation
    small = HeldOut.split(images[:20], ids[:20], tiny_model, fit=128)  # a small --calibration DIR
    assert len(small.held) == 8 and len(small.fit) == 12
    with pytest.raises(EdgeConvNextError, match="held out"):
        HeldOut.split(images[:5], ids[:5], tiny_model, fit=128)
    # the float model measures perfect against itself; choose() takes the best SQNR
    assert measure(tiny_model, data).top1_agreement == 1.0
    noisy = lambda x: tiny_model(x + 0.05 * torch.randn_like(x))  # noqa: E731
    choice = choose({"noisy": lambda: noisy, "float": lambda: tiny_model}, data)
    assert choice.chosen == "float" and set(choice.to_dict()["candidates"]) == {"noisy", "float"}


def test_convert_records_every_choice_on_calibration_images_only(tmp_path, monkeypatch, subset):
    """A static LiteRT recipe with migration and range candidates: the manifest records both choices,
    their candidates' numbers and image ids, none of them an evaluation image; the torch-side ranges
    are what the .tflite stores."""
    import converters.build as build
    from edge_convnext.manifest import read_manifest
    from edge_convnext.recipes import get_recipe

    base = get_recipe("tflite-int8")
    recipe = dataclasses.replace(base, options={
        **base.options, "smoothing": {"alphas": [0.0, 0.5]},
        "activation_ranges": {"estimators": ["minmax", "percentile 99.99"], "gelu_floor": 0.25},
        "float_layers": ("stages.*.dwconv.*", "classifier")})
    monkeypatch.setattr(build, "select_recipes", lambda spec: [recipe])
    convert_tiny(tmp_path, "tflite-int8", reference_images=8, parity_images=4, calibration_images=32)
    m = read_manifest(tmp_path / "tflite-int8.json")
    low = m.lowering
    evaluation = {s.image_id for s in subset.split("evaluation")}
    for key in ("smoothing", "activation_ranges"):
        rec = low[key]
        assert set(rec["candidates"]) and rec["chosen"] in rec["candidates"]
        assert rec["held_out_images"] == len(rec["held_out_ids"]) >= 8
        assert not set(rec["held_out_ids"]) & set(rec["fit_ids"])
        assert not (set(rec["held_out_ids"]) | set(rec["fit_ids"])) & evaluation
    assert not set(m.calibration["image_ids"]) & set(low["activation_ranges"]["held_out_ids"])  # backend calibration
    assert not set(low["weight_rounding"]["image_ids"]) & set(low["activation_ranges"]["held_out_ids"])
    assert {f["name"] for f in low["float_layers"]["float_layers"]} >= {"classifier"}
    assert low["quantization"]["calibration"]["tensors_ranged_on_torch_side"] == low["activation_ranges"]["points"]
    # every estimator is measured as it is and with its GELU inputs floored; a floored choice lists its floors
    assert set(low["activation_ranges"]["candidates"]) == {"minmax", "percentile 99.99", "minmax, GELU floor",
                                                           "percentile 99.99, GELU floor"}
    if low["activation_ranges"]["chosen"].endswith("GELU floor"):
        floors = low["activation_ranges"]["gelu_floor"]["floors"]
        assert floors and all(n.endswith(".pwconv1") and v < 0 for n, v in floors.items())
    else:
        assert "gelu_floor" not in low["activation_ranges"]
    assert m.parity["status"] == "measured"


def test_int8_all_chooses_its_ranges_on_held_out_calibration_images_only(tmp_path, monkeypatch, subset, tiny_weights,
                                                                          tiny_calibration):
    """tflite-int8-all's own int8 LayerNorm/GELU/adds are not simulated on the torch side, so it folds its
    LayerNorm affines into the next layers (nothing left to migrate) and chooses its ranges on built artifacts.
    A variant asking for a migration is refused by name; the recipe's range choices use held-out calibration
    images that set no statistic, never evaluation images."""
    import converters.build as build
    from converters.prepare import Preparation
    from edge_convnext.manifest import read_manifest
    from edge_convnext.recipes import get_recipe

    base = get_recipe("tflite-int8-all")
    assert "fold_norm_affine" in base.options["rewrites"] and "smoothing" not in base.options
    migrating = dataclasses.replace(base, options={**base.options, "smoothing": {"alphas": [0.0, 0.5]}})
    prep = Preparation(export_model(tiny_weights.model, tiny_weights.preprocessing).eval(), tiny_calibration, 8)
    with pytest.raises(EdgeConvNextError, match="tflite-int8-all: smoothing needs a simulated activation scheme"):
        prep.prepare(migrating)
    # Fewer candidates than the recipe's, for time; per-group ranges keep two estimators.
    graph = {**base.options["graph_ranges"], "held_out_images": 16,
             "per_group": {**base.options["graph_ranges"]["per_group"], "estimators": ("minmax", "percentile 99.5")}}
    recipe = dataclasses.replace(base, options={**base.options, "graph_ranges": graph})
    monkeypatch.setattr(build, "select_recipes", lambda spec: [recipe])
    convert_tiny(tmp_path, "tflite-int8-all", reference_images=8, parity_images=4, calibration_images=32)
    m = read_manifest(tmp_path / "tflite-int8-all.json")
    assert "smoothing" not in m.lowering and m.lowering["rewrites"]["fold_norm_affine"] > 0
    assert m.lowering["rewrites"]["fold_norm_mean"] == m.lowering["rewrites"]["fold_norm_affine"]
    evaluation = {s.image_id for s in subset.split("evaluation")}
    assert m.lowering["quantization"]["activation_scope"] == "all"
    # Its int8 tensors' ranges are chosen by building the artifact per estimator (tflite_ranges).
    from converters.layer_report import used_image_ids

    graph = m.lowering["quantization"]["graph_ranges"]
    assert graph["chosen"] in graph["candidates"] and len(graph["candidates"]) == 4
    assert graph["per_group"]["start"] == graph["chosen"] and graph["per_group"]["groups"]
    assert not set(graph["held_out_image_ids"]) & (evaluation | set(m.calibration["image_ids"]))
    assert set(graph["held_out_image_ids"]) <= used_image_ids(m)
