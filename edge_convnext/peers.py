"""Peer runtimes for `edge-convnext bench --peers`: what a user would run instead of the artifacts.

* ``onnxruntime-fp32``: ONNX Runtime's CPU provider on an ONNX export of the same export model
  (normalization folded in, float32, opset 18), ``intra_op_num_threads`` = the bench's threads;
* ``pytorch-eager-fp32``: the same export model in PyTorch eager mode, ``torch.set_num_threads``.

Both return logits for float32 NCHW ``[N, 3, 224, 224]`` RGB in [0, 1], like a runner. The ONNX file
is exported on the build host (torch, the ``convert`` extra); running it needs only ``onnxruntime``
(the ``bench`` extra). The weights must be the artifacts' own: `load_peer_weights` refuses others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.errors import ManifestError, MissingExtra

PEERS = ("onnxruntime-fp32", "pytorch-eager-fp32")
ONNX_OPSET = 18


class OnnxRuntimePeer:
    """ONNX Runtime (CPU execution provider) on ``onnx_path``: float32 NCHW [0, 1] -> float32 logits."""

    name = "onnxruntime"
    emulated = False

    def __init__(self, onnx_path: Path, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingExtra("onnxruntime", "bench", "benchmarking against ONNX Runtime") from e
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.concatenate([self.session.run(None, {self._input: x[i : i + 1]})[0] for i in range(len(x))])


class TorchEagerPeer:
    """The float export model in PyTorch eager mode (``torch.no_grad``, batch 1, float32 logits)."""

    name = "pytorch-eager"
    emulated = False

    def __init__(self, weights: str, weights_sha256: str | None, threads: int | None) -> None:
        import torch

        from converters.model import export_model

        w = load_peer_weights(weights, weights_sha256)
        self.model = export_model(w.model, w.preprocessing, probabilities=False)
        if threads:
            torch.set_num_threads(int(threads))
        self._torch = torch

    def run(self, x: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            return np.concatenate([self.model(self._torch.from_numpy(np.ascontiguousarray(x[i : i + 1]))).numpy()
                                   for i in range(len(x))])


def load_peer_weights(weights: str, weights_sha256: str | None) -> Any:
    """The weights the artifacts were built from (`converters.weights.load_weights`); refuses others."""
    try:
        from converters.weights import load_weights
    except ImportError as e:
        raise MissingExtra("torch", "convert", "benchmarking the peers (ONNX export, PyTorch eager)") from e
    w = load_weights(weights)
    if weights_sha256 and w.identity.sha256 != weights_sha256:
        raise ManifestError(
            f"peer weights {weights} have sha256 {w.identity.sha256[:12]}…, the artifacts' reference was built from "
            f"{weights_sha256[:12]}…; pass --weights with the artifacts' own weights")
    return w


def export_onnx(weights: str, weights_sha256: str | None, out: Path) -> Path:
    """Export the float export model (logits, normalization folded) of ``weights`` to ``out`` (ONNX, opset 18)."""
    import torch

    from converters.model import export_model

    w = load_peer_weights(weights, weights_sha256)
    model = export_model(w.model, w.preprocessing, probabilities=False)
    with torch.no_grad():
        torch.onnx.export(model, (torch.rand(1, 3, 224, 224),), str(out), opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["logits"], dynamo=False)
    return out
