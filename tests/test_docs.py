"""The project documents itself: every command has help with an example, every run option has its
row in the README (default, fixed by the fingerprint, accepted by retry, as the registry declares),
CI runs the README's tests, and the parent process never imports torch."""

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


def test_every_run_option_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    options = [opt for p in cli.commands["run"].params for opt in p.opts if opt.startswith("--")]
    missing = [opt for opt in options if f"`{opt}" not in readme]
    assert not missing, f"options not documented in README.md: {missing}"


def _readme_table(heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading``, as lists of stripped cells."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows: list[list[str]] = []
    for line in readme.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert rows, f"no table after {heading!r}"
    return rows[2:]  # without the header and the --- line


def test_every_registry_option_has_its_readme_row() -> None:
    rows = {row[0].strip("`").split(" / ")[0]: row for row in _readme_table("### Options of `run`")}
    for opt in OPTIONS:
        assert opt.cli_name in rows, f"README.md: no row for {opt.cli_name} in 'Options of `run`'"
        _, default, fixed, retry, meaning = rows[opt.cli_name]
        assert default == opt.shown_default, f"{opt.cli_name}: README default {default!r}"
        assert fixed == ("yes" if opt.fingerprint else ""), f"{opt.cli_name}: 'fixed' column"
        assert retry == ("yes" if opt.retry else ""), f"{opt.cli_name}: 'retry' column"
        assert meaning, opt.cli_name
    documented = set(rows) - {"--job"}
    assert documented == {o.cli_name for o in OPTIONS}, "README rows for options that do not exist"


def test_exit_codes_in_the_readme_are_the_named_ones() -> None:
    rows = _readme_table("## Exit codes")
    assert [int(row[0]) for row in rows] == [int(code) for code in ExitCode]


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
