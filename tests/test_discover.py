"""discover(): what is found, in which order, and what is refused, on real folders."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from batchseg.discover import discover, glob_to_regex
from batchseg.errors import ConfigError


def touch(root: Path, rel: str, data: bytes = b"x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def paths(root: Path, **kwargs: object) -> list[str]:
    return [item.path for item in discover(root, **kwargs).items]  # type: ignore[arg-type]


def case_sensitive(folder: Path) -> bool:
    probe = folder / "CaseProbe"
    probe.write_bytes(b"")
    try:
        return not (folder / "caseprobe").exists()
    finally:
        probe.unlink()


needs_symlinks = pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")


def test_finds_images_recursively_sorted_with_forward_slashes(tmp_path: Path) -> None:
    for rel in ["b.jpg", "a/z.png", "a/b/c.tif", "A0.bmp", "a.webp", "c/d.jpeg", "x.tiff"]:
        touch(tmp_path, rel)
    assert paths(tmp_path) == sorted(
        ["b.jpg", "a/z.png", "a/b/c.tif", "A0.bmp", "a.webp", "c/d.jpeg", "x.tiff"]
    )


def test_extensions_match_in_any_case_and_others_are_ignored(tmp_path: Path) -> None:
    for rel in ["a.JPG", "b.Png", "c.TIFF", "d.jpeg", "e.txt", "f.gif", "g.jpg.txt", "noext", "jpg"]:
        touch(tmp_path, rel)
    assert paths(tmp_path) == ["a.JPG", "b.Png", "c.TIFF", "d.jpeg"]


def test_item_carries_size_and_mtime(tmp_path: Path) -> None:
    path = touch(tmp_path, "a.png", b"12345")
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (item,) = discover(tmp_path).items
    assert (item.path, item.size_bytes, item.mtime_ns, item.content_hash) == (
        "a.png",
        5,
        1_600_000_000_123_456_789,
        None,
    )


def test_hidden_files_and_folders_are_skipped(tmp_path: Path) -> None:
    for rel in [".hidden.jpg", ".cache/a.jpg", "ok/.thumb.png", "ok/.git/x.png", "ok/seen.png"]:
        touch(tmp_path, rel)
    assert paths(tmp_path) == ["ok/seen.png"]


def test_hash_is_sha256_of_content(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    touch(tmp_path, "big.jpg", data)
    touch(tmp_path, "small.png", b"abc")
    items = discover(tmp_path, with_hash=True).items
    assert [i.content_hash for i in items] == [
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(b"abc").hexdigest(),
    ]


def test_missing_root_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist; check the path"):
        discover(tmp_path / "nope")


def test_root_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    file = touch(tmp_path, "a.jpg")
    with pytest.raises(ConfigError, match=r"is a file, not a folder"):
        discover(file)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_unreadable_subfolder_is_skipped_and_reported(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg")
    touch(tmp_path, "locked/b.jpg")
    (tmp_path / "locked").chmod(0)
    try:
        found = discover(tmp_path)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert [i.path for i in found.items] == ["a.jpg"]
    assert found.unreadable == ["locked"]


def test_case_collisions_keep_the_first_and_report_the_rest(tmp_path: Path) -> None:
    if not case_sensitive(tmp_path):
        pytest.skip("the temp folder is on a case-insensitive disk")
    for rel in ["a.jpg", "a.JPG", "Dir/x.png", "dir/x.png", "dir/y.png", "b.png"]:
        touch(tmp_path, rel)
    found = discover(tmp_path)
    assert [i.path for i in found.items] == ["Dir/x.png", "a.JPG", "b.png", "dir/y.png"]
    assert found.collisions == {"dir/x.png": "Dir/x.png", "a.jpg": "a.JPG"}


def test_a_path_that_already_has_a_result_wins_its_clash(tmp_path: Path) -> None:
    if not case_sensitive(tmp_path):
        pytest.skip("the temp folder is on a case-insensitive disk")
    for rel in ["A.jpg", "a.jpg", "b.png"]:
        touch(tmp_path, rel)
    found = discover(tmp_path, keep={"a.jpg", "b.png"})
    assert [i.path for i in found.items] == ["a.jpg", "b.png"]
    assert found.collisions == {"A.jpg": "a.jpg"}


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="names are bytes on Linux")
def test_a_name_that_is_not_utf8_is_listed_and_opens_again(tmp_path: Path) -> None:
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(b"latin-1 name")
    (item,) = discover(tmp_path, with_hash=True).items
    assert os.fsencode(item.path) == b"caf\xe9.jpg"
    assert (tmp_path / item.path).read_bytes() == b"latin-1 name"
    assert item.content_hash == hashlib.sha256(b"latin-1 name").hexdigest()


def test_unicode_normalisation_collisions(tmp_path: Path) -> None:
    nfc, nfd = "caf\u00e9.jpg", "cafe\u0301.jpg"
    try:
        touch(tmp_path, nfc)
        touch(tmp_path, nfd)
    except OSError:
        pytest.skip("the file system cannot hold both spellings")
    if len(list(tmp_path.iterdir())) != 2:
        pytest.skip("the file system normalises names")
    found = discover(tmp_path)
    assert [i.path for i in found.items] == [nfd]  # U+0065 sorts before U+00E9
    assert found.collisions == {nfc: nfd}


def test_globs_ignore_case_so_colliding_spellings_are_selected_together(tmp_path: Path) -> None:
    if not case_sensitive(tmp_path):
        pytest.skip("the temp folder is on a case-insensitive disk")
    touch(tmp_path, "A/x.jpg")
    touch(tmp_path, "a/x.jpg")
    touch(tmp_path, "b/x.jpg")
    found = discover(tmp_path, exclude=["a/**"])
    assert [i.path for i in found.items] == ["b/x.jpg"]
    assert (found.excluded, found.collisions) == (["A/x.jpg", "a/x.jpg"], {})


# --- include / exclude -------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ["top.jpg", "top.png", "raw/a.jpg", "raw/deep/b.jpg", "sel/c.png", "sel/x/raw/d.png"]:
        touch(tmp_path, rel)
    return tmp_path


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ((), (), ["raw/a.jpg", "raw/deep/b.jpg", "sel/c.png", "sel/x/raw/d.png", "top.jpg", "top.png"]),
        (("*.png",), (), ["sel/c.png", "sel/x/raw/d.png", "top.png"]),  # no "/": the name, any depth
        (("*.PNG",), (), ["sel/c.png", "sel/x/raw/d.png", "top.png"]),  # case ignored
        (("/*.png",), (), ["top.png"]),  # leading "/": anchored at the root
        (("raw/*",), (), ["raw/a.jpg"]),  # "*" stays inside one folder
        (("raw/**",), (), ["raw/a.jpg", "raw/deep/b.jpg"]),
        (("**/raw/**",), (), ["raw/a.jpg", "raw/deep/b.jpg", "sel/x/raw/d.png"]),  # "**/" = zero folders too
        (("sel/**/*.png",), (), ["sel/c.png", "sel/x/raw/d.png"]),
        (("t?p.*",), (), ["top.jpg", "top.png"]),
        (("[rs]*/*",), (), ["raw/a.jpg", "sel/c.png"]),
        (("[!r]*/*",), (), ["sel/c.png"]),
        ((), ("raw/**",), ["sel/c.png", "sel/x/raw/d.png", "top.jpg", "top.png"]),
        ((), ("**/raw/**", "*.jpg"), ["sel/c.png", "top.png"]),
        (("*.png",), ("sel/x/**",), ["sel/c.png", "top.png"]),  # exclude wins
        (("raw\\*",), (), ["raw/a.jpg"]),  # a Windows-style separator works too
    ],
)
def test_include_exclude(
    tree: Path, include: tuple[str, ...], exclude: tuple[str, ...], expected: list[str]
) -> None:
    found = discover(tree, include=include, exclude=exclude)
    assert [i.path for i in found.items] == expected
    assert sorted(found.excluded + expected) == paths(tree)


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("a/*/b.jpg", "a/x/b.jpg", True),
        ("a/*/b.jpg", "a/x/y/b.jpg", False),
        ("a/**/b.jpg", "a/b.jpg", True),
        ("a/**/b.jpg", "a/x/y/b.jpg", True),
        ("a**.jpg", "ab/c.jpg", False),  # "**" not a whole segment: two stars
        ("[a-c].jpg", "b.jpg", True),
        ("x[.jpg", "x[.jpg", True),  # an unclosed "[" is literal
        ("*", "a/b/c.jpg", True),
    ],
)
def test_glob_language(pattern: str, path: str, matches: bool) -> None:
    assert bool(glob_to_regex(pattern).match(path)) is matches


# --- symbolic links ----------------------------------------------------------------------------


@needs_symlinks
def test_file_link_inside_root_is_listed_under_its_own_name(tmp_path: Path) -> None:
    root = tmp_path / "in"
    touch(root, "real/a.jpg", b"abcd")
    (root / "alias.jpg").symlink_to(root / "real" / "a.jpg")
    found = discover(root, with_hash=True)
    assert [i.path for i in found.items] == ["alias.jpg", "real/a.jpg"]
    assert found.items[0].size_bytes == 4  # the target's size, not the link's
    assert found.items[0].content_hash == hashlib.sha256(b"abcd").hexdigest()


@needs_symlinks
def test_links_pointing_out_of_the_root_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "in"
    touch(root, "ok.jpg")
    touch(tmp_path, "outside/secret.jpg")
    (root / "out_dir").symlink_to(tmp_path / "outside")
    (root / "out_file.jpg").symlink_to(tmp_path / "outside" / "secret.jpg")
    (root / "dotdot").symlink_to("..")
    assert paths(root) == ["ok.jpg"]


@needs_symlinks
def test_linked_folder_inside_root_is_followed_once(tmp_path: Path) -> None:
    root = tmp_path / "in"
    touch(root, ".store/a.jpg")  # hidden: reachable only through the link
    touch(root, "plain/b.jpg")
    (root / "store").symlink_to(root / ".store")
    (root / "again").symlink_to(root / "plain")  # already walked as itself: adds nothing
    assert paths(root) == ["plain/b.jpg", "store/a.jpg"]


@needs_symlinks
def test_link_loops_terminate(tmp_path: Path) -> None:
    root = tmp_path / "in"
    touch(root, "a/x.jpg")
    (root / "a" / "loop").symlink_to(root / "a")
    (root / "a" / "up").symlink_to(root)
    (root / "self").symlink_to("self")  # a link to itself cannot be resolved to a file
    (root / "b").symlink_to(root / "c")
    (root / "c").symlink_to(root / "b")
    assert paths(root) == ["a/x.jpg"]


@needs_symlinks
def test_broken_link_is_ignored(tmp_path: Path) -> None:
    touch(tmp_path, "ok.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    assert paths(tmp_path) == ["ok.jpg"]


@needs_symlinks
def test_root_given_through_a_link(tmp_path: Path) -> None:
    touch(tmp_path, "real/a.jpg")
    (tmp_path / "via").symlink_to(tmp_path / "real")
    assert paths(tmp_path / "via") == ["a.jpg"]


def test_skip_leaves_out_a_folder_such_as_the_output(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg")
    touch(tmp_path, "out/masks/a.jpg.png")
    assert paths(tmp_path, skip=[tmp_path / "out"]) == ["a.jpg"]
    assert paths(tmp_path) == ["a.jpg", "out/masks/a.jpg.png"]


def test_discover_does_not_import_torch() -> None:
    # A fresh interpreter: other tests in this process may have imported torch already.
    import subprocess

    code = "import sys, batchseg.discover, batchseg.imageio; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_two_hundred_thousand_files_in_a_couple_of_seconds(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if "slow" not in request.config.getoption("markexpr") or "not slow" in request.config.getoption(
        "markexpr"
    ):
        pytest.skip("large folder: run with -m slow")
    import time

    for d in range(1000):
        folder = tmp_path / f"d{d // 50:03d}" / f"s{d:04d}"
        folder.mkdir(parents=True)
        for f in range(200):
            os.close(os.open(folder / f"img_{f:05d}.{'jpg' if f % 3 else 'PNG'}", os.O_CREAT | os.O_WRONLY))
    started = time.perf_counter()
    found = discover(tmp_path)
    elapsed = time.perf_counter() - started
    assert len(found.items) == 200_000
    assert elapsed < 4.0, f"discover took {elapsed:.2f} s for 200,000 files"
