"""onnxruntime sessions for a bundle: backbone → classifier head and embedder head.

Providers come from config in preference order (``tensorrt`` → ``cuda`` → ``cpu``).
onnxruntime silently drops a provider it cannot load; this module compares what it asked
for with what the session actually runs on and logs a WARNING for every provider that
fell away, so a box that lost its GPU never runs on CPU unnoticed.

The heads are separate sessions so that an adapted head can replace the old one without
rebuilding the backbone's TensorRT engine (``adopt``), and so that one backbone serves
every expert of a bundle (``bundle.Expert``: its own input spec and head per domain).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from appliance.contract.bundle import (
    BACKBONE,
    EMBEDDER,
    EMBEDDING,
    FEATURES,
    IMAGE_INPUT,
    LOGITS,
    Bundle,
    Manifest,
)
from appliance.contract.signature import Signature
from appliance.model.routing import route
from appliance.model.tta import d4_views, mean_over_views, view_count

if TYPE_CHECKING:
    from appliance.config import BoxTta, Settings

log = logging.getLogger(__name__)

PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = frozenset({"tensorrt", "cuda"})
SPINNING = "session.intra_op.allow_spinning"


@dataclass(frozen=True)
class ProviderPlan:
    """What to ask onnxruntime for, and where TensorRT may cache engines."""

    providers: tuple[str, ...] = ("tensorrt", "cuda", "cpu")
    trt_fp16: bool = True
    cuda_tf32: bool = False
    trt_cache: Path | None = None
    intra_op_threads: int = 0
    io_binding: bool | None = None  # None: when the backbone runs on a GPU

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderPlan:
        """The plan ``model.*`` asks for; TensorRT engines default to ``state/trt-cache``."""
        m = settings.model
        return cls(providers=tuple(m.providers), trt_fp16=m.trt_fp16, cuda_tf32=m.cuda_tf32,
                   trt_cache=m.trt_engine_cache or settings.paths.state / "trt-cache",
                   intra_op_threads=m.intra_op_threads, io_binding=m.io_binding)

    def narrowed_to(self, active: list[str]) -> ProviderPlan:
        """The same plan restricted to providers a session actually loaded."""
        keep = tuple(k for k in self.providers if PROVIDER_NAMES[k] in active) or ("cpu",)
        return replace(self, providers=keep)

    def ort_providers(self) -> list[str | tuple[str, dict[str, Any]]]:
        """onnxruntime provider list with options; CPU is always last, as the floor."""
        out: list[str | tuple[str, dict[str, Any]]] = []
        for key in self.providers:
            name = PROVIDER_NAMES[key]
            if key == "tensorrt":
                opts: dict[str, Any] = {"trt_fp16_enable": self.trt_fp16}
                if self.trt_cache is not None:
                    self.trt_cache.mkdir(parents=True, exist_ok=True)
                    opts |= {"trt_engine_cache_enable": True,
                             "trt_engine_cache_path": str(self.trt_cache),
                             "trt_timing_cache_enable": True,
                             "trt_timing_cache_path": str(self.trt_cache)}
                out.append((name, opts))
            elif key == "cuda":
                out.append((name, {"use_tf32": int(self.cuda_tf32)}))
            else:
                out.append(name)
        if "cpu" not in self.providers:
            out.append(PROVIDER_NAMES["cpu"])
        return out


@functools.cache
def load_gpu_libraries() -> None:
    """Load the CUDA/cuDNN libraries of pip's ``nvidia-*`` wheels, once per process.

    onnxruntime-gpu does not look in those wheels' folders by itself: on a box whose CUDA
    comes from pip rather than the system, the CUDA provider fails with "libcublasLt.so.13:
    cannot open shared object file" and the node runs on CPU. ``preload_dlls`` loads them
    from site-packages, then from the default loader path; a CPU-only build skips it.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


@functools.cache
def quiet_onnxruntime() -> None:
    """Raise onnxruntime's own logger to FATAL, once, before any session exists: its
    warnings about providers it cannot load duplicate the FALLBACK warning logged here."""
    ort.set_default_logger_severity(4)


def open_session(model: Path | bytes, plan: ProviderPlan) -> ort.InferenceSession:
    """An InferenceSession on the best available provider, falling back loudly."""
    if GPU_PROVIDERS.intersection(plan.providers):
        load_gpu_libraries()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # infer() runs backbone, classifier and embedder back to back, each with its own
    # thread pool: spinning idle threads of one pool hold the cores the next one needs
    # (the chain is several times slower with spinning: benchmarks/gpu_runtime.py).
    opts.add_session_config_entry(SPINNING, "0")
    if plan.intra_op_threads:
        opts.intra_op_num_threads = plan.intra_op_threads
    available = set(ort.get_available_providers())
    wanted = plan.ort_providers()
    requested = [p for p in wanted if (p[0] if isinstance(p, tuple) else p) in available]
    for p in wanted:
        name = p[0] if isinstance(p, tuple) else p
        if name not in available:
            log.warning("provider %s requested but not in this onnxruntime build", name)
    source = model if isinstance(model, bytes) else str(model)
    quiet_onnxruntime()
    # onnxruntime print()s a provider that fails to load ("EP Error ... Falling back") on
    # stdout, which must carry only data (`terratile process > result.json`): captured
    # here and logged; the fallback itself is reported below as a WARNING.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        session = ort.InferenceSession(source, sess_options=opts, providers=requested)
    if captured.getvalue().strip():
        log.debug("onnxruntime: %s", captured.getvalue().strip())
    active = session.get_providers()
    first_wanted = requested[0][0] if isinstance(requested[0], tuple) else requested[0]
    if active[0] != first_wanted:
        log.warning(
            "FALLBACK: asked for %s, running on %s (%s)",
            [p[0] if isinstance(p, tuple) else p for p in requested], active[0],
            model if isinstance(model, Path) else "in-memory model",
        )
    return session


@dataclass(frozen=True)
class Inference:
    """Outputs for one batch: pooled features, class probabilities, L2-normalised embedding."""

    features: np.ndarray
    probs: np.ndarray
    embedding: np.ndarray


class ModelRuntime:
    """Runs a bundle: ``infer(tiles)`` from value-range tiles to features, probs, embedding.

    ``domain`` picks the expert (None: the source): its input spec normalises the tiles and
    its head classifies them; backbone and embedder are the same for all. ``tta`` 'bundle'
    averages the probabilities over the views the bundle's manifest asks for
    (``appliance.model.tta``), 'off' runs the plain view only.
    """

    def __init__(self, bundle: Bundle, plan: ProviderPlan | None = None,
                 tta: BoxTta = "bundle") -> None:
        self.bundle = bundle
        self.plan = plan or ProviderPlan()
        self.tta = tta
        self._backbone = open_session(bundle.file(BACKBONE), self.plan)
        # Heads go on what the backbone really got, so a missing GPU is reported once.
        self.plan = self.plan.narrowed_to(self._backbone.get_providers())
        self._embedder = open_session(bundle.file(EMBEDDER), self.plan)
        self._lock = threading.Lock()
        self._experts = self._open_experts(bundle, {})

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    def open_experts(self, bundle: Bundle, warmup_batch: int = 0) -> Experts:
        """Sessions for every expert of ``bundle``, to ``adopt`` it with later.

        Opening (and, with ``warmup_batch``, running once: TensorRT builds its engines on
        the first run) may take minutes on a Jetson, so the daemon calls this on the
        adaptation thread and only swaps the result in on its main loop."""
        experts = self._open_experts(bundle, self._experts)
        if warmup_batch:
            _warm(bundle.manifest, experts, warmup_batch)
        return experts

    def _open_experts(self, bundle: Bundle, have: Experts) -> Experts:
        """Sessions per expert; a backbone already open under the same sha256 is reused
        (a head step must not rebuild an expert's TensorRT engine)."""
        by_sha = {e.backbone_sha: e.backbone for e in have.values()}
        by_sha[self.manifest.files.get(BACKBONE, "")] = self._backbone
        out: Experts = {}
        for name in [None, *(d.name for d in bundle.manifest.experts)]:
            path = bundle.backbone(name)
            sha = bundle.manifest.files.get(path.name, "")
            backbone = by_sha.get(sha) or open_session(path, self.plan)
            by_sha[sha] = backbone
            out[name] = Expert(backbone, sha, open_session(bundle.classifier(name), self.plan))
        return out

    @property
    def providers(self) -> list[str]:
        """Providers the backbone session really runs on, best first."""
        return list(self._backbone.get_providers())

    @property
    def input_size(self) -> int:
        return self.manifest.input.size

    def warmup(self, batch: int = 1) -> None:
        """One inference per expert so that lazy provider set-up (TensorRT build) happens
        at start."""
        _warm(self.manifest, self._experts, batch)
        self.embed(np.zeros((batch, self.manifest.feature_dim), np.float32))

    def features(self, tiles: np.ndarray, domain: str | None = None) -> np.ndarray:
        """[N,C,S,S] tiles in the model's value range → [N,D] pooled features."""
        x = self.manifest.input_for(domain).normalise(tiles)
        out = self._experts[domain].backbone.run([FEATURES], {IMAGE_INPUT: x})[0]
        return np.asarray(out, np.float32)

    def probs(self, features: np.ndarray, domain: str | None = None) -> np.ndarray:
        """Features → class probabilities (softmax, or sigmoid for multi-label bundles)."""
        with self._lock:
            head = self._experts[domain].classifier
            logits = head.run([LOGITS], {FEATURES: features})[0]
        return probabilities(np.asarray(logits, np.float32), self.manifest.task == "multi-label")

    def embed(self, features: np.ndarray) -> np.ndarray:
        """Features → L2-normalised retrieval embedding."""
        return np.asarray(self._embedder.run([EMBEDDING], {FEATURES: features})[0], np.float32)

    def route(self, signature: Signature) -> str | None:
        """The expert of the running bundle that a scene's signature routes to."""
        return route(self.bundle, signature)

    @property
    def device(self) -> str:
        """Where the backbone's outputs live: ``cuda`` on a GPU provider, else ``cpu``."""
        return "cuda" if self.providers[0] in (PROVIDER_NAMES[k] for k in GPU_PROVIDERS) \
            else "cpu"

    @property
    def binds(self) -> bool:
        """Whether ``infer`` keeps features on the device (``ProviderPlan.io_binding``)."""
        return self.device != "cpu" if self.plan.io_binding is None else self.plan.io_binding

    @property
    def views(self) -> int:
        """Backbone passes per tile: 8 with the bundle's TTA followed, else 1."""
        return view_count(self.manifest.tta, self.tta)

    def infer(self, tiles: np.ndarray, domain: str | None = None) -> Inference:
        """Features and embedding of the tiles as they are; probabilities averaged over the
        ``views`` (one backbone run on all views of the batch)."""
        if domain not in self._experts:
            self.manifest.expert(domain)  # raises BundleError naming the unknown domain
        views = self.views
        if views == 1:
            if self.binds:
                return self._infer_bound(tiles, domain)
            feats = self.features(tiles, domain)
            return Inference(feats, self.probs(feats, domain), self.embed(feats))
        all_feats = self.features(d4_views(tiles), domain)
        feats = all_feats[: len(tiles)]  # view 0: the tiles as they are
        probs = mean_over_views(self.probs(all_feats, domain), views)
        return Inference(feats, probs.astype(np.float32), self.embed(feats))

    def _infer_bound(self, tiles: np.ndarray, domain: str | None) -> Inference:
        """``infer`` with IO binding: the backbone writes its features into device memory
        and both heads read them there, so a batch crosses the host-device link once
        each way (tiles in; features, logits and embedding out) instead of three times."""
        x = self.manifest.input_for(domain).normalise(tiles)
        with self._lock:
            expert = self._experts[domain]
            bound = expert.backbone.io_binding()
            bound.bind_cpu_input(IMAGE_INPUT, np.ascontiguousarray(x, np.float32))
            bound.bind_output(FEATURES, self.device)
            expert.backbone.run_with_iobinding(bound)
            feats = bound.get_outputs()[0]
            logits = _run_bound(expert.classifier, feats, LOGITS)
        embedding = _run_bound(self._embedder, feats, EMBEDDING)
        return Inference(np.asarray(feats.numpy(), np.float32),
                         probabilities(logits, self.manifest.task == "multi-label"), embedding)

    def serves(self, bundle: Bundle) -> bool:
        """Whether ``bundle`` can run on these sessions: same backbone and embedder files
        (its experts' heads, input specs and backbones are opened by ``open_experts``)."""
        return all(bundle.manifest.files.get(f) == self.manifest.files.get(f)
                   for f in (BACKBONE, EMBEDDER))

    def adopt(self, bundle: Bundle, experts: Experts | None = None) -> bool:
        """Run ``bundle`` with the sessions in hand when only experts (heads, input specs,
        re-normalised backbones) changed (adaptation, rollback), with ``experts`` from
        ``open_experts`` if given; False when the bundle's own backbone or embedder
        differs, and a new runtime is needed."""
        if not self.serves(bundle):
            return False
        if experts is None or set(experts) != {None, *(d.name for d in bundle.manifest.experts)}:
            experts = self._open_experts(bundle, self._experts)
        with self._lock:
            self._experts = experts
            self.bundle = bundle
        return True


@dataclass(frozen=True)
class Expert:
    """The sessions of one expert: its backbone (shared when unchanged) and its head."""

    backbone: ort.InferenceSession
    backbone_sha: str
    classifier: ort.InferenceSession


Experts = dict[str | None, Expert]
"""Sessions per expert of a bundle (None: the source model)."""


def _warm(manifest: Manifest, experts: Experts, batch: int) -> None:
    """Run every expert's backbone and head once on mid-range tiles: TensorRT builds its
    engines on the first run, and that must not happen on a scene."""
    spec = manifest.input
    lo, hi = spec.value_range
    tiles = np.full((batch, len(spec.bands), spec.size, spec.size), (lo + hi) / 2, np.float32)
    for name, expert in experts.items():
        x = manifest.input_for(name).normalise(tiles)
        feats = expert.backbone.run([FEATURES], {IMAGE_INPUT: x})[0]
        expert.classifier.run([LOGITS], {FEATURES: np.asarray(feats, np.float32)})


def _run_bound(session: ort.InferenceSession, features: ort.OrtValue, output: str) -> np.ndarray:
    """Run a head on features already in device memory; its output comes back to the host."""
    bound = session.io_binding()
    bound.bind_ortvalue_input(FEATURES, features)
    bound.bind_output(output, "cpu")
    session.run_with_iobinding(bound)
    return np.asarray(bound.copy_outputs_to_cpu()[0], np.float32)


def probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """Softmax over classes, or an element-wise sigmoid for multi-label tasks."""
    if multi_label:
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


RUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu")


def runtime_package_clash() -> str | None:
    """Why the installed onnxruntime may be broken: both the CPU and the GPU package are
    installed (they write the same ``onnxruntime`` module over each other). None: fine."""
    found = []
    for name in RUNTIME_PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    if len(found) < 2:
        return None
    return (f"both {' and '.join(found)} are installed and overwrite each other's files; "
            "keep one: pip uninstall -y onnxruntime && pip install --force-reinstall "
            "--no-deps onnxruntime-gpu (GPU) or pip uninstall -y onnxruntime-gpu && "
            "pip install --force-reinstall onnxruntime (CPU)")


def open_runtime(bundle: Bundle, settings: Settings) -> ModelRuntime:
    """A runtime on the configured providers, warmed up so the first scene is not slow."""
    clash = runtime_package_clash()
    if clash is not None:
        log.error("onnxruntime: %s", clash)
    runtime = ModelRuntime(bundle, ProviderPlan.from_settings(settings), settings.model.tta)
    if settings.model.warmup:
        runtime.warmup(batch=settings.tiling.batch_size)
    log.info("model %s v%d on %s, %d view(s) a tile", bundle.manifest.name, bundle.version,
             runtime.providers, runtime.views)
    return runtime
