"""Per-layer channel statistics of a backbone: what the exporter measures on its training
chips (``layer_stats.npz``) and what the box re-measures on a new domain's tiles.

Exported backbones carry no ``BatchNormalization`` nodes (the exporter folds them into the
preceding ``Conv``), so the statistics are those of every ``Conv`` output with constant fp32
weights. ``LayerProbe`` exposes those outputs, and the weights as inputs, in one
onnxruntime session: layer re-normalisation on the box corrects one layer after another
with new weights without building a session per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from appliance.contract.bundle import IMAGE_INPUT


class RenormError(ValueError):
    """A backbone or statistics file that layer re-normalisation cannot work with."""


@dataclass(frozen=True)
class LayerStats:
    """Per-channel mean and variance of each ``Conv`` output, by output tensor name."""

    names: list[str]
    mean: list[np.ndarray]
    var: list[np.ndarray]

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {"names": np.asarray(self.names)}
        arrays |= {f"mean_{i}": m for i, m in enumerate(self.mean)}
        arrays |= {f"var_{i}": v for i, v in enumerate(self.var)}
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> LayerStats:
        with np.load(path) as data:
            names = [str(n) for n in data["names"]]
            return cls(names, [data[f"mean_{i}"].astype(np.float64) for i in range(len(names))],
                       [data[f"var_{i}"].astype(np.float64) for i in range(len(names))])


def conv_layers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """``Conv`` nodes whose weight (and bias, if any) are fp32 initializers: the ones to
    correct (an int8 QDQ or fp16 backbone has none and is not re-normalised)."""
    fp32 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    return [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in fp32
            and (len(n.input) < 3 or not n.input[2] or n.input[2] in fp32)]


class LayerProbe:
    """One onnxruntime session over the backbone with every corrected ``Conv``'s output
    exposed and its weight and bias turned into inputs, so that layer after layer can be
    measured with new weights without building a session per layer."""

    def __init__(self, model: onnx.ModelProto) -> None:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        self.layers = conv_layers(probe)
        if not self.layers:
            raise RenormError("backbone has no Conv layer with constant weights")
        graph = probe.graph
        inits = {i.name: i for i in graph.initializer}
        self.weights: dict[str, np.ndarray] = {}
        for k, node in enumerate(self.layers):
            if len(node.input) < 3 or not node.input[2]:  # a bias to fold the shift into
                channels = numpy_helper.to_array(inits[node.input[1]]).shape[0]
                name = f"renorm_bias_{k}"
                graph.initializer.append(numpy_helper.from_array(
                    np.zeros(channels, np.float32), name))
                inits[name] = graph.initializer[-1]
                if len(node.input) < 3:
                    node.input.append(name)
                else:
                    node.input[2] = name
            for name in node.input[1:3]:
                self.weights[name] = numpy_helper.to_array(inits[name]).astype(np.float32)
                graph.input.append(helper.make_tensor_value_info(
                    name, TensorProto.FLOAT, list(self.weights[name].shape)))
            graph.output.append(helper.make_tensor_value_info(node.output[0],
                                                              TensorProto.FLOAT, None))
        # Fed on every run: inputs, no longer initializers (onnxruntime warns about both).
        fed = [i for i in graph.initializer if i.name in self.weights]
        for init in fed:
            graph.initializer.remove(init)
        self.model = probe
        opts = ort.SessionOptions()
        # Weights are fed per run, so nothing may be constant-folded into the plan.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(probe.SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])

    @property
    def names(self) -> list[str]:
        return [n.output[0] for n in self.layers]

    def stats(self, x: np.ndarray, outputs: list[str], batch: int = 32
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-channel mean and variance of ``outputs`` over normalised inputs ``x``."""
        total: list[tuple[np.ndarray, np.ndarray, int]] | None = None
        for i in range(0, len(x), batch):
            feeds = {IMAGE_INPUT: x[i:i + batch], **self.weights}
            outs = self.session.run(outputs, feeds)
            sums = [(o.sum(axis=(0, 2, 3), dtype=np.float64),
                     np.square(o, dtype=np.float64).sum(axis=(0, 2, 3)),
                     o.shape[0] * o.shape[2] * o.shape[3]) for o in outs]  # per layer: sizes
            total = sums if total is None else [(a + d, b + e, c + f) for (a, b, c), (d, e, f)
                                                in zip(total, sums, strict=True)]
        assert total is not None
        return [(s / n, np.maximum(q / n - (s / n) ** 2, 0.0)) for s, q, n in total]


def measure(backbone: Path, x: np.ndarray) -> LayerStats:
    """Source statistics of every corrected layer over normalised inputs ``x`` (exporter)."""
    probe = LayerProbe(onnx.load(str(backbone)))
    stats = probe.stats(x, probe.names)
    return LayerStats(probe.names, [m for m, _ in stats], [v for _, v in stats])
