"""Fidelity and accuracy metrics over logits (NumPy only; used by build-time parity and by eval).

Fidelity is measured one way for every artifact: on logits centered per image. Artifacts that output
probabilities are read as ``log p`` (`edge_convnext.contract.OutputContract.log_scores`), which is
the logits minus a per-image constant (``logsumexp``); centering removes that constant on both sides,
so a probability artifact and a logit artifact of the same network compare equal. Classes with a
probability below 1e-30 are floored on both sides (`LOG_FLOOR`): float32 softmax kernels cannot
resolve them (see there). Uncentered
log-probabilities would count the per-image offset as signal and inflate SQNR by 10 dB or more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Fidelity:
    """How closely an artifact's logits follow the float reference on the same images."""

    images: int
    max_abs: float
    sqnr_db: float
    cosine: float
    kl: float
    top1_agreement: float
    top5_overlap: float

    def to_dict(self) -> dict[str, float]:
        return {k: (round(v, 7) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - actual|^2) over all logits; inf when identical."""
    ref = reference.astype(np.float64)
    err = float(np.sum((ref - actual.astype(np.float64)) ** 2))
    sig = float(np.sum(ref**2))
    return float("inf") if err == 0.0 else 10.0 * np.log10(sig / err)


def topk(z: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, best first: int ``[N, k]``."""
    idx = np.argpartition(-z, k - 1, axis=-1)[:, :k]
    order = np.argsort(-np.take_along_axis(z, idx, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(idx, order, axis=-1)


# Probabilities below 1e-30 are not compared: both sides of every comparison are floored at log(1e-30).
# A float32 probability cannot go below the smallest normal float32 (1.2e-38) without losing precision,
# and runtimes' softmax kernels lose it earlier: XNNPACK's float32 softmax (LiteRT) was measured here
# 0.34 nats off at p ~ 1e-36 and exact to 5e-5 nats above 1e-30. No app decision depends on such classes.
LOG_FLOOR = float(np.log(1e-30))  # -69.08


def center(z: np.ndarray) -> np.ndarray:
    """Logits ``[N, C]`` (up to a per-image constant) -> centered log-probabilities, float64.

    ``log_softmax(z)`` floored at `LOG_FLOOR`, minus its per-image mean: exactly the centered logits
    for every class with probability above 1e-30, and the form every fidelity metric reads.
    """
    z = np.maximum(log_softmax(np.asarray(z)), LOG_FLOOR)
    return z - z.mean(axis=-1, keepdims=True)


def compare(reference: np.ndarray, actual: np.ndarray) -> Fidelity:
    """Compare an artifact's logits ``[N, C]`` (up to a per-image constant) with the reference's.

    Both are centered per image first (`center`): SQNR, cosine and max abs are over centered logits;
    KL and the top-k metrics do not depend on the constant.
    """
    if reference.shape != actual.shape:
        raise ValueError(f"logit shapes differ: reference {reference.shape}, artifact {actual.shape}")
    ref, act = center(reference), center(actual)
    num = np.sum(ref * act, axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(act, axis=1)
    cosine = float(np.mean(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))
    lp, lq = log_softmax(ref), log_softmax(act)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
    t5r, t5a = topk(ref, 5), topk(act, 5)
    overlap = np.mean([len(set(a) & set(b)) / 5.0 for a, b in zip(t5r, t5a)])
    return Fidelity(
        images=int(ref.shape[0]),
        max_abs=float(np.max(np.abs(ref - act))),
        sqnr_db=sqnr_db(ref, act),
        cosine=cosine,
        kl=kl,
        top1_agreement=float(np.mean(t5r[:, 0] == t5a[:, 0])),
        top5_overlap=float(overlap),
    )


def accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(top-1, top-5) accuracy of logits ``[N, C]`` against int labels ``[N]``."""
    t5 = topk(logits, 5)
    return float(np.mean(t5[:, 0] == labels)), float(np.mean(np.any(t5 == labels[:, None], axis=1)))
