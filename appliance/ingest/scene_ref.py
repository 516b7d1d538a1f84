"""A scene named by reference, and its stable identity.

A fleet job names its scene by ``https://``/``http://`` URL, ``s3://bucket/key`` or an
absolute path under ``fleet.shared_dirs``; ``resolve`` turns that text into a
``SceneSource`` or refuses it (``Refused`` with a reason slug) before anything is
contacted: an unknown or disabled scheme (``scheme``), a host (or bucket) outside
``fleet.hosts`` when that is set (``host``), credentials in a URL (``credentials``), a
name without an allowed ending (``extension``), a path outside the shared directories
(``outside-shared-dirs``), GDAL's own ``/vsi…`` syntax (``format``).
``resolve`` only reads the text, so it is cheap enough for the MQTT network thread.

``identify`` then gives the scene its id, the key of the journal, the results folder
and the result's ``msg_id``, so that an unchanged scene submitted again is a duplicate and
a changed object a new scene:

* a shared file: the sha256 of its bytes (as for an inbox file, so the same file dropped
  into the inbox or named by a job is one scene); a ``sha256`` given with the job must
  match (``digest``), symlinks out of the shared directories are refused;
* an HTTP(S) object: one HEAD request; its size must be known and at most
  ``input.max_file_bytes`` (``too-large``), the server must serve byte ranges
  (``no-ranges``: GDAL would fetch the whole object otherwise), and the id is the sha256 of
  the URL with the job's ``sha256`` or else with the object's ETag, Last-Modified and size
  (``no-identity`` when it has neither ETag nor Last-Modified);
* an S3 object: the URL with the job's ``sha256``, which is required (``no-identity``).

A digest a submitter gives is trusted as the identity of *that URL* only (it is hashed
with it): a false one can make the box skip re-reading that one object, never pass one
object off as another's result.
"""

from __future__ import annotations

import hashlib
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from appliance.config import FleetConfig
from appliance.scene.source import RemoteAccess, SceneSource

USER_AGENT = "terratile-scene"


class Refused(Exception):
    """A scene that is not read: ``reason`` slug and a message for its ``failed``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def hash_regular_file(path: Path, limit: int) -> str:
    """Hex sha256 of a regular file of at most ``limit`` bytes; never follows a symlink,
    never blocks on a FIFO; raises ``Refused`` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise Refused("unreadable", f"cannot open the file: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused("not-a-file", "not a regular file")
        digest = hashlib.sha256()
        total = 0
        for block in iter(lambda: fh.read(1 << 20), b""):
            total += len(block)
            if total > limit:
                raise Refused("too-large", f"larger than input.max_file_bytes ({limit} bytes)")
            digest.update(block)
    return digest.hexdigest()


def _ends_well(path: str, extensions: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(e.lower() for e in extensions))


def resolve(ref: str, cfg: FleetConfig) -> SceneSource:
    """The source a job's scene text names, or ``Refused``; reads nothing but the text."""
    if not ref.isprintable() or ref != ref.strip():
        raise Refused("malformed", "the scene reference holds control characters or spaces")
    if ref.lower().startswith("/vsi"):
        raise Refused("format", "GDAL /vsi… paths are not accepted; give a URL or a path")
    if "://" in ref:
        return _remote(ref, cfg)
    if not ref.startswith("/"):
        raise Refused("outside-shared-dirs", "a scene path must be absolute and under "
                      "fleet.shared_dirs")
    path = Path(os.path.normpath(ref))
    if not any(path.is_relative_to(d) for d in cfg.shared_dirs):
        raise Refused("outside-shared-dirs", f"{ref} is not under fleet.shared_dirs")
    return SceneSource.file(path, "shared")


def _remote(url: str, cfg: FleetConfig) -> SceneSource:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in cfg.schemes:
        raise Refused("scheme", f"{scheme}:// is not accepted (fleet.schemes: "
                      f"{', '.join(cfg.schemes) or 'none'})")
    if parts.username is not None or parts.password is not None:
        raise Refused("credentials", "credentials in a URL are refused; the node has its own")
    if not parts.hostname:
        raise Refused("malformed", f"{url[:200]}: no host")
    if cfg.hosts and not _host_allowed(parts.hostname, cfg.hosts):
        raise Refused("host", f"{parts.hostname} is not among fleet.hosts")
    if scheme == "s3" and (parts.query or parts.fragment):
        raise Refused("malformed", "an s3:// URL takes no query or fragment")
    if parts.fragment:
        raise Refused("malformed", "a URL with a #fragment is refused")
    if not _ends_well(parts.path, cfg.extensions):
        raise Refused("extension", f"{parts.path[-80:] or '/'} does not end in "
                      f"{' or '.join(cfg.extensions)} (fleet.extensions)")
    access = RemoteAccess(tuple(cfg.extensions), cfg.http_timeout, cfg.http_retries)
    return SceneSource("s3" if scheme == "s3" else "http", url, access)


def _host_allowed(host: str, allowed: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == a.lower() or (a.startswith(".") and host.endswith(a.lower()))
               for a in allowed)


def identify(source: SceneSource, sha256: str | None, cfg: FleetConfig,
             max_bytes: int) -> str:
    """The scene id of ``source`` (see the module docstring); raises ``Refused``."""
    if source.kind == "shared":
        return _identify_shared(source.path, sha256, cfg, max_bytes)
    if source.kind == "s3":
        if sha256 is None:
            raise Refused("no-identity", "an s3:// job needs the object's sha256")
        return _url_identity(source.location, f"sha256:{sha256}")
    if source.kind == "http":
        return _identify_http(source.location, sha256, cfg, max_bytes)
    raise Refused("malformed", f"{source.kind} scenes are not named by jobs")


def _identify_shared(path: Path, sha256: str | None, cfg: FleetConfig, max_bytes: int) -> str:
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(os.path.realpath(d)) for d in cfg.shared_dirs):
        raise Refused("outside-shared-dirs", f"{path} leads outside fleet.shared_dirs")
    if not real.exists():
        raise Refused("missing", f"{path} does not exist")
    digest = hash_regular_file(real, max_bytes)
    if sha256 is not None and sha256 != digest:
        raise Refused("digest", f"{path}: sha256 {digest} differs from the job's {sha256}")
    return digest


def _identify_http(url: str, sha256: str | None, cfg: FleetConfig, max_bytes: int) -> str:
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=cfg.http_timeout) as response:
            headers = response.headers
    except urllib.error.HTTPError as exc:
        raise Refused("unreachable", f"HEAD {url[:200]}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        raise Refused("unreachable", f"HEAD {url[:200]}: {why}") from exc
    size = headers.get("Content-Length")
    if size is None or not size.isdigit():
        raise Refused("no-identity", f"{url[:200]}: the server gives no size")
    if int(size) > max_bytes:
        raise Refused("too-large", f"{size} bytes is larger than input.max_file_bytes "
                      f"({max_bytes})")
    if headers.get("Accept-Ranges", "").lower() != "bytes":
        raise Refused("no-ranges", f"{url[:200]}: the server does not serve byte ranges, "
                      "so the scene could only be read whole")
    if sha256 is not None:
        return _url_identity(url, f"sha256:{sha256}")
    etag, modified = headers.get("ETag"), headers.get("Last-Modified")
    if etag is None and modified is None:
        raise Refused("no-identity", f"{url[:200]}: no ETag or Last-Modified; give the "
                      "job a sha256")
    return _url_identity(url, f"etag:{etag}\0modified:{modified}\0size:{size}")


def _url_identity(url: str, validator: str) -> str:
    return hashlib.sha256(f"terratile.scene-url/1\0{url}\0{validator}".encode()).hexdigest()
