"""Where the time of one batch-1 run goes, per op kind, per layer and per op (``edge-convnext bench --profile``).

One `Profile` per artifact, from the artifact's own runtime:

- ``.tflite``: the LiteRT Python interpreter has no op timings, so the flatbuffer is cut into one model
  per op (`edge_convnext.profiling.tflite`), each timed in LiteRT; needs NumPy and ``ai-edge-litert`` only.
- ``.pte`` (XNNPACK or portable): the runtime's own per-op events, from an ETDump
  (`edge_convnext.profiling.executorch`).
- Core ML (and ExecuTorch's Core ML delegate): not profiled. Off Apple hardware they run in this project's
  NumPy emulator, whose profile says nothing about the Neural Engine or the GPU.

Every profile states the total its parts add up to next to the same process's un-profiled whole-run
median, because neither method is free: XNNPACK's profiling adds a timestamp per op, and the op pieces
of a ``.tflite`` run out of their context (inputs and weights hot in cache, no neighbours).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_convnext.recipes import ArtifactFormat

NOT_PROFILED_COREML = ("not profiled: Core ML runs in this project's NumPy emulator here, and an emulator's profile "
                       "says nothing about Apple hardware; profile on a Mac with Xcode's Core ML performance report "
                       "or Instruments")


@dataclass
class OpTime:
    """One op (or one XNNPACK operator) with its median time per run, in ms.

    ``kind`` is what ops are grouped by (LiteRT builtin name, or the XNNPACK operator without its ``#n``);
    ``layer`` the model scope it belongs to (None when the runtime does not say); ``detail`` its tensors.
    """

    name: str
    kind: str
    ms: float
    layer: str | None = None
    detail: str = ""
    index: int | None = None


@dataclass
class Group:
    name: str
    ms: float
    count: int
    share: float  # of the profile's total


@dataclass
class Profile:
    """One artifact's profile. ``status`` is "ok" or why it was not profiled.

    ``whole_ms``: the un-profiled whole-model median in the same process; ``total_ms``: what the
    profile's parts add up to (``method`` says how they were measured); ``extra`` holds the
    method's own facts (profiled run median, per-invoke overhead, pieces timed, ...).
    """

    artifact: str
    method: str
    status: str = "ok"
    runtime: str = "-"
    threads: int | None = None
    runs: int = 0
    whole_ms: float | None = None
    total_ms: float | None = None
    ops: list[OpTime] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def by_kind(self) -> list[Group]:
        """Ops grouped by kind, slowest first."""
        return _group(self.ops, lambda o: o.kind, self.total_ms)

    def by_layer(self) -> list[Group]:
        """Ops grouped by model block (`block_of` their scope), slowest first; [] when no op has a layer."""
        if not any(o.layer for o in self.ops):
            return []
        return _group(self.ops, lambda o: block_of(o.layer or ""), self.total_ms)

    def top(self, n: int = 10) -> list[OpTime]:
        return sorted(self.ops, key=lambda o: -o.ms)[:n]

    def to_dict(self) -> dict[str, Any]:
        """Everything, plus the ``by_kind`` and ``by_layer`` groups (derived, ignored by `from_dict`)."""
        d = asdict(self)
        d["by_kind"] = [asdict(g) for g in self.by_kind()]
        d["by_layer"] = [asdict(g) for g in self.by_layer()]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["ops"] = [OpTime(**o) for o in d.get("ops", [])]
        return cls(**kw)


def _group(ops: list[OpTime], key: Any, total: float | None) -> list[Group]:
    ms: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for o in ops:
        ms[key(o)] += o.ms
        count[key(o)] += 1
    total = total or sum(ms.values()) or 1.0
    return [Group(k, round(v, 3), count[k], round(v / total, 4)) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])]


_WRAPPER = re.compile(r"^(?:.*_wrapped/|ChannelLastIOWrapper/)")
_INDEXED = re.compile(r"^[A-Za-z0-9]+_\d+$")  # a ModuleList/Sequential item, e.g. "ConvNextStage_2"


def scope_of(tensor_name: str) -> str:
    """The torch module scope in a litert-torch tensor name: wrapper prefixes and the ``;n`` suffix dropped.

    ``ChannelLastIOWrapper/ExportClassifier_wrapped/ConvNextStage_2/ConvNextLayer_4/Linear_pwconv1;2``
    -> ``ConvNextStage_2/ConvNextLayer_4/Linear_pwconv1``; ``""`` for the IO wrapper's own ops.
    """
    name = tensor_name.split(";", 1)[0]
    if name.endswith("_wrapped") or name == "ChannelLastIOWrapper" or name.startswith("serving_default_"):
        return ""  # the IO wrapper's transpose, the signature's input and output
    return _WRAPPER.sub("", name)


def block_of(scope: str) -> str:
    """The block a scope belongs to: cut after its second indexed module (``ConvNextStage_2/ConvNextLayer_4``),
    else after its last indexed one (``ConvNextStage_1/Conv2d_1``, a downsampling layer), else its first
    component (``Conv2d_patch_embeddings``, ``Linear_classifier``); ``"(model input/output)"`` for an empty scope."""
    parts = [p for p in scope.split("/") if p]
    if not parts:
        return "(model input/output)"
    indexed = [i for i, p in enumerate(parts) if _INDEXED.match(p)]
    if len(indexed) >= 2:
        return "/".join(parts[: indexed[1] + 1])
    if indexed:
        return "/".join(parts[: indexed[-1] + 1])
    return parts[0]


def profile_artifact(path: Path, threads: int | None, runs: int = 10, warmup: int = 2) -> Profile:
    """Profile one artifact with its own runtime (see the module doc); never raises for Core ML."""
    path = Path(path)
    fmt = ArtifactFormat.from_path(str(path))
    if fmt is ArtifactFormat.COREML:
        return Profile(str(path), "-", status=NOT_PROFILED_COREML, runtime="coreml-emulated")
    if fmt is ArtifactFormat.TFLITE:
        from edge_convnext.profiling.tflite import profile_tflite

        return profile_tflite(path, threads, runs=runs, warmup=warmup)
    from edge_convnext.profiling.executorch import profile_pte

    return profile_pte(path, threads, runs=runs, warmup=warmup)


def render(p: Profile, top: int = 10, name: str | None = None) -> str:
    """Markdown: a header line, then op kinds, layers (when known) and the ``top`` slowest ops."""
    title = f"### Profile: {name or Path(p.artifact).stem}"
    if p.status != "ok":
        return f"{title}\n\n{p.status}"
    lines = [title, "", f"{p.method}; {p.threads or 'default'} threads, median of {p.runs} runs."]
    if p.total_ms is not None and p.whole_ms:
        lines.append(f"Parts add up to **{p.total_ms:.1f} ms** against the un-profiled whole-model median "
                     f"**{p.whole_ms:.1f} ms** in the same process ({p.total_ms / p.whole_ms:.2f}x).")
    lines += [f"- {n}" for n in p.notes]
    lines += ["", "| op kind | ms | share | count |", "|---|---|---|---|"]
    lines += [f"| {g.name} | {g.ms:.2f} | {100 * g.share:.1f}% | {g.count} |" for g in p.by_kind()]
    layers = p.by_layer()
    if layers:
        lines += ["", "| layer | ms | share | ops |", "|---|---|---|---|"]
        lines += [f"| {g.name} | {g.ms:.2f} | {100 * g.share:.1f}% | {g.count} |" for g in layers]
    lines += ["", "| slowest ops | ms | layer | tensors |", "|---|---|---|---|"]
    lines += [f"| {o.name} | {o.ms:.3f} | {o.layer or '-'} | {o.detail} |" for o in p.top(top)]
    return "\n".join(lines)
