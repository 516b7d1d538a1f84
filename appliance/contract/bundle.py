"""The model bundle: the one contract between the workstation exporter and the appliance.

A bundle is a directory (DESIGN.md, 'The model bundle'): ``manifest.json`` plus
``backbone.onnx``, ``classifier.onnx``, ``embedder.onnx``, ``source_bank.npz`` and
``reference.json``. Both sides read and write it through this module only; ``export``
imports it, the appliance never imports ``export``.

Loading verifies every file's sha256 and refuses a tampered or incomplete bundle with a
``BundleError`` naming the file, so a daemon can keep the model it had.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.contract.durable import atomic_write_text

SCHEMA = "terratile.bundle/1"
REFERENCE_SCHEMA = "terratile.reference/1"
MANIFEST = "manifest.json"
BACKBONE = "backbone.onnx"
CLASSIFIER = "classifier.onnx"
EMBEDDER = "embedder.onnx"
SOURCE_BANK = "source_bank.npz"
REFERENCE = "reference.json"
LAYER_STATS = "layer_stats.npz"  # optional: per-Conv source statistics (appliance/renorm.py)
REQUIRED_FILES = (BACKBONE, CLASSIFIER, EMBEDDER, SOURCE_BANK, REFERENCE)

# ONNX tensor names fixed by the contract.
IMAGE_INPUT = "image"
FEATURES = "features"
LOGITS = "logits"
EMBEDDING = "embedding"

Task = Literal["single-label", "multi-label"]


class BundleError(RuntimeError):
    """A bundle that must not be loaded: missing file, bad hash, bad manifest."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassSpec(_Frozen):
    """One output class and the colour it gets in maps and legends."""

    name: str
    colour: tuple[int, int, int]


class InputSpec(_Frozen):
    """What the backbone expects.

    Pixel values are first brought into ``value_range`` (the range of the training
    images, 0..255 for 8-bit chips), then normalised as ``(x * scale - mean) / std``
    per band, in ``bands`` order, resized to ``size`` x ``size``.
    """

    bands: list[str]
    value_range: tuple[float, float] = (0.0, 255.0)
    scale: float = 1.0
    mean: list[float]
    std: list[float]
    size: int = Field(gt=0)

    def normalise(self, tiles: np.ndarray) -> np.ndarray:
        """[N,C,H,W] values in ``value_range`` → float32 network input.

        One multiply into a new array and one in-place add (``x·(s/σ) − m/σ``): on a GPU
        box the host-side normalisation, not the network, bounded throughput (35 of 50 ms
        per 256-tile batch on an H100 with the three-pass form; 9 ms like this).
        """
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        gain = np.float32(self.scale) / std
        offset = -np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1) / std
        out = np.multiply(tiles, gain, dtype=np.float32)
        out += offset
        return out


class Domain(_Frozen):
    """An adapted expert inside a bundle, for scenes from another sensor or season.

    Self-adaptation (``appliance/adaptation.py``) calibrates the input to a new domain and
    fits a head for it, but the source domain must not pay for that: source-sensor scenes
    keep the bundle's own ``input`` and ``classifier.onnx``. Each scene is routed
    (``appliance/routing.py``) to the expert whose radiometric signature, the per-band
    ``mean`` and ``std`` of its scenes in the model's value range and their ``sharpness``,
    is nearest its own; the source's signature is ``reference.json``. The embedder is
    shared; the backbone too unless the expert has a re-normalised one.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    mean: list[float]
    std: list[float]
    sharpness: list[float] | None = None
    input: InputSpec
    classifier: str = Field(description="Head file of this expert, listed in ``files``.")
    backbone: str | None = Field(
        default=None, description="Re-normalised backbone of this expert (None: the bundle's).")
    reference: str | None = Field(
        default=None, description="Drift reference of this expert's domain (Reference JSON).")


class Manifest(_Frozen):
    """``manifest.json``. ``files`` maps every other file of the bundle to its sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    schema_: str = Field(default=SCHEMA, alias="schema")
    name: str
    version: int = Field(ge=1)
    parent: int | None = None
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    task: Task = "single-label"
    backbone: str
    classes: list[ClassSpec]
    input: InputSpec
    scales: list[int] = Field(default_factory=lambda: [56, 112, 224])
    feature_dim: int = Field(gt=0)
    embedding_dim: int = Field(gt=0)
    files: dict[str, str] = Field(default_factory=dict)
    domains: list[Domain] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    notes: str = ""

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def domain(self, name: str | None) -> Domain | None:
        """The adapted expert called ``name``; None for the source (``name`` None)."""
        if name is None:
            return None
        for d in self.domains:
            if d.name == name:
                return d
        raise BundleError(f"bundle {self.name} v{self.version} has no domain {name!r}")

    def input_for(self, domain: str | None) -> InputSpec:
        """The input spec of an expert (the bundle's own for the source)."""
        d = self.domain(domain)
        return self.input if d is None else d.input

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


class BandStats(_Frozen):
    """Input radiometry of one band on source data, in the model's value range."""

    name: str
    mean: float
    std: float
    quantiles: list[float] = Field(description="101 values: the 0th..100th percentiles.")
    sharpness: float | None = Field(
        default=None, description="Neighbour difference over std on model-input chips "
        "(appliance.routing.sharpness); None in bundles exported before it existed.")


class FeatureStats(_Frozen):
    """Backbone feature statistics on source data, for label-free feature-shift scores."""

    mean: list[float]
    std: list[float]
    pca_mean: list[float]
    pca_components: list[list[float]] = Field(description="P x D principal axes.")
    sample: list[list[float]] = Field(description="Source features projected on the P axes.")
    centroid_distance_mean: float = Field(description="Mean distance to the nearest centroid.")
    centroid_distance_std: float


class ConfidenceStats(_Frozen):
    """Per-cell max-probability and entropy statistics on source data."""

    mean_max_prob: float
    std_max_prob: float
    mean_entropy: float
    std_entropy: float


class Reference(_Frozen):
    """``reference.json``: the drift reference of DESIGN.md."""

    schema_: str = Field(default=REFERENCE_SCHEMA, alias="schema")
    bands: list[BandStats]
    features: FeatureStats
    confidence: ConfidenceStats


@dataclass(frozen=True)
class SourceBank:
    """``source_bank.npz``: class-balanced source features, the pseudo-label oracle.

    ``labels`` is [M] int64 for single-label and [M,K] uint8 for multi-label bundles;
    ``holdout`` marks rows never used for training a head, kept for the adaptation gate.
    """

    features: np.ndarray
    labels: np.ndarray
    centroids: np.ndarray
    holdout: np.ndarray

    @classmethod
    def load(cls, path: Path) -> SourceBank:
        with np.load(path) as data:
            missing = {"features", "labels", "centroids"} - set(data.files)
            if missing:
                raise BundleError(f"{path.name}: missing arrays {sorted(missing)}")
            features = data["features"].astype(np.float32)
            holdout = data["holdout"] if "holdout" in data.files else _default_holdout(features)
            return cls(features, data["labels"], data["centroids"].astype(np.float32),
                       holdout.astype(bool))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, features=self.features.astype(np.float32), labels=self.labels,
                            centroids=self.centroids.astype(np.float32), holdout=self.holdout)


def _default_holdout(features: np.ndarray) -> np.ndarray:
    """Every fifth row, deterministic: a held-back part for banks written without one."""
    mask = np.zeros(len(features), bool)
    mask[::5] = True
    return mask


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        return self.path / name

    def classifier(self, domain: str | None = None) -> Path:
        """The head file of an expert (``classifier.onnx`` for the source)."""
        d = self.manifest.domain(domain)
        return self.file(CLASSIFIER if d is None else d.classifier)

    def domain_references(self) -> dict[str, Reference]:
        """The drift reference of every expert that has one, by domain name."""
        return {d.name: Reference.model_validate_json(self.file(d.reference).read_text())
                for d in self.manifest.domains if d.reference is not None}

    def backbone(self, domain: str | None = None) -> Path:
        """The backbone file of an expert (``backbone.onnx`` unless it has its own)."""
        d = self.manifest.domain(domain)
        return self.file(BACKBONE if d is None or d.backbone is None else d.backbone)

    @cached_property
    def source_bank(self) -> SourceBank:
        return SourceBank.load(self.file(SOURCE_BANK))

    @cached_property
    def reference(self) -> Reference:
        return Reference.model_validate_json(self.file(REFERENCE).read_text())

    @property
    def version(self) -> int:
        return self.manifest.version


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> Manifest:
    """A bundle's parsed manifest, its files not hashed: for walking version lineages,
    where ``load_bundle``'s sha256 of every file (tens of MB) would be wasted."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no {MANIFEST} (not a bundle directory)")
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        got = raw.get("schema") if isinstance(raw, dict) else None
        raise BundleError(f"{manifest_path}: schema {got!r}, expected {SCHEMA!r}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{manifest_path}: invalid manifest: {exc}") from exc


def load_bundle(path: Path) -> Bundle:
    """Read and verify a bundle; raise ``BundleError`` saying exactly what is wrong."""
    path = Path(path)
    manifest_path = path / MANIFEST
    manifest = read_manifest(path)
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleError(f"{path}: manifest lists no sha256 for required file {name}")
    for name, expected in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path}: missing file {name}")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(
                f"{path}: sha256 mismatch for {name} (manifest {expected[:12]}…, "
                f"file {actual[:12]}…): refusing a modified bundle"
            )
    if len(manifest.input.mean) != len(manifest.input.bands) or len(manifest.input.std) != len(
        manifest.input.bands
    ):
        raise BundleError(f"{manifest_path}: input mean/std must have one value per band")
    for d in manifest.domains:
        n = len(manifest.input.bands)
        for own in (d.classifier, d.backbone, d.reference):
            if own is not None and own not in manifest.files:
                raise BundleError(f"{manifest_path}: domain {d.name!r} file {own} has no "
                                  "sha256 in files")
        if {len(d.mean), len(d.std), len(d.input.mean), len(d.input.std)} != {n}:
            raise BundleError(f"{manifest_path}: domain {d.name!r} needs one mean/std per band")
    if len({d.name for d in manifest.domains}) != len(manifest.domains):
        raise BundleError(f"{manifest_path}: domain names must be unique")
    return Bundle(path=path, manifest=manifest)


def seal_bundle(path: Path, manifest: Manifest) -> Manifest:
    """Hash every required (and any extra listed) file and write ``manifest.json``.

    Written to a temporary name and renamed, so a reader never sees a half manifest.
    """
    names = sorted(set(REQUIRED_FILES) | set(manifest.files))
    files = {}
    for name in names:
        file = path / name
        if not file.is_file():
            raise BundleError(f"cannot seal {path}: missing {name}")
        files[name] = sha256_file(file)
    sealed = manifest.model_copy(update={"files": files})
    atomic_write_text(path / MANIFEST, sealed.to_json())
    return sealed
