"""An adaptation lineage: the versions from a source bundle to the one a job adapts.

Every version adaptation proposes is a copy of the one it started from (``parent`` in the
manifest), so a lineage leads back to a source bundle, the exported one, whose source bank
and references every step judges against. A lineage grows at most one expert beside the
source model (``DOMAIN``, made by the input step); head steps refine that expert or, when
there is none, the source model's own head (``adapted_domain``).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.contract.bundle import Bundle
from appliance.model.store import ModelStore

DOMAIN = "adapted"  # the one expert an adaptation lineage grows


def adapted_domain(bundle: Bundle) -> str | None:
    """The expert adaptation refines: the bundle's adapted domain, else its source head."""
    return bundle.manifest.experts[-1].name if bundle.manifest.experts else None


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
