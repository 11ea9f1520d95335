"""Loading ConvNeXt-T from every checkpoint format, and clear errors for bad checkpoints.

Checkpoints are written here from full-size models: transformers' own (HF directory and files), and
independent re-implementations with the official, timm and torchvision module naming
(`convnext_originals`). Loaded into transformers, each must reproduce its source's logits.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from converters.model import ReferenceClassifier  # noqa: E402
from converters.weights import load_weights  # noqa: E402
from convnext_originals import ORIGINALS, randomize  # noqa: E402
from edge_convnext.errors import WeightsError  # noqa: E402
from edge_convnext.preprocessing import (  # noqa: E402
    CONVNEXT_TIMM_OFFICIAL,
    TORCHVISION_IMAGENET1K_V1,
    normalize,
    preprocess_file,
)

pytestmark = pytest.mark.convert
TOL = 1e-4


@pytest.fixture(scope="module")
def images(subset) -> np.ndarray:
    """Two real evaluation images, float32 [2, 3, 224, 224] in [0, 1]."""
    return np.stack([preprocess_file(s.path) for s in subset.split("evaluation")[:2]])


@pytest.fixture(scope="module")
def hf_model():
    return load_weights("random:3").model


def _logits(model, x01: np.ndarray, pre) -> np.ndarray:
    with torch.no_grad():
        return ReferenceClassifier(model, pre)(torch.from_numpy(x01)).numpy()


def _hf_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x)).logits.numpy()


@pytest.mark.parametrize("fmt", ["official", "timm", "torchvision"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_foreign_checkpoint_reproduces_its_source_logits(tmp_path, images, fmt, suffix):
    src = randomize(ORIGINALS[fmt](), seed=11)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"convnext_tiny_{fmt}{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    elif fmt == "official":
        torch.save({"model": sd, "epoch": 300}, path)  # the released files wrap the weights like this
    else:
        torch.save(sd, path)
    loaded = load_weights(str(path))
    assert loaded.identity.format == fmt and not loaded.identity.synthetic
    assert loaded.model.config.depths == [3, 3, 9, 3] and loaded.model.config.hidden_sizes == [96, 192, 384, 768]
    expected_pre = TORCHVISION_IMAGENET1K_V1 if fmt == "torchvision" else CONVNEXT_TIMM_OFFICIAL
    assert loaded.preprocessing == expected_pre
    x = normalize(images, expected_pre)
    with torch.no_grad():
        want = src(torch.from_numpy(x)).numpy()
    got = _hf_logits(loaded.model, x)
    assert np.abs(got - want).max() <= TOL
    assert want.std() > 0.5  # the comparison is not between two near-constant outputs


def test_hf_directory_safetensors_and_bin(tmp_path, images, hf_model):
    want = _hf_logits(hf_model, normalize(images))
    for safe in (True, False):
        d = tmp_path / ("safe" if safe else "bin")
        hf_model.config.id2label = {i: f"class number {i}" for i in range(1000)}
        if safe:
            hf_model.save_pretrained(d)
        else:  # older HF repos ship pytorch_model.bin; transformers 5 no longer writes it
            hf_model.config.save_pretrained(d)
            torch.save(hf_model.state_dict(), d / "pytorch_model.bin")
        (d / "preprocessor_config.json").write_text(json.dumps({
            "crop_pct": 0.875, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
        }))
        assert (d / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
        loaded = load_weights(str(d))
        assert loaded.identity.format == "hf"
        assert loaded.labels is not None and loaded.labels[7] == "class number 7"
        assert loaded.preprocessing.resize_shortest_edge == 256 and loaded.preprocessing.resample == "bicubic"
        assert np.abs(_hf_logits(loaded.model, normalize(images)) - want).max() <= TOL


def test_single_hf_safetensors_file(tmp_path, images, hf_model):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(path))
    loaded = load_weights(str(path))
    # A bare file has no config.json: the final LayerNorm's eps takes transformers' default (1e-12, as in
    # facebook/convnext-tiny-224's config) while this model was built with 1e-6, hence the looser bound.
    assert loaded.identity.format == "hf" and loaded.model.config.layer_norm_eps == 1e-12
    diff = np.abs(_hf_logits(loaded.model, normalize(images)) - _hf_logits(hf_model, normalize(images))).max()
    assert diff <= 1e-3


def test_missing_key_is_named(tmp_path, hf_model):
    sd = dict(hf_model.state_dict())
    del sd["convnext.encoder.stages.2.layers.4.pwconv1.weight"]
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(WeightsError, match=r"missing 1 key.*stages\.2\.layers\.4\.pwconv1\.weight"):
        load_weights(str(path))


def test_shape_mismatch_and_unexpected_key_are_named(tmp_path):
    src = randomize(ORIGINALS["timm"](), seed=1)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    sd["stages.1.blocks.0.mlp.fc1.weight"] = torch.zeros(10, 10)
    path = tmp_path / "timm_bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"shape mismatch.*stages\.1\.layers\.0\.pwconv1\.weight"):
        load_weights(str(path))
    sd = {k: v.contiguous() for k, v in src.state_dict().items()} | {"stages.0.blocks.0.extra.weight": torch.zeros(3)}
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"no ConvNeXt meaning: stages\.0\.blocks\.0\.extra\.weight"):
        load_weights(str(path))


def test_truncated_and_foreign_files(tmp_path, hf_model):
    good = tmp_path / "ok.pth"
    torch.save({k: v for k, v in list(hf_model.state_dict().items())[:4]}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(WeightsError, match=r"cut\.pth: corrupted or truncated"):
        load_weights(str(cut))
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    with pytest.raises(WeightsError, match=r"cut\.safetensors"):
        load_weights(str(cut_st))
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, other)
    with pytest.raises(WeightsError, match="not a ConvNeXt checkpoint"):
        load_weights(str(other))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Evil()}, fh)
    with pytest.raises(WeightsError, match="not unpickled for safety"):
        load_weights(str(path))
    assert "this must never run" not in capsys.readouterr().out


def test_bad_specs_fail_with_the_spec_named(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth: no such checkpoint"):
        load_weights(str(tmp_path / "nope.pth"))
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(WeightsError, match="needs config.json"):
        load_weights(str(empty))
    with pytest.raises(WeightsError, match="unknown synthetic architecture"):
        load_weights("random:0:convnext-huge")


def test_default_falls_back_to_synthetic_loudly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable here anyway; this keeps it instant
    loaded = load_weights(None)
    assert loaded.identity.synthetic and loaded.identity.source == "random:0"
    assert any("FALLING BACK TO SYNTHETIC" in w for w in loaded.warnings)


def test_explicit_unreachable_hub_id_fails(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="facebook/convnext-tiny-224"):
        load_weights("facebook/convnext-tiny-224")


def test_synthetic_weights_are_deterministic():
    a, b = load_weights("random:5:convnext-test"), load_weights("random:5:convnext-test")
    c = load_weights("random:6:convnext-test")
    assert a.identity.sha256 == b.identity.sha256 != c.identity.sha256
    assert a.identity.synthetic and "SYNTHETIC" in a.identity.description
