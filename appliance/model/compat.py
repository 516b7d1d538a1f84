"""Whether a model version can run on this node: the one compatibility check.

A bundle that verifies (every sha256, schema) may still not fit the box it is sent to:
another band count than ``input.bands`` maps, scales the configured tiling cannot weight,
or embeddings of another size than the retrieval index holds (every later scene would
then fail in the index). Install, activate, rollback, reload and the start-up fallback all
ask ``problems`` before anything switches, so no path can put such a version in charge.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config import Settings
from appliance.contract.bundle import Bundle, BundleError, Manifest


@dataclass(frozen=True)
class NodeFit:
    """What a bundle must match to run here."""

    mapped_bands: int | None  # len(input.bands); None: the scene's first N bands are used
    index_dim: int | None  # embedding size the retrieval index holds; None: no index

    @classmethod
    def of(cls, settings: Settings, index_dim: int | None = None) -> NodeFit:
        bands = settings.input.bands
        return cls(len(bands) if bands is not None else None, index_dim)


def problems(manifest: Manifest, fit: NodeFit, settings: Settings) -> list[str]:
    """Every reason ``manifest`` cannot run on this node (empty: it fits)."""
    out = []
    wanted = len(manifest.input.bands)
    if fit.mapped_bands is not None and fit.mapped_bands != wanted:
        out.append(f"it takes {wanted} bands but input.bands maps {fit.mapped_bands}")
    if fit.index_dim is not None and manifest.embedding_dim != fit.index_dim:
        out.append(f"its embeddings have {manifest.embedding_dim} dimensions, the retrieval "
                   f"index {fit.index_dim}")
    try:
        settings.tiling.for_bundle(manifest.scales)
    except ValueError as exc:
        out.append(str(exc))
    return out


def require_fit(bundle: Bundle, fit: NodeFit, settings: Settings) -> None:
    """``BundleError`` naming every reason ``bundle`` does not fit this node."""
    found = problems(bundle.manifest, fit, settings)
    if found:
        raise BundleError(f"model v{bundle.version} does not fit this node: "
                          + "; ".join(found))
