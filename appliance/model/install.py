"""Installing a model version on a box: from a directory, a tar archive or an http(s) URL.

Triton's rule is the bar: versions sit side by side, and a version that fails to load
leaves the running one serving. An install therefore goes, off the daemon's main loop:

1. **fetch** the source into a ``.tmp-*`` folder of the store (the store's start-up
   cleanup removes one a crash left). A local source must lie inside
   ``model.install_dirs`` when it comes from outside (MQTT ``cmd/install``; symlinks are
   resolved first); a URL is downloaded with the standard library, at most
   ``model.install_max_mb``, and unpacked with tarfile's ``data`` filter (no absolute
   paths, no ``..``, no links out, no devices).
2. **verify**: the sha256 of ``manifest.json`` against the digest the request names (it
   pins every file, since the manifest holds their sha256), then every file's sha256 and
   the schema (``load_bundle``), then the fit to this node (``compat``).
3. **install** beside the other versions (not yet active), and with ``activate`` **stage**
   it: open and warm its sessions (TensorRT builds its engines here).

The caller then switches on its main loop (``ModelHost.switch``). Any failure raises
``BundleError`` with the reason and changes nothing that runs.

``check_seed`` covers the other way a new model arrives: a ``model.bundle`` in the config
that differs from every installed version is reported, and installed when
``model.install_newer`` says so and it is newer than all of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from appliance.config import ModelConfig
from appliance.contract.bundle import MANIFEST, Bundle, BundleError, load_bundle, read_manifest
from appliance.model.host import ModelHost, Staged

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")
CHUNK = 1 << 20
MAX_SOURCE_CHARS = 4096


@dataclass(frozen=True)
class InstallRequest:
    """What to install: ``source`` (directory, archive or http(s) URL), the expected
    sha256 of its ``manifest.json`` (None: not pinned), and whether to run it."""

    source: str
    sha256: str | None = None
    activate: bool = False

    @classmethod
    def from_payload(cls, payload: bytes) -> InstallRequest:
        """``{"source": …, "sha256": …, "activate": true}``; ``ValueError`` saying why not."""
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        unknown = sorted(set(data) - {"source", "sha256", "activate"})
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        source, digest, activate = data.get("source"), data.get("sha256"), data.get("activate")
        if not isinstance(source, str) or not source:
            raise ValueError("source must be a non-empty string")
        if digest is not None and not isinstance(digest, str):
            raise ValueError("sha256 must be a string")
        if activate is not None and not isinstance(activate, bool):
            raise ValueError("activate must be true or false")
        return cls(source, digest, bool(activate)).validated()

    def validated(self) -> InstallRequest:
        """This request, checked: a bounded source without control characters and a
        64-digit hex digest (lower-cased); ``ValueError`` otherwise."""
        if len(self.source) > MAX_SOURCE_CHARS or any(ord(c) < 32 for c in self.source):
            raise ValueError("source holds control characters or is too long")
        digest = self.sha256
        if digest is not None:
            digest = digest.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("sha256 must be 64 hex digits (the digest of manifest.json)")
        return InstallRequest(self.source, digest, self.activate)

    @property
    def is_url(self) -> bool:
        return urlparse(self.source).scheme in ("http", "https")


@dataclass(frozen=True)
class Installed:
    """A version now in the store; ``staged`` holds its warmed sessions when it is to run."""

    bundle: Bundle
    staged: Staged | None


def manifest_digest(bundle_dir: Path) -> str:
    """The sha256 of a bundle's ``manifest.json``: the one digest that pins all its files."""
    return hashlib.sha256((Path(bundle_dir) / MANIFEST).read_bytes()).hexdigest()


class Installer:
    """Fetches, verifies, installs and (on request) stages bundle versions for a host."""

    def __init__(self, host: ModelHost, cfg: ModelConfig, confined: bool = True) -> None:
        """``confined``: local sources must lie in ``cfg.install_dirs`` (requests from
        outside the box); the CLI, run by the box's operator, installs from anywhere."""
        self.host = host
        self.cfg = cfg
        self.confined = confined
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Abandon an install under way at its next chunk or step (the daemon stops)."""
        self._cancelled.set()

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise BundleError("install abandoned: the node is stopping")

    def install(self, request: InstallRequest) -> Installed:
        """Steps 1–3 of the module docstring; ``BundleError`` with the reason on any
        failure (the running model and the active pointer are untouched)."""
        store = self.host.store
        scratch = Path(tempfile.mkdtemp(prefix=".tmp-install-", dir=store.root))
        try:
            bundle_dir = self._fetch(request, scratch)
            if request.sha256 is not None:
                actual = manifest_digest(bundle_dir)
                if actual != request.sha256:
                    raise BundleError(f"manifest sha256 {actual[:12]}… is not the requested "
                                      f"{request.sha256[:12]}…: refusing the bundle")
            self.host.check(load_bundle(bundle_dir))
            self._check_cancelled()
            bundle = store.install(bundle_dir, activate=False)
        except (OSError, tarfile.TarError, urllib.error.URLError, ValueError) as exc:
            raise BundleError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("installed model %s v%d from %s", bundle.manifest.name, bundle.version,
                 request.source)
        self._check_cancelled()
        staged = self.host.stage(bundle.version) if request.activate else None
        return Installed(bundle, staged)

    # -- fetching ---------------------------------------------------------------------------

    def _fetch(self, request: InstallRequest, scratch: Path) -> Path:
        """The bundle directory of ``request.source``, inside ``scratch`` or in place."""
        if request.is_url:
            archive = scratch / "download"
            self._download(request.source, archive)
            return _unpack(archive, scratch / "bundle")
        if "://" in request.source:
            raise BundleError(f"{request.source}: only http(s) URLs and local paths are "
                              "accepted")
        path = Path(request.source)
        if not path.is_absolute():
            raise BundleError(f"{request.source}: a local source must be an absolute path")
        path = path.resolve()
        if self.confined and not any(path.is_relative_to(d.resolve())
                                     for d in self.cfg.install_dirs):
            allowed = [str(d) for d in self.cfg.install_dirs] or "none configured"
            raise BundleError(f"{path} is outside model.install_dirs ({allowed})")
        if path.is_dir():
            return path
        if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
            return _unpack(path, scratch / "bundle")
        raise BundleError(f"{path}: not a bundle directory or a .tar[.gz] archive")

    def _download(self, url: str, target: Path) -> None:
        limit = self.cfg.install_max_mb << 20
        req = urllib.request.Request(url, headers={"User-Agent": "terratile-install"})
        with urllib.request.urlopen(req, timeout=self.cfg.install_timeout) as response, \
                target.open("wb") as out:
            final = urlparse(response.geturl()).scheme
            if final not in ("http", "https"):
                raise BundleError(f"{url} redirected to a {final!r} URL")
            size = 0
            while chunk := response.read(CHUNK):
                self._check_cancelled()
                size += len(chunk)
                if size > limit:
                    raise BundleError(f"{url}: larger than model.install_max_mb "
                                      f"({self.cfg.install_max_mb} MB)")
                out.write(chunk)
        log.info("downloaded %s (%.1f MB)", url, size / (1 << 20))


def _unpack(archive: Path, into: Path) -> Path:
    """Unpack a tar archive safely; the bundle is its top level or its one folder."""
    into.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    if (into / MANIFEST).is_file():
        return into
    folders = [p for p in into.iterdir() if p.is_dir()]
    if len(folders) == 1 and (folders[0] / MANIFEST).is_file():
        return folders[0]
    raise BundleError(f"{archive.name}: no {MANIFEST} at the top of the archive or in its "
                      "one folder")


@dataclass(frozen=True)
class SeedCheck:
    """How ``model.bundle`` compares with the installed versions at start."""

    bundle: Path
    version: int | None  # its manifest version (None: unreadable)
    installed: bool  # identical to an installed version
    newer: bool  # newer than every installed version
    problem: str | None = None  # why it cannot be used (unreadable, not fitting)


def check_seed(host: ModelHost, seed: Path | None) -> SeedCheck | None:
    """Compare ``model.bundle`` with the installed versions (None: no seed configured)."""
    if seed is None:
        return None
    try:
        manifest = read_manifest(seed)
        digest = manifest_digest(seed)
    except (BundleError, OSError) as exc:
        return SeedCheck(seed, None, False, False, str(exc))
    store = host.store
    installed = store.installed()  # by manifest digest alone: no file is hashed here

    def same(version: int) -> bool:
        try:
            return manifest_digest(store.dir_for(version)) == digest
        except OSError:
            return False
    return SeedCheck(seed, manifest.version, any(same(v) for v in installed),
                     all(manifest.version > v for v in installed))
