"""The project documents itself: every command has help with an example, every run option has its
row in the documentation's reference of options (default, fixed by the fingerprint, accepted by
retry, as the registry declares; docs/gen_reference.py writes it), the README stays a front page
whose test command CI runs, and the parent process never imports torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchseg.cli import cli
from batchseg.errors import ExitCode
from batchseg.options import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = sorted(cli.commands)
OPTIONS_PAGE = ROOT / "docs" / "reference" / "options.md"
EXIT_CODES_PAGE = ROOT / "docs" / "reference" / "exit-codes.md"
REGENERATE = "run `python docs/gen_reference.py`"


def test_all_commands_are_there() -> None:
    assert set(COMMANDS) == {"run", "retry", "status", "schedule", "doctor", "demo", "report", "export"}


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help_has_an_example(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "batchseg " in result.output.split("Example")[-1]


@pytest.mark.parametrize("command", ["run", "retry"])
def test_exit_codes_in_help(command: str) -> None:
    output = CliRunner().invoke(cli, [command, "--help"]).output
    for code in ("0 all images ok", "1 fatal", "2 usage", "3 finished", "4 stopped"):
        assert code in " ".join(output.split())


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- test-command -->\s*```\w*\n(.+?)\n```", readme, re.S)
    assert match, "README must mark its test command with <!-- test-command -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = _readme_test_command()
    assert command in ci.splitlines(), f"{command!r} is not a line of .ci/run"


def test_every_run_option_is_in_the_reference() -> None:
    page = OPTIONS_PAGE.read_text(encoding="utf-8")
    options = [opt for p in cli.commands["run"].params for opt in p.opts if opt.startswith("--")]
    missing = [opt for opt in options if f"`{opt}" not in page]
    assert not missing, f"options not in docs/reference/options.md ({REGENERATE}): {missing}"


def _table(page: Path, heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading`` in ``page``, as lists of stripped cells."""
    text = page.read_text(encoding="utf-8")
    assert heading in text, f"{page.name}: no {heading!r}"
    rows: list[list[str]] = []
    for line in text.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
        elif rows:
            break
    assert rows, f"no table after {heading!r}"
    return rows[2:]  # without the header and the --- line


def test_every_registry_option_has_its_row_in_the_reference() -> None:
    rows = {
        row[0].strip("`").split(" / ")[0]: row for row in _table(OPTIONS_PAGE, "# Options of `batchseg run`")
    }
    for opt in OPTIONS:
        assert opt.cli_name in rows, f"docs/reference/options.md: no row for {opt.cli_name} ({REGENERATE})"
        _, default, fixed, retry, meaning = rows[opt.cli_name]
        assert default == opt.shown_default, f"{opt.cli_name}: default {default!r} ({REGENERATE})"
        assert fixed == ("yes" if opt.fingerprint else ""), f"{opt.cli_name}: 'fixed' column"
        assert retry == ("yes" if opt.retry else ""), f"{opt.cli_name}: 'retry' column"
        assert meaning, opt.cli_name
    assert set(rows) == {o.cli_name for o in OPTIONS}, f"rows for options that do not exist ({REGENERATE})"


def test_exit_codes_in_the_reference_are_the_named_ones() -> None:
    rows = _table(EXIT_CODES_PAGE, "# Exit codes")
    assert [(int(row[0]), row[1]) for row in rows] == [(int(c), f"`{c.name}`") for c in ExitCode]


def test_the_readme_is_a_front_page() -> None:
    """What a new user needs first, and links to the rest: details go to docs/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300, "README.md is a front page: move details into docs/"
    assert "activate" in readme, "the set-up commands activate the virtual environment"
    assert "batchseg demo" in readme and "--engine threshold" in readme, "a first run without weights"
    assert "chromium" in readme and "minutes" in readme, "the test command's needs and duration"


def parent_side_modules() -> list[str]:
    """Every module outside ``batchseg/engines/`` (the only folder whose code runs in workers alone)."""
    package = ROOT / "batchseg"
    names = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.parts[1] == "engines" or rel.name == "__main__":
            continue
        names.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return names


def test_parent_modules_do_not_import_torch() -> None:
    modules = parent_side_modules()
    assert "batchseg.supervise.pool" in modules and "batchseg.store.checkpoint" in modules
    code = (
        f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
        "bad = [m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "batchseg", "--version"], capture_output=True, text=True, check=True
    )
    assert "batchseg" in out.stdout


def test_public_api_is_exported() -> None:
    import batchseg

    for name in batchseg.__all__:
        assert getattr(batchseg, name) is not None, name
    assert batchseg.run.__module__ == "batchseg.runner"


def test_no_module_is_over_500_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "batchseg").rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500
    }
    assert not long, f"split these by job: {long}"


def _imports(path: Path, package: str) -> set[str]:
    """The batchseg modules a module imports (absolute or relative, any depth, lazy ones too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("batchseg")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("batchseg")}


def test_the_import_graph_has_no_circle() -> None:
    modules = {}
    for path in (ROOT / "batchseg").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rsplit(".", 1)[0]
        modules[name] = _imports(path, package)
    graph = {
        m: {d for d in deps if d in modules and d != m and not m.startswith(d + ".")}
        for m, deps in modules.items()
    }
    # A package's __init__ re-exporting its own modules is not a circle; the package name itself
    # stands for its __init__ only.
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(d) :] + [d]))
            if d not in state:
                visit(d, trail + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
