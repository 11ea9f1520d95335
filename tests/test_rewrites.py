"""Exact rewrites of the export model (`converters.rewrites`): each one float-equal to the original."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters import rewrites  # noqa: E402
from converters.model import export_model  # noqa: E402

pytestmark = pytest.mark.convert


@pytest.fixture(scope="module")
def model_and_images(tiny_weights, subset):
    from edge_convnext.preprocessing import preprocess_file

    model = export_model(tiny_weights.model, tiny_weights.preprocessing, probabilities=False)
    x = np.stack([preprocess_file(s.path, tiny_weights.preprocessing) for s in subset.split("evaluation")[:4]])
    return model, torch.from_numpy(x)


@pytest.mark.parametrize("names", [["fold_layer_scale"], ["split_depthwise"], ["fold_norm_affine"], ["channels_first"],
                                   ["fold_layer_scale", "split_depthwise", "channels_first"],
                                   ["fold_layer_scale", "split_depthwise", "fold_norm_affine", "channels_first"],
                                   ["channels_first", "fold_layer_scale", "split_depthwise"],
                                   ["fold_norm_affine", "fold_norm_mean"],
                                   ["fold_layer_scale", "split_depthwise", "fold_norm_affine", "fold_norm_mean"]])
def test_rewrites_are_float_equal(model_and_images, names):
    model, x = model_and_images
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rewritten, counts = rewrites.apply(model, names)
    blocks = sum(len(stage.layers) for stage in model.stages)
    downsampling = sum(len(stage.downsampling_layer) == 2 for stage in model.stages)
    want = {"channels_first": blocks + 1 + downsampling,  # + stem, downsampling LayerNorms
            "fold_norm_affine": blocks + downsampling + 1,  # + the final norm; the stem keeps its bias
            "fold_norm_mean": blocks + downsampling + 1}
    assert counts == {n: want.get(n, blocks) for n in names}  # every block rewritten
    with torch.no_grad():
        ref, got = model(x), rewritten(x)
    assert ref.std() > 1.0  # spread logits: the bound below means something
    assert (got - ref).abs().max().item() <= 1e-4
    # The input model is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fold_norm_mean_leaves_scale_only_norms_before_layers_that_ignore_their_mean(model_and_images):
    from converters.smoothing import norm_pairs

    model, x = model_and_images
    with pytest.raises(ValueError, match="run fold_norm_affine before fold_norm_mean"):
        rewrites.apply(model, ["fold_norm_mean"])
    folded, _ = rewrites.apply(model, ["fold_norm_affine"])
    rewritten, _ = rewrites.apply(folded, ["fold_norm_mean"])
    outs: dict[str, torch.Tensor] = {}
    modules = dict(rewritten.named_modules())
    hooks = [modules[p.norm].register_forward_hook(lambda m, i, o, n=p.norm: outs.__setitem__(n, o))
             for p in norm_pairs(model)]
    with torch.no_grad():
        rewritten(x)
    for h in hooks:
        h.remove()
    for pair in norm_pairs(model):
        assert isinstance(modules[pair.norm], rewrites.ScaleNorm)
        w = modules[pair.layer].weight
        assert w.sum(dim=1).abs().max().item() <= 1e-5 * w.abs().max().item()  # W' 1 = 0 at every tap
        y = outs[pair.norm]
        mean = y.mean(dim=1 if modules[pair.norm].channels_first else -1)
        assert mean.abs().max().item() > 1e-3  # the output keeps the mean the next layer must ignore
    assert not isinstance(modules["embeddings.layernorm"], rewrites.ScaleNorm)  # it feeds the residual stream
    with pytest.raises(ValueError, match="no channel form of fold_norm_mean"):
        rewrites.apply(rewritten, ["channels_first"])
    with pytest.raises(ValueError, match="is a ScaleNorm; fold_norm_mean takes the model's own LayerNorms, once"):
        rewrites.apply(rewritten, ["fold_norm_mean"])


def test_fold_removes_the_layer_scale_and_the_split_leaves_only_small_centred_depthwise_convs(model_and_images):
    model, _ = model_and_images
    rewritten, _ = rewrites.apply(model, ["fold_layer_scale", "split_depthwise"])
    blocks = [layer for stage in rewritten.stages for layer in stage.layers]
    assert all(b.layer_scale_parameter is None for b in blocks)
    convs = [m for b in blocks for m in b.dwconv.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 * len(blocks)
    assert {(c.kernel_size, c.dilation) for c in convs} == {((5, 5), (1, 1)), ((2, 7), (6, 1)), ((5, 2), (1, 6))}
    # 49 taps in all per block (each kernel weight exactly once), none above XNNPACK's 25-tap kernels
    assert all(c.kernel_size[0] * c.kernel_size[1] <= 25 for c in convs)
    assert sum(c.kernel_size[0] * c.kernel_size[1] for c in convs) == 49 * len(blocks)
    assert all(c.groups == c.in_channels for c in convs)


@pytest.mark.parametrize("k", [5, 7, 9])
def test_split_depthwise_equals_the_original_kernel(k):
    torch.manual_seed(k)
    conv = torch.nn.Conv2d(12, 12, k, padding=k // 2, groups=12)
    x = torch.randn(2, 12, 15, 9)  # non-square, smaller than the kernel's reach at the borders
    with torch.no_grad():
        assert (rewrites.SplitDepthwise(conv)(x) - conv(x)).abs().max().item() <= 1e-5


def test_channels_first_keeps_every_layer_name_and_weight(model_and_images):
    """A layout pass: the quantizable layers keep their names and weights (1x1 convs hold the linears' weights)."""
    from converters.quant_plan import quantizable_layers

    model, _ = model_and_images
    rewritten, _ = rewrites.apply(model, ["channels_first"])
    before, after = dict(quantizable_layers(model)), dict(quantizable_layers(rewritten))
    assert list(before) == list(after)
    for name, m in before.items():
        assert torch.equal(m.weight.reshape(after[name].weight.shape), after[name].weight), name
    blocks = [layer for stage in rewritten.stages for layer in stage.layers]
    assert all(isinstance(b.pwconv1, torch.nn.Conv2d) and b.pwconv1.kernel_size == (1, 1) for b in blocks)
    assert "channels_first" in rewrites.LAYOUT_PASSES


def test_the_split_refuses_what_it_cannot_rewrite_exactly():
    with pytest.raises(ValueError, match="depthwise"):
        rewrites.SplitDepthwise(torch.nn.Conv2d(8, 8, 7, padding=3))  # not depthwise
    with pytest.raises(ValueError, match="depthwise"):
        rewrites.SplitDepthwise(torch.nn.Conv2d(8, 8, 7, stride=2, padding=3, groups=8))
    with pytest.raises(ValueError, match="depthwise"):
        rewrites.SplitDepthwise(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8))  # nothing to split
    with pytest.raises(ValueError, match="unknown rewrite"):
        rewrites.apply(torch.nn.Identity(), ["fuse_everything"])


def test_a_recipe_option_applies_rewrites_and_the_manifest_records_them(tmp_path, monkeypatch):
    """`convert` applies a recipe's ``rewrites`` before the backend; the artifact still matches the reference."""
    import converters.build as build
    from converters.build import ConvertOptions, convert
    from edge_convnext.manifest import read_manifest
    from edge_convnext.recipes import get_recipe

    recipe = dataclasses.replace(get_recipe("tflite-fp32"), options={"rewrites": ["fold_layer_scale", "split_depthwise"]})
    monkeypatch.setattr(build, "select_recipes", lambda spec: [recipe])
    report = convert(ConvertOptions(weights="random:0:convnext-test", recipes="tflite-fp32", out=tmp_path,
                                    reference_images=8, parity_images=4), echo=lambda s: None)
    assert report.ok, [o.error for o in report.outcomes]
    m = read_manifest(tmp_path / "tflite-fp32.json")
    assert m.lowering["rewrites"] == {"fold_layer_scale": 5, "split_depthwise": 5}
    assert m.parity["passed"] and m.parity["max_abs"] <= 1e-3
    assert m.lowering["ops"]["DEPTHWISE_CONV_2D"] == 3 * 5
    assert "PAD" not in m.lowering["ops"] and "SLICE" not in m.lowering["ops"]  # "same" padding in every piece


def test_centring_inputs_is_float_equal_and_shifts_what_the_layer_reads(model_and_images):
    """`converters.centering`: ``W x + b = W (x - c) + (b + W c)``; the layer's input hook sees ``x - c``."""
    from converters.centering import Shift, center_inputs

    model, x = model_and_images
    names = [n for n, _ in model.named_modules() if n.endswith("pwconv2")]
    centers = {n: 0.5 + i for i, n in enumerate(names)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    centred = center_inputs(model, centers)
    out: dict[str, torch.Tensor] = {}
    read: dict[str, torch.Tensor] = {}  # what the first pwconv2 reads in each model
    def keep(which: str):
        def hook(mod, inp) -> None:  # returns None: the input passes unchanged
            read[which] = inp[0].detach()
        return hook

    for which, m in (("float", model), ("centred", centred)):
        h = dict(m.named_modules())[names[0]].register_forward_pre_hook(keep(which))
        with torch.no_grad():
            out[which] = m(x)
        h.remove()
    assert (out["centred"] - out["float"]).abs().max().item() <= 1e-4
    assert torch.allclose(read["centred"], read["float"] - centers[names[0]], atol=1e-5)
    assert sum(isinstance(m, Shift) for m in centred.modules()) == len(names)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched


def test_centring_refuses_a_layer_without_a_producer_to_shift(model_and_images):
    from converters.centering import center_inputs

    model, _ = model_and_images
    name = next(n for n, _ in model.named_modules() if n.endswith("pwconv1"))
    with pytest.raises(ValueError, match="pwconv1"):
        center_inputs(model, {name: 1.0})


def test_centring_outputs_is_float_equal_and_shifts_what_the_layer_writes(model_and_images):
    """`converters.centering.center_outputs`: the layer writes ``y - c``, its consumer reads ``y`` again."""
    from converters.centering import Restore, center_outputs

    model, x = model_and_images
    names = [n for n, _ in model.named_modules() if n.endswith("pwconv1")]
    centers = {n: 0.5 - i for i, n in enumerate(names)}  # negative centres too: the op stays an add
    before = {k: v.clone() for k, v in model.state_dict().items()}
    centred = center_outputs(model, centers)
    written: dict[str, torch.Tensor] = {}
    for which, m in (("float", model), ("centred", centred)):
        h = dict(m.named_modules())[names[0]].register_forward_hook(
            lambda mod, inp, out, which=which: written.__setitem__(which, out.detach()))
        with torch.no_grad():
            written[which + " logits"] = m(x)
        h.remove()
    assert (written["centred logits"] - written["float logits"]).abs().max().item() <= 1e-4
    assert torch.allclose(written["centred"], written["float"] - centers[names[0]], atol=1e-5)
    assert sorted(m.c for m in centred.modules() if isinstance(m, Restore)) == sorted(centers.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched
    with pytest.raises(ValueError, match="pwconv2"):
        center_outputs(model, {names[0].replace("pwconv1", "pwconv2"): 1.0})


def test_fold_norm_affine_moves_every_paired_affine_and_keeps_the_stems(model_and_images):
    from converters.smoothing import norm_pairs

    model, x = model_and_images
    rewritten, _ = rewrites.apply(model, ["fold_norm_affine"])
    before, after = dict(model.named_modules()), dict(rewritten.named_modules())
    for pair in norm_pairs(model):
        # a real affine moved, not an identity one
        assert before[pair.norm].bias.abs().max() > 0.01 and (before[pair.norm].weight - 1).abs().max() > 0.01
        assert after[pair.norm].weight is None and after[pair.norm].bias is None
        assert not torch.equal(after[pair.layer].bias, before[pair.layer].bias)
        assert not torch.equal(after[pair.layer].weight, before[pair.layer].weight)
    assert after["embeddings.layernorm"].bias is not None  # it also feeds the residual stream
    with pytest.raises(ValueError, match="no affine to migrate"):
        from converters.smoothing import smooth

        smooth(rewritten, {p.layer: torch.ones(1) for p in norm_pairs(model)}, 0.5)
    # and the channels-first LayerNorm of ExecuTorch's layout takes a bias-free LayerNorm
    cf, _ = rewrites.apply(rewritten, ["channels_first"])
    with torch.no_grad():
        assert (cf(x) - model(x)).abs().max().item() <= 1e-4
