"""Read and write the linear classifier head (``classifier.onnx``) as numpy weights.

Adaptation updates only the head, so the appliance needs the head as plain arrays
``logits = features @ W + b`` (``W`` [D,K], ``b`` [K]) and a way back to ONNX. Heads reach
the box in two shapes: ``Gemm`` (torch's export of ``nn.Linear``, weight [K,D] with
``transB=1``; the test colour bundle's ``Gemm`` with ``W`` [D,K]) and ``MatMul`` + ``Add``
(torch's dynamo exporter, other toolchains). Weights may be graph initializers or
``Constant`` nodes and may pass through ``Identity`` nodes. Anything else (a hidden layer,
a non-linearity) is refused with a ``HeadError`` rather than silently approximated.

Writing always produces one ``Gemm`` node with the contract's tensor names, on the opset
and IR version of the head it replaces, so the runtime opens it like the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.contract.bundle import FEATURES, LOGITS
from appliance.contract.durable import atomic_path


class HeadError(ValueError):
    """A classifier graph that is not a single affine layer ``features → logits``."""


@dataclass(frozen=True)
class LinearHead:
    """An affine head: ``logits = features @ weight + bias``."""

    weight: np.ndarray  # [D, K] float32
    bias: np.ndarray  # [K] float32

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, features: np.ndarray) -> np.ndarray:
        return (features.astype(np.float32) @ self.weight + self.bias).astype(np.float32)

    def composed(self, scale: np.ndarray, shift: np.ndarray) -> LinearHead:
        """This head applied after the feature map ``f ↦ f * scale + shift`` (per dimension).

        Folding an affine feature re-standardisation into the weights keeps the bundle at
        one head file: ``(f*s + c) @ W + b = f @ (s[:,None] * W) + (c @ W + b)``.
        """
        w = (scale.astype(np.float32)[:, None] * self.weight).astype(np.float32)
        b = (shift.astype(np.float32) @ self.weight + self.bias).astype(np.float32)
        return LinearHead(w, b)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant tensor of the graph by name: initializers, Constant and Identity nodes."""
    out = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    changed = True
    while changed:  # Identity chains over constants (torch emits them for shared weights)
        changed = False
        for node in graph.node:
            if node.op_type == "Identity" and node.input[0] in out and node.output[0] not in out:
                out[node.output[0]] = out[node.input[0]]
                changed = True
    return out


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for attr in node.attribute:
        if attr.name == name:
            return float(helper.get_attribute_value(attr))
    return default


def _compute_nodes(graph: onnx.GraphProto, consts: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """Nodes that do work on the features (not constant producers or pure pass-throughs)."""
    return [
        n for n in graph.node
        if n.op_type != "Constant" and not (n.op_type == "Identity" and n.input[0] in consts)
    ]


def parse_head(model: onnx.ModelProto) -> LinearHead:
    """The affine map of a ``Gemm`` or ``MatMul`` + ``Add`` head; ``HeadError`` otherwise."""
    graph = model.graph
    consts = _constants(graph)
    nodes = [n for n in _compute_nodes(graph, consts) if n.op_type != "Identity"]
    ops = [n.op_type for n in nodes]
    if ops == ["Gemm"]:
        node = nodes[0]
        if _attr(node, "transA", 0):
            raise HeadError("Gemm head with transA=1 is not a features → logits layer")
        w = consts.get(node.input[1])
        if w is None:
            raise HeadError(f"Gemm weight {node.input[1]!r} is not a constant")
        if _attr(node, "transB", 0):
            w = w.T
        w = w * _attr(node, "alpha", 1.0)
        bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        b = np.zeros(w.shape[1]) if bias is None else bias * _attr(node, "beta", 1.0)
    elif ops == ["MatMul", "Add"]:
        mm, add = nodes
        w = consts.get(mm.input[1])
        if w is None:
            raise HeadError(f"MatMul weight {mm.input[1]!r} is not a constant")
        others = [i for i in add.input if i != mm.output[0]]
        if len(others) != 1 or others[0] not in consts:
            raise HeadError("Add after MatMul must add one constant bias")
        b = consts[others[0]]
    elif ops == ["MatMul"]:
        w = consts.get(nodes[0].input[1])
        if w is None:
            raise HeadError(f"MatMul weight {nodes[0].input[1]!r} is not a constant")
        b = np.zeros(w.shape[1])
    else:
        raise HeadError(f"classifier is not one affine layer (ops {ops}); cannot adapt it")
    weight = np.asarray(w, np.float32)
    bias_k = np.asarray(b, np.float32).reshape(-1)
    if weight.ndim != 2 or bias_k.shape != (weight.shape[1],):
        raise HeadError(
            f"head weights of shapes {weight.shape} and {bias_k.shape} do not form D→K")
    return LinearHead(weight, bias_k)


def read_head(path: Path) -> LinearHead:
    """``parse_head`` of an ONNX file."""
    return parse_head(onnx.load(str(path)))


def head_model(head: LinearHead, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A ``Gemm`` head with the contract's names, on the opset/IR of ``like`` if given."""
    batch = "N"
    if like is not None and like.graph.input:
        dims = like.graph.input[0].type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            batch = dims[0].dim_param
    graph = helper.make_graph(
        [helper.make_node("Gemm", [FEATURES, "W", "b"], [LOGITS])],
        "classifier",
        [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [batch, head.dim])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [batch, head.n_classes])],
        [numpy_helper.from_array(head.weight.astype(np.float32), "W"),
         numpy_helper.from_array(head.bias.astype(np.float32), "b")],
    )
    opsets = [helper.make_opsetid("", 17)]
    if like is not None:
        opsets = [o for o in like.opset_import if o.domain in ("", "ai.onnx")] or opsets
    model = helper.make_model(graph, opset_imports=opsets, producer_name="terratile-adapt")
    model.ir_version = like.ir_version if like is not None else 8
    onnx.checker.check_model(model)
    return model


def write_head(head: LinearHead, path: Path, like: Path | None = None) -> Path:
    """Write ``head`` as ONNX to ``path`` (atomically: temporary name, then rename)."""
    model = head_model(head, onnx.load(str(like)) if like is not None else None)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path
