"""The documentation site (mkdocs.yml, docs/) builds with --strict, so a broken link, a missing
anchor or a page left out of the nav fails; its reference pages are what docs/gen_reference.py makes
from the code now; the README's links lead to files that exist."""

from __future__ import annotations

import difflib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_reference_pages_are_what_the_code_gives() -> None:
    gen = generator()
    stale = gen.stale()
    assert not stale, f"run `python docs/gen_reference.py`: out of date: {stale}\n" + page_diffs(gen, stale)


def page_diffs(gen: ModuleType, stale: list[str]) -> str:
    """What changed in each stale reference page, for the failure message."""
    pages = gen.pages()
    return "\n".join(
        "".join(difflib.unified_diff((DOCS / p).read_text(encoding="utf-8").splitlines(True),
                                     pages[p].splitlines(True), p, "the code now", n=1))[:3000]
        for p in stale if p in pages and (DOCS / p).exists()
    )  # fmt: skip


def test_the_generator_check_says_so_for_a_stale_page(tmp_path: Path) -> None:
    copy = tmp_path / "docs"
    shutil.copytree(DOCS, copy)
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    page = copy / "reference" / "options.md"
    page.write_text(page.read_text(encoding="utf-8").replace("`--timeout`", "`--time-out`"), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(copy / "gen_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "reference/options.md" in result.stderr, result.stderr


def test_the_site_builds_strict(tmp_path: Path) -> None:
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "reference" / "options" / "index.html").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("[the options](reference/nowhere.md)", "reference/nowhere.md"),
        ("[the options](reference/options.md#no-such-heading)", "no-such-heading"),
    ],
)
def test_a_broken_link_fails_the_build(tmp_path: Path, change: str, message: str) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "running.md"
    page.write_text(page.read_text(encoding="utf-8") + f"\nSee {change}.\n", encoding="utf-8")
    result = build(tmp_path, tmp_path / "site")
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_a_page_left_out_of_the_nav_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "forgotten.md").write_text("# Forgotten\n", encoding="utf-8")
    result = build(tmp_path, tmp_path / "site")
    assert result.returncode != 0 and "forgotten.md" in result.stderr, result.stderr


def headings_slugs(path: Path) -> set[str]:
    from markdown.extensions.toc import slugify

    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    titles = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {slugify(re.sub(r"[`*]", "", t), "-") for t in titles}


def test_the_readme_links_lead_somewhere() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local), "the README links to the documentation"
    for link in local:
        target, _, anchor = link.partition("#")
        path = ROOT / target if target else ROOT / "README.md"
        assert path.exists(), f"README.md links to {link}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in headings_slugs(path), f"README.md links to {link}: no such heading"
