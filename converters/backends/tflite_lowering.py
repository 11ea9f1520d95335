"""What a ``.tflite`` became: op histogram with dtypes, quantize/dequantize ops, XNNPACK partitions.

Read through the LiteRT interpreter itself, so the delegation facts are the runtime's, not a guess:
after ``allocate_tensors`` the default XNNPACK delegate has replaced each partition with one
``DELEGATE`` node appended after the model's own nodes. The model's nodes a partition absorbed are
found by walking back from the partition's outputs to its inputs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

# Ops whose second input is a weight tensor: their signature shows the weight dtype.
_WEIGHTED = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL"}
_CASTS = {"QUANTIZE", "DEQUANTIZE"}


def lowering_report(path: Path, threads: int | None = None) -> dict[str, Any]:
    """Summarize a ``.tflite`` as the interpreter sees it (see module doc). JSON-serializable."""
    it = Interpreter(model_path=str(path), num_threads=threads)
    model_ops = it._get_ops_details()  # before delegation: the model's own nodes
    it.allocate_tensors()
    after = it._get_ops_details()
    nodes, delegates = after[: len(model_ops)], after[len(model_ops):]

    def dtype(t: int) -> str:
        return np.dtype(it._get_tensor_details(t, 0)["dtype"]).name

    def signature(op: dict[str, Any]) -> str:
        ins = [t for t in op["inputs"] if t >= 0]
        outs = [t for t in op["outputs"] if t >= 0]
        sig = f"{op['op_name']} {dtype(ins[0]) if ins else '-'}->{dtype(outs[0]) if outs else '-'}"
        if op["op_name"] in _WEIGHTED and len(ins) > 1:
            sig += f" w:{dtype(ins[1])}"
        return sig

    sigs = {op["index"]: signature(op) for op in nodes}
    delegated = _delegated_nodes(nodes, delegates)
    ops = Counter(op["op_name"] for op in nodes)
    # An op "stays float" when it computes on float32 activations (input and output float32),
    # including dynamic-range ops whose int8 weights are dequantized or quantized on the fly.
    float_ops = Counter(
        op["op_name"] for op in nodes
        if op["op_name"] not in _CASTS and sigs[op["index"]].split(" ")[1].startswith("float32->float32")
    )
    return {
        "ops_total": len(nodes),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "ops_by_dtype": dict(sorted(Counter(sigs.values()).items(), key=lambda kv: (-kv[1], kv[0]))),
        "quantize_ops": ops.get("QUANTIZE", 0),
        "dequantize_ops": ops.get("DEQUANTIZE", 0),
        "float_compute_ops": dict(sorted(float_ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "xnnpack": {
            "partitions": len(delegates),
            "delegated_ops": len(delegated),
            "not_delegated": dict(sorted(
                Counter(sigs[op["index"]] for op in nodes if op["index"] not in delegated).items(),
                key=lambda kv: (-kv[1], kv[0]))),
        },
        "input": _tensor(it.get_input_details()[0]),
        "output": _tensor(it.get_output_details()[0]),
    }


def _delegated_nodes(nodes: list[dict[str, Any]], delegates: list[dict[str, Any]]) -> set[int]:
    producer = {t: op["index"] for op in nodes for t in op["outputs"] if t >= 0}
    taken: set[int] = set()
    for d in delegates:
        boundary = {t for t in d["inputs"] if t >= 0}
        stack = [t for t in d["outputs"] if t >= 0]
        seen: set[int] = set()
        while stack:
            t = stack.pop()
            if t in boundary or t in seen or t not in producer:
                continue
            seen.add(t)
            n = producer[t]
            if n not in taken:
                taken.add(n)
                stack.extend(x for x in nodes[n]["inputs"] if x >= 0)
    return taken


def _tensor(d: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = d["quantization"]
    out: dict[str, Any] = {"name": d["name"], "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
    if scale:
        out["quantization"] = {"scale": float(scale), "zero_point": int(zero_point)}
    return out
