"""Bringing an entry log written by an earlier version to the current layout, when opened.

Boxes in the field keep their index across upgrades, so every earlier layout of
``state/index.sqlite`` is converted, never refused. Layouts, oldest first:

1. one ``entries`` table holding everything, float32 vectors included;
2. the same with a ``labels`` column (multi-label bundles);
3. vectors as float16 in their own table (``retrieval.vector_table``);
4. what a scene's cells share in ``scenes`` and class names in ``names``
   (``retrieval.scene_table``), cells' projected bounds computed from the scene's affine.

Each step runs in one transaction, so a crash leaves the log in the layout before the
step or after it, and the next open goes on from there. Ids and the ``AUTOINCREMENT``
high-water mark are kept: an id names the same entry before and after, so the faiss
checkpoint stays valid and ids are still never reused.

The step to layout 4 recovers each scene's affine from its cells' windows and bounds,
assuming a north-up grid (what the pipeline writes for every scene it reads); a scene
whose cells do not fit one such grid keeps its cells without projected bounds (their
lon/lat bounds are kept), logged with a count. Indexing the scene again restores them.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from itertools import groupby
from typing import Any

import numpy as np

from appliance.contract.durable import transaction
from appliance.retrieval import scene_table, vector_table
from appliance.retrieval.scene_table import encode_transform
from appliance.scene.cells import Affine6, windows_bounds

log = logging.getLogger(__name__)

_OLD_INDEXES = ("entries_scene", "entries_class", "entries_ts")


def upgrade(db: sqlite3.Connection, schema: str) -> None:
    """Convert a log of any earlier layout to the current one, whose tables ``schema``
    creates; a new or current log is left as it is."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(entries)")}
    if not columns or "scene" in columns:
        return
    if "labels" not in columns:
        with transaction(db):
            db.execute("ALTER TABLE entries ADD COLUMN labels TEXT")
    vector_table.create(db)
    vector_table.migrate(db)
    _to_scene_table(db, schema)


def _to_scene_table(db: sqlite3.Connection, schema: str) -> None:
    with transaction(db):
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
        db.execute("DROP TRIGGER IF EXISTS entries_drop_vector")
        for name in _OLD_INDEXES:
            db.execute(f"DROP INDEX IF EXISTS {name}")
        db.execute("ALTER TABLE entries RENAME TO entries_old")
        for statement in schema.split(";"):
            if statement.strip():
                db.execute(statement)
        for statement in scene_table.SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        transforms, unfit = _fit_transforms(db.execute(
            "SELECT scene_id, col, row, width, height, minx, miny, maxx, maxy "
            "FROM entries_old WHERE col IS NOT NULL AND minx IS NOT NULL ORDER BY scene_id"))
        scenes = db.execute("SELECT scene_id, MIN(source), MIN(crs), MAX(ts) FROM entries_old "
                            "GROUP BY scene_id ORDER BY MIN(id)").fetchall()
        db.executemany(
            "INSERT INTO scenes (scene_id, source, crs, transform, ts) VALUES (?, ?, ?, ?, ?)",
            ((sid, source, crs, encode_transform(transforms.get(sid)), ts)
             for sid, source, crs, ts in scenes))
        db.execute("INSERT OR IGNORE INTO names (name) SELECT DISTINCT class FROM entries_old "
                   "WHERE class IS NOT NULL ORDER BY class")
        moved = db.execute(
            "INSERT INTO entries (id, scene, col, row, width, height, lon_min, lat_min, "
            "lon_max, lat_max, class, confidence, label, labels) "
            "SELECT o.id, s.key, o.col, o.row, o.width, o.height, o.lon_min, o.lat_min, "
            "o.lon_max, o.lat_max, n.key, o.confidence, o.label, o.labels "
            "FROM entries_old o JOIN scenes s ON s.scene_id = o.scene_id "
            "LEFT JOIN names n ON n.name = o.class ORDER BY o.id").rowcount
        db.execute("DROP TABLE entries_old")
        if seq is not None:
            db.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'entries'",
                       (int(seq[0]),))
    log.info("index: moved %d entries of %d scenes to the scene table layout",
             moved, len(scenes))
    if unfit:
        log.warning("index: %d scene(s) do not lie on a north-up grid; their cells keep "
                    "their lon/lat bounds but no projected bounds until indexed again",
                    len(unfit))


def _fit_transforms(rows: Iterable[tuple[Any, ...]]) -> tuple[dict[str, Affine6], list[str]]:
    """Each scene's north-up affine, recovered from its cells' windows and projected
    bounds (rows sorted by scene) and checked against every cell; the scenes that fit
    none go to the second list."""
    fitted: dict[str, Affine6] = {}
    unfit: list[str] = []
    for sid, group in groupby(rows, key=lambda r: str(r[0])):
        transform = _north_up(np.asarray([r[1:] for r in group], np.float64))
        if transform is None:
            unfit.append(sid)
        else:
            fitted[sid] = transform
    return fitted, unfit


def _north_up(cells: np.ndarray) -> Affine6 | None:
    """The north-up affine that gives every ``[col, row, w, h, minx, miny, maxx, maxy]``
    row its bounds, or ``None`` if there is none."""
    col, row, w, h, minx, miny, maxx, maxy = cells[0]
    if w <= 0 or h <= 0:
        return None
    a, e = (maxx - minx) / w, -(maxy - miny) / h
    transform = (a, 0.0, minx - col * a, 0.0, e, maxy - row * e)
    again = windows_bounds(cells[:, :4], transform)
    scale = max(abs(a), abs(e), 1e-12)
    if not np.allclose(again, cells[:, 4:], rtol=0.0, atol=1e-6 * scale):
        return None
    return transform
