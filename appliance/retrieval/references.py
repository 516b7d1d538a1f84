"""Reference images: a folder of labelled chips indexed beside the scene cells.

Each image file under the folder becomes one entry of its own: ``scene_id =
"ref:<sha256 of the file>"`` (``REFERENCE_PREFIX``; re-adding a file replaces its entry),
``source`` = its path relative to the folder, ``label`` = its parent folder's name, and
``class`` = that name when it is one of the model's classes (case-insensitive), the
predicted class otherwise. Files are read as image queries are (``retrieval.image``).
Unreadable files are reported and skipped; the rest are indexed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from appliance.config import InputConfig
from appliance.contract.bundle import sha256_file
from appliance.contract.image_files import is_image
from appliance.model.runtime import ModelRuntime
from appliance.retrieval.entry_log import REFERENCE_PREFIX, Entry
from appliance.retrieval.image import read_tile
from appliance.retrieval.index import TileIndex
from appliance.retrieval.query import RequestError

BATCH = 32


def add_reference_images(root: Path, index: TileIndex, runtime: ModelRuntime,
                         input_cfg: InputConfig,
                         progress: Callable[[Path], None] | None = None
                         ) -> tuple[int, list[str]]:
    """Index every image under ``root``; returns (entries added, one line per skipped file).
    ``progress`` is told of each file once it has been read (or skipped)."""
    names = runtime.manifest.class_names
    by_lower = {n.lower(): n for n in names}
    added, skipped, seen = 0, [], set()
    batch: list[tuple[Path, str, np.ndarray]] = []

    def flush() -> int:
        if not batch:
            return 0
        inference = runtime.infer(np.stack([t for _, _, t in batch]))
        entries = []
        for (path, sid, _), p in zip(batch, inference.probs, strict=True):
            folder = path.parent.name if path.parent != root else None
            predicted = names[int(p.argmax())]
            entries.append(Entry(
                scene_id=sid, source=str(path.relative_to(root)), label=folder,
                class_name=by_lower.get(folder.lower(), predicted) if folder else predicted,
                confidence=float(p.max()),
            ))
        n = index.replace([e.scene_id for e in entries], entries, inference.embedding)
        batch.clear()
        return n

    for path in reference_files(root):
        if progress is not None:
            progress(path)
        try:
            sid = REFERENCE_PREFIX + sha256_file(path)
        except OSError as exc:
            skipped.append(f"{path}: unreadable: {exc}")
            continue
        if sid in seen:
            skipped.append(f"{path}: duplicate of a file already added in this run")
            continue
        seen.add(sid)
        try:
            batch.append((path, sid, read_tile(path, runtime.manifest.input, input_cfg)))
        except RequestError as exc:
            skipped.append(exc.message)
            continue
        if len(batch) >= BATCH:
            added += flush()
    added += flush()
    return added, skipped


def reference_files(root: Path) -> Iterator[Path]:
    """The image files under ``root``, in a stable order."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and is_image(path):
            yield path
