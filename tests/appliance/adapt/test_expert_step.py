"""The input step on the colour bundle: a routed expert for a colour-cast sensor."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from appliance.adapt.adapter import Adapter
from appliance.adapt.domains import split_domains
from appliance.adapt.expert_step import backbone_features, newest, routed_share
from appliance.adapt.lineage import DOMAIN
from appliance.contract.bundle import (
    BACKBONE,
    CLASSIFIER,
    REFERENCE,
    Bundle,
    SceneSample,
    load_bundle,
    seal_bundle,
)
from appliance.contract.payloads import AdaptationReport, InputCounts, InputGate, Renorm
from appliance.contract.signature import Signature, source_signature
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.store import ModelStore
from appliance.scene.cells import SceneCells
from tests.helpers.adaptation import HEAD_ONLY, TILING, apply, fill
from tests.helpers.colour_scenes import BLUE_CAST, colour_scene

WITH_INPUT = HEAD_ONLY.model_copy(update={"input_blend": 1.0})
CPU = ProviderPlan(providers=("cpu",))


@dataclass(frozen=True)
class ExpertRun:
    """One input step on six blue-cast scenes, shared by the read-only tests below."""

    source: Bundle
    report: AdaptationReport
    candidate: Bundle


@pytest.fixture(scope="module")
def expert(colour_bundle: Path, runtime: ModelRuntime,
           tmp_path_factory: pytest.TempPathFactory) -> ExpertRun:
    state = tmp_path_factory.mktemp("expert") / "state"
    store = ModelStore(state / "models")
    store.install(colour_bundle)
    adapter = Adapter(store, WITH_INPUT, state, TILING)
    fill(adapter, runtime)
    report = adapter.run(store.active(), "drift")
    assert report.candidate is not None, report.as_dict()
    return ExpertRun(store.active(), report, load_bundle(Path(report.candidate)))


def _accuracy(cells: SceneCells, truth: np.ndarray) -> float:
    return float((cells.labels == truth).mean())


def test_input_step_proposes_a_new_expert(expert: ExpertRun) -> None:
    report, candidate = expert.report, expert.candidate
    assert report.step == "input" and report.promoted and report.domain == DOMAIN
    assert isinstance(report.gate, InputGate) and isinstance(report.counts, InputCounts)
    assert report.gate.radiometric_distance_after < 0.1 * report.gate.radiometric_distance_before
    assert report.gate.domain_fraction == 1.0 and report.counts.domain_scenes == 6
    assert candidate.version == 2 and candidate.manifest.parent == 1
    assert [d.name for d in candidate.manifest.experts] == [DOMAIN]


def test_expert_backbone_is_renormalised_on_the_stored_tiles(expert: ExpertRun) -> None:
    """4 cells × 2 scales of each of the 6 scenes, minus the quarter held out for the check."""
    gate, candidate = expert.report.gate, expert.candidate
    assert isinstance(gate, InputGate) and isinstance(gate.renorm, Renorm)
    assert gate.renorm.layers == 1 and gate.renorm.tiles == 36
    assert candidate.manifest.experts[0].backbone == f"backbone.{DOMAIN}.onnx"
    assert candidate.backbone(DOMAIN).read_bytes() != expert.source.file(BACKBONE).read_bytes()
    assert candidate.backbone(None) == candidate.file(BACKBONE)


def test_expert_reference_is_the_new_domain(expert: ExpertRun) -> None:
    references = expert.candidate.expert_references()
    assert list(references) == [DOMAIN]
    assert references[DOMAIN].bands[2].mean > expert.source.reference.bands[2].mean + 50


def test_expert_check_runs_on_the_held_out_quarter(expert: ExpertRun) -> None:
    gate = expert.report.gate
    assert isinstance(gate, InputGate) and gate.check is not None
    assert gate.check.tiles == 12
    assert gate.check.expert.confirmed >= gate.check.source_model.confirmed


def test_source_expert_is_untouched(expert: ExpertRun) -> None:
    """The source keeps its input and head; the new expert starts from the source head."""
    source, candidate = expert.source, expert.candidate
    assert candidate.manifest.input == source.manifest.input
    assert candidate.file(CLASSIFIER).read_bytes() == source.file(CLASSIFIER).read_bytes()
    assert candidate.classifier(DOMAIN).read_bytes() == source.file(CLASSIFIER).read_bytes()
    assert candidate.manifest.input_for(DOMAIN).mean != source.manifest.input.mean


def test_cast_scenes_route_to_the_expert_clean_ones_stay_bit_for_bit(
        expert: ExpertRun, runtime: ModelRuntime) -> None:
    routed = ModelRuntime(expert.candidate, CPU)
    cells, truth = colour_scene(routed, 950, BLUE_CAST)
    shifted, _ = colour_scene(runtime, 950, BLUE_CAST)
    assert cells.domain == DOMAIN and shifted.domain is None
    assert _accuracy(cells, truth) > _accuracy(shifted, truth)
    clean_after, _ = colour_scene(routed, 951)
    clean_before, _ = colour_scene(runtime, 951)
    assert clean_after.domain is None
    np.testing.assert_array_equal(clean_after.probs, clean_before.probs)


def test_a_head_step_on_the_expert_is_owed_after_the_input_step(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    """Stored features are from the source input spec: the head step waits for cells the
    expert computed, then is due without drift and refines the expert's head only. Here
    the expert already agrees with every confirmed cell and with the teacher: nothing to
    gain, so the refined head is refused (and kept)."""
    adapter = Adapter(store, WITH_INPUT, tmp_path / "state", TILING)
    fill(adapter, runtime)
    apply(store, adapter.run(store.active(), "drift"))
    adapted = store.active()
    assert adapter.candidates.count(adapter.collector.adapted_key(adapted)) == 0
    assert not adapter.due(drifting=False, bundle=adapted)
    fill(adapter, ModelRuntime(adapted, CPU), scenes=3, start=960)
    assert adapter.candidates.count(adapter.collector.adapted_key(adapted)) > 0
    assert adapter.due(drifting=False, bundle=adapted)  # owed, drift or not
    follow = adapter.run(adapted, "follow-up")
    assert (follow.step, follow.domain, follow.action) == ("head", DOMAIN, "rejected")
    assert "at the ceiling" in follow.message and "did not rise" in follow.message
    kept = load_bundle(Path(follow.kept_at or ""))
    assert kept.file(CLASSIFIER).read_bytes() == adapted.file(CLASSIFIER).read_bytes()
    assert kept.classifier(DOMAIN).read_bytes() != adapted.classifier(DOMAIN).read_bytes()
    assert kept.manifest.experts == adapted.manifest.experts
    assert not adapter.due(drifting=False, bundle=adapted)  # no longer owed
    assert adapter.run(adapted, "again").step == "head"  # its domain gets no second expert


def test_an_expert_is_made_again_from_twice_its_scenes(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    """Made from 6 cast scenes, the expert serves 3 more: no refinement (9 < 2 × 6). At 12
    of its own stored scenes the input step makes it again under the same name, pooled
    from all 12, through the same gates; still one expert."""
    adapter = Adapter(store, WITH_INPUT, tmp_path / "state", TILING)
    fill(adapter, runtime)
    apply(store, adapter.run(store.active(), "drift"))
    adapted = store.active()
    (first,) = adapted.manifest.experts
    assert first.scenes == 6
    fill(adapter, ModelRuntime(adapted, CPU), scenes=3, start=960)
    assert adapter.run(adapted, "drift").step == "head"
    fill(adapter, ModelRuntime(adapted, CPU), scenes=3, start=963)
    report = adapter.run(adapted, "drift")
    assert (report.step, report.domain, report.replaced) == ("input", DOMAIN, True), \
        report.as_dict()
    assert report.promoted and report.counts == InputCounts(scenes=12, domain_scenes=12,
                                                            tiles=report.counts.tiles)
    (again,) = load_bundle(Path(report.candidate or "")).manifest.experts
    assert again.name == first.name and again.scenes == 12 and again.mean != first.mean


def test_expert_check_refuses_an_expert_that_breaks_the_features(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    """A mis-calibrated input loses retrieval confirmation (every band squashed towards one
    value) or collapses the predictions (red pushed far up): the check names each."""
    adapter = Adapter(store, HEAD_ONLY, tmp_path / "state", TILING)
    fill(adapter, runtime)
    stored = adapter.candidates.load(features=False)
    tiles = adapter.candidates.tiles(stored.seqs, 64)
    assert tiles is not None and len(tiles) == 48
    source = store.active()
    step, backbone = adapter.expert_step, source.file(BACKBONE)
    squashed = source.manifest.input.model_copy(update={"std": [1e4] * 3})
    failures, check = step.check(source, tiles, backbone_features(squashed, backbone, tiles))
    assert any("retrieval-confirmed share" in f for f in failures), check
    assert check.expert.confirmed < check.source_model.confirmed
    reddened = source.manifest.input.model_copy(update={"mean": [-2000.0, 127.5, 127.5]})
    failures, check = step.check(source, tiles, backbone_features(reddened, backbone, tiles))
    assert any("class collapse" in f for f in failures), check
    same = backbone_features(source.manifest.input, backbone, tiles)
    assert step.check(source, tiles, same)[0] == []


def test_the_new_domain_leaves_source_like_scenes_out(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter = Adapter(store, HEAD_ONLY, tmp_path / "state", TILING)
    fill(adapter, runtime, scenes=3, cast=(0.0, 0.0, 0.0))
    fill(adapter, runtime, scenes=4)
    stored = adapter.candidates.load(features=False)
    split = split_domains(stored.scene_signatures(False), lambda m: stored.signature(m, False),
                          [source_signature(store.active().reference.bands)], 0.15, 3, 4)
    assert len(split.domains) == 1
    assert split.domains[0].members.tolist() == [False] * 3 + [True] * 4
    assert split.labels.tolist() == [0] * 3 + [1] * 4
    mean = split.domains[0].signature[0]
    assert mean[2] > store.active().reference.bands[2].mean + 50  # the cast scenes' blue


def test_too_few_scenes_of_a_new_look_make_no_expert(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    """Two cast scenes among seven are fewer than adapt.domain_min_scenes (3): no domain,
    no expert; the job goes on with a head step on the source model."""
    adapter = Adapter(store, WITH_INPUT, tmp_path / "state", TILING)
    fill(adapter, runtime, scenes=5, cast=(0.0, 0.0, 0.0))
    fill(adapter, runtime, scenes=2)
    report = adapter.run(store.active(), "drift")
    assert report.step == "head" and report.refused_input is None, report.as_dict()
    assert not store.active().manifest.experts


def test_no_input_step_for_an_unshifted_stream(store: ModelStore, runtime: ModelRuntime,
                                               tmp_path: Path) -> None:
    adapter = Adapter(store, WITH_INPUT, tmp_path / "state", TILING)
    fill(adapter, runtime, cast=(0.0, 0.0, 0.0))
    report = adapter.run(store.active(), "drift")
    assert report.step == "head" and report.refused_input is None


def _with_source_scenes(bundle: Path, out: Path, samples: list[Signature]) -> Path:
    """A copy of ``bundle`` whose reference holds ``samples`` as its source sample scenes."""
    shutil.copytree(bundle, out)
    copy = load_bundle(out)
    ref = copy.reference.model_copy(update={"scenes": [
        SceneSample(mean=list(map(float, m)), std=list(map(float, s)), sharpness=[1.0] * 3)
        for m, s, _ in samples]})
    (out / REFERENCE).write_text(ref.model_dump_json(by_alias=True))
    seal_bundle(out, copy.manifest)
    return out


@pytest.mark.parametrize("spread", ["narrow", "wide"])
def test_an_expert_that_would_take_source_scenes_is_refused(
        colour_bundle: Path, runtime: ModelRuntime, tmp_path: Path, spread: str) -> None:
    """Source sample scenes all at the source's signature: the cast expert needs no margin
    to keep them, and is made. Source scenes that stray as far as the cast (their content
    alone moves them so): the margin that keeps them with the source keeps the cast's own
    scenes there too, and the expert is refused, saying why."""
    stored = tmp_path / "probe"
    probe = Adapter(ModelStore(stored / "models"), WITH_INPUT, stored, TILING)
    fill(probe, runtime)
    kept = probe.candidates.load(features=False)
    cast = kept.signature(np.ones(len(kept.seqs), bool), False)
    source = source_signature(load_bundle(colour_bundle).reference.bands)
    samples = [source] * 10 if spread == "narrow" else [source] * 2 + [cast] * 8
    store = ModelStore(tmp_path / "state" / "models")
    store.install(_with_source_scenes(colour_bundle, tmp_path / "bundle", samples))
    adapter = Adapter(store, WITH_INPUT, tmp_path / "state", TILING)
    fill(adapter, runtime)
    report = adapter.run(store.active(), "drift")
    expert = report if report.step == "input" else report.refused_input
    assert expert is not None and isinstance(expert.gate, InputGate), report.as_dict()
    if spread == "narrow":
        assert expert.promoted and expert.gate.routing_margin < 1e-6
        assert report.candidate is not None
        assert load_bundle(Path(report.candidate)).manifest.experts[0].margin == \
            expert.gate.routing_margin
    else:
        assert not expert.promoted and expert.gate.routing_margin > 0.5
        assert "only 0% of the new domain's newer stored scenes route to its expert" \
            in expert.message


def _at(offset: float) -> Signature:
    """A one-band signature ``offset`` source spreads above the source's mean."""
    return (np.array([offset]), np.array([1.0]), None)


def test_coverage_is_judged_on_the_domain_as_it_arrives_now() -> None:
    """A haze that thickens over eight scenes: the margin keeps its four faint first scenes
    with the source, the four thick later ones go to the expert. Judged on every member the
    expert would cover half its domain; judged on the newer half, all of it. A scene of
    another domain that the expert would take counts against it however old it is."""
    scenes = [_at(0.2 * (i + 1)) for i in range(8)]
    routes = {None: (_at(0.0), 0.0), "haze": (_at(1.6), 0.0)}
    members = np.ones(8, bool)
    none = np.zeros(8, bool)
    assert newest(members, 3).tolist() == [False] * 4 + [True] * 4
    assert newest(np.array([True, True, True, False]), 3).tolist() == [True] * 3 + [False]
    assert routed_share(scenes, members, none, routes, "haze", 3) == 1.0
    assert routed_share(scenes, members, none, routes, "haze", 8) == 0.5  # every member
    intruder = members.copy()
    intruder[6] = False  # a thick-looking scene of another sensor, not the domain's
    assert routed_share(scenes, intruder, none, routes, "haze", 3) == 0.75
