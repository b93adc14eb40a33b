"""Find the images under an input folder: a fast, deterministic, safe recursive walk.

The rules, in the order they apply:

* Image files are those whose extension is one of ``IMAGE_EXTENSIONS``, in any case (``.JPG`` too).
* Hidden entries are skipped, folders with everything under them: a name starting with ``.``, and on
  Windows an entry with the hidden attribute.
* Symbolic links (and Windows junctions) are followed only when their resolved target lies inside the
  input root. A link pointing out of the root, a broken link and a link to something that is neither
  a file nor a folder are ignored.
* Every real folder is walked at most once, so link loops cannot happen: the plain folders are walked
  first, then the linked folders (in path order) whose target was not walked yet. A link to a folder
  already walked therefore adds nothing; a link to a file is an alias and is listed under its own name.
* A folder that cannot be read (permission denied) is skipped and listed in ``Discovery.unreadable``.
* ``include`` / ``exclude`` globs select on the relative path (see ``glob_to_regex``); an empty
  ``include`` selects everything, and ``exclude`` wins over ``include``.
* Items come sorted by relative path (code point order), which makes runs reproducible.
* Two relative paths equal once case and Unicode normalisation are ignored (``a.JPG`` and ``a.jpg``)
  would write the same mask on Windows or macOS: one is kept, the others are reported in
  ``Discovery.collisions`` and left out of ``items``. The kept one is the path named in ``keep`` (an
  image that already has a result: a newcomer never demotes it), else the first in order.
* A name that is not valid UTF-8 (Latin-1 bytes on a Linux share) is listed as Python decodes it
  (``os.fsdecode``): it opens again as the same file, and the store keeps its bytes.

This module is imported by the parent process: it must never import torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .errors import ConfigError
from .records import Item

__all__ = ["Discovery", "IMAGE_EXTENSIONS", "check_input_folder", "discover", "file_sha256", "glob_to_regex"]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "tif", "tiff", "bmp", "webp"})

_HASH_CHUNK = 1 << 20
_IS_WINDOWS = sys.platform == "win32"
_HIDDEN = getattr(stat, "FILE_ATTRIBUTE_HIDDEN", 2)
_REPARSE_POINT = getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0x400)


@dataclass
class Discovery:
    """What ``discover`` found.

    ``items``: the images to process, sorted by path. ``collisions``: relative path -> the kept path it
    clashes with on a case-insensitive disk. ``excluded``: image paths left out by include/exclude.
    ``unreadable``: relative paths of the folders that could not be read and were skipped.
    """

    items: list[Item]
    collisions: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


#: One image found: (relative path, size, mtime in ns, where to read its bytes: a link's target for
#: a linked file; None when nothing will read it). Tuples: a folder of a million images is a
#: million of these, and a tuple costs a third of an object's memory and time.
_Found = tuple[str, int, int, str | None]


def discover(
    root: str | os.PathLike[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    with_hash: bool = False,
    skip: Iterable[str | os.PathLike[str]] = (),
    keep: Container[str] = frozenset(),
) -> Discovery:
    """Walk ``root`` recursively and return its images (rules in the module docstring).

    ``skip`` names folders never to walk, typically the output folder when it lies inside the input.
    ``keep``: relative paths that win a name clash (those with a result already).
    With ``with_hash`` every item gets the sha256 hex of its content (read in 1 MiB chunks); a file
    that cannot be read for hashing keeps ``content_hash=None`` and fails later as an invalid image.
    Raises ``ConfigError`` if ``root`` is missing, not a folder, or unreadable.
    """
    root_real = check_input_folder(root)
    walker = _Walker(root_real, {_norm(os.path.realpath(p)) for p in skip}, with_real_path=with_hash)
    walker.walk()
    found = walker.found
    walker.found = []
    found.sort(key=_rel_of)

    included = _compile(include)
    excluded_rx = _compile(exclude)
    excluded: list[str] = []
    if included or excluded_rx:
        kept: list[_Found] = []
        for f in found:
            if (included and not _matches(included, f[0])) or _matches(excluded_rx, f[0]):
                excluded.append(f[0])
            else:
                kept.append(f)
        found = kept

    found, collisions = _drop_collisions(found, keep)
    if with_hash:
        items = [
            Item(rel, size, mtime, file_sha256(real or os.path.join(root_real, rel)))
            for rel, size, mtime, real in found
        ]
    else:
        items = [Item(rel, size, mtime) for rel, size, mtime, _ in found]
    return Discovery(items, collisions, excluded, sorted(walker.unreadable))


def _rel_of(found: _Found) -> str:
    return found[0]


def check_input_folder(root: str | os.PathLike[str]) -> str:
    path = os.fspath(root)
    if not os.path.exists(path):
        raise ConfigError(
            f"The input folder {path} does not exist; check the path (a network share: is it mounted?)."
        )
    if not os.path.isdir(path):
        raise ConfigError(f"The input {path} is a file, not a folder; give the folder that holds the images.")
    real = os.path.realpath(path)
    try:
        with os.scandir(real):
            pass
    except OSError as exc:
        raise ConfigError(
            f"The input folder {path} cannot be read ({exc.strerror}); check its permissions."
        ) from exc
    return real


def _norm(path: str) -> str:
    """Comparable form of a real path (Windows paths compare without case)."""
    return os.path.normcase(path)


class _Walker:
    """One walk: plain folders depth-first, then linked folders round by round."""

    def __init__(self, root_real: str, skip: set[str], *, with_real_path: bool = True) -> None:
        self.root_real = root_real
        self.with_real_path = with_real_path
        self.root_prefix = _norm(root_real).rstrip(os.sep) + os.sep
        self.visited: set[str] = set(skip)
        self.found: list[_Found] = []
        self.unreadable: list[str] = []
        self.linked_dirs: list[tuple[str, str]] = []  # (rel of the link, real target)

    def walk(self) -> None:
        self._walk_tree(self.root_real, "")
        while self.linked_dirs:
            pending, self.linked_dirs = sorted(self.linked_dirs), []
            for rel, target in pending:
                self._walk_tree(target, rel + "/")

    def _inside(self, real: str) -> bool:
        return (_norm(real) + os.sep).startswith(self.root_prefix)

    def _walk_tree(self, top_real: str, top_prefix: str) -> None:
        stack = [(top_real, top_prefix)]
        while stack:
            real, prefix = stack.pop()
            key = _norm(real)
            if key in self.visited:
                continue
            self.visited.add(key)
            stack.extend(self._scan(real, prefix))

    def _scan(self, real: str, prefix: str) -> list[tuple[str, str]]:
        """List one folder: record its images, return its plain subfolders (real path, rel prefix)."""
        subdirs: list[tuple[str, str]] = []
        try:
            with os.scandir(real) as it:
                if _IS_WINDOWS:
                    for entry in it:
                        sub = self._entry(entry, prefix)
                        if sub is not None:
                            subdirs.append(sub)
                else:
                    self._scan_posix(it, prefix, subdirs)
        except OSError:
            self.unreadable.append(prefix.rstrip("/") or ".")
        return subdirs

    def _scan_posix(
        self, entries: Iterator[os.DirEntry[str]], prefix: str, subdirs: list[tuple[str, str]]
    ) -> None:
        """``_entry``'s rules in one loop (a folder of a million images pays per entry): no hidden
        attribute, and the entry's type comes with the listing, so only an image costs a stat."""
        found, real_path = self.found, self.with_real_path
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_symlink():
                    self._link(entry, prefix)
                elif entry.is_dir(follow_symlinks=False):
                    subdirs.append((entry.path, prefix + name + "/"))
                elif _is_image_name(name) and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    found.append(
                        (prefix + name, st.st_size, st.st_mtime_ns, entry.path if real_path else None)
                    )
            except OSError:
                pass  # vanished or unreadable between listing and stat: not an image we can offer

    def _entry(self, entry: os.DirEntry[str], prefix: str) -> tuple[str, str] | None:
        name = entry.name
        if name.startswith("."):
            return None
        try:
            if _IS_WINDOWS:
                attrs = entry.stat(follow_symlinks=False).st_file_attributes  # type: ignore[attr-defined]
                if attrs & _HIDDEN:
                    return None
                is_link = entry.is_symlink() or bool(attrs & _REPARSE_POINT)
            else:
                is_link = entry.is_symlink()
            if is_link:
                self._link(entry, prefix)
                return None
            if entry.is_dir(follow_symlinks=False):
                return entry.path, prefix + name + "/"
            if _is_image_name(name) and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                real = entry.path if self.with_real_path else None
                self.found.append((prefix + name, st.st_size, st.st_mtime_ns, real))
        except OSError:
            pass  # vanished or unreadable between listing and stat: not an image we can offer
        return None

    def _link(self, entry: os.DirEntry[str], prefix: str) -> None:
        target = os.path.realpath(entry.path)
        if not self._inside(target):
            return
        rel = prefix + entry.name
        st = os.stat(target)
        if stat.S_ISDIR(st.st_mode):
            self.linked_dirs.append((rel, target))
        elif stat.S_ISREG(st.st_mode) and _is_image_name(entry.name):
            self.found.append((rel, st.st_size, st.st_mtime_ns, target))


def _is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot + 1 :].lower() in IMAGE_EXTENSIONS


def _collision_key(rel: str) -> str:
    # NTFS and APFS ignore case; APFS also ignores Unicode normalisation (NFC vs NFD).
    if rel.isascii() and rel.islower():
        return rel  # its own key (no new string): the usual name
    return unicodedata.normalize("NFC", rel).lower()


def _drop_collisions(found: list[_Found], keep: Container[str]) -> tuple[list[_Found], dict[str, str]]:
    """Keep one path per collision key: the first in ``keep``, else the first in order. ``keep``
    is asked only about the paths of a clash."""
    keys = [_collision_key(f[0]) for f in found]
    if len(set(keys)) == len(keys):
        return found, {}  # no clash: the usual folder
    winner: dict[str, str] = {}
    for f, key in zip(found, keys, strict=True):
        if key not in winner or (f[0] in keep and winner[key] not in keep):
            winner[key] = f[0]
    kept: list[_Found] = []
    collisions: dict[str, str] = {}
    for f, key in zip(found, keys, strict=True):
        chosen = winner[key]
        if chosen == f[0]:
            kept.append(f)
        else:
            collisions[f[0]] = chosen
    return kept, collisions


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """sha256 hex of a file's content, read in chunks; None if the file cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile an include/exclude glob; matched against the whole relative path, ignoring case.

    The language (the same on every OS):

    * ``*`` matches any run of characters except ``/``; ``?`` matches one character except ``/``.
    * ``[abc]``, ``[a-z]``, ``[!abc]`` match one character of (or not of) the set, never ``/``.
    * ``**`` as a whole path segment matches any number of folders: ``**/`` matches zero or more
      leading folders (``**/*.png`` matches ``a.png`` and ``x/y/a.png``), and a trailing ``/**``
      matches everything below (``raw/**`` matches every file under ``raw``).
    * A pattern without ``/`` is matched against the file name alone, at any depth
      (``*.tif`` and ``IMG_*`` select files in every folder).
    * A leading ``/`` anchors the pattern at the input root (``/*.png``: top-level files only).
    * Matching ignores case, like the image extensions, so a job file means the same on every OS.
    * Backslashes in the pattern are read as ``/``.
    """
    pat = pattern.replace("\\", "/").strip()
    if pat.startswith("/"):
        pat = pat.lstrip("/")
    elif "/" not in pat:
        pat = "**/" + pat
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        if pat.startswith("**/", i) and (i == 0 or pat[i - 1] == "/"):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("**", i) and (i == 0 or pat[i - 1] == "/") and i + 2 == n:
            out.append(".*")
            i += 2
        elif pat[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pat[i] == "?":
            out.append("[^/]")
            i += 1
        elif pat[i] == "[":
            cls, i = _char_class(pat, i)
            out.append(cls)
        else:
            out.append(re.escape(pat[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.IGNORECASE | re.DOTALL)


def _char_class(pat: str, i: int) -> tuple[str, int]:
    """Translate ``[...]`` starting at ``pat[i]``; a ``[`` without its ``]`` is a literal."""
    j = i + 1
    if j < len(pat) and pat[j] == "!":
        j += 1
    if j < len(pat) and pat[j] == "]":
        j += 1
    j = pat.find("]", j)
    if j < 0:
        return re.escape("["), i + 1
    body = pat[i + 1 : j]
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    body = body.replace("\\", "\\\\").replace("^", "\\^")
    return ("[^/" + body + "]" if negate else "(?!/)[" + body + "]"), j + 1


def _compile(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    return [glob_to_regex(p) for p in patterns if p.strip()]


def _matches(regexes: list[re.Pattern[str]], rel: str) -> bool:
    return any(rx.match(rel) for rx in regexes)
