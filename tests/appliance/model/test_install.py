"""Installing bundle versions: from a folder, a tar archive or a real local HTTP server;
every refusal (tampered, wrong digest, outside the allowed folders, unsafe archive,
another embedding size, too large) leaves the store's active version as it was."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from appliance.config import Settings
from appliance.contract.bundle import BundleError, read_manifest, seal_bundle
from appliance.model.host import ModelHost
from appliance.model.install import Installer, InstallRequest, check_seed, manifest_digest
from appliance.model.store import ModelStore
from tests.helpers.colour_bundle import versioned_copy
from tests.helpers.http_files import FileServer


def tar_of(bundle: Path, out: Path, folder: str | None = "bundle") -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(bundle, arcname=folder or ".")
    return out


@pytest.fixture()
def box(colour_bundle: Path, tmp_path: Path) -> tuple[ModelHost, Path]:
    """A host (no sessions) with v1 active, and an allowed install folder holding v2."""
    drop = tmp_path / "drop"
    settings = Settings(paths={"state": tmp_path / "state"}, mqtt={"enabled": False},
                        model={"providers": ["cpu"], "warmup": False, "install_dirs": [drop]})
    store = ModelStore.for_settings(settings)
    store.install(colour_bundle)
    versioned_copy(colour_bundle, drop / "v2", 2, 1, head_bias=2.0)
    return ModelHost(store, settings, serve=False, index_dim=6), drop


def installer(host: ModelHost) -> Installer:
    return Installer(host, host._settings.model)


def test_install_from_a_folder_then_from_an_archive_over_http(
        box: tuple[ModelHost, Path], colour_bundle: Path, tmp_path: Path) -> None:
    host, drop = box
    digest = manifest_digest(drop / "v2")
    done = installer(host).install(InstallRequest(str(drop / "v2"), digest))
    assert done.bundle.version == 2 and done.staged is None
    assert host.store.active_version() == 1  # installed beside, not active
    served = tmp_path / "served"
    served.mkdir()
    v3 = versioned_copy(colour_bundle, tmp_path / "v3", 3, 2)
    tar_of(v3, served / "v3.tar.gz")
    with FileServer(served) as server:
        done = installer(host).install(InstallRequest(server.url("v3.tar.gz"),
                                                      manifest_digest(v3).upper(), True)
                                       .validated())
        assert server.requests == ["/v3.tar.gz"]
    assert done.staged is not None and done.bundle.version == 3
    change = host.switch(done.staged, "install")
    assert change.previous.version == 1 and host.store.active_version() == 3
    assert [v.version for v in host.store.versions()] == [1, 2, 3]
    assert not list(host.store.root.glob(".tmp-*"))  # scratch folders are gone


def test_refusals_change_nothing(box: tuple[ModelHost, Path], colour_bundle: Path,
                                 tmp_path: Path) -> None:
    host, drop = box
    inst = installer(host)

    def refused(request: InstallRequest, match: str) -> None:
        with pytest.raises(BundleError, match=match):
            inst.install(request)
        assert host.store.active_version() == 1 and host.bundle.version == 1
        assert not list(host.store.root.glob(".tmp-*"))

    refused(InstallRequest(str(drop / "v2"), "0" * 64), "not the requested")
    outside = versioned_copy(colour_bundle, tmp_path / "elsewhere", 4, None)
    refused(InstallRequest(str(outside)), "outside model.install_dirs")
    (drop / "link").symlink_to(outside)  # a symlink out of the folder is outside too
    refused(InstallRequest(str(drop / "link")), "outside model.install_dirs")
    refused(InstallRequest("file:///etc/passwd"), "only http")
    refused(InstallRequest("relative/v2"), "absolute path")
    tampered = versioned_copy(colour_bundle, drop / "tampered", 5, None)
    (tampered / "classifier.onnx").write_bytes(b"not the sealed file")
    refused(InstallRequest(str(tampered)), "sha256 mismatch for classifier.onnx")
    wide = versioned_copy(colour_bundle, drop / "wide", 6, None)
    seal_bundle(wide, read_manifest(wide).model_copy(update={"embedding_dim": 7}))
    refused(InstallRequest(str(wide)), "embeddings have 7 dimensions, the retrieval index 6")
    clash = versioned_copy(colour_bundle, drop / "clash", 1, None, head_bias=1.0)
    refused(InstallRequest(str(clash)), "already installed with different files")
    # An archive that tries to write outside its folder is refused by the data filter.
    evil = drop / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    refused(InstallRequest(str(evil)), "outside the destination")
    assert not (host.store.root.parent / "escaped.txt").exists()
    with FileServer(drop) as server:
        refused(InstallRequest(server.url("missing.tar.gz")), "404")
        big = Installer(host, host._settings.model.model_copy(update={"install_max_mb": 1}))
        (drop / "big.tar").write_bytes(b"\0" * (3 << 20))
        with pytest.raises(BundleError, match="install_max_mb"):
            big.install(InstallRequest(server.url("big.tar")))


def test_the_seed_bundle_is_compared_with_the_installed_versions(
        box: tuple[ModelHost, Path], colour_bundle: Path) -> None:
    host, drop = box
    same = check_seed(host, colour_bundle)
    assert same is not None and same.installed
    newer = check_seed(host, drop / "v2")
    assert newer is not None and not newer.installed and newer.newer and newer.version == 2
    assert check_seed(host, None) is None
    broken = check_seed(host, drop)
    assert broken is not None and "no manifest.json" in (broken.problem or "")


def test_models_install_without_a_daemon(colour_bundle: Path, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from appliance.cli.main import app as cli

    config = tmp_path / "box.yaml"
    config.write_text(yaml.safe_dump({
        "paths": {"state": "state", "inbox": "inbox", "results": "results",
                  "failed": "failed"},
        "model": {"bundle": str(colour_bundle), "providers": ["cpu"], "warmup": False},
        "mqtt": {"enabled": False}}))
    store = ModelStore(tmp_path / "state" / "models")
    store.install(colour_bundle)
    v2 = versioned_copy(colour_bundle, tmp_path / "v2", 2, 1, head_bias=2.0)
    bad = versioned_copy(colour_bundle, tmp_path / "bad", 3, 1)
    (bad / "embedder.onnx").write_bytes(b"tampered")
    runner = CliRunner()
    out = runner.invoke(cli, ["models", "install", str(bad), "-c", str(config)])
    assert out.exit_code == 1 and "sha256 mismatch for embedder.onnx" in out.stderr
    out = runner.invoke(cli, ["models", "install", str(v2), "--sha256", "f" * 64,
                              "-c", str(config)])
    assert out.exit_code == 1 and "not the requested" in out.stderr
    out = runner.invoke(cli, ["models", "install", str(v2), "--sha256", manifest_digest(v2),
                              "--activate", "-c", str(config)])
    assert out.exit_code == 0, out.output
    assert "installed v2" in out.stdout and "active model: v1 → v2" in out.stdout
    assert store.active_version() == 2


def test_a_cancelled_install_is_abandoned_with_nothing_installed(
        box: tuple[ModelHost, Path]) -> None:
    host, drop = box
    inst = installer(host)
    inst.cancel()  # the daemon is stopping
    with pytest.raises(BundleError, match="abandoned"):
        inst.install(InstallRequest(str(drop / "v2"), activate=True))
    assert [v.version for v in host.store.versions()] == [1]
    assert not list(host.store.root.glob(".tmp-*"))
