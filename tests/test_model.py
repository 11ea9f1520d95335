"""The float reference, the export model, and synthetic weights in which every block matters."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import ConvNextForImageClassification  # noqa: E402

from converters.model import ReferenceClassifier, export_model  # noqa: E402
from converters.synthetic import synthetic_config  # noqa: E402
from converters.weights import load_weights  # noqa: E402
from edge_convnext.preprocessing import normalize, preprocess_file  # noqa: E402

pytestmark = pytest.mark.convert


@pytest.fixture(scope="module")
def tiny_t():
    return load_weights("random:0")


@pytest.fixture(scope="module")
def images(subset) -> torch.Tensor:
    return torch.from_numpy(np.stack([preprocess_file(s.path) for s in subset.split("evaluation")[:8]]))


def test_reference_is_transformers_on_normalized_input(tiny_t, images):
    with torch.no_grad():
        want = tiny_t.model(pixel_values=torch.from_numpy(normalize(images.numpy()))).logits
        got = ReferenceClassifier(tiny_t.model, tiny_t.preprocessing)(images)
    assert torch.equal(want, got)


def test_export_model_equals_reference(tiny_t, images):
    with torch.no_grad():
        ref = ReferenceClassifier(tiny_t.model, tiny_t.preprocessing)(images)
        exp = export_model(tiny_t.model, tiny_t.preprocessing, probabilities=False)(images)
        probs = export_model(tiny_t.model, tiny_t.preprocessing)(images)
    assert (ref - exp).abs().max().item() <= 1e-4
    # The artifacts' graph ends in a softmax of those logits.
    assert (probs.log() - torch.log_softmax(ref, dim=-1)).abs().max().item() <= 1e-4
    assert torch.allclose(probs.sum(dim=-1), torch.ones(len(images)), atol=1e-5)
    # the export model is a copy: folding the normalization did not touch the loaded weights
    with torch.no_grad():
        again = ReferenceClassifier(tiny_t.model, tiny_t.preprocessing)(images)
    assert torch.equal(ref, again)


def _block_sensitivity(model: ConvNextForImageClassification, x: torch.Tensor) -> list[tuple[float, float]]:
    """For each block: (relative logit change, top-1 agreement) when its contribution is zeroed."""
    ref = ReferenceClassifier(model, load_weights("random:0:convnext-test").preprocessing)
    with torch.no_grad():
        base = ref(x)
        out = []
        for stage in model.convnext.encoder.stages:
            for layer in stage.layers:
                saved = layer.layer_scale_parameter.detach().clone()
                layer.layer_scale_parameter.zero_()
                z = ref(x)
                layer.layer_scale_parameter.copy_(saved)
                rel = ((z - base).norm() / base.norm()).item()
                out.append((rel, (z.argmax(1) == base.argmax(1)).float().mean().item()))
    return out


def test_every_synthetic_block_matters(tiny_t, images):
    sens = _block_sensitivity(tiny_t.model, images)
    assert len(sens) == 18
    for i, (rel, agree) in enumerate(sens):
        assert rel > 0.2, f"block {i}: zeroing it changes the logits by only {rel:.2%}"
    assert np.mean([a for _, a in sens]) < 0.8  # and it moves predictions, not just logits


def test_hf_default_init_hides_blocks(images):
    """The negative control: transformers' init (layer scale 1e-6) fails the criterion above."""
    torch.manual_seed(0)
    cfg = synthetic_config("convnext-tiny")
    cfg.layer_scale_init_value = 1e-6
    model = ConvNextForImageClassification(cfg).eval()
    sens = _block_sensitivity(model, images[:2])
    assert max(rel for rel, _ in sens) < 1e-3


def test_synthetic_logits_look_like_a_classifier(tiny_t, images):
    with torch.no_grad():
        z = ReferenceClassifier(tiny_t.model, tiny_t.preprocessing)(images)
    p = torch.softmax(z, 1)
    assert 2.0 < z.std(1).mean().item() < 12.0
    assert 0.1 < p.max(1).values.mean().item() < 0.95
    assert len(set(z.argmax(1).tolist())) >= 4  # predictions depend on the image
