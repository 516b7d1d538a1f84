"""The one owner of the active model: which bundle runs, its sessions, the store's pointer.

Every change of the running model goes through ``ModelHost``, in two steps, so a slow one
never stalls scene processing and no two parts disagree about what runs:

1. **stage** (any thread): verify an installed version and open its sessions ahead
   (TensorRT builds its engines on that first run). Nothing that runs changes yet.
2. **switch** (the daemon's main loop): point the store's ``ACTIVE`` at it, swap the
   sessions in, and tell every listener (drift monitor, status, model events), in that
   order and in this one place.

Installing a bundle, adopting an adaptation, rolling back, activating a version and
reloading are all ``stage`` then ``switch``. ``stage`` and ``switch`` refuse
(``BundleError``) a version that does not fit the node (``appliance.model.compat``: band
count, tiling, embedding size vs the retrieval index) before anything switches. Without
sessions (``serve=False``: the CLI while no daemon runs) the same code
only moves the pointer, so ``terratile models rollback`` and ``cmd/rollback`` are one code
path.

At start a serving host whose ``ACTIVE`` version does not verify (damaged, tampered) or
does not fit the node falls back to the newest installed version that verifies and fits,
loudly: ``fallback`` holds that change as a ``Switch`` with action ``fallback`` (and the
reason) for the composition root to announce.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Settings
from appliance.contract.bundle import Bundle, BundleError, load_bundle
from appliance.contract.payloads import AdaptationReport
from appliance.model.compat import NodeFit, problems, require_fit
from appliance.model.runtime import Experts, ModelRuntime, open_runtime
from appliance.model.store import ModelStore, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Staged:
    """A verified installed version with its sessions opened ahead of the switch."""

    bundle: Bundle
    experts: Experts | None = None  # new sessions for the running runtime to adopt
    runtime: ModelRuntime | None = None  # a whole new runtime (another backbone/embedder)


@dataclass(frozen=True)
class Switch:
    """One change of the running model, as listeners are told of it."""

    action: str  # adapted | reset | rollback | activate | reload | fallback
    bundle: Bundle
    previous: Bundle
    detail: AdaptationReport | None = None  # what the adaptation job that proposed it did
    reason: str | None = None  # why (a fallback: what was wrong with the active version)
    source: str | None = None  # where an installed version came from


SwitchListener = Callable[[Switch], None]


class ModelHost:
    """Holds the store, the running bundle and its runtime; the only code that changes them."""

    def __init__(self, store: ModelStore, settings: Settings, serve: bool = True,
                 index_dim: int | None = None) -> None:
        self.store = store
        self._settings = settings
        self.fit = NodeFit.of(settings, index_dim)
        self.fallback: Switch | None = None
        self._bundle = self._active_or_fallback() if serve else store.active()
        self._runtime = open_runtime(self._bundle, settings) if serve else None
        self._listeners: list[SwitchListener] = []

    def _active_or_fallback(self) -> Bundle:
        """The active version if it verifies and fits; else the newest one that does
        (loudly). When no version gives the retrieval index's embedding size, the same
        choice without that requirement (the index is then switched off, loudly)."""
        fits = [self.fit] if self.fit.index_dim is None else [
            self.fit, NodeFit(self.fit.mapped_bands, None)]
        why = "no installed version fits this node"
        for fit in fits:
            try:
                bundle = self.store.active()
                require_fit(bundle, fit, self._settings)
                return bundle
            except BundleError as exc:
                why = str(exc)
            fallback = self.store.newest_verified(functools.partial(self._fits, fit))
            if fallback is not None:
                log.error("the active model cannot run (%s): falling back to v%d, the newest "
                          "installed version that verifies and fits this node", why,
                          fallback.version)
                self.store.activate(fallback.version)
                self.fallback = Switch("fallback", fallback, fallback, reason=why)
                return fallback
        raise BundleError(why)

    def bind_index(self, dim: int) -> None:
        """From now on a version must give ``dim``-d embeddings (the retrieval index's)."""
        self.fit = NodeFit(self.fit.mapped_bands, dim)

    def _fits(self, fit: NodeFit, bundle: Bundle) -> bool:
        return not problems(bundle.manifest, fit, self._settings)

    def check(self, bundle: Bundle) -> None:
        """``BundleError`` if ``bundle`` does not fit this node (``compat.problems``)."""
        require_fit(bundle, self.fit, self._settings)

    @classmethod
    def open(cls, settings: Settings, serve: bool = True,
             index_dim: int | None = None) -> ModelHost:
        """The node's host: its store (seeded from ``model.bundle`` on first start) and,
        with ``serve``, a warmed runtime of the active version. ``index_dim``: the
        embedding size the retrieval index already holds, if any."""
        return cls(open_store(settings), settings, serve, index_dim)

    @property
    def bundle(self) -> Bundle:
        """The bundle that runs now."""
        return self._bundle

    @property
    def runtime(self) -> ModelRuntime:
        """The sessions that run it (only a serving host has them)."""
        if self._runtime is None:
            raise RuntimeError("this model host does not serve the model (serve=False)")
        return self._runtime

    @property
    def serving(self) -> bool:
        return self._runtime is not None

    def on_switch(self, listener: SwitchListener) -> None:
        """Call ``listener`` after every switch, in registration order."""
        self._listeners.append(listener)

    # -- step 1: any thread ----------------------------------------------------------------

    def install(self, source: Path) -> int:
        """Copy a bundle into the store beside the others (verified, not activated)."""
        return self.store.install(source, activate=False).version

    def stage(self, version: int) -> Staged:
        """Verify installed ``version`` and open its sessions (warmed when
        ``model.warmup``), ready for ``switch``."""
        bundle = load_bundle(self.store.dir_for(version))
        self.check(bundle)
        if self._runtime is None:
            return Staged(bundle)
        if self._runtime.serves(bundle):
            batch = self._settings.tiling.batch_size if self._settings.model.warmup else 0
            return Staged(bundle, experts=self._runtime.open_experts(bundle, batch))
        return Staged(bundle, runtime=open_runtime(bundle, self._settings))

    # -- step 2: the main loop -------------------------------------------------------------

    def switch(self, staged: Staged, action: str, detail: AdaptationReport | None = None,
               source: str | None = None) -> Switch:
        """Make ``staged`` the running model: pointer, sessions, then the listeners."""
        previous = self._bundle
        self.check(staged.bundle)
        self.store.activate(staged.bundle.version)
        if self._runtime is not None:
            if staged.runtime is not None:
                self._runtime = staged.runtime
            elif not self._runtime.adopt(staged.bundle, staged.experts):
                self._runtime = open_runtime(staged.bundle, self._settings)
        self._bundle = staged.bundle
        change = Switch(action, staged.bundle, previous, detail, source=source)
        log.info("model v%d → v%d (%s)", previous.version, staged.bundle.version, action)
        for listener in self._listeners:
            listener(change)
        return change

    def activate(self, version: int, action: str = "activate") -> Switch:
        """Run installed ``version`` (staged on the calling thread)."""
        return self.switch(self.stage(version), action)

    def rollback(self) -> Switch:
        """Run the parent of the running version (or the newest older one)."""
        return self.activate(self.store.rollback_target(self._bundle.version), "rollback")

    def reload(self) -> Switch | None:
        """Run what the store's pointer names, if that is not what runs (the pointer was
        changed by hand); None when nothing changed."""
        version = self.store.active_version()
        if version is None:
            raise BundleError(f"{self.store.root}: no active model")
        if version == self._bundle.version:
            log.info("reload: model v%d already runs", version)
            return None
        return self.activate(version, "reload")
