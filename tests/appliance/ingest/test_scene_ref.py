"""Scene references: what a job may name, and the stable identity of what it names.

Remote identities come from a real nginx (ETag, Last-Modified, byte ranges); shared files
are real files, with a real symlink out of the shared directory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import FleetConfig
from appliance.ingest.scene_ref import Refused, identify, resolve
from tests.helpers.range_server import RangeServer, write_cog
from tests.helpers.scenes import write_scene

MAX = 1 << 30


@pytest.fixture()
def shared(tmp_path: Path) -> Path:
    folder = tmp_path / "shared"
    folder.mkdir()
    return folder


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[RangeServer, Path]]:
    folder = tmp_path / "www"
    folder.mkdir()
    write_cog(write_scene(tmp_path / "a.tif"), folder / "a.tif")
    (folder / "plain.txt").write_text("not a scene")
    with RangeServer(folder, tmp_path / "nginx") as server:
        yield server, folder


def refusal(ref: str, cfg: FleetConfig) -> str:
    with pytest.raises(Refused) as caught:
        resolve(ref, cfg)
    return caught.value.reason


def test_references_are_resolved_by_their_text(shared: Path) -> None:
    cfg = FleetConfig(shared_dirs=[shared])
    http = resolve("https://data.example.org/s2/T32.tif?X-Sig=1", cfg)
    assert http.kind == "http" and http.name == "T32.tif"
    assert http.gdal_path() == "/vsicurl/https://data.example.org/s2/T32.tif?X-Sig=1"
    s3 = resolve("s3://bucket/a/b.TIF", cfg)
    assert s3.kind == "s3" and s3.gdal_path() == "/vsis3/bucket/a/b.TIF"
    local = resolve(f"{shared}/x/../scene.tif", cfg)
    assert local.kind == "shared" and local.path == shared / "scene.tif"
    assert local.origin().url == str(shared / "scene.tif")


def test_anything_else_is_refused_with_its_reason(shared: Path, tmp_path: Path) -> None:
    cfg = FleetConfig(shared_dirs=[shared], schemes=["https"])
    assert refusal("ftp://host/a.tif", cfg) == "scheme"
    assert refusal("http://host/a.tif", cfg) == "scheme"  # not in fleet.schemes
    assert refusal("file:///etc/passwd", cfg) == "scheme"
    assert refusal("https://user:pw@host/a.tif", cfg) == "credentials"
    assert refusal("https://host/a.vrt", cfg) == "extension"
    assert refusal("https://host/a.tif#x", cfg) == "malformed"
    assert refusal("/vsicurl/https://host/a.tif", cfg) == "format"
    assert refusal(str(tmp_path / "elsewhere.tif"), cfg) == "outside-shared-dirs"
    assert refusal(f"{shared}/../elsewhere.tif", cfg) == "outside-shared-dirs"
    assert refusal("relative/a.tif", cfg) == "outside-shared-dirs"
    assert refusal("https://host/a.tif\n", cfg) == "malformed"
    hosts = FleetConfig(hosts=["data.example.org", ".bucket.example"])
    assert resolve("https://DATA.example.org/a.tif", hosts).kind == "http"
    assert resolve("https://eu.bucket.example/a.tif", hosts).kind == "http"
    assert refusal("https://data.example.org.evil/a.tif", hosts) == "host"
    assert refusal("https://169.254.169.254/a.tif", hosts) == "host"
    assert refusal("s3://other/a.tif", hosts) == "host"


def test_a_shared_file_is_its_bytes_and_a_symlink_out_is_refused(shared: Path,
                                                                 tmp_path: Path) -> None:
    cfg = FleetConfig(shared_dirs=[shared])
    scene = write_scene(shared / "s.tif")
    digest = hashlib.sha256(scene.read_bytes()).hexdigest()
    assert identify(resolve(str(scene), cfg), None, cfg, MAX) == digest
    assert identify(resolve(str(scene), cfg), digest, cfg, MAX) == digest
    with pytest.raises(Refused) as wrong:
        identify(resolve(str(scene), cfg), "0" * 64, cfg, MAX)
    assert wrong.value.reason == "digest"
    outside = write_scene(tmp_path / "outside.tif")
    os.symlink(outside, shared / "link.tif")
    with pytest.raises(Refused) as escaped:
        identify(resolve(str(shared / "link.tif"), cfg), None, cfg, MAX)
    assert escaped.value.reason == "outside-shared-dirs"
    with pytest.raises(Refused) as big:
        identify(resolve(str(scene), cfg), None, cfg, 100)
    assert big.value.reason == "too-large"


def test_a_url_is_the_same_scene_until_the_object_changes(
        served: tuple[RangeServer, Path]) -> None:
    server, folder = served
    cfg = FleetConfig()
    source = resolve(server.url("a.tif"), cfg)
    first = identify(source, None, cfg, MAX)
    assert identify(source, None, cfg, MAX) == first  # unchanged: a duplicate
    stat = (folder / "a.tif").stat()
    os.utime(folder / "a.tif", (stat.st_atime, stat.st_mtime + 60))  # a new version
    assert identify(source, None, cfg, MAX) != first
    pinned = identify(source, "ab" * 32, cfg, MAX)
    assert pinned != first and identify(source, "ab" * 32, cfg, MAX) == pinned
    assert {h.method for h in server.hits()} == {"HEAD"}  # identity reads no pixel


def test_unreachable_missing_and_oversized_objects_are_refused(
        served: tuple[RangeServer, Path]) -> None:
    server, _ = served
    cfg = FleetConfig(http_timeout=2)
    reasons = {}
    for name, ref, limit in (("missing", server.url("nothing.tif"), MAX),
                             ("big", server.url("a.tif"), 100),
                             ("closed", "http://127.0.0.1:9/a.tif", MAX)):
        with pytest.raises(Refused) as caught:
            identify(resolve(ref, cfg), None, cfg, limit)
        reasons[name] = caught.value.reason
    assert reasons == {"missing": "unreachable", "big": "too-large", "closed": "unreachable"}
    with pytest.raises(Refused) as s3:
        identify(resolve("s3://bucket/a.tif", cfg), None, cfg, MAX)
    assert s3.value.reason == "no-identity"
