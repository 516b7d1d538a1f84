"""The model bundle: the one contract between the workstation exporter and the appliance.

A bundle is a directory: ``manifest.json`` plus ``backbone.onnx``, ``classifier.onnx``,
``embedder.onnx``, ``source_bank.npz`` and ``reference.json``. Both sides read and write it
through this module only; ``export`` imports it, the appliance never imports ``export``.

Loading verifies every file's sha256 and refuses a tampered or incomplete bundle with a
``BundleError`` naming the file, so a daemon can keep the model it had. Documents written
in an older layout are brought to the current one in a single place, ``upgrade_reference``
(the only layout change so far), as they are read.
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
from appliance.contract.palette import ClassSpec, semantic_palette

SCHEMA = "terratile.bundle/2"
SCHEMA_V1 = "terratile.bundle/1"  # read through ``upgrade_manifest``
REFERENCE_SCHEMA = "terratile.reference/2"
REFERENCE_V1 = "terratile.reference/1"  # read through ``upgrade_reference``
MANIFEST = "manifest.json"
BACKBONE = "backbone.onnx"
CLASSIFIER = "classifier.onnx"
EMBEDDER = "embedder.onnx"
SOURCE_BANK = "source_bank.npz"
REFERENCE = "reference.json"
LAYER_STATS = "layer_stats.npz"  # optional: per-Conv source statistics (adapt/renorm.py)
REQUIRED_FILES = (BACKBONE, CLASSIFIER, EMBEDDER, SOURCE_BANK, REFERENCE)

# ONNX tensor names fixed by the contract.
IMAGE_INPUT = "image"
FEATURES = "features"
LOGITS = "logits"
EMBEDDING = "embedding"

Task = Literal["single-label", "multi-label"]
BundleTta = Literal["none", "flips-rot90"]
"""Test-time augmentation a bundle asks for (``appliance.model.tta``): none, or class
probabilities averaged over the eight flips and quarter turns of each tile."""


DEFAULT_SCALES = (56, 112, 224)  # GID's co-centred windows, px

class BundleError(RuntimeError):
    """A bundle that must not be loaded: missing file, bad hash, bad manifest."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        box the host-side normalisation, not the network, can bound throughput.
        """
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        gain = np.float32(self.scale) / std
        offset = -np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1) / std
        out = np.multiply(tiles, gain, dtype=np.float32)
        out += offset
        return out


class Expert(_Frozen):
    """An adapted expert inside a bundle, for scenes from another sensor or season.

    Self-adaptation (``appliance.adapt``) calibrates the input to a new domain and
    fits a head for it, but the source domain must not pay for that: source-sensor scenes
    keep the bundle's own ``input`` and ``classifier.onnx``. Each scene is routed
    (``appliance.model.routing``) to the expert whose radiometric signature, the per-band
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
    margin: float = Field(
        default=0.0, ge=0.0, description="Added to this expert's distance in routing: how "
        "much nearer this expert than the source the source's sample scenes come, so that "
        "they keep routing to the source (0: experts made before margins).")
    scenes: int | None = Field(
        default=None, ge=1, description="Stored scenes its signature and re-normalisation were "
        "pooled from; it is made again from its own scenes once it has served "
        "adapt.refine_growth times as many (None: experts made before refinement, never "
        "refined).")


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
    scales: list[int] = Field(
        default_factory=lambda: list(DEFAULT_SCALES),
        description="Window sizes (px) the box tiles with unless its config sets tiling.scales.")
    gsd: float | None = Field(
        default=None, gt=0,
        description="Ground sampling distance of the training chips, metres per pixel "
        "(null: unknown). The box scales its windows to a scene's GSD with it.")
    palette: Literal["semantic", "custom"] | None = Field(
        default=None,
        description="Where the class colours come from: the semantic default palette or a "
        "file given at export (null: a bundle from before palettes; the box then colours "
        "its maps with the semantic palette).")
    tta: BundleTta = Field(
        default="none",
        description="Test-time augmentation chosen at export: 'flips-rot90' averages the "
        "class probabilities over the 8 flips/quarter turns of a tile (8 backbone passes); "
        "a box may turn it off (model.tta: off).")
    feature_dim: int = Field(gt=0)
    embedding_dim: int = Field(gt=0)
    files: dict[str, str] = Field(default_factory=dict)
    experts: list[Expert] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    notes: str = ""

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def map_classes(self) -> list[ClassSpec]:
        """The classes with the colours maps and legends use: the bundle's own, or the
        semantic palette for a bundle exported before palettes were recorded."""
        if self.palette is not None:
            return list(self.classes)
        return semantic_palette(self.class_names)

    @property
    def thresholds(self) -> np.ndarray:
        """[K] per-label presence thresholds (0.5 where none was calibrated)."""
        return np.asarray([0.5 if c.threshold is None else c.threshold for c in self.classes],
                          np.float64)

    def expert(self, name: str | None) -> Expert | None:
        """The adapted expert called ``name``; None for the source (``name`` None)."""
        if name is None:
            return None
        for d in self.experts:
            if d.name == name:
                return d
        raise BundleError(f"bundle {self.name} v{self.version} has no domain {name!r}")

    def input_for(self, domain: str | None) -> InputSpec:
        """The input spec of an expert (the bundle's own for the source)."""
        d = self.expert(domain)
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
        "(appliance.contract.signature.sharpness); None in bundles exported before it existed.")


class SceneSample(_Frozen):
    """The signature of one small scene of a domain: per-band mean, std and sharpness."""

    mean: list[float]
    std: list[float]
    sharpness: list[float]


class FeatureStats(_Frozen):
    """Backbone feature statistics on source data, for label-free feature-shift scores."""

    mean: list[float] = Field(description="Per dimension; also the centre of the PCA axes.")
    std: list[float]
    pca_components: list[list[float]] = Field(description="P x D principal axes.")
    sample: list[list[float]] = Field(description="Source features projected on the P axes.")


class ConfidenceStats(_Frozen):
    """Mean per-cell max probability and normalised entropy on source data."""

    mean_max_prob: float
    mean_entropy: float


class Reference(_Frozen):
    """``reference.json``: what a domain looks like to the model, for drift detection."""

    schema_: str = Field(default=REFERENCE_SCHEMA, alias="schema")
    bands: list[BandStats]
    features: FeatureStats
    confidence: ConfidenceStats
    scenes: list[SceneSample] = Field(
        default_factory=list, description="Signatures of pseudo-scenes of a dozen of the "
        "domain's chips: how far its scenes stray by what they show alone (empty in bundles "
        "exported before it existed).")


def upgrade_reference(raw: dict[str, Any]) -> dict[str, Any]:
    """A reference document in the current layout, whatever layout it was written in.

    ``terratile.reference/1`` also carried statistics nothing reads: the features'
    ``pca_mean`` (always equal to their ``mean``), the nearest-centroid distances and the
    standard deviations of the confidence figures. A document already current is returned
    as it is; an unknown schema is refused.
    """
    schema = raw.get("schema")
    if schema == REFERENCE_V1:
        dropped = {"pca_mean", "centroid_distance_mean", "centroid_distance_std",
                   "std_max_prob", "std_entropy"}
        raw = {**raw, "schema": REFERENCE_SCHEMA,
               "features": {k: v for k, v in raw["features"].items() if k not in dropped},
               "confidence": {k: v for k, v in raw["confidence"].items() if k not in dropped}}
    elif schema != REFERENCE_SCHEMA:
        raise BundleError(f"reference schema {schema!r}, expected {REFERENCE_SCHEMA!r}")
    return raw


def read_reference(path: Path) -> Reference:
    """A ``reference.json`` (the source's or an expert's), upgraded and validated."""
    try:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise BundleError(f"{path}: not a reference document")
        return Reference.model_validate(upgrade_reference(raw))
    except (OSError, json.JSONDecodeError, ValidationError, KeyError, AttributeError) as exc:
        raise BundleError(f"{path}: unreadable reference: {exc}") from exc


@dataclass(frozen=True)
class SourceBank:
    """``source_bank.npz``: class-balanced source features, the pseudo-label oracle.

    ``labels`` is [M] int64 for single-label and [M,K] uint8 for multi-label bundles;
    ``holdout`` marks rows never used for training a head, kept for the adaptation gate
    (``holdout_rows``).
    """

    features: np.ndarray
    labels: np.ndarray
    holdout: np.ndarray

    @classmethod
    def load(cls, path: Path) -> SourceBank:
        with np.load(path) as data:
            missing = {"features", "labels", "holdout"} - set(data.files)
            if missing:
                raise BundleError(f"{path.name}: missing arrays {sorted(missing)}")
            return cls(data["features"].astype(np.float32), data["labels"],
                       data["holdout"].astype(bool))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, features=self.features.astype(np.float32), labels=self.labels,
                            holdout=self.holdout)


def holdout_rows(labels: np.ndarray) -> np.ndarray:
    """The bank rows held back for the adaptation gate: every fifth row of each class (of
    the first label of multi-label rows), deterministic. [M] bool."""
    first = labels if labels.ndim == 1 else labels.argmax(axis=1)
    mask = np.zeros(len(labels), bool)
    for k in np.unique(first):
        mask[np.flatnonzero(first == k)[::5]] = True
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
        d = self.manifest.expert(domain)
        return self.file(CLASSIFIER if d is None else d.classifier)

    def expert_references(self) -> dict[str, Reference]:
        """The drift reference of every expert that has one, by domain name."""
        return {d.name: read_reference(self.file(d.reference))
                for d in self.manifest.experts if d.reference is not None}

    def backbone(self, domain: str | None = None) -> Path:
        """The backbone file of an expert (``backbone.onnx`` unless it has its own)."""
        d = self.manifest.expert(domain)
        return self.file(BACKBONE if d is None or d.backbone is None else d.backbone)

    @cached_property
    def source_bank(self) -> SourceBank:
        return SourceBank.load(self.file(SOURCE_BANK))

    @cached_property
    def reference(self) -> Reference:
        return read_reference(self.file(REFERENCE))

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


def upgrade_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """A manifest document in the current layout, whatever layout it was written in.

    ``terratile.bundle/1`` called the adapted experts ``domains`` (a domain is the data an
    expert serves, not the expert). A current document is returned as it is.
    """
    if raw.get("schema") == SCHEMA_V1:
        raw = dict(raw)
        raw["experts"] = raw.pop("domains", [])
        raw["schema"] = SCHEMA
    return raw


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
    if not isinstance(raw, dict) or raw.get("schema") not in (SCHEMA, SCHEMA_V1):
        got = raw.get("schema") if isinstance(raw, dict) else None
        raise BundleError(f"{manifest_path}: schema {got!r}, expected {SCHEMA!r}")
    try:
        return Manifest.model_validate(upgrade_manifest(raw))
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
    for d in manifest.experts:
        n = len(manifest.input.bands)
        for own in (d.classifier, d.backbone, d.reference):
            if own is not None and own not in manifest.files:
                raise BundleError(f"{manifest_path}: domain {d.name!r} file {own} has no "
                                  "sha256 in files")
        if {len(d.mean), len(d.std), len(d.input.mean), len(d.input.std)} != {n}:
            raise BundleError(f"{manifest_path}: domain {d.name!r} needs one mean/std per band")
    if len({d.name for d in manifest.experts}) != len(manifest.experts):
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
