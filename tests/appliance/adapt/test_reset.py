"""The reset policy on lineages of given lengths (milliseconds: no bundle is read)."""

from __future__ import annotations

from appliance.adapt.reset import reset_reason, worn_out
from appliance.config import AdaptConfig

CFG = AdaptConfig(reset_after=3, min_entropy=0.5)


def test_the_source_is_never_reset() -> None:
    assert reset_reason(0, current_entropy=0.0, cfg=CFG) is None
    assert not worn_out(0, CFG)


def test_a_long_lineage_goes_back_to_its_source() -> None:
    assert reset_reason(2, 0.9, CFG) is None and not worn_out(2, CFG)
    assert worn_out(3, CFG)
    assert reset_reason(3, 0.9, CFG) == "3 adapted versions since the source"


def test_a_collapsed_head_goes_back_to_its_source() -> None:
    assert reset_reason(1, 0.2, CFG) == "current head collapsed (entropy 0.200)"
