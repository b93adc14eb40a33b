"""``manifest/polygons.parquet`` (``--vectors``): the per-image part files workers wrote beside the
label maps, combined at each manifest export from the same checkpoint snapshot as the other two files.

Only images whose status is ``ok`` count, so the part of an image that failed later, went missing or
is being redone is left out. An ``ok`` image with detections but no part file (processed before
``--vectors`` was given) gets its part made here from its label map, its detections and the
georeference stored in its row, so turning ``--vectors`` on for an output folder covers every image.
Run id, model and class (``--class``) are set here for every row. Imports the geo extra only when called.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from .. import imageio
from ..prompting import classes_of
from ..records import Detection
from .tables import MANIFEST_DIR, path_from

__all__ = ["POLYGONS_FILE", "export_polygons"]

POLYGONS_FILE = "polygons.parquet"

_OK_IMAGES = (
    "SELECT path, path_raw, n_detections, mask_path, width, height, crs_wkt, crs_epsg, transform,"
    " georef_source FROM images WHERE status='ok' ORDER BY path"
)
_DETECTIONS = (
    "SELECT prompt, idx, score, box_x0, box_y0, box_x1, box_y1, area_px FROM detections"
    " WHERE path=? ORDER BY idx"
)


def export_polygons(
    conn: sqlite3.Connection, output_dir: Path, run_id: str, model: str, config: dict[str, Any]
) -> int:
    """Write ``manifest/polygons.parquet`` (to a temp name, swapped into place); returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..geo.vectors import write_polygons

    tables = []
    for row in conn.execute(_OK_IMAGES).fetchall():
        rel = path_from(row[0], row[1])
        part = imageio.safe_output_path(output_dir, imageio.polygons_relpath(rel))
        if not part.is_file():
            if not row[2] or row[3] is None:
                continue  # no detections, or no label map (tiles only): nothing to trace
            _backfill(conn, output_dir, rel, row, part, config)
        tables.append(pq.read_table(part))
    table = pa.concat_tables(tables) if tables else None
    if table is None:
        from ..geo.vectors import polygons_table

        table = polygons_table([])
    table = table.set_column(
        table.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * table.num_rows, pa.string())
    )
    table = table.set_column(
        table.schema.get_field_index("model"), "model", pa.array([model] * table.num_rows, pa.string())
    )
    classes = classes_of(config)  # the class of each prompt (--class), as the detections have it
    named = [classes.get(p, p) for p in table.column("prompt").to_pylist()]
    table = table.append_column("class", pa.array(named, pa.string()))
    return write_polygons(output_dir / MANIFEST_DIR / POLYGONS_FILE, table)


def _backfill(
    conn: sqlite3.Connection,
    output_dir: Path,
    rel: str,
    row: tuple[Any, ...],
    part: Path,
    config: dict[str, Any],
) -> None:
    """The part file of an image done without --vectors, from what the checkpoint and its label map hold."""
    from ..geo.georef import Georef
    from ..geo.vectors import DetectionInfo, image_polygons, write_polygons

    _path, _raw, _n, mask_path, width, height, crs_wkt, epsg, transform, source = row
    georef = None
    if transform is not None:
        six = tuple(float(v) for v in json.loads(transform))
        georef = Georef(six, crs_wkt, epsg, width, height, 1, "uint16", None, source)  # type: ignore[arg-type]
    detections = [
        Detection(prompt, idx, score, (x0, y0, x1, y1), area, "")
        for prompt, idx, score, x0, y0, x1, y1, area in conn.execute(_DETECTIONS, (row[0],))
    ]
    infos = [DetectionInfo(d.index, d.prompt, d.score, 1, d.box, d.area_px) for d in detections]
    rows = image_polygons(
        rel,
        imageio.safe_output_path(output_dir, mask_path),
        georef,
        infos,
        run_id="",
        model="",
        simplify=float(config.get("simplify") or 0.0),
    )
    write_polygons(part, rows)
