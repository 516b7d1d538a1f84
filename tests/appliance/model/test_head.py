"""The classifier head as numpy weights: parsing Gemm / MatMul+Add heads, writing them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.contract.bundle import CLASSIFIER, FEATURES, LOGITS
from appliance.model.head import HeadError, LinearHead, parse_head, read_head, write_head
from tests.helpers.colour_bundle import classifier_weights

D, K = 8, 3


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([LOGITS], {FEATURES: x})[0])


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(D, K)).astype(np.float32), rng.normal(size=K).astype(np.float32)


def _torch_gemm() -> onnx.ModelProto:
    """What torch.onnx.export writes for nn.Linear: weight [K,D], transB=1, alpha/beta."""
    w, b = _weights()
    return _model([helper.make_node("Gemm", [FEATURES, "fc.weight", "fc.bias"], [LOGITS],
                                    alpha=1.0, beta=1.0, transB=1)],
                  [numpy_helper.from_array(w.T.copy(), "fc.weight"),
                   numpy_helper.from_array(b, "fc.bias")])


def _matmul_add_constants() -> onnx.ModelProto:
    """MatMul + Add with the weight as a Constant node behind an Identity, bias first in Add."""
    w, b = _weights(1)
    return _model([
        helper.make_node("Constant", [], ["w0"], value=numpy_helper.from_array(w, "w0")),
        helper.make_node("Identity", ["w0"], ["w"]),
        helper.make_node("MatMul", [FEATURES, "w"], ["mm"]),
        helper.make_node("Add", ["bias", "mm"], [LOGITS]),
    ], [numpy_helper.from_array(b, "bias")])


@pytest.mark.parametrize("build", [_torch_gemm, _matmul_add_constants])
def test_parse_matches_onnxruntime(build: object) -> None:
    model = build()  # type: ignore[operator]
    head = parse_head(model)
    x = np.random.default_rng(3).normal(size=(20, D)).astype(np.float32)
    np.testing.assert_allclose(head.logits(x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_colour_bundle_head_round_trips(colour_bundle: Path, tmp_path: Path) -> None:
    head = read_head(colour_bundle / CLASSIFIER)
    w, b = classifier_weights()
    np.testing.assert_array_equal(head.weight, w)
    np.testing.assert_array_equal(head.bias, b)
    changed = LinearHead(head.weight * 2, head.bias + 1)
    out = write_head(changed, tmp_path / CLASSIFIER, like=colour_bundle / CLASSIFIER)
    x = np.random.default_rng(4).normal(size=(10, D)).astype(np.float32)
    np.testing.assert_allclose(_run(onnx.load(str(out)), x), changed.logits(x), rtol=1e-6)
    assert not (tmp_path / (CLASSIFIER + ".tmp")).exists()


def test_composed_head_equals_mapping_the_features() -> None:
    w, b = _weights(2)
    head = LinearHead(w, b)
    rng = np.random.default_rng(5)
    scale, shift = rng.uniform(0.5, 2, D), rng.normal(size=D)
    x = rng.normal(size=(6, D)).astype(np.float32)
    np.testing.assert_allclose(head.composed(scale, shift).logits(x),
                               head.logits((x * scale + shift).astype(np.float32)),
                               rtol=1e-4, atol=1e-4)


def test_non_affine_head_is_refused() -> None:
    w, b = _weights()
    model = _model([helper.make_node("Gemm", [FEATURES, "W", "b"], ["h"]),
                    helper.make_node("Relu", ["h"], [LOGITS])],
                   [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    with pytest.raises(HeadError, match="not one affine layer"):
        parse_head(model)


def test_weight_computed_at_runtime_is_refused() -> None:
    model = _model([helper.make_node("MatMul", [FEATURES, FEATURES], ["mm"]),
                    helper.make_node("Add", ["mm", "b"], [LOGITS])],
                   [numpy_helper.from_array(np.zeros(K, np.float32), "b")])
    with pytest.raises(HeadError, match="not a constant"):
        parse_head(model)
