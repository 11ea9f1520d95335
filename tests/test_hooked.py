"""The one statistics loop: hooks always removed, an empty image stream an error."""

import numpy as np
import pytest
import torch
from torch import nn

from converters.hooked import run_hooked


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()


def test_runs_every_image_and_removes_the_hooks():
    model, seen = _model(), []
    handle = model[0].register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    images = [np.zeros((1, 3, 8, 8), np.float32) for _ in range(3)]
    assert run_hooked(model, images, [handle], "test") == 3
    assert seen == [(1, 4, 8, 8)] * 3
    model(torch.zeros(1, 3, 8, 8))
    assert len(seen) == 3  # the hook is gone


def test_removes_the_hooks_when_an_image_fails():
    model, calls = _model(), []
    handle = model[0].register_forward_pre_hook(lambda mod, inp: calls.append(1))

    def images():
        yield np.zeros((1, 3, 8, 8), np.float32)
        raise OSError("unreadable image")

    with pytest.raises(OSError):
        run_hooked(model, images(), [handle], "test")
    model(torch.zeros(1, 3, 8, 8))
    assert calls == [1]


def test_an_empty_stream_names_the_pass():
    model = _model()
    handle = model[0].register_forward_pre_hook(lambda mod, inp: None)
    with pytest.raises(ValueError, match="weight rounding got no calibration images"):
        run_hooked(model, [], [handle], "weight rounding")
    assert not model[0]._forward_pre_hooks


def test_collect_stats_names_its_caller():
    from converters.weight_quant import collect_stats

    model = _model()
    with pytest.raises(ValueError, match="coreml-p4's per-layer storage choice got no calibration images"):
        collect_stats(model, [("0", model[0])], [], "coreml-p4's per-layer storage choice")
    with pytest.raises(ValueError, match="^weight rounding got no calibration images"):
        collect_stats(model, [("0", model[0])], [])
