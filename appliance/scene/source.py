"""Where a scene's pixels come from: a local file, or an object read in windows remotely.

The pipeline reads every scene the same way; only how GDAL opens it differs. A local
file (the inbox's claimed copy, or a file in a shared directory) opens through
``open_raster`` under ``SAFE_GDAL`` (no network at all). A remote object (``http``/``https``
through GDAL's ``/vsicurl/``, ``s3`` through ``/vsis3/``) opens through
``open_remote_raster`` under ``RemoteAccess.gdal_env``: HTTP range requests of the blocks
the windows need, never a download of the whole object, no sidecar discovery, no
``.aux.xml``, only the GeoTIFF driver, bounded timeouts and retries. S3 credentials come
from GDAL's own sources (the environment, ``~/.aws/credentials``), never from a job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from appliance.contract.payloads import SceneOrigin
from appliance.contract.raster_open import SAFE_GDAL

SourceKind = Literal["inbox", "shared", "http", "s3"]
REMOTE_KINDS: frozenset[str] = frozenset({"http", "s3"})


@dataclass(frozen=True)
class RemoteAccess:
    """How GDAL may read a remote object: allowed name endings, timeout and retries."""

    extensions: tuple[str, ...] = (".tif", ".tiff")
    timeout: float = 30.0
    retries: int = 2

    def gdal_env(self) -> dict[str, str | int | bool]:
        """GDAL configuration for one remote scene: ``SAFE_GDAL`` with the network opened
        for exactly the object (by extension), and nothing read beside it."""
        seconds = max(1, round(self.timeout))
        return {
            **SAFE_GDAL,
            "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ",".join(self.extensions),
            "GDAL_HTTP_TIMEOUT": seconds,
            "GDAL_HTTP_CONNECTTIMEOUT": min(seconds, 10),
            "GDAL_HTTP_MAX_RETRY": self.retries,
            "GDAL_HTTP_RETRY_DELAY": 1,
            "GDAL_PAM_ENABLED": "NO",  # no <name>.aux.xml requested beside the object
            "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        }


@dataclass(frozen=True)
class SceneSource:
    """A scene to read: ``kind`` and ``location`` (a local path, or the URL as given)."""

    kind: SourceKind
    location: str
    remote: RemoteAccess = field(default_factory=RemoteAccess)

    @classmethod
    def file(cls, path: Path, kind: SourceKind = "inbox") -> SceneSource:
        """A local file (the inbox's claimed copy, or a file in a shared directory)."""
        return cls(kind, str(path))

    @property
    def is_remote(self) -> bool:
        return self.kind in REMOTE_KINDS

    @property
    def path(self) -> Path:
        """The local file; only for a source that is not remote."""
        if self.is_remote:
            raise ValueError(f"{self.location} is not a local file")
        return Path(self.location)

    @property
    def name(self) -> str:
        """The file name: the last component of the path or of the URL's path."""
        if not self.is_remote:
            return Path(self.location).name
        return urlsplit(self.location).path.rstrip("/").rsplit("/", 1)[-1] or self.location

    def gdal_path(self) -> str:
        """What GDAL opens: the path, ``/vsicurl/<url>`` or ``/vsis3/<bucket>/<key>``."""
        if self.kind == "http":
            return f"/vsicurl/{self.location}"
        if self.kind == "s3":
            parts = urlsplit(self.location)
            return f"/vsis3/{parts.netloc}{parts.path}"
        return self.location

    def gdal_env(self) -> dict[str, str | int | bool]:
        """The GDAL configuration to open and read this scene under."""
        return self.remote.gdal_env() if self.is_remote else dict(SAFE_GDAL)

    def origin(self) -> SceneOrigin:
        """Where the scene came from, for its result."""
        return SceneOrigin(kind=self.kind, url=None if self.kind == "inbox" else self.location)
