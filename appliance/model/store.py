"""The model store: bundle versions side by side and one atomically switched active pointer.

Layout under ``state/models/``: one verified bundle directory per version (``v0001/``…)
and ``ACTIVE``, a small file holding the active version, replaced with ``os.replace`` so a
crash at any moment leaves either the old or the new pointer, never a broken one. New
versions are copied into ``.tmp-*`` and renamed into place only after they verify.

Candidate versions (``derive``: a copy of a bundle with some files and manifest fields
changed, e.g. by self-adaptation) are sealed under ``.candidates/`` and installed from there
by a rename, or discarded. A staging directory is named after the process that wrote it, so
``cleanup`` removes only those whose process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.contract.bundle import (
    Bundle,
    BundleError,
    load_bundle,
    read_manifest,
    seal_bundle,
)
from appliance.contract.durable import atomic_write_text, fsync_path

if TYPE_CHECKING:
    from appliance.config import Settings

log = logging.getLogger(__name__)

CANDIDATES = ".candidates"


@dataclass(frozen=True)
class ModelVersion:
    """One installed bundle version as listed by ``terratile models list``."""

    version: int
    path: Path
    parent: int | None
    active: bool
    name: str
    experts: list[str]  # adapted experts beside the source model

    def as_dict(self) -> dict[str, object]:
        return {"version": self.version, "path": str(self.path), "active": self.active,
                "parent": self.parent, "name": self.name, "experts": self.experts}


class ModelStore:
    """Versioned bundles plus the active pointer."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._pointer = self.root / "ACTIVE"
        self.staging = self.root / CANDIDATES

    @classmethod
    def for_settings(cls, settings: Settings) -> ModelStore:
        """The node's model store, ``<paths.state>/models``."""
        return cls(settings.paths.state / "models")

    def dir_for(self, version: int) -> Path:
        return self.root / f"v{version:04d}"

    def versions(self) -> list[ModelVersion]:
        """Installed versions, oldest first (directories that fail to verify are skipped)."""
        active = self.active_version()
        out = []
        for path in sorted(self.root.glob("v[0-9][0-9][0-9][0-9]")):
            try:
                manifest = load_bundle(path).manifest
            except BundleError:
                continue
            out.append(ModelVersion(manifest.version, path, manifest.parent,
                                    manifest.version == active, manifest.name,
                                    [d.name for d in manifest.experts]))
        return out

    def active_version(self) -> int | None:
        try:
            return int(json.loads(self._pointer.read_text())["version"])
        except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
            return None

    def active(self) -> Bundle:
        """The active bundle, verified; ``BundleError`` if there is none."""
        version = self.active_version()
        if version is None:
            raise BundleError(f"{self.root}: no active model (install a bundle first)")
        return load_bundle(self.dir_for(version))

    def newest_verified(self, accept: Callable[[Bundle], bool] = lambda _b: True
                        ) -> Bundle | None:
        """The newest installed version that verifies and that ``accept``s (None: none)."""
        for version in reversed(self.installed()):
            try:
                bundle = load_bundle(self.dir_for(version))
            except BundleError:
                continue
            if accept(bundle):
                return bundle
        return None

    def load(self, version: int) -> Bundle:
        """An installed version, verified, whether active or not."""
        return load_bundle(self.dir_for(version))

    def installed(self) -> list[int]:
        """Version numbers of the version directories, oldest first (not verified)."""
        return sorted(int(p.name[1:]) for p in self.root.glob("v[0-9][0-9][0-9][0-9]"))

    def next_version(self) -> int:
        return max(self.installed(), default=0) + 1

    def install(self, source: Path, activate: bool = True) -> Bundle:
        """Copy a verified bundle in under its manifest version; activate it if asked.

        A candidate staged by ``derive`` is moved in rather than copied. A bundle whose
        version is already installed with identical files is reused (a staged copy is then
        discarded), so a daemon restarted with the same seed bundle does not pile up copies.
        """
        source = Path(source)
        staged = self._is_staged(source)
        bundle = load_bundle(source)
        target = self.dir_for(bundle.version)
        if target.exists():
            existing = load_bundle(target)
            if existing.manifest.files != bundle.manifest.files:
                raise BundleError(
                    f"version {bundle.version} is already installed with different files; "
                    "give the new bundle a new version"
                )
            if staged:
                self.discard(source)
        else:
            if staged:
                tmp = source
            else:
                tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
                shutil.copytree(source, tmp, dirs_exist_ok=True)
                load_bundle(tmp)
            fsync_path(tmp)
            tmp.replace(target)
            fsync_path(self.root)
        if activate:
            self.activate(bundle.version)
        return load_bundle(target)

    def derive(self, bundle: Bundle, files: Mapping[str, Path] | None = None,
               update: Mapping[str, Any] | None = None) -> Path:
        """A sealed candidate version made from ``bundle``, staged, not installed.

        A copy of ``bundle`` with ``files`` (bundle file name → file to copy in; new names are
        listed in the manifest) and the manifest fields ``update`` (e.g. ``experts``,
        ``metrics``, ``notes``), as version ``next_version()`` with ``bundle`` as its parent.
        Returns its directory under ``.candidates/``: ``load_bundle`` verifies it,
        ``install(path, activate=False)`` moves it in, ``discard(path)`` removes it.
        """
        files = dict(files or {})
        version = self.next_version()
        self.staging.mkdir(exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f"v{version:04d}-{os.getpid()}-", dir=self.staging))
        try:
            shutil.copytree(bundle.path, build, dirs_exist_ok=True)
            for name, file in files.items():
                shutil.copyfile(file, build / name)
            manifest = bundle.manifest.model_copy(update={
                "created": datetime.now(timezone.utc), **(update or {}),
                "version": version, "parent": bundle.version,
                "files": {**bundle.manifest.files, **dict.fromkeys(files, "")}})
            seal_bundle(build, manifest)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        return build

    def discard(self, candidate: Path) -> None:
        """Remove a candidate staged by ``derive`` (nothing else: installed versions stay)."""
        if not self._is_staged(Path(candidate)):
            raise ValueError(f"{candidate} is not a staged candidate of {self.root}")
        shutil.rmtree(candidate, ignore_errors=True)

    def _is_staged(self, path: Path) -> bool:
        return path.resolve().parent == self.staging.resolve()

    def activate(self, version: int) -> Bundle:
        """Point ACTIVE at ``version`` after verifying it; atomic."""
        bundle = load_bundle(self.dir_for(version))
        atomic_write_text(self._pointer, json.dumps({"version": version}))
        return bundle

    def rollback_target(self, version: int) -> int:
        """The version a rollback from ``version`` goes to: its parent, or the newest older
        installed version; ``BundleError`` if there is none."""
        parent = read_manifest(self.dir_for(version)).parent
        if parent is not None:
            return parent
        older = [v.version for v in self.versions() if v.version < version]
        if not older:
            raise BundleError(f"version {version} has no earlier version")
        return max(older)

    def lineage(self, version: int) -> list[int]:
        """``version`` and its ancestors back to a source (a version without parent)."""
        chain = [version]
        while len(chain) < 10_000:
            parent = read_manifest(self.dir_for(chain[-1])).parent
            if parent is None or not self.dir_for(parent).is_dir():
                break
            chain.append(parent)
        return chain

    def prune(self, keep: int) -> list[int]:
        """Delete old versions: the active one and its lineage (rollback and the reset
        policy need them) stay, and so do the ``keep`` newest others. Returns what went.

        Self-adaptation installs a version per promotion, each a full bundle (tens of MB
        with an expert's backbone): an edge box's disk must not fill up over months.
        """
        active = self.active_version()
        protected = set(self.lineage(active)) if active is not None else set()
        others = [v for v in self.installed() if v not in protected]
        doomed = others[: max(len(others) - keep, 0)]
        for version in doomed:
            shutil.rmtree(self.dir_for(version), ignore_errors=True)
        if doomed:
            fsync_path(self.root)
        return doomed

    def cleanup(self) -> None:
        """Remove half-copied ``.tmp-*`` directories left by a crash, and staged candidates
        whose process is gone (a running job's own candidate stays)."""
        for tmp in self.root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        for staged in self.staging.glob("v*-*-*"):
            pid = staged.name.split("-")[1]
            if not (pid.isdigit() and _running(int(pid))):
                shutil.rmtree(staged, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_store(settings: Settings) -> ModelStore:
    """The model store; the seed bundle is installed when nothing is active yet."""
    store = ModelStore.for_settings(settings)
    store.cleanup()
    if store.active_version() is None:
        if settings.model.bundle is None:
            raise FileNotFoundError("no active model in the store and model.bundle is not set")
        log.info("installing seed bundle %s", settings.model.bundle)
        store.install(settings.model.bundle)
    return store


def serving_bundle(settings: Settings) -> Bundle:
    """The bundle the node serves: the store's active version, else ``model.bundle``.

    Unlike ``open_store`` this neither installs the seed bundle nor cleans the store, so a
    CLI beside a running daemon never touches its half-written versions.
    """
    store = ModelStore.for_settings(settings)
    if store.active_version() is not None:
        return store.active()
    if settings.model.bundle is None:
        raise BundleError("no active model in the store and no model.bundle in the config")
    return load_bundle(settings.model.bundle)
