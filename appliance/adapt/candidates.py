"""The candidate store: what self-adaptation learns from, kept on disk and bounded.

After every scene the adapter stores its sampled valid cells (per-scale backbone
features, fused probabilities), its band moments and sharpness (the scene's radiometric
signature), and a few model-input tiles (for layer re-normalisation). Features are only
comparable under the expert that computed them, hence a key per expert (``expert_key``).
Both rings are files written under a temporary name and renamed, so the adaptation thread
never reads half a file, and both drop their oldest entries beyond their caps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.contract.bundle import Bundle
from appliance.contract.durable import atomic_path
from appliance.contract.signature import Signature


@dataclass(frozen=True)
class Candidates:
    """Stored target cells: per-scale features [n,S,D], fused probs [n,K], scene of each.

    ``bands`` [m,2,C] holds each stored scene's per-band mean and mean square of its
    rescaled pixels (model value range), ``sharp`` [m,C] its sharpness (NaN where it was
    not measured) and ``seqs`` its number in the ring, for every scene whatever its key.
    """

    features: np.ndarray
    probs: np.ndarray
    scenes: np.ndarray
    bands: np.ndarray
    sharp: np.ndarray
    seqs: list[int]

    def __len__(self) -> int:
        return len(self.features)

    def signature(self, scenes: np.ndarray | None = None, sharp: bool = True) -> Signature:
        """Pooled signature of the stored scenes (or of ``scenes``, a boolean mask over
        them): per-band mean and std of their pixels, and their mean sharpness if asked
        for and all have one."""
        keep = np.ones(len(self.bands), bool) if scenes is None else scenes
        bands = self.bands[keep]
        mean = bands[:, 0].mean(axis=0)
        var = bands[:, 1].mean(axis=0) - mean**2
        values = self.sharp[keep]
        return (mean, np.sqrt(np.maximum(var, 1e-12)),
                values.mean(axis=0) if sharp and not np.isnan(values).any() else None)

    def scene_signatures(self, sharp: bool = True) -> list[Signature]:
        """Per stored scene: its signature (sharpness only if asked for and measured)."""
        mean = self.bands[:, 0]
        std = np.sqrt(np.maximum(self.bands[:, 1] - mean**2, 1e-12))
        return [(m, s, h if sharp and not np.isnan(h).any() else None)
                for m, s, h in zip(mean, std, self.sharp, strict=True)]


def expert_key(bundle: Bundle, domain: str | None) -> str:
    """A short fingerprint of an expert's input spec and backbone: features are comparable
    only under equal keys."""
    backbone = bundle.manifest.files.get(bundle.backbone(domain).name, "")
    text = bundle.manifest.input_for(domain).model_dump_json() + backbone
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class CandidateStore:
    """A bounded ring of per-scene ``.npz`` files (features stored as float16).

    Files are named ``<seq>-<cells>-<input key>.npz`` and written under a temporary name
    then renamed, so a reader (the adaptation thread) never sees half a file. Features are
    only comparable under the expert they were computed with, hence the key. A scene's
    few sampled model-input tiles go to a second, smaller ring (``tiles/<seq>-<n>.npy``,
    ``max_tiles`` tiles in all): at 128 px and three scales a tile costs 100 kB.
    """

    def __init__(self, root: Path, max_cells: int, max_tiles: int = 512) -> None:
        self.root = Path(root)
        self.tiles_dir = self.root / "tiles"
        self.tiles_dir.mkdir(parents=True, exist_ok=True)
        self.max_cells = max_cells
        self.max_tiles = max_tiles

    def _files(self) -> list[tuple[int, int, str, Path]]:
        out = []
        for path in self.root.glob("*-*-*.npz"):
            seq, n, key = path.stem.split("-", 2)
            if seq.isdigit() and n.isdigit():
                out.append((int(seq), int(n), key, path))
        return sorted(out)

    @property
    def last_seq(self) -> int:
        files = self._files()
        return files[-1][0] if files else 0

    def count(self, key: str | None = None) -> int:
        """Stored cells (computed under input ``key``, or all)."""
        return sum(n for _, n, k, _ in self._files() if key is None or k == key)

    def __len__(self) -> int:
        return self.count()

    def add(self, scene_id: str, features: np.ndarray, probs: np.ndarray, pixels: np.ndarray,
            key: str, tiles: np.ndarray | None = None, sharp: np.ndarray | None = None) -> int:
        """Store one scene's cells, band moments, sharpness and sampled tiles; drop the
        oldest scenes beyond the cap."""
        n = len(features)
        if n == 0:
            return 0
        px = pixels.astype(np.float64)
        seq = self.last_seq + 1
        with atomic_path(self.root / f"{seq:08d}-{n}-{key}.npz") as tmp, tmp.open("wb") as fh:
            np.savez(fh, features=features.astype(np.float16), probs=probs.astype(np.float32),
                     scene=np.asarray(scene_id),
                     bands=np.stack([px.mean(axis=0), (px**2).mean(axis=0)]),
                     sharp=np.full(px.shape[1], np.nan) if sharp is None else sharp)
        if tiles is not None and len(tiles):
            self._add_tiles(seq, tiles)
        files = self._files()
        total = sum(c for _, c, _, _ in files)
        for _, count, _, path in files[:-1]:
            if total <= self.max_cells:
                break
            path.unlink(missing_ok=True)
            total -= count
        return n

    def _tile_files(self) -> dict[int, tuple[int, Path]]:
        """Kept tile files by scene sequence number: (tile count, path)."""
        out = {}
        for path in self.tiles_dir.glob("*-*.npy"):
            seq, n = path.stem.split("-", 1)
            if seq.isdigit() and n.isdigit():
                out[int(seq)] = (int(n), path)
        return out

    def _add_tiles(self, seq: int, tiles: np.ndarray) -> None:
        """Keep a scene's tiles [t,S,C,H,W]; drop the oldest scenes' beyond ``max_tiles``."""
        count = tiles.shape[0] * tiles.shape[1]
        with atomic_path(self.tiles_dir / f"{seq:08d}-{count}.npy") as tmp, \
                tmp.open("wb") as fh:
            np.save(fh, tiles.astype(np.float16))
        total = 0
        for _, (n, path) in sorted(self._tile_files().items(), reverse=True):
            total += n
            if total > self.max_tiles and n != total:  # the newest scene is always kept
                path.unlink(missing_ok=True)

    def tiles(self, seqs: list[int], cap: int) -> np.ndarray | None:
        """Model-input tiles [n,C,H,W] (every scale) of the scenes ``seqs``, newest first, at
        most ``cap``; None when none are kept."""
        kept = self._tile_files()
        out: list[np.ndarray] = []
        count = 0
        for seq in sorted(set(seqs) & set(kept), reverse=True):
            if count >= cap:
                break
            try:
                tiles = np.load(kept[seq][1])
            except (FileNotFoundError, OSError, ValueError):
                continue  # pruned meanwhile
            flat = tiles.reshape(-1, *tiles.shape[2:])[: cap - count]
            out.append(flat.astype(np.float32))
            count += len(flat)
        return np.concatenate(out) if out else None

    def load(self, key: str | None = None, features: bool = True) -> Candidates:
        """Cells computed under input ``key`` (or all); band moments of every stored scene."""
        feats, probs, scenes, bands = [], [], [], []
        seqs: list[int] = []
        sharps: list[np.ndarray] = []
        for seq, _, k, path in self._files():
            try:
                with np.load(path) as data:
                    scene_bands, scene_sharp = data["bands"], data["sharp"]
                    if features and (key is None or k == key):
                        feats.append(data["features"].astype(np.float32))
                        probs.append(data["probs"])
                        scenes.append(np.full(len(data["probs"]), str(data["scene"])))
            except (FileNotFoundError, OSError, ValueError, KeyError):
                continue  # pruned or damaged while we listed; the ring goes on without it
            bands.append(scene_bands)
            sharps.append(scene_sharp)
            seqs.append(seq)
        band_arr = np.stack(bands) if bands else np.zeros((0, 2, 1))
        sharp_arr = np.stack(sharps) if sharps else np.zeros((0, 1))
        if not feats:
            return Candidates(np.zeros((0, 1, 1), np.float32), np.zeros((0, 1), np.float32),
                              np.zeros(0, str), band_arr, sharp_arr, seqs)
        return Candidates(np.concatenate(feats), np.concatenate(probs), np.concatenate(scenes),
                          band_arr, sharp_arr, seqs)
