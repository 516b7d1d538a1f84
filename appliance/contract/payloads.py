"""The JSON payloads the appliance publishes on MQTT, as pydantic models: the contract
between the box and whoever subscribes to it.

Every payload carries ``schema`` (name and major version, e.g. ``terratile.scene-result/1``),
``msg_id``, ``node_id`` and ``ts`` so a consumer can route, de-duplicate and order them.
Payloads are references to files, never rasters. Their typed parts (``Record``: drift
scores and verdicts, adaptation reports and gates) are defined here too, so that the
published schemas describe every property. The JSON Schemas in ``docs/schemas/`` are
generated from these models (``python -m appliance.contract.payloads docs/schemas``) and a test
keeps them in step.

A scene result's ``msg_id`` is derived from the scene id (``uuid5``), so a result that is
re-published after a crash or re-announced for a re-dropped file carries the same id and a
consumer can drop the copy.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from appliance.contract.bundle import Manifest

# A fixed namespace so msg_ids derived from scene ids are stable across boxes and versions.
MSG_NAMESPACE = uuid.UUID("5b0c3f0e-7a49-4c55-9d0f-2f6c1a7e9b11")


def now_iso() -> str:
    """UTC timestamp in ISO 8601 with a ``Z`` suffix."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def result_msg_id(scene_id: str) -> str:
    """The deterministic msg_id of a scene's result."""
    return str(uuid.uuid5(MSG_NAMESPACE, f"{scene_id}/result"))


def job_event_msg_id(job_id: str, event: str) -> str:
    """The deterministic msg_id of a job's event (a re-sent event carries the same id)."""
    return str(uuid.uuid5(MSG_NAMESPACE, f"job/{job_id}/{event}"))


def new_msg_id() -> str:
    return str(uuid.uuid4())


class Payload(BaseModel):
    """Fields every payload carries; subclasses set ``SCHEMA``."""

    model_config = ConfigDict(extra="forbid")
    SCHEMA: ClassVar[str] = ""

    schema_: str = Field(default="", alias="schema", description="Payload type and version.")
    msg_id: str = Field(default_factory=new_msg_id, description="Unique id; stable on re-send.")
    node_id: str
    ts: str = Field(default_factory=now_iso, description="UTC time the payload was built.")

    def model_post_init(self, __context: Any) -> None:
        self.schema_ = self.SCHEMA

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


class Record(BaseModel):
    """A typed part of a payload: closed (unknown keys are refused) and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# -- drift: what ``appliance.adapt.drift.DriftMonitor`` says about the scene stream --------

Signal = Literal["radiometry", "features", "confidence"]


class DriftScores(Record):
    """One scene's drift scores against the reference it was judged by."""

    reference: str | None = Field(
        description="Expert whose own reference scored the scene (null: the source's).")
    psi_bands: list[float] = Field(description="Population stability index per band.")
    psi: float = Field(description="The worst band's PSI.")
    mmd: float = Field(description="Unbiased MMD² of the PCA-projected features.")
    mean_max_prob: float
    mean_entropy: float = Field(description="Mean normalised entropy of the valid cells.")
    cells: int = Field(description="Valid cells scored.")


class DriftWindow(Record):
    """The sliding window's medians and the confidence detectors' statistics."""

    psi: float
    mmd: float
    scenes: int = Field(description="Scenes in the window.")
    ph_max_prob: float = Field(description="Page-Hinkley statistic of the max-probability drop.")
    ph_entropy: float = Field(description="Page-Hinkley statistic of the entropy rise.")


class DriftThresholds(Record):
    """The ``drift.*`` thresholds the verdict was reached with."""

    psi: float
    mmd: float
    ph: float
    ph_delta: float


class DriftReport(Record):
    """The drift verdict after one scene: its scores, the window, the fired signals."""

    scene_id: str
    drifting: bool = Field(description="At least drift.min_signals signals fired together.")
    fired: list[Signal]
    scene: DriftScores | None = Field(
        default=None, description="This scene's scores (null: it was skipped).")
    window: DriftWindow
    scenes_seen: int = Field(description="Scenes scored since the detectors last restarted.")
    skipped: str | None = Field(default=None, description="Why the scene was not scored.")
    thresholds: DriftThresholds

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class DriftStatus(Record):
    """The drift state without a new scene, for the status payload."""

    drifting: bool
    fired: list[Signal]
    window: DriftWindow
    adapting: bool = Field(default=False, description="An adaptation job is running.")


# -- adaptation: what one ``appliance.adapt.adapter.Adapter.run`` job did -------------------

Action = Literal["promoted", "rejected", "skipped", "reset"]
Step = Literal["input", "head", "retire"]


class ExpertUse(BaseModel):
    """One expert of the running model and how much it served (``appliance.adapt.usage``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The expert's name; `source` for the source model.")
    scenes: int = Field(description="Scenes routed to it since it was made.")
    idle_scenes: int = Field(description="Scenes since it last served one.")


class HeadCounts(Record):
    """Cells and source rows a head step worked with."""

    candidates: int = Field(description="Stored target cells under the adapted expert's input.")
    scenes: int
    pseudo: int = Field(description="Cells whose teacher confidence reached adapt.tau.")
    confirmed: int = Field(description="Retrieval-confirmed cells fitted in round 1.")
    heldout: int = Field(description="Cells never fitted (every adapt.holdout_every-th).")
    validation: int = Field(description="Confirmed cells among the held-out ones.")
    source_train: int
    source_holdout: int


class InputCounts(Record):
    """Scenes and tiles an input step worked with."""

    scenes: int = Field(description="Stored scenes.")
    domain_scenes: int = Field(description="Stored scenes that form the new domain.")
    tiles: int = Field(description="Model-input tiles of the new domain measured.")


class GateReport(Record):
    """A gate's verdict: passed when no criterion failed."""

    passed: bool
    failures: list[str] = Field(description="One sentence per failed criterion.")


class HeadGate(GateReport):
    """The head step's gate figures, before and after the update."""

    source_acc_source_head: float = Field(description="Source head on held-back source rows.")
    source_acc_before: float = Field(description="Current head on held-back source rows.")
    source_acc_after: float = Field(description="New head on held-back source rows.")
    target_entropy_after: float = Field(description="Predicted-class entropy on target cells.")
    agreement_before: float = Field(description="Current head vs held-out confirmed cells.")
    agreement_after: float
    teacher_agreement_before: float = Field(description="Current head vs the teacher, held out.")
    teacher_agreement_after: float


class Renorm(Record):
    """How the new expert's backbone layers were re-normalised."""

    layers: int = Field(description="Conv layers corrected before the deadline.")
    tiles: int
    blend: float
    layer_shift_before: float = Field(description="Mean |log σ_target/σ_source| per layer.")
    seconds: float


class RenormSkipped(Record):
    """Why the new expert shares the source backbone."""

    skipped: str


class CheckFigures(Record):
    """One model on the held-out target tiles."""

    confirmed: float = Field(description="Share whose source neighbours confirm the class.")
    entropy: float = Field(description="Predicted-class entropy.")
    confidence: float = Field(description="Mean max probability.")


class ExpertCheck(Record):
    """The label-free check of a new expert against the source model on held-out tiles."""

    tiles: int
    source_model: CheckFigures
    expert: CheckFigures


class InputGate(GateReport):
    """The input step's gate figures: radiometry of the new domain, re-normalisation, check."""

    radiometric_distance_before: float = Field(description="New domain to the source.")
    radiometric_distance_after: float = Field(description="Once re-standardised.")
    domain_fraction: float = Field(description="Share of stored scenes in the new domain.")
    routing_margin: float = Field(
        default=0.0, description="The new expert's routing margin (``Expert.margin``): with "
        "it at most ``adapt.source_allowance`` of the source's sample scenes route to it.")
    gain: list[float] = Field(description="Per-band gain of the input re-standardisation.")
    offset: list[float]
    renorm: Renorm | RenormSkipped | None = Field(
        default=None, description="Null: re-normalisation off or no layer statistics.")
    check: ExpertCheck | None = Field(default=None, description="Null: no stored tiles.")


class Round(Record):
    """One self-training round of a head step."""

    round: int
    confirmed: int = Field(description="Cells fitted in this round.")


class AdaptationReport(Record):
    """What one adaptation job did; the ``detail`` of an ``events/model`` payload.

    The adapter only proposes: a ``promoted`` report names a sealed, not yet installed
    ``candidate`` bundle and a ``reset`` report the version to re-activate (``reset_to``).
    Whoever installs or activates it fills ``version_after`` and ``bundle_path``
    (``model_copy(update=...)``).
    """

    reason: str = Field(description="What started the job (drift, command, cli...).")
    action: Action
    step: Step = Field(default="head", description="input: a new or replacing expert; head: "
                       "a head update; retire: idle experts left out of the new version.")
    domain: str | None = Field(
        default=None, description="The expert the step changed (null: the source model).")
    replaced: bool = Field(default=False, description="input: the new expert replaces the "
                           "one of the same name, whose domain moved on (gradual drift).")
    retired: list[str] = Field(default_factory=list,
                               description="retire: the idle experts the new version drops.")
    version_before: int
    version_after: int | None = Field(default=None, description="Filled once installed.")
    message: str = ""
    counts: HeadCounts | InputCounts | None = None
    gate: HeadGate | InputGate | None = Field(default=None, description="Null: no gate ran.")
    rounds: list[Round] = Field(default_factory=list)
    seconds: float = 0.0
    bundle_path: str | None = Field(default=None, description="Filled once installed.")
    kept_at: str | None = Field(default=None, description="Where a refused candidate is kept.")
    refused_input: AdaptationReport | None = Field(
        default=None, description="An input step refused earlier in the same job.")
    candidate: str | None = Field(
        default=None, description="promoted: the sealed candidate bundle, not yet installed.")
    reset_to: int | None = Field(default=None, description="reset: the version to activate.")

    @model_validator(mode="before")
    @classmethod
    def _derived_fields_are_not_input(cls, data: Any) -> Any:
        """``promoted`` is derived from ``action``; a dumped report validates again."""
        if isinstance(data, dict) and "promoted" in data:
            return {k: v for k, v in data.items() if k != "promoted"}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def promoted(self) -> bool:
        return self.action == "promoted"

    @property
    def model_changed(self) -> bool:
        """True when the job proposes another active version (promotion or reset)."""
        return self.action in ("promoted", "reset")

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ModelRef(BaseModel):
    """The bundle that produced a result."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: int
    domain: str | None = Field(
        default=None, description="The adapted expert a scene was routed to (null: source).")

    @classmethod
    def of(cls, manifest: Manifest, domain: str | None = None) -> ModelRef:
        """The reference to a bundle (and the expert that ran, if any)."""
        return cls(name=manifest.name, version=manifest.version, domain=domain)


class ClassShare(BaseModel):
    """One class's share of a scene's valid area."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(ge=0, le=1)
    area_ha: float = Field(ge=0)


class BandUse(Record):
    """One model input band and the scene band that fed it."""

    band: str = Field(description="The model's band (manifest input.bands).")
    index: int = Field(ge=1, description="1-based scene band number.")
    label: str | None = Field(description="What the scene calls that band (null: nothing).")


class RescaleUse(Record):
    """The value mapping applied: ``raw * gain + bias`` per band, into the model's range."""

    mode: str
    gain: list[float]
    bias: list[float]


class Resolution(Record):
    """Ground sampling distances and the windows the scene was tiled with."""

    scene_gsd: float | None = Field(description="Metres per pixel at the scene centre.")
    bundle_gsd: float | None = Field(description="The training GSD (null: unknown).")
    matched: bool = Field(description="Windows were scaled to the scene's GSD.")
    ratio: float | None = Field(
        description="Ground extent of the windows / the training one (1: matched).")
    windows: list[int] = Field(description="Window sizes used, scene pixels.")
    cell: int = Field(description="Grid step, scene pixels.")


class SceneInput(Record):
    """How the scene was fed to the model: bands, value mapping, resolution."""

    bands: list[BandUse]
    band_selection: Literal["config", "metadata", "order"] = Field(
        description="config: input.bands; metadata: matched by band names; order: the "
        "first N bands of an N-band scene that names none.")
    rescale: RescaleUse
    resolution: Resolution


class Acquired(Record):
    """When the scene was acquired."""

    datetime: str = Field(description="UTC, ISO 8601.")
    source: Literal["tag", "sidecar", "processing"] = Field(
        description="tag: the scene's own tags; sidecar: its STAC item; processing: none "
        "known, the processing time.")


class SceneOrigin(Record):
    """Where a scene's pixels were read from: the box's own inbox, a shared directory, or
    an object read in windows over HTTP(S) or S3 (never copied whole)."""

    kind: Literal["inbox", "shared", "http", "s3"]
    url: str | None = Field(default=None, description="The URL or shared path as the job "
                            "named it (null for the inbox).")


class SceneResult(Payload):
    """``<p>/scene/<scene_id>/result``: a scene was classified; where its outputs are."""

    SCHEMA: ClassVar[str] = "terratile.scene-result/2"

    scene_id: str
    source: str = Field(description="File name as dropped into the inbox.")
    model: ModelRef
    crs: str
    bounds: tuple[float, float, float, float] = Field(description="minx, miny, maxx, maxy (CRS).")
    bounds_wgs84: tuple[float, float, float, float] = Field(description="lon/lat, EPSG:4326.")
    width: int
    height: int
    classes: dict[str, ClassShare] = Field(description="Per class: fraction and area_ha.")
    mean_confidence: float
    outputs: dict[str, str] = Field(description="landuse, confidence, summary, ... → paths.")
    timings: dict[str, float] = Field(description="Seconds per stage.")
    tiles: int = Field(description="Model inputs run (cells × scales).")
    drift: DriftReport | None = Field(default=None, description="Null: drift detection is off.")
    input: SceneInput
    acquired: Acquired
    warnings: list[str] = Field(
        default_factory=list, description="What makes this result less trustworthy.")
    labels: dict[str, ClassShare] | None = Field(
        default=None, description="Multi-label bundles: per label, the share of the valid "
        "area where it is present (at its threshold) and hectares; null for single-label.")
    origin: SceneOrigin | None = Field(
        default=None, description="Where the scene came from (null: older boxes, the inbox).")


class SceneFailed(Payload):
    """``<p>/scene/<scene_id>/failed``: a scene was rejected; why and where the file went."""

    SCHEMA: ClassVar[str] = "terratile.scene-failed/1"

    scene_id: str
    source: str
    reason: str = Field(description="Slug, also the failed/<reason>/ folder name.")
    message: str
    moved_to: str | None = Field(description="Path of the file under failed/, if kept.")
    attempts: int


class MqttStatus(Record):
    """The broker connection as the node sees it."""

    connected: bool
    attempts: int = Field(default=0, description="Failed connection attempts since the "
                          "last successful connection.")
    since: datetime | None = Field(default=None, description="When the connection was "
                                   "made or lost (UTC).")
    error: str | None = Field(default=None, description="The last connection error.")
    refused_subscriptions: list[str] = Field(
        default_factory=list, description="Topics the broker refused to subscribe (an ACL): "
        "commands or requests on them never arrive.")
    refused_messages: int = Field(
        default=0, description="Outbox messages the broker refused (an ACL), re-sent with "
        "backoff.")


class StatusPayload(Payload):
    """``<p>/status`` (retained): what the node is doing now."""

    SCHEMA: ClassVar[str] = "terratile.status/1"

    state: str = Field(description="starting | ready | processing | stopping")
    model: ModelRef | None
    providers: list[str] = Field(default_factory=list)
    queue_depth: int = Field(description="Work waiting or running: inbox files, and fleet "
                             "jobs taken and not yet ended.")
    counts: dict[str, int] = Field(default_factory=dict, description="Journal scenes per state.")
    version: str = Field(description="terratile software version.")
    drift: DriftStatus | None = Field(default=None, description="Null: drift detection is off.")
    mqtt: MqttStatus | None = Field(default=None, description="Null: MQTT is off.")
    outbox_depth: int = Field(default=0, description="Results and events waiting to be sent.")
    experts: list[ExpertUse] = Field(
        default_factory=list, description="The running model's paths (source first) and the "
        "scenes each served; empty: adaptation is off.")
    degraded: list[str] = Field(
        default_factory=list,
        description="Why the node is not fully working although it runs: `mqtt` (the broker "
        "cannot be reached; results wait in the outbox), `disk` (a folder is below "
        "paths.min_free_mb: no new file is claimed). Empty: healthy.")


class StatsPayload(Payload):
    """``<p>/stats`` (QoS 0, message expiry): counters and timings since start."""

    SCHEMA: ClassVar[str] = "terratile.stats/1"

    uptime_s: float
    counters: dict[str, int]
    timings: dict[str, float] = Field(description="Mean seconds per stage, recent scenes.")
    outbox_depth: int
    queue_depth: int = Field(description="Work waiting or running: inbox files, and fleet "
                             "jobs taken and not yet ended.")


class DriftEvent(Payload):
    """``<p>/events/drift``: the drift monitor fired."""

    SCHEMA: ClassVar[str] = "terratile.event-drift/1"

    scene_id: str
    report: DriftReport


class ModelEvent(Payload):
    """``<p>/events/model``: the active model changed (adapted, rolled back, reloaded)."""

    SCHEMA: ClassVar[str] = "terratile.event-model/1"

    action: str = Field(description="adapted | rejected | rollback | activate | reload | "
                        "install | installed | fallback | refused | seed-differs")
    model: ModelRef | None = Field(description="The model that runs now.")
    previous: ModelRef | None = None
    detail: AdaptationReport | None = Field(
        default=None, description="The adaptation job's report (adapted, rejected, reset).")
    experts: list[ExpertUse] = Field(
        default_factory=list, description="The running model's paths (source first) and the "
        "scenes each served; empty: adaptation is off.")
    target: ModelRef | None = Field(
        default=None, description="The version the request was about (installed, refused, "
        "seed-differs), when it is known.")
    request: str | None = Field(
        default=None, description="What was asked (install, activate, rollback, reload, "
        "start) when the action is refused, fallback or seed-differs.")
    reason: str | None = Field(default=None, description="Why (refused, fallback, seed-differs).")
    source: str | None = Field(default=None,
                               description="Where an installed or refused bundle came from.")


JOB_SCHEMA = "terratile.scene-job/1"
JOB_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class SceneJob(BaseModel):
    """A job on ``<prefix>/jobs`` (the fleet's shared work queue): one scene by reference.

    ``scene`` is an ``https://``/``http://`` URL, an ``s3://bucket/key`` or an absolute path
    under one of the node's ``fleet.shared_dirs``. ``sha256`` (the object's bytes) is the
    scene's identity when given; otherwise the object's ETag, size and modification time
    are. Events about the job go to ``reply_to`` (an MQTT topic outside the box's
    ``<prefix>/`` tree), or to ``<p>/jobs/events`` without one.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["terratile.scene-job/1"] = Field(alias="schema")
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    scene: str = Field(min_length=1, max_length=2048)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    reply_to: str | None = Field(default=None, max_length=1024)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


JobEventKind = Literal["accepted", "done", "failed"]


class JobEvent(Payload):
    """``accepted`` (committed to the node's journal), ``done`` (its result's msg_id) or
    ``failed`` (a reason slug and why) for one job: what a submitter's lease watches."""

    SCHEMA: ClassVar[str] = "terratile.job-event/1"

    job_id: str | None = Field(description="Null only for a job too malformed to name itself.")
    event: JobEventKind
    scene: str | None = Field(default=None, description="The job's scene reference.")
    scene_id: str | None = Field(default=None, description="The scene's stable identity.")
    result_msg_id: str | None = Field(
        default=None, description="done: the msg_id of the scene's result (the same on "
        "every node and every re-run).")
    reason: str | None = Field(default=None, description="failed: a slug (e.g. `scheme`, "
                               "`outside-shared-dirs`, `malformed`, `unreachable`).")
    message: str | None = None


PAYLOADS: dict[str, type[Payload]] = {
    cls.SCHEMA: cls
    for cls in (SceneResult, SceneFailed, StatusPayload, StatsPayload, DriftEvent, ModelEvent,
                JobEvent)
}


def json_schema(cls: type[Payload]) -> dict[str, Any]:
    """The JSON Schema of a payload, with ``schema`` pinned to its constant."""
    schema = cls.model_json_schema(by_alias=True, mode="serialization")
    schema["properties"]["schema"] = {"const": cls.SCHEMA, "title": "Schema", "type": "string"}
    schema["$id"] = cls.SCHEMA
    return schema


def dump_schemas(out_dir: Path) -> list[Path]:
    """Write one ``<name>.json`` per payload into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, cls in PAYLOADS.items():
        path = out_dir / (name.removeprefix("terratile.").replace("/", ".v") + ".json")
        path.write_text(json.dumps(json_schema(cls), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":  # python -m appliance.contract.payloads docs/schemas
    for p in dump_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        print(p)
