"""Layer re-normalisation: the backbone's channel statistics, blended towards a new domain.

Batch normalisation is where a CNN stores what its training imagery looked like, layer by
layer; blur, haze or another sensor's response move those statistics, and a head trained
on the source cannot undo that (on AID, even true labels recover only a third of a blur
shift through the head). Re-estimating the statistics on target imagery (AdaBN) works,
but resetting them fully on few images is harmful; blending target into source statistics
(Schneider et al. 2020, "covariate shift adaptation") is the robust form.

Exported backbones carry no ``BatchNormalization`` nodes: the exporter folds them into
the preceding ``Conv``. The same correction is therefore applied to every ``Conv`` output:
per channel, ``y ↦ a·y + c`` with ``a = σ_s / σ_b`` and ``c = μ_s − a·μ_b``, where ``μ_s``,
``σ_s`` are source statistics (``layer_stats.npz``, measured by the exporter on training
chips) and ``μ_b``, ``σ_b`` the blend of source and target statistics. The map is folded
into the ``Conv``'s own weight and bias, so the adapted backbone is the same graph with new
initializers: same cost, same TensorRT support, no torch on the box. Layers are corrected
in graph order, each measured with every earlier layer already corrected, as a forward
pass in training mode would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from appliance.bundle import IMAGE_INPUT


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


class _Probe:
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
    probe = _Probe(onnx.load(str(backbone)))
    stats = probe.stats(x, probe.names)
    return LayerStats(probe.names, [m for m, _ in stats], [v for _, v in stats])


@dataclass(frozen=True)
class Renormalised:
    """An adapted backbone and how far its layers had moved (mean |log σ_t/σ_s| per layer)."""

    model: onnx.ModelProto
    layers: int
    tiles: int
    shift_before: float
    seconds: float


def renormalise(backbone: Path, x: np.ndarray, source: LayerStats, blend: float,
                deadline: float) -> Renormalised:
    """``backbone`` with each layer's statistics on ``x`` blended towards ``source``'s.

    ``x`` is normalised network input from the target domain; ``blend`` is the weight of
    the target statistics (0: unchanged, 1: AdaBN's full reset). Stops correcting at
    ``deadline`` (``time.monotonic``): layers not reached keep their source weights.
    """
    started = time.monotonic()
    original = onnx.load(str(backbone))
    probe = _Probe(original)
    if probe.names != source.names:
        raise RenormError("layer statistics do not match the backbone's Conv layers "
                          f"({len(source.names)} vs {len(probe.names)}): re-export the bundle")
    moved: list[float] = []
    for k, node in enumerate(probe.layers):
        if time.monotonic() > deadline:
            break
        (mean_t, var_t), = probe.stats(x, [node.output[0]])
        mean_s, var_s = source.mean[k], source.var[k]
        moved.append(float(np.mean(np.abs(0.5 * np.log((var_t + 1e-8) / (var_s + 1e-8))))))
        mean_b = (1 - blend) * mean_s + blend * mean_t
        var_b = (1 - blend) * var_s + blend * var_t
        gain = np.sqrt(var_s / np.maximum(var_b, 1e-12))
        gain = np.where(var_s > 1e-12, gain, 1.0)  # dead channels stay as they are
        weight, bias = node.input[1], node.input[2]
        shape = (-1,) + (1,) * (probe.weights[weight].ndim - 1)
        probe.weights[weight] = (probe.weights[weight] * gain.reshape(shape)).astype(np.float32)
        probe.weights[bias] = (probe.weights[bias] * gain + mean_s - gain * mean_b
                               ).astype(np.float32)
    out = onnx.ModelProto()
    out.CopyFrom(original)
    _set_weights(out, probe)
    return Renormalised(out, len(moved), len(x), float(np.mean(moved)) if moved else 0.0,
                        time.monotonic() - started)


def _set_weights(model: onnx.ModelProto, probe: _Probe) -> None:
    """Write the probe's corrected weights into ``model`` (adding biases it lacked)."""
    inits = {i.name: i for i in model.graph.initializer}
    for node, probed in zip(conv_layers(model), probe.layers, strict=True):
        weight, bias = probed.input[1], probed.input[2]
        inits[weight].CopyFrom(numpy_helper.from_array(probe.weights[weight], weight))
        if bias in inits:
            inits[bias].CopyFrom(numpy_helper.from_array(probe.weights[bias], bias))
        else:
            model.graph.initializer.append(numpy_helper.from_array(probe.weights[bias], bias))
            if len(node.input) < 3:
                node.input.append(bias)
            else:
                node.input[2] = bias
