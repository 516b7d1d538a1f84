"""The head step's fit and gate on the colour bundle: held-out cells, refusals."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.adapt.adapter import Adapter
from appliance.adapt.head_step import AdaptationData, AdaptationError
from appliance.adapt.lineage import Lineage
from appliance.model.runtime import ModelRuntime
from appliance.model.store import ModelStore
from tests.helpers.adaptation import HEAD_ONLY, TILING, fill


def _prepared(store: ModelStore, runtime: ModelRuntime, tmp_path: Path,
              **cfg: float) -> tuple[Adapter, AdaptationData]:
    adapter = Adapter(store, HEAD_ONLY.model_copy(update=cfg), tmp_path / "state", TILING)
    fill(adapter, runtime)
    return adapter, adapter.head_step.prepare(Lineage.of(store, store.active()))


def test_prepare_holds_out_every_nth_cell(store: ModelStore, runtime: ModelRuntime,
                                          tmp_path: Path) -> None:
    _, data = _prepared(store, runtime, tmp_path)
    assert data.heldout.sum() == -(-len(data.candidates) // HEAD_ONLY.holdout_every)
    assert not data.heldout[data.confirmed].any() and data.heldout[data.validation].all()
    assert len(data.validation) > 0
    counts = data.counts
    assert (counts.candidates, counts.scenes) == (180, 6)
    assert counts.confirmed == len(data.confirmed) and counts.heldout == 45
    bank = data.lineage.source.source_bank
    assert counts.source_train + counts.source_holdout == len(bank.labels)


def test_gate_refuses_a_head_trained_on_wrong_labels(store: ModelStore, runtime: ModelRuntime,
                                                     tmp_path: Path) -> None:
    adapter, data = _prepared(store, runtime, tmp_path)
    step, cells = adapter.head_step, data.confirmed
    wrong = (data.pseudo[cells] + 1) % 3
    gate = step.gate(step.fit(data, cells, wrong, deadline=time.monotonic() + 30), data)
    assert not gate.passed
    assert any("held-out confirmed target cells fell" in f for f in gate.failures)
    assert gate.agreement_after < gate.agreement_before
    good = step.fit(data, cells, data.pseudo[cells], deadline=time.monotonic() + 30)
    assert step.gate(good, data).passed
    assert store.active_version() == 1  # fit and gate never touch the store


def test_gate_at_the_ceiling_needs_the_teacher_agreement_to_rise(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter, data = _prepared(store, runtime, tmp_path, agreement_ceiling=0.5)
    step, cells = adapter.head_step, data.confirmed
    gate = step.gate(step.fit(data, cells, data.pseudo[cells], time.monotonic() + 30), data)
    assert gate.agreement_before >= 0.5  # at this ceiling: the teacher decides
    assert gate.passed, gate.failures
    assert gate.teacher_agreement_after > gate.teacher_agreement_before
    # The current head itself gains nothing over itself: refused, whatever the ceiling.
    same = step.gate(data.current, data)
    assert not same.passed and any("did not rise" in f for f in same.failures)


def test_rounds_relabel_until_the_configured_count(store: ModelStore, runtime: ModelRuntime,
                                                   tmp_path: Path) -> None:
    adapter, data = _prepared(store, runtime, tmp_path, rounds=2)
    _, rounds = adapter.head_step.rounds(data, time.monotonic() + 30)
    assert [r.round for r in rounds] == [1, 2]
    assert rounds[0].confirmed == len(data.confirmed)
    _, none_left = adapter.head_step.rounds(data, time.monotonic() - 1)  # past the deadline
    assert [r.round for r in none_left] == [1]


def test_prepare_without_cells_is_an_adaptation_error(store: ModelStore,
                                                      tmp_path: Path) -> None:
    adapter = Adapter(store, HEAD_ONLY, tmp_path / "state", TILING)
    with pytest.raises(AdaptationError, match="no candidate cells"):
        adapter.head_step.prepare(Lineage.of(store, store.active()))


def test_gate_refuses_without_confirmed_held_out_cells(store: ModelStore,
                                                       runtime: ModelRuntime,
                                                       tmp_path: Path) -> None:
    adapter, data = _prepared(store, runtime, tmp_path)
    none_held = replace(data, validation=data.validation[:0])
    gate = adapter.head_step.gate(data.current, none_held)
    assert not gate.passed and gate.agreement_before == gate.agreement_after == 0.0
    assert "no confirmed cells among the held-out target cells" in gate.failures
