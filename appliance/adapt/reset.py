"""The reset policy: when a job re-activates the source version instead of adapting further.

Each adapted version is judged against the one before it, so small losses the gate lets
through could add up over a long lineage. After ``adapt.reset_after`` adapted versions, or
when the current head's predictions on the stored target cells have collapsed onto few
classes (entropy below ``adapt.min_entropy``), a job proposes the source version back.
A worn-out lineage grows no new expert either: a reset starts it over.
"""

from __future__ import annotations

from appliance.config import AdaptConfig


def worn_out(adapted_versions: int, cfg: AdaptConfig) -> bool:
    """Whether a lineage of ``adapted_versions`` since its source is due for a reset."""
    return adapted_versions >= cfg.reset_after


def reset_reason(adapted_versions: int, current_entropy: float, cfg: AdaptConfig
                 ) -> str | None:
    """Why the job should go back to the source (None: adapt on). ``current_entropy`` is
    the predicted-class entropy of the current head on the stored target cells."""
    if adapted_versions == 0:
        return None
    if worn_out(adapted_versions, cfg):
        return f"{adapted_versions} adapted versions since the source"
    if current_entropy < cfg.min_entropy:
        return f"current head collapsed (entropy {current_entropy:.3f})"
    return None
