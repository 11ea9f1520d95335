"""Graph rewrites that let XNNPACK take ConvNeXt whole: LayerNorm and the head's global mean.

ExecuTorch 1.5's XNNPACK partitioner has no LayerNorm and delegates ``mean.dim`` only for 4-D inputs
reduced over the two innermost dims with ``keepdim=True``. ConvNeXt-T has 23 LayerNorms and a
``mean(dim=(-2, -1))`` head, so a straight export splits into 24 XNNPACK partitions with the
LayerNorms and the mean between them on ExecuTorch's own kernels.

`rewrite_for_xnnpack` works on an ATen-level ``GraphModule`` (``ExportedProgram.module()``, or what
``convert_pt2e`` returns) and replaces

* ``layer_norm(x, [C], w, b, eps)`` over the last dim with ops XNNPACK delegates, in the order of the
  two-pass reference computation::

      mu  = linear(x, ones[1, C]) / C          # per-position sum as a 1-output GEMM, exact products
      d   = x - mu
      var = linear(d * d, ones[1, C]) / C      # two-pass variance, not E[x^2] - E[x]^2
      y   = d * rsqrt(var + eps) * w + b

  The channels-first LayerNorms (stem and downsampling) are ``permute -> layer_norm -> permute`` in
  transformers' ConvNeXt, so the same rewrite covers them. A reduction over the channel dim cannot be
  an XNNPACK ``mean`` (it only averages the two innermost dims of a 4-D tensor), hence the GEMM.
* ``mean(x4d, [-2, -1], keepdim=False)`` with ``mean(x4d, [2, 3], keepdim=True)`` then ``view``.

In a PT2E-quantized graph the LayerNorms are not quantized, so the rewritten ops stay float32 between
the dequantize/quantize pairs, and XNNPACK runs them in float inside one delegate.

The result must be re-exported (``torch.export.export``), which recomputes shapes and metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function

_aten = torch.ops.aten


@dataclass(frozen=True)
class RewriteCount:
    layer_norms: int
    means: int

    def to_dict(self) -> dict[str, int]:
        return {"layer_norms": self.layer_norms, "means": self.means}


def rewrite_for_xnnpack(gm: GraphModule) -> RewriteCount:
    """Rewrite ``gm`` in place (see module doc); returns how many nodes were replaced."""
    graph = gm.graph
    ones: dict[int, Node] = {}
    n_ln = n_mean = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten.layer_norm.default:
            kw = _kwargs(node)
            shape = list(kw["normalized_shape"])
            if len(shape) != 1:
                continue  # normalizing over several dims: leave it to the portable kernel
            y = _decompose_layer_norm(gm, node, kw, int(shape[0]), ones)
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            n_ln += 1
        elif node.target is _aten.mean.dim:
            y = _keepdim_mean(graph, node)
            if y is not None:
                node.replace_all_uses_with(y)
                graph.erase_node(node)
                n_mean += 1
    graph.lint()
    gm.recompile()
    return RewriteCount(n_ln, n_mean)


def _kwargs(node: Node) -> dict:
    normalized = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    assert normalized is not None, f"cannot normalize the arguments of {node.format_node()}"
    return normalized.kwargs


def _decompose_layer_norm(gm: GraphModule, node: Node, kw: dict, c: int, ones: dict[int, Node]) -> Node:
    graph = gm.graph
    x, w, b, eps = kw["input"], kw.get("weight"), kw.get("bias"), float(kw.get("eps", 1e-5))
    if c not in ones:
        name = f"_xnnpack_ln_ones_{c}"
        gm.register_buffer(name, torch.ones(1, c, dtype=torch.float32), persistent=False)
        with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
            ones[c] = graph.get_attr(name)  # before every use
    one = ones[c]

    def call(target, *args):  # noqa: ANN001, ANN202
        return graph.call_function(target, args)

    with graph.inserting_before(node):
        mu = call(_aten.div.Tensor, call(_aten.linear.default, x, one), float(c))
        d = call(_aten.sub.Tensor, x, mu)
        var = call(_aten.div.Tensor, call(_aten.linear.default, call(_aten.mul.Tensor, d, d), one), float(c))
        y = call(_aten.mul.Tensor, d, call(_aten.rsqrt.default, call(_aten.add.Tensor, var, eps)))
        if w is not None:
            y = call(_aten.mul.Tensor, y, w)
        if b is not None:
            y = call(_aten.add.Tensor, y, b)
    return y


def _keepdim_mean(graph: torch.fx.Graph, node: Node) -> Node | None:
    kw = _kwargs(node)
    out = node.meta.get("val")
    dims = kw.get("dim")
    if kw.get("keepdim") or kw.get("dtype") is not None or out is None or not dims or out.dim() != 2:
        return None
    if sorted(int(d) % 4 for d in dims) != [2, 3] or len(dims) != 2:
        return None  # only the 4-D -> 2-D spatial global average (output rank 2 and two dims: input is 4-D)
    with graph.inserting_before(node):
        m = graph.call_function(_aten.mean.dim, (node.args[0], [2, 3], True))
        return graph.call_function(_aten.view.default, (m, [int(s) for s in out.shape]))
