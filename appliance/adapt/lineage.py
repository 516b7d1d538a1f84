"""An adaptation lineage: the versions from a source bundle to the one a job adapts.

Every version adaptation proposes is a copy of the one it started from (``parent`` in the
manifest), so a lineage leads back to a source bundle, the exported one, whose source bank
and references every step judges against. A lineage grows an expert per new domain beside
the source model (the input step, up to ``adapt.max_experts``; the first is called
``DOMAIN``, later ones ``DOMAIN-2``…, never a name used before: ``expert_name``). A new or
replacing expert goes to the end of the list, and head steps refine the last one, or the
source model's own head when there is none (``adapted_domain``).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.contract.bundle import Bundle
from appliance.model.store import ModelStore

DOMAIN = "adapted"  # the name of the first expert a lineage grows


def adapted_domain(bundle: Bundle) -> str | None:
    """The expert head steps refine: the newest (last) expert, else the source head."""
    return bundle.manifest.experts[-1].name if bundle.manifest.experts else None


def expert_name(taken: set[str]) -> str:
    """A name for a new expert that no expert had (``taken``): ``DOMAIN``, then
    ``DOMAIN-2``, ``DOMAIN-3``…; counts and candidate keys never mix two domains."""
    if DOMAIN not in taken:
        return DOMAIN
    n = 2
    while f"{DOMAIN}-{n}" in taken:
        n += 1
    return f"{DOMAIN}-{n}"


@dataclass(frozen=True)
class Lineage:
    """The bundle a job adapts, its versions back to the source, and the source bundle."""

    bundle: Bundle
    versions: list[int]  # bundle.version first, the source's last
    source: Bundle

    @classmethod
    def of(cls, models: ModelStore, bundle: Bundle) -> Lineage:
        """Read from the store by version number (manifests, then the source verified)."""
        versions = models.lineage(bundle.version)
        source = bundle if versions[-1] == bundle.version else models.load(versions[-1])
        return cls(bundle, versions, source)

    @property
    def adapted_versions(self) -> int:
        """Versions adapted since the source (0: the bundle is the source)."""
        return len(self.versions) - 1
