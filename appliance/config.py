"""The appliance's one settings tree.

Sources, highest priority first: explicit overrides, environment variables ``TERRATILE_…``
(nested with ``__``, e.g. ``TERRATILE_MQTT__PORT=1884``), the YAML file, defaults. Secrets
come from files (``mqtt.password_file``, or the systemd credential ``mqtt_password``).
Unknown keys are errors everywhere, so a typo in a field config never silently falls back
to a default. ``explain_errors`` turns a ``ValidationError`` into one line per key.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

log = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits.h: a configuration error; the unit file does not restart on it


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class PathsConfig(Section):
    """Where the appliance keeps its files: the drop zone, claimed and finished inputs, one
    folder of outputs per scene, failed inputs with why, and its state (journal, index,
    model store)."""

    inbox: Path = Path("/var/lib/terratile/inbox")
    work: Path | None = None
    results: Path = Field(default=Path("/var/lib/terratile/results"),
                          description="One folder of outputs per scene (results/<scene_id>/).")
    failed: Path = Path("/var/lib/terratile/failed")
    processed: Path | None = None
    state: Path = Path("/var/lib/terratile/state")
    min_free_mb: int = Field(
        default=64, ge=0,
        description="Free space (MB) every folder of the box (inbox, work, results, failed, "
        "state) must keep: below it no new file is claimed and status says `degraded: disk` "
        "until space returns, and a scene's outputs are not written (`disk-full`). Formerly "
        "input.min_free_mb (still read, with a warning).",
    )

    @model_validator(mode="before")
    @classmethod
    def _outbox_is_results(cls, data: Any) -> Any:
        """``paths.outbox`` is the old name of ``paths.results`` (the MQTT outbox is a
        journal table, not this folder): still read, with a warning."""
        if isinstance(data, dict) and "outbox" in data:
            data = dict(data)
            old = data.pop("outbox")
            if "results" in data:
                raise ValueError("paths.outbox is the deprecated name of paths.results: "
                                 "give only paths.results")
            log.warning("paths.outbox is deprecated: call it paths.results")
            data["results"] = old
        return data

    @property
    def work_dir(self) -> Path:
        """Claimed scenes live here; defaults to a sibling of the inbox."""
        return self.work or self.inbox.parent / "work"

    @property
    def processed_dir(self) -> Path:
        """Finished inputs move here unless ``input.keep_processed`` is false."""
        return self.processed or self.inbox.parent / "processed"


Provider = Literal["tensorrt", "cuda", "cpu"]
BoxTta = Literal["bundle", "off"]
"""Test-time augmentation on the box: follow the bundle's manifest ``tta``, or run the plain
view only (``appliance.model.tta``)."""
_DEFAULT_PROVIDERS: tuple[Provider, ...] = ("tensorrt", "cuda", "cpu")


class ModelConfig(Section):
    """Which bundle to run and on which onnxruntime execution providers."""

    bundle: Path | None = Field(
        default=None,
        description="Seed bundle directory; installed into the model store on first start.",
    )
    providers: list[Provider] = Field(default_factory=lambda: list(_DEFAULT_PROVIDERS))
    trt_fp16: bool = True
    cuda_tf32: bool = Field(
        default=False,
        description="Let the CUDA provider use TF32 matmuls/convolutions: a little faster, "
        "but features then drift from the CPU-computed drift reference and source bank by "
        "orders of magnitude more than in fp32 (benchmarks/gpu_runtime.py).",
    )
    trt_engine_cache: Path | None = Field(
        default=None, description="TensorRT engine cache; defaults to state/trt-cache."
    )
    intra_op_threads: int = Field(default=0, ge=0, description="0 lets onnxruntime decide.")
    io_binding: bool | None = Field(
        default=None,
        description="Keep features on the device between backbone and heads (onnxruntime "
                    "IO binding); unset: on when the backbone runs on a GPU.")
    warmup: bool = True
    tta: BoxTta = Field(
        default="bundle",
        description="Test-time augmentation: 'bundle' follows the bundle's manifest `tta` "
        "(flips/quarter turns averaged, 8 backbone passes a tile), 'off' runs each tile "
        "once, for speed.",
    )
    install_dirs: list[Path] = Field(
        default_factory=list,
        description="Folders `cmd/install` may install a bundle (directory or .tar[.gz]) "
        "from; http(s) URLs are always allowed. Empty: only URLs.",
    )
    install_newer: bool = Field(
        default=False,
        description="At start, install and activate `model.bundle` when it is newer than "
        "every installed version (otherwise such a bundle is only reported, loudly).",
    )
    install_max_mb: int = Field(default=2048, ge=1,
                                description="Largest bundle archive an install downloads.")
    install_timeout: float = Field(default=60.0, gt=0,
                                   description="Seconds without data before a download fails.")


class RescaleConfig(Section):
    """How scene values map into the model's value range (the bundle's ``input.value_range``).

    ``auto`` is ``none`` for uint8 scenes and ``percentile`` otherwise.
    """

    mode: Literal["auto", "none", "linear", "percentile"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """``rescale: percentile`` is short for ``rescale: {mode: percentile}``."""
        return {"mode": data} if isinstance(data, str) else data

    factor: float = Field(default=1.0, gt=0, description="linear: value * factor + offset")
    offset: float = 0.0
    percentiles: tuple[float, float] = (2.0, 98.0)
    sample_size: int = Field(default=1024, ge=64, description="Overview size for statistics.")

    @model_validator(mode="after")
    def _ordered(self) -> RescaleConfig:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        return self


INPUT_DRIVERS = frozenset({"GTiff", "COG", "VRT", "PNG", "JPEG"})


class InputConfig(Section):
    """Band mapping and value rescaling from a scene to the model's input."""

    bands: list[int | str] | None = Field(
        default=None,
        description="Scene bands in model band order: 1-based numbers or band names (`red`, "
        "`B04`…). Default: matched by the scene's band descriptions and colour "
        "interpretation, else the first N when the scene has exactly N bands.",
    )
    gsd_tolerance: float = Field(
        default=2.0, ge=1,
        description="A scene whose ground windows differ from the bundle's training ground "
        "extent by more than this factor (either way) gets a warning or is refused.",
    )
    gsd_policy: Literal["warn", "refuse"] = Field(
        default="warn",
        description="warn: process it with a warning in the log, result, summary and STAC; "
        "refuse: fail it with reason `resolution`.",
    )
    rescale: RescaleConfig = Field(default_factory=RescaleConfig)
    nodata: float | None = Field(default=None, description="Overrides the scene's nodata.")
    keep_processed: bool = Field(default=True, description="Keep inputs in processed/.")
    settle_seconds: float = Field(default=2.0, ge=0, description="Size must be stable this long.")
    rescan_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, description="Crashes on a scene before it fails.")
    max_file_bytes: int = Field(
        default=20 * 1024**3, gt=0,
        description="Larger inbox files are refused (failed/too-large) without being read.",
    )
    max_scene_seconds: float = Field(
        default=3600.0, gt=0,
        description="The systemd watchdog is fed this long into one scene, no longer.",
    )
    drivers: list[str] = Field(
        default_factory=lambda: ["GTiff", "COG"], min_length=1,
        description="GDAL drivers a scene or GeoTIFF chip may be opened with; anything else "
        "fails with reason `format`. Add \"VRT\" to accept VRTs whose sources are GeoTIFFs "
        "in the VRT's own directory (never network or out-of-tree sources). JPEG/PNG chips "
        "are decoded by Pillow, limited to those two formats.",
    )
    max_pixels: int = Field(
        default=1_000_000_000, gt=0,
        description="Largest declared width x height of a scene or chip (a 10980² Sentinel-2 "
        "tile is 1.2e8); larger fails with reason `too-large` before any pixel is read.",
    )

    @model_validator(mode="after")
    def _known_drivers(self) -> InputConfig:
        # Only drivers whose files hold pixels, plus the VRT that the reader checks source
        # by source: a WMS, HTTP or other referencing driver cannot be switched on.
        unknown = sorted(set(self.drivers) - INPUT_DRIVERS)
        if unknown:
            raise ValueError(f"input.drivers: {unknown} not among {sorted(INPUT_DRIVERS)}")
        if self.bands is not None and any(isinstance(b, int) and b < 1 for b in self.bands):
            raise ValueError("input.bands: band numbers are 1-based")
        return self


class TilingConfig(Section):
    """The GID multi-scale grid: co-centred windows at every scale around each cell centre."""

    units: Literal["pixels", "metres"] = Field(
        default="pixels",
        description="Unit of scales and cell: scene pixels, or metres on the ground (each "
        "window then covers that extent whatever the scene's resolution).")
    scales: list[float] | None = Field(
        default=None,
        description="Window sizes in `units`; default: the bundle's (set at export with "
        "`terratile-export bundle --scales`), scaled to the scene's GSD when the bundle "
        "records its training GSD.")
    cell: float | None = Field(
        default=None, gt=0, description="Grid step in `units`; default min(scales).")
    match_gsd: bool = Field(
        default=True,
        description="With the bundle's scales and both GSDs known, scale the windows so "
        "each covers the ground extent it covered in training.")
    batch_size: int = Field(default=32, ge=1)
    fusion: Literal["mean", "max", "weighted"] = "mean"
    weights: list[float] | None = None
    nodata_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Cells with more nodata than this get nodata."
    )
    segments: Literal["none", "felzenszwalb", "slic"] = "none"
    segment_scale: float = Field(default=100.0, gt=0)
    read_ahead: int = Field(default=2, ge=0, description="Batches read ahead of inference.")
    gdal_cachemax_mb: int = Field(default=256, ge=16)

    @model_validator(mode="after")
    def _weights_match(self) -> TilingConfig:
        if self.scales is not None and (not self.scales or any(s <= 0 for s in self.scales)):
            raise ValueError("scales must be a non-empty list of positive pixel sizes")
        if self.fusion == "weighted" and self.weights is None:
            raise ValueError("fusion 'weighted' needs one weight per scale")
        if self.scales is not None and self.weights is not None and (
                len(self.weights) != len(self.scales)):
            raise ValueError("weights need one weight per scale")
        return self

    def for_bundle(self, bundle_scales: list[int], pixels: list[int] | None = None,
                   cell: int | None = None) -> ResolvedTiling:
        """This tiling in scene pixels: ``pixels`` (and ``cell``) where the caller converted
        the windows to the scene (metres, GSD matching), else the configured scales or the
        bundle's."""
        scales = pixels or [round(s) for s in (self.scales or bundle_scales)]
        if self.weights is not None and len(self.weights) != len(scales):
            raise ValueError(f"tiling.weights has {len(self.weights)} weights for the "
                             f"{len(scales)} scales {scales} (the bundle's)")
        step = cell if cell is not None else (round(self.cell) if self.cell else None)
        return ResolvedTiling(**{**self.model_dump(), "scales": scales, "cell": step,
                                 "units": "pixels"})


class ResolvedTiling(TilingConfig):
    """A tiling whose scales are known (configured, or the bundle's), in scene pixels."""

    scales: list[int]  # type: ignore[assignment]
    cell: int | None = None

    @property
    def cell_size(self) -> int:
        """The grid step in pixels."""
        return self.cell or min(self.scales)


class TLSConfig(Section):
    """TLS for the broker connection; all paths optional (system CAs by default)."""

    enabled: bool = False
    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    insecure: bool = False


class MQTTConfig(Section):
    """Broker connection; the password is read from a file, never from the YAML."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: str = "terratile"
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    tls: TLSConfig = Field(default_factory=TLSConfig)
    keepalive: int = Field(default=30, ge=5)
    stats_interval: float = Field(default=60.0, gt=0)
    stats_expiry: int = Field(default=120, ge=1, description="MQTT 5 message expiry, seconds.")
    reconnect_max_delay: int = Field(default=30, ge=1, description="Backoff ceiling, seconds.")
    max_pending_requests: int = Field(
        default=64, ge=1,
        description="Requests queued or running at once; beyond it a request is answered "
        "`busy` at once instead of queueing.",
    )
    client_rate: float = Field(
        default=20.0, ge=0,
        description="Requests per second one client (named by its reply topic) may send; "
        "beyond it a request is answered `rate-limited`. 0 turns the limit off.",
    )
    client_burst: int = Field(default=40, ge=1,
                              description="Requests one client may send at once.")
    max_response_topic_length: int = Field(
        default=256, ge=1, le=65535,
        description="Longest MQTT 5 response topic (UTF-8 bytes) a reply is sent to.",
    )
    publish_retry_max_delay: float = Field(
        default=300.0, gt=0,
        description="Backoff ceiling (s) for re-sending an outbox row the broker refused.",
    )
    down_warning_seconds: float = Field(
        default=10.0, gt=0,
        description="Seconds between the first 'broker unreachable' WARNINGs; doubled each "
        "time up to 600 s.",
    )

    @model_validator(mode="after")
    def _prefix(self) -> MQTTConfig:
        if not self.topic_prefix or any(c in self.topic_prefix for c in "#+"):
            raise ValueError("topic_prefix must be non-empty and contain no wildcards")
        return self

    def password(self) -> SecretStr | None:
        """The password from ``password_file`` or the systemd credential ``mqtt_password``."""
        candidates = [self.password_file]
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            candidates.append(Path(cred_dir) / "mqtt_password")
        for path in candidates:
            if path is not None and path.is_file():
                return SecretStr(path.read_text().strip())
        if self.password_file is not None:
            raise FileNotFoundError(f"mqtt.password_file: {self.password_file} does not exist")
        return None


class RetrievalConfig(Section):
    """The local faiss index of tile embeddings."""

    enabled: bool = True
    scale: int | None = Field(default=None, description="Scale whose embedding is indexed.")
    exact_max: int = Field(default=50_000, ge=0, description="Flat index up to this many vectors.")
    index_type: Literal["auto", "flat", "hnsw", "ivfpq", "ivfsq"] = "auto"
    hnsw_max: int = Field(
        default=200_000, ge=0,
        description="auto: HNSW up to this many vectors, IVF over scalar codes beyond.",
    )
    hnsw_m: int = Field(default=32, ge=4)
    hnsw_ef_search: int = Field(
        default=128, ge=8,
        description="HNSW search breadth: recall against latency (benchmarks/retrieval.py).",
    )
    hnsw_ef_construction: int = Field(default=64, ge=8)
    tombstone_rebuild: float = Field(
        default=0.2, gt=0, description="HNSW: rebuild when replaced ids exceed this fraction."
    )
    filter_exact_max: int = Field(
        default=50_000, ge=0, description="Filtered queries search this few vectors exactly."
    )
    faiss_threads: int = Field(
        default=1, ge=0,
        description="OpenMP threads for faiss (0: its default). 1 keeps single-query latency "
        "flat on a busy box; more only speeds up rebuilds and batch queries.",
    )
    ivf_nlist: int | None = Field(
        default=None, ge=1, description="IVF lists; unset: 2·√n, rebuilt as the index grows.")
    ivf_nprobe: int = Field(
        default=8, ge=1, description="IVF lists searched per query (benchmarks/retrieval.py).")
    sq_bits: Literal[4, 6, 8] = Field(
        default=6, description="IVF-SQ bits per dimension (6: the recall of 8 at 3/4 the codes).")
    rerank: int = Field(
        default=4, ge=1,
        description="Quantised kinds: shortlist rerank × k, re-scored exactly from the log.",
    )
    pq_m: int = Field(default=16, ge=1)
    checkpoint_every: int = Field(default=5000, ge=1, description="Vectors between saves.")
    allowed_dirs: list[Path] = Field(
        default_factory=list, description="Query images may only be read from these folders."
    )
    max_k: int = Field(default=100, ge=1)


class DriftConfig(Section):
    """Label-free drift detection against the bundle's ``reference.json``."""

    enabled: bool = True
    psi_threshold: float = Field(default=0.25, gt=0)
    feature_threshold: float = Field(
        default=0.01, gt=0, description="Window median of MMD² on the PCA-projected features."
    )
    confidence_delta: float = Field(default=0.05, gt=0)
    confidence_threshold: float = Field(default=0.5, gt=0)
    window: int = Field(default=5, ge=1, description="Scenes in the sliding window.")
    min_signals: int = Field(default=2, ge=1, description="Signals that must fire together.")
    min_scenes: int = Field(default=3, ge=1, description="Scenes seen before window signals fire.")


class AdaptConfig(Section):
    """Retrieval-confirmed pseudo-label adaptation, gated, versioned, reversible."""

    enabled: bool = True
    auto: bool = Field(default=True, description="Start a job when drift fires.")
    tau: float = Field(default=0.6, ge=0, le=1, description="Pseudo-label confidence threshold.")
    k: int = Field(default=10, ge=1, description="Source neighbours that must agree.")
    agreement: float = Field(default=0.5, gt=0, le=1, description="Fraction of k that agree.")
    per_class_cap: int = Field(default=200, ge=1)
    min_samples: int = Field(default=50, ge=1, description="Confirmed cells a head step needs.")
    store_max_cells: int = Field(default=20_000, ge=100)
    max_seconds: float = Field(default=120.0, gt=0)
    max_source_drop: float = Field(default=0.01, ge=0, description="Gate: Δ on held-back OA.")
    min_entropy: float = Field(default=0.5, ge=0, description="Gate: class-collapse floor.")
    reset_after: int = Field(default=10, ge=1, description="Updates before resetting to source.")
    rounds: int = Field(default=3, ge=1, description="Pseudo-label → confirm → fit rounds per job.")
    blend: float = Field(
        default=0.8, ge=0, le=1,
        description="Weight of target statistics in the feature re-standardisation (0: none).",
    )
    l2: float = Field(default=1e-3, ge=0, description="Pull of the head towards the source head.")
    source_weight: float = Field(
        default=1.0, ge=0, description="Total weight of source rows relative to target rows."
    )
    cooldown_scenes: int = Field(
        default=5, ge=0, description="New scenes collected before another automatic job."
    )
    distill: float = Field(
        default=1.0, ge=0, description="Weight of the aligned teacher's soft targets (0: off)."
    )
    input_blend: float = Field(
        default=1.0, ge=0, le=1,
        description="How far the adapted expert's input re-standardisation goes towards the "
        "source statistics (0: no input step; 1: all the way). Source scenes are routed to the "
        "source model, so they do not pay for it.",
    )
    input_tolerance: float = Field(
        default=0.15, ge=0,
        description="Radiometric distance from the source above which a new expert is made.",
    )
    renorm_blend: float = Field(
        default=0.5, ge=0, le=1,
        description="Weight of target statistics when the new expert's backbone layers are "
        "re-normalised (0: the expert shares the source backbone; 1: AdaBN's full reset). Needs "
        "the bundle's layer_stats.npz.",
    )
    renorm_tiles: int = Field(
        default=256, ge=8, description="Most recent target tiles the re-normalisation measures.")
    store_max_tiles: int = Field(
        default=512, ge=8, description="Model-input tiles kept on disk for re-normalisation.")
    cloud_brightness: float = Field(
        default=0.8, ge=0, le=1,
        description="Cloud screen: a cell whose every band mean is at least this share of the "
        "value range (and whose bands are alike) is never a pseudo-label candidate.")
    cloud_spread: float = Field(
        default=0.08, ge=0, le=1,
        description="Cloud screen: largest band-mean difference (share of the range) of a "
        "cloud-like cell.")
    keep_versions: int = Field(
        default=20, ge=1, description="Installed versions kept besides the active one's lineage.")
    keep_rejected: int = Field(
        default=5, ge=1, description="Refused candidate bundles kept under state/adapt/rejected.")
    domain_min_fraction: float = Field(
        default=0.8, gt=0, le=1,
        description="Gate of the input step: share of the new domain's newer stored scenes "
        "(its later half) that must route to the new expert, and of the scenes routed to it "
        "that must be the domain's (a signature that cannot tell the domains apart would "
        "misroute scenes).",
    )
    source_allowance: float = Field(
        default=0.0, ge=0, lt=1,
        description="Share of the source's sample scenes a new expert may take in routing: its "
        "routing margin is the smallest that leaves it no more (0: none; more makes experts "
        "come sooner and lets them take some source-sensor scenes).",
    )
    holdout_every: int = Field(
        default=4, ge=2,
        description="Every n-th stored target cell is kept out of the fit: the gate judges on it.",
    )
    agreement_ceiling: float = Field(
        default=0.99, gt=0, le=1,
        description="Gate: held-out agreement at or above this need not rise, only stay there.",
    )
    max_experts: int = Field(
        default=4, ge=1,
        description="Most adapted experts a version holds beside the source model; a new domain "
        "beyond them gets none until one is retired.")
    expert_idle_scenes: int = Field(
        default=200, ge=1,
        description="An expert that served none of this many scenes in a row is retired from "
        "the active version (older versions keep it for rollback).")
    refine_growth: float = Field(
        default=2.0, ge=0,
        description="An expert is made again (same name, same gates) from its own stored "
        "scenes once they number this many times the scenes it was pooled from: an expert "
        "made early from a few scenes is refined as more arrive (0: never).")
    domain_min_scenes: int = Field(
        default=3, ge=1,
        description="Stored scenes a new domain needs before it gets an expert: one odd scene "
        "never makes an expert.")


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class HTTPConfig(Section):
    """The local dashboard, Prometheus ``/metrics`` and the ``/healthz``, ``/readyz`` probes.

    Bound to the loopback address by default; bound anywhere else, every page but the two
    probes needs the token of ``token_file`` (sent as ``Authorization: Bearer …``), and
    the dashboard's write actions (rollback) always need it.
    """

    enabled: bool = True
    host: str = Field(default="127.0.0.1", description="Address to bind; 0.0.0.0 for all.")
    port: int = Field(default=8780, ge=1, le=65535)
    token_file: Path | None = Field(
        default=None, description="File holding the access token (one line, ≥ 16 characters).")

    @property
    def loopback(self) -> bool:
        """True when only this machine can reach the server."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> HTTPConfig:
        if self.enabled and not self.loopback and self.token_file is None:
            raise ValueError(f"http.host {self.host} is reachable from other machines: "
                             "set http.token_file")
        return self

    def token(self) -> str | None:
        """The token from ``token_file`` (None when none is configured)."""
        if self.token_file is None:
            return None
        if not self.token_file.is_file():
            raise FileNotFoundError(f"http.token_file: {self.token_file} does not exist")
        token = self.token_file.read_text().strip()
        if len(token) < 16:
            raise ValueError(f"http.token_file: {self.token_file} holds fewer than 16 "
                             "characters")
        return token


Scheme = Literal["https", "http", "s3"]


class FleetConfig(Section):
    """The fleet's shared work queue: scene jobs taken from ``$share/<group>/<prefix>/jobs``
    on the broker, each acknowledged only once committed to the journal, and scenes read
    by reference (HTTP(S) or S3 in windows, or a path under ``shared_dirs``)."""

    enabled: bool = Field(default=False, description="Take jobs from the shared queue.")
    group: str = Field(default="terratile", pattern=r"^[A-Za-z0-9_.-]+$",
                       description="The shared-subscription group every node of the fleet "
                       "joins; the broker hands each job to one member.")
    max_inflight: int = Field(
        default=2, ge=1, le=64,
        description="Jobs the node holds at once (committed, not yet finished); also its MQTT "
        "Receive Maximum, so the broker sends no more unacknowledged jobs than that.")
    session_expiry: int = Field(
        default=3600, ge=0,
        description="Seconds the broker keeps the node's session (its unacknowledged jobs) "
        "while it is away; longer than a restart takes.")
    shared_dirs: list[Path] = Field(
        default_factory=list,
        description="Absolute directories a job may name scenes in (e.g. an NFS mount); "
        "any other path is refused (`outside-shared-dirs`).")
    schemes: list[Scheme] = Field(
        default_factory=lambda: list(get_args(Scheme)),
        description="URL schemes a job may name; others are refused (`scheme`).")
    hosts: list[str] = Field(
        default_factory=list,
        description="Hosts (or buckets, for s3) a job's URL may name: `data.example.org` "
        "exactly, `.example.org` for any host under it; empty: any.")
    extensions: list[str] = Field(
        default_factory=lambda: [".tif", ".tiff"],
        description="File name endings a remote object must have (GDAL's "
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS).")
    http_timeout: float = Field(default=30.0, gt=0,
                                description="Seconds one HTTP(S) or S3 request may take.")
    http_retries: int = Field(default=2, ge=0,
                              description="Retries of a failed HTTP(S) or S3 request.")
    max_job_bytes: int = Field(default=8192, ge=256,
                               description="Larger job messages are refused (`malformed`).")

    @model_validator(mode="after")
    def _absolute_dirs(self) -> FleetConfig:
        relative = [str(d) for d in self.shared_dirs if not d.is_absolute()]
        if relative:
            raise ValueError(f"fleet.shared_dirs must be absolute: {relative}")
        return self


class FolderRetention(Section):
    """How long one folder keeps what it holds: by age and by total size (None: no limit)."""

    max_age_days: float | None = Field(default=None, gt=0)
    max_total_mb: float | None = Field(default=None, gt=0)


class RetentionConfig(Section):
    """What the sweeper removes, per folder; never what is not yet published (a result
    waiting in the outbox) or not yet indexed (a scene still being processed)."""

    results: FolderRetention = Field(default_factory=lambda: FolderRetention(max_age_days=30))
    processed: FolderRetention = Field(default_factory=lambda: FolderRetention(max_age_days=7))
    failed: FolderRetention = Field(default_factory=lambda: FolderRetention(max_age_days=30))
    sweep_seconds: float = Field(default=600.0, gt=0, description="Time between sweeps.")


class LoggingConfig(Section):
    """How log lines look: ``text`` (no timestamp under journald, which adds its own) or
    ``json`` (one object per line)."""

    format: Literal["text", "json"] = "text"

class LabelsConfig(Section):
    """Multi-label bundles: presence thresholds per label (default: the bundle's own,
    calibrated at export to maximise each label's F1 on the validation split)."""

    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Label name → presence threshold on its probability (0..1), replacing "
        "the bundle's for that label.")

    @model_validator(mode="after")
    def _in_unit_range(self) -> LabelsConfig:
        bad = {k: v for k, v in self.thresholds.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"thresholds must lie in [0, 1]: {bad}")
        return self


class Settings(BaseSettings):
    """The whole appliance configuration."""

    model_config = SettingsConfigDict(
        env_prefix="TERRATILE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    node_id: str = Field(default="edge-01", pattern=r"^[A-Za-z0-9_.-]+$")
    paths: PathsConfig = Field(default_factory=PathsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    mqtt: MQTTConfig = Field(default_factory=MQTTConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _input_min_free_mb(cls, data: Any) -> Any:
        """``input.min_free_mb`` is the old name of ``paths.min_free_mb``: still read, with
        a warning (one setting for the scene writer and the claim guard)."""
        if not isinstance(data, dict) or not isinstance(data.get("input"), dict) or (
                "min_free_mb" not in data["input"]):
            return data
        data = {**data, "input": dict(data["input"])}
        old = data["input"].pop("min_free_mb")
        paths = data.get("paths")
        paths = dict(paths) if isinstance(paths, dict) else {}
        if "min_free_mb" in paths:
            raise ValueError("input.min_free_mb is the deprecated name of paths.min_free_mb: "
                             "give only paths.min_free_mb")
        log.warning("input.min_free_mb is deprecated: call it paths.min_free_mb")
        data["paths"] = {**paths, "min_free_mb": old}
        return data


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every bad key."""


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    """The keys the section at ``loc`` accepts (empty when ``loc`` is not a section)."""
    model: type[BaseModel] = Settings
    for part in loc:
        info = model.model_fields.get(str(part))
        kind = info.annotation if info is not None else None
        if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
            return []
        model = kind
    return list(model.model_fields)


def _in(tree: dict[str, Any], loc: tuple[str | int, ...]) -> bool:
    node: Any = tree
    for part in loc:
        if not isinstance(node, dict) or str(part) not in node:
            return False
        node = node[str(part)]
    return True


def _env_name(loc: tuple[str | int, ...]) -> str:
    return "TERRATILE_" + "__".join(str(p).upper() for p in loc if isinstance(p, str))


def explain_errors(exc: ValidationError,
                   origin: Callable[[tuple[str | int, ...]], str] | None = None) -> list[str]:
    """One human line per error: ``key.path: message (got value)``, a suggestion for an
    unknown key close to a known one, and ``origin(loc)`` (where the value came from)."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc[:-1]), n=1)
            if close:
                msg += f" (did you mean `{close[0]}`?)"
        got = err.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        lines.append(f"{key}: {msg}{shown}{origin(loc) if origin else ''}")
    return lines


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read the YAML file (if any) plus environment; raise ``ConfigError`` naming each key.

    Relative paths in the file are taken relative to the file's folder, so a config that
    sits beside its data works from any working directory.
    """
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
        data = _resolve_relative(loaded, path.parent.resolve())
    try:
        env_values = _EnvOnly().model_dump(exclude_unset=True)  # above the YAML file
    except ValidationError as exc:
        raise ConfigError("\n".join(explain_errors(
            exc, lambda loc: f" [from environment variable {_env_name(loc)}]"))) from exc

    def origin(loc: tuple[str | int, ...]) -> str:
        if _in(env_values, loc):
            return f" [from environment variable {_env_name(loc)}]"
        return f" [from {path}]" if path is not None and _in(data, loc) else ""

    try:
        merged = _deep_merge(_deep_merge(data, env_values), overrides)
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError("\n".join(explain_errors(exc, origin))) from exc


class _EnvOnly(Settings):
    """Settings read from the environment alone (no defaults validated as 'set')."""

    model_config = SettingsConfigDict(
        env_prefix="TERRATILE_", env_nested_delimiter="__", extra="ignore"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings,)


def _path_keys(model: type[BaseModel], lists: bool, prefix: tuple[str, ...] = ()
               ) -> set[tuple[str, ...]]:
    """Keys whose values are paths (``lists``: lists of paths), read from the field types
    of ``model`` and its nested sections."""
    keys: set[tuple[str, ...]] = set()
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            keys |= _path_keys(kind, lists, (*prefix, name))
        elif (get_origin(kind) is list) == lists and (kind is Path or Path in get_args(kind)):
            keys.add((*prefix, name))
    return keys


_PATH_KEYS = {*_path_keys(Settings, lists=False), ("paths", "outbox")}  # + deprecated alias
_PATH_LIST_KEYS = _path_keys(Settings, lists=True)


def _resolve_relative(data: dict[str, Any], base: Path, prefix: tuple[str, ...] = ()) -> dict:
    out: dict[str, Any] = {}
    for key, value in data.items():
        here = (*prefix, str(key))
        if isinstance(value, dict):
            out[key] = _resolve_relative(value, base, here)
        elif here in _PATH_KEYS and isinstance(value, str) and not Path(value).is_absolute():
            out[key] = str(base / value)
        elif here in _PATH_LIST_KEYS and isinstance(value, list):
            out[key] = [str(base / v) if isinstance(v, str) else v for v in value]
        else:
            out[key] = value
    return out


def _deep_merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
