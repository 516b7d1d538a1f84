"""The bundle contract: a sealed bundle loads; any change to it is refused with a clear error."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.contract.bundle import (
    CLASSIFIER,
    MANIFEST,
    REFERENCE,
    REFERENCE_SCHEMA,
    SOURCE_BANK,
    BundleError,
    holdout_rows,
    load_bundle,
    read_reference,
    seal_bundle,
    sha256_file,
)


@pytest.fixture()
def bundle_copy(colour_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(colour_bundle, tmp_path / "b"))


def test_sealed_bundle_loads_with_its_parts(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    assert bundle.manifest.class_names == ["urban", "vegetation", "water"]
    assert bundle.source_bank.features.shape[1] == bundle.manifest.feature_dim
    assert bundle.source_bank.holdout.any()
    assert len(bundle.reference.bands) == 3
    assert len(bundle.reference.bands[0].quantiles) == 101


def test_tampered_file_is_refused(bundle_copy: Path) -> None:
    with (bundle_copy / CLASSIFIER).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"sha256 mismatch for classifier.onnx"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / SOURCE_BANK).unlink()
    with pytest.raises(BundleError, match=r"missing file source_bank.npz"):
        load_bundle(bundle_copy)


def test_wrong_schema_and_garbage_manifest_are_refused(bundle_copy: Path) -> None:
    raw = json.loads((bundle_copy / MANIFEST).read_text())
    raw["schema"] = "terratile.bundle/0"
    (bundle_copy / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"expected 'terratile\.bundle/2'"):
        load_bundle(bundle_copy)
    (bundle_copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match=r"unreadable"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match=r"no manifest.json"):
        load_bundle(bundle_copy / "nowhere")


def test_reseal_after_a_legitimate_change(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    bank = bundle.source_bank
    np.savez_compressed(bundle_copy / SOURCE_BANK, features=bank.features[:10],
                        labels=bank.labels[:10], holdout=holdout_rows(bank.labels[:10]))
    sealed = seal_bundle(bundle_copy, bundle.manifest.model_copy(update={"version": 2}))
    again = load_bundle(bundle_copy)
    assert again.version == 2 and again.manifest.files == sealed.files
    assert again.source_bank.holdout.sum() == 2


def test_a_bank_without_holdout_rows_is_refused(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    bank = bundle.source_bank
    np.savez_compressed(bundle_copy / SOURCE_BANK, features=bank.features, labels=bank.labels)
    seal_bundle(bundle_copy, bundle.manifest)
    with pytest.raises(BundleError, match="missing arrays"):
        _ = load_bundle(bundle_copy).source_bank


def test_holdout_rows_are_every_fifth_row_of_each_class() -> None:
    labels = np.array([0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    assert np.flatnonzero(holdout_rows(labels)).tolist() == [0, 1, 7, 11]
    multi = np.eye(2, dtype=np.uint8)[labels]  # multi-label rows: by their first label
    assert (holdout_rows(multi) == holdout_rows(labels)).all()


def test_a_v1_reference_is_upgraded_as_it_is_read(bundle_copy: Path, tmp_path: Path) -> None:
    current = json.loads((bundle_copy / REFERENCE).read_text())
    assert current["schema"] == REFERENCE_SCHEMA
    old = {**current, "schema": "terratile.reference/1",
           "features": {**current["features"], "pca_mean": current["features"]["mean"],
                        "centroid_distance_mean": 1.0, "centroid_distance_std": 0.1},
           "confidence": {**current["confidence"], "std_max_prob": 0.1, "std_entropy": 0.1}}
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert read_reference(tmp_path / "v1.json") == load_bundle(bundle_copy).reference
    (tmp_path / "v9.json").write_text(json.dumps({**current, "schema": "terratile.reference/9"}))
    with pytest.raises(BundleError, match="reference schema"):
        read_reference(tmp_path / "v9.json")


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    data = bytes(range(256)) * 9000  # > one 1 MiB block
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_a_bundle_1_manifest_is_read_through_the_one_upgrade(colour_bundle: Path,
                                                             tmp_path: Path) -> None:
    """``terratile.bundle/1`` called the experts ``domains``: it still loads, as /2."""
    old = tmp_path / "old"
    shutil.copytree(colour_bundle, old)
    raw = json.loads((old / "manifest.json").read_text())
    raw["schema"] = "terratile.bundle/1"
    raw["domains"] = raw.pop("experts")
    (old / "manifest.json").write_text(json.dumps(raw))
    bundle = load_bundle(old)
    assert bundle.manifest.schema_ == "terratile.bundle/2" and bundle.manifest.experts == []
    raw["schema"] = "terratile.bundle/9"
    (old / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"expected 'terratile\.bundle/2'"):
        load_bundle(old)
