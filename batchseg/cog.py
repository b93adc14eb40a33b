"""Label maps as cloud-optimized GeoTIFFs (COG), written block by block.

The layout is the one GDAL's COG driver writes and its validator checks: the TIFF header, GDAL's
structural metadata ("ghost area": ``LAYOUT=IFDS_BEFORE_DATA``), every IFD (full resolution first,
then the overviews, largest first), then the tile data of the smallest overview first and of the
full resolution last, tiles row-major within each. A reader of a remote file gets every IFD in its
first request and an overview's tiles together. Each tile has GDAL's leader (its size) and
trailer (its last 4 bytes again), so GDAL reports ``LAYOUT=COG`` and reads a tile in one request.
Tiles are 512 x 512, DEFLATE with the horizontal predictor; overviews halve each side until one
tile holds the image, sampled by nearest neighbour (GDAL's pixel choice), so every overview pixel
is a label of the map, never a blend of two.

Memory stays flat in the image's area: a ``Painter`` fills one block at a time, at full resolution
or sampled for an overview, and each block is compressed and written as it is made. Tile offsets
and byte counts are known only once written: their arrays are reserved in the IFDs and filled in at
the end. Extra tags (a GeoTIFF's keys, GDAL's nodata) go to the full-resolution IFD.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import numpy as np

from .atomic import atomic_path

__all__ = [
    "BLOCK",
    "Painter",
    "Tag",
    "encode_block",
    "in_order",
    "level_sizes",
    "nodata_tag",
    "value_bytes",
    "write_cog",
    "write_cog_atomically",
]

#: Side of the TIFF's internal tiles: GDAL's and QGIS's usual block size.
BLOCK = 512
#: Threads painting and compressing blocks (at most half the machine's cores, or two: other workers
#: may be running their engines meanwhile).
_WRITE_THREADS = 8
#: BigTIFF when the uncompressed blocks of every level would pass this (a classic TIFF's offsets end
#: at 4 GiB; DEFLATE can only grow a block by a few bytes).
_BIGTIFF_FROM = 2**31
_GHOST = (
    "LAYOUT=IFDS_BEFORE_DATA\nBLOCK_ORDER=ROW_MAJOR\nBLOCK_LEADER=SIZE_AS_UINT4\n"
    "BLOCK_TRAILER=LAST_4_BYTES_REPEATED\nKNOWN_INCOMPATIBLE_EDITION=NO\n"
)

# TIFF field types
_ASCII, _SHORT, _LONG, _DOUBLE, _LONG8 = 2, 3, 4, 12, 16
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8}


@dataclass(frozen=True)
class Tag:
    """A TIFF tag: its code, field type, value count and the values packed little-endian."""

    code: int
    kind: int
    count: int
    data: bytes


def value_bytes(kind: int, count: int) -> int:
    """Bytes that ``count`` values of TIFF field type ``kind`` take."""
    return count * _TYPE_SIZE[kind]


def nodata_tag(value: int) -> Tag:
    """GDAL's nodata tag (42113, ASCII)."""
    text = f"{value}\0".encode()
    return Tag(42113, _ASCII, len(text), text)


class Painter(Protocol):
    """Fills ``out`` (len(rows) x len(cols), zeros) with the labels at source columns ``cols`` and
    rows ``rows`` (sorted int64 arrays); returns False when it painted nothing."""

    def __call__(self, out: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> bool: ...


def level_sizes(width: int, height: int) -> list[tuple[int, int, int]]:
    """(width, height, factor) of the full resolution and of each overview, as GDAL's COG driver
    makes them: the factor doubles until the overview fits one block."""
    sizes = [(width, height, 1)]
    factor = 1
    while max(-(-width // factor), -(-height // factor)) > BLOCK:
        factor *= 2
        sizes.append((-(-width // factor), -(-height // factor), factor))
    return sizes


def _samples(start: int, n: int, factor: int, limit: int) -> np.ndarray:
    """Source indices of overview pixels start..start+n-1: the pixel nearest each one's centre."""
    idx = np.arange(start, start + n, dtype=np.int64) * factor + factor // 2
    return np.minimum(idx, limit - 1) if factor > 1 else idx


def write_cog(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    dtype: type[np.unsignedinteger],
    paint: Painter,
    tags: Sequence[Tag] = (),
) -> None:
    """Write the label map ``paint`` draws as a COG at ``path`` (not atomic: give a temp path)."""
    levels = level_sizes(width, height)
    itemsize = np.dtype(dtype).itemsize
    raw = sum(_grid(w, h)[0] * _grid(w, h)[1] for w, h, _ in levels) * BLOCK * BLOCK * itemsize
    layout = _Layout(levels, itemsize, raw >= _BIGTIFF_FROM, sorted(tags, key=lambda t: t.code))
    empty = encode_block(np.zeros((BLOCK, BLOCK), dtype))
    with open(path, "wb") as fh:
        fh.write(layout.head())
        offsets: list[list[int]] = [[] for _ in levels]
        counts: list[list[int]] = [[] for _ in levels]
        for index in range(len(levels) - 1, -1, -1):  # smallest overview first, full resolution last
            w, h, factor = levels[index]

            def block(x: int, y: int, factor: int = factor, w: int = w, h: int = h) -> bytes:
                out = np.zeros((BLOCK, BLOCK), dtype)  # edge blocks are padded, as TIFF tiles are
                cols = _samples(x, min(BLOCK, w - x), factor, width)
                rows = _samples(y, min(BLOCK, h - y), factor, height)
                painted = paint(out[: rows.size, : cols.size], cols, rows)
                return encode_block(out) if painted else empty  # most blocks: compressed once

            corners = ((x, y) for y in range(0, h, BLOCK) for x in range(0, w, BLOCK))
            for data in in_order(block, corners):
                fh.write(struct.pack("<I", len(data)))  # GDAL's block leader: the size
                offsets[index].append(fh.tell())
                counts[index].append(len(data))
                fh.write(data)
                fh.write(data[-4:])  # and its trailer: the last 4 bytes again
        layout.fill(fh, offsets, counts)
        fh.flush()
        os.fsync(fh.fileno())


def write_cog_atomically(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    dtype: type[np.unsignedinteger],
    paint: Painter,
    tags: Sequence[Tag] = (),
) -> None:
    """``write_cog`` to a temp name beside ``path``, renamed into place once complete."""
    with atomic_path(path) as tmp:
        write_cog(tmp, width, height, dtype, paint, tags)


def _grid(width: int, height: int) -> tuple[int, int]:
    return -(-width // BLOCK), -(-height // BLOCK)


class _Layout:
    """The header, ghost area and IFDs of a COG, with the places of each level's tile arrays."""

    def __init__(
        self, levels: Sequence[tuple[int, int, int]], itemsize: int, bigtiff: bool, tags: Sequence[Tag]
    ) -> None:
        self.levels, self.itemsize, self.big, self.tags = levels, itemsize, bigtiff, tags
        self.offset_kind = _LONG8 if bigtiff else _LONG
        self.arrays: list[tuple[int, int]] = []  # per level: file positions of offsets and counts

    def head(self) -> bytes:
        big = self.big
        header = b"II" + (struct.pack("<HHHQ", 43, 8, 0, 0) if big else struct.pack("<HI", 42, 0))
        ghost = _GHOST.encode()
        ghost = f"GDAL_STRUCTURAL_METADATA_SIZE={len(ghost):06d} bytes\n".encode() + ghost
        position = len(header) + len(ghost)
        position += position % 2  # IFDs start on a word boundary
        first = position
        ifds = b""
        for index in range(len(self.levels)):
            last = index == len(self.levels) - 1
            ifd, arrays = self._ifd(index, position, last)
            self.arrays.append(arrays)
            ifds += ifd
            position += len(ifd)
        header = header[:-8] + struct.pack("<Q", first) if big else header[:-4] + struct.pack("<I", first)
        pad = b"\0" * (first - len(header) - len(ghost))
        return header + ghost + pad + ifds

    def _ifd(self, index: int, at: int, last: bool) -> tuple[bytes, tuple[int, int]]:
        """One IFD at file position ``at`` (its out-of-line values after it), and the positions of
        its tile offsets and byte counts."""
        width, height, _ = self.levels[index]
        columns, rows = _grid(width, height)
        n = columns * rows
        size = _TYPE_SIZE[self.offset_kind]
        entries = [
            _short_or_long(254, _LONG, 0 if index == 0 else 1),  # NewSubfileType: 1 = reduced image
            _short_or_long(256, _LONG, width),
            _short_or_long(257, _LONG, height),
            _short_or_long(258, _SHORT, 8 * self.itemsize),
            _short_or_long(259, _SHORT, 8),  # DEFLATE
            _short_or_long(262, _SHORT, 1),  # min-is-black
            _short_or_long(277, _SHORT, 1),
            _short_or_long(284, _SHORT, 1),
            _short_or_long(317, _SHORT, 2),  # horizontal predictor
            _short_or_long(322, _SHORT, BLOCK),
            _short_or_long(323, _SHORT, BLOCK),
            Tag(324, self.offset_kind, n, bytes(n * size)),
            Tag(325, self.offset_kind, n, bytes(n * size)),
            _short_or_long(339, _SHORT, 1),  # unsigned integers
        ]
        extra = list(self.tags) if index == 0 else [t for t in self.tags if t.code == 42113]
        entries = sorted(entries + extra, key=lambda t: t.code)
        entry_size, count_fmt, next_fmt = (20, "<Q", "<Q") if self.big else (12, "<H", "<I")
        inline = 8 if self.big else 4
        body = struct.pack(count_fmt, len(entries))
        values_at = at + len(body) + entry_size * len(entries) + struct.calcsize(next_fmt)
        values = b""
        arrays = [0, 0]
        for tag in entries:
            body += struct.pack("<HH", tag.code, tag.kind)
            body += struct.pack("<Q" if self.big else "<I", tag.count)
            if len(tag.data) <= inline:
                where, field = at + len(body), tag.data.ljust(inline, b"\0")
            else:
                values += b"\0" * (len(values) % 2)  # values start on a word boundary
                where = values_at + len(values)
                field = struct.pack("<Q" if self.big else "<I", where)
                values += tag.data
            if tag.code in (324, 325):
                arrays[tag.code - 324] = where
            body += field
        next_at = 0 if last else values_at + len(values) + len(values) % 2
        body += struct.pack(next_fmt, next_at)
        return body + values + b"\0" * (len(values) % 2), (arrays[0], arrays[1])

    def fill(self, fh: BinaryIO, offsets: Sequence[Sequence[int]], counts: Sequence[Sequence[int]]) -> None:
        """Write each level's tile offsets and byte counts into the places reserved for them."""
        fmt = "<Q" if self.big else "<I"
        for (offsets_at, counts_at), level_offsets, level_counts in zip(
            self.arrays, offsets, counts, strict=True
        ):
            fh.seek(offsets_at)
            fh.write(b"".join(struct.pack(fmt, v) for v in level_offsets))
            fh.seek(counts_at)
            fh.write(b"".join(struct.pack(fmt, v) for v in level_counts))


def _short_or_long(code: int, kind: int, value: int) -> Tag:
    return Tag(code, kind, 1, struct.pack("<H" if kind == _SHORT else "<I", value))


def in_order(make: Callable[[int, int], bytes], corners: Iterator[tuple[int, int]]) -> Iterator[bytes]:
    """``make(x, y)`` for every block, in order, made by a few threads (numpy's sums and zlib let go
    of the GIL: a dense 20000 x 20000 map took 4 s in one thread), with a bounded number in flight
    so that memory stays a few blocks, whatever the map's size."""
    cores = os.cpu_count() or 1
    threads = min(_WRITE_THREADS, cores, max(2, cores // 2))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="batchseg-labels") as pool:
        pending: deque[Future[bytes]] = deque()
        for x, y in corners:
            pending.append(pool.submit(make, x, y))
            if len(pending) >= 4 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def encode_block(block: np.ndarray) -> bytes:
    """One TIFF tile: the horizontal predictor (differences along each row, modulo the type's
    range), then DEFLATE level 1 with the run-length strategy, which suits label maps (zeros and
    flat blobs) and costs about half of level 6."""
    little = block.astype(block.dtype.newbyteorder("<"), copy=False)
    diff = np.empty_like(little)
    diff[:, 0] = little[:, 0]
    np.subtract(little[:, 1:], little[:, :-1], out=diff[:, 1:])
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return deflate.compress(diff.data) + deflate.flush()  # the array's buffer: no copy to bytes
