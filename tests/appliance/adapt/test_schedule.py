"""When an automatic job is due: drift or a head step owed, cells, cooldown (milliseconds
for the schedule itself; one colour-bundle job for the adapter's wiring)."""

from __future__ import annotations

from pathlib import Path

from appliance.adapt.adapter import Adapter
from appliance.adapt.schedule import JobSchedule, LastJob
from appliance.config import AdaptConfig
from appliance.contract.payloads import AdaptationReport
from appliance.model.runtime import ModelRuntime
from appliance.model.store import ModelStore
from tests.helpers.adaptation import HEAD_ONLY, TILING, fill

CFG = AdaptConfig(cooldown_scenes=3)


def _report(action: str, step: str = "head") -> AdaptationReport:
    return AdaptationReport.model_validate({"reason": "t", "action": action, "step": step,
                                            "version_before": 1})


def test_a_fresh_schedule_waits_for_drift_only(tmp_path: Path) -> None:
    schedule = JobSchedule(tmp_path / "last_job.json", CFG)
    assert schedule.last() == LastJob()
    assert not schedule.wanted(drifting=False) and schedule.wanted(drifting=True)
    assert schedule.cooled_down(0)
    off = JobSchedule(tmp_path / "last_job.json", CFG.model_copy(update={"auto": False}))
    assert not off.wanted(drifting=True)


def test_cooldown_counts_scenes_since_the_last_job(tmp_path: Path) -> None:
    schedule = JobSchedule(tmp_path / "last_job.json", CFG)
    schedule.mark(_report("rejected"), seq=10)
    assert schedule.last().seq == 10 and schedule.last().ts is not None
    assert not schedule.cooled_down(12) and schedule.cooled_down(13)


def test_a_promoted_input_step_owes_a_head_step_until_one_runs(tmp_path: Path) -> None:
    schedule = JobSchedule(tmp_path / "last_job.json", CFG)
    schedule.mark(_report("promoted", step="input"), seq=1)
    assert schedule.wanted(drifting=False)
    schedule.mark(_report("skipped"), seq=2)  # nothing to learn from yet: still owed
    assert schedule.wanted(drifting=False)
    schedule.mark(_report("rejected"), seq=3)  # a head step ran
    assert not schedule.wanted(drifting=False)


def test_a_damaged_marker_reads_as_no_job(tmp_path: Path) -> None:
    (tmp_path / "last_job.json").write_text("[1, 2")
    assert JobSchedule(tmp_path / "last_job.json", CFG).last() == LastJob()


def test_due_needs_drift_cells_and_cooldown(store: ModelStore, runtime: ModelRuntime,
                                            tmp_path: Path) -> None:
    adapter = Adapter(store, HEAD_ONLY, tmp_path / "state", TILING)
    bundle = store.active()
    assert not adapter.due(drifting=True, bundle=bundle)  # no cells
    fill(adapter, runtime, scenes=2)
    assert not adapter.due(drifting=False, bundle=bundle)
    assert adapter.due(drifting=True, bundle=bundle)
    adapter.run(bundle, "drift")
    assert not adapter.due(drifting=True, bundle=bundle)  # cooling down
    fill(adapter, runtime, scenes=2, start=400)
    assert adapter.due(drifting=True, bundle=bundle)
