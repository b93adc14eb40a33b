"""The finished tiles of an image not yet merged, kept on disk so a killed run does not redo them.

While tiles finish the worker writes their detections (window RLE, prompt, score, box, area) to
``OUTPUT/tiles-in-progress/<relative path>/batch-<first tile>.json``, atomically (every second
and at the end of each batch: ``worker.tiling``). When the
image is processed again (the run was killed, the worker crashed, a tile failed), the tiles found
there are not run again. Each file carries a key (the input's size, mtime and hash, the run's
configuration fingerprint, the batchseg version and the tile plan); a file whose key differs is
ignored, so a changed image or other settings never reuse old tiles. A changed image is one the
run sees as changed: another size or mtime, or with ``--hash`` other content (the hash is None
without it), as for whole images. The folder goes when the image's label map is written.
Torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..records import Detection

__all__ = ["PROGRESS_DIR", "TileProgress"]

#: Folder of OUTPUT holding the finished tiles of images not merged yet.
PROGRESS_DIR = "tiles-in-progress"


class TileProgress:
    """Finished tiles of one image under ``folder``, valid for ``key`` only."""

    def __init__(self, folder: Path, key: Mapping[str, Any]) -> None:
        self.folder = folder
        self.key = json.loads(json.dumps(dict(key), sort_keys=True))  # as it reads back

    def load(self) -> dict[str, list[Detection]]:
        """Tile id -> its detections, from every readable file with this key."""
        return self.load_new(set())

    def load_new(self, seen: set[str]) -> dict[str, list[Detection]]:
        """``load`` from the files not named in ``seen``, adding to ``seen`` the files read: a merge
        that follows the folder while tiles finish reads each file once."""
        found: dict[str, list[Detection]] = {}
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".json") and n not in seen)
        except OSError:
            return found
        for name in names:
            try:
                data = json.loads((self.folder / name).read_text(encoding="utf-8"))
                if data.get("key") != self.key:
                    continue
                for tile_id, rows in data["tiles"].items():
                    found[tile_id] = [_detection(*row) for row in rows]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # unreadable: those tiles are simply run again
            seen.add(name)
        return found

    def kept_ids(self, known: dict[str, tuple[tuple[int, int], frozenset[str]]]) -> set[str]:
        """The ids of the tiles kept with this key. ``known`` (file name -> its (mtime_ns, size) and
        the ids it holds) is what an earlier call read: only new or changed files are read again,
        and files gone are forgotten, so asking once per tile costs a listing, not a re-read."""
        try:
            files = {e.name: e for e in os.scandir(self.folder) if e.name.endswith(".json")}
        except OSError:
            files = {}
        for name in [n for n in known if n not in files]:
            del known[name]
        for name, entry in files.items():
            try:
                stat = entry.stat()
            except OSError:
                known.pop(name, None)
                continue
            signature = (stat.st_mtime_ns, stat.st_size)
            if name not in known or known[name][0] != signature:
                known[name] = (signature, self._ids_in(name))
        return set().union(*(ids for _, ids in known.values()))

    def _ids_in(self, name: str) -> frozenset[str]:
        try:
            data = json.loads((self.folder / name).read_text(encoding="utf-8"))
            return frozenset(data["tiles"]) if data.get("key") == self.key else frozenset()
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return frozenset()  # unreadable: its tiles are run again, as ``load`` would have it

    def save(self, first: str, tiles: Mapping[str, Sequence[Detection]]) -> None:
        """Keep a batch of finished tiles (named by its first tile); OSError when it cannot."""
        rows = {
            tile_id: [
                [d.prompt, d.index, d.score, list(d.box), d.area_px, d.mask_rle, list(d.folded)]
                for d in detections
            ]
            for tile_id, detections in tiles.items()
        }
        blob = json.dumps({"key": self.key, "tiles": rows}, separators=(",", ":")).encode()
        atomic_write_bytes(self.folder / f"batch-{first}.json", blob)

    def clear(self) -> None:
        """Remove the image's folder (and parents left empty, up to ``PROGRESS_DIR``)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        while parent.name and PROGRESS_DIR in parent.parts:
            try:
                parent.rmdir()
            except OSError:
                break
            if parent.name == PROGRESS_DIR:
                break
            parent = parent.parent


def _detection(
    prompt: str, index: int, score: float, box: list[float], area: int, counts: str, *folded: list[str]
) -> Detection:
    """A kept row; the prompts folded into it are its seventh field (absent in older files)."""
    names = tuple(str(name) for name in folded[0]) if folded else ()
    box4 = (box[0], box[1], box[2], box[3])
    return Detection(prompt, int(index), float(score), box4, int(area), str(counts), folded=names)
