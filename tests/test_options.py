"""The option registry: every option reaches the command line, BATCHSEG_* variables, job files and
``retry`` with the same meaning; the fingerprint of existing options stays byte-identical; one
error boundary turns errors into exit codes.

Options are parsed by the real click commands (``make_context``) and the real job-file reader; one
test runs a whole run through the CLI with the fault engine of tests/.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest
from _storage import make_config
from click.testing import CliRunner
from conftest import make_image

from batchseg.cli import Commands, cli, run_config
from batchseg.config import FINGERPRINT_UPGRADES, RunConfig, upgrade_fingerprint
from batchseg.engine_names import BUILT_IN_ENGINES, EngineRef
from batchseg.errors import (
    BadValueError,
    CircuitBreakerTripped,
    ConfigError,
    ExitCode,
    OutputError,
    StoppedEarly,
)
from batchseg.options import DEFAULT_ENGINE, OPTIONS, BandList, Option, Reader, by_name, fingerprint_options
from batchseg.prompt_values import ExemplarFile, ExemplarsKind, PromptMap, file_digest
from batchseg.remote import InputPath
from batchseg.store.checkpoint import Checkpoint, describe_fingerprint_change
from batchseg.values import (
    BOOL_WORDS,
    SHOWN_CHARS,
    Choice,
    Count,
    CountOrAuto,
    Device,
    Duration,
    Flag,
    Fraction,
    ModelRef,
    Number,
    PathValue,
    Text,
    TextList,
    TileSide,
    TimeOfDay,
    show,
)

DATA = Path(__file__).parent / "data"
NAMES = [o.name for o in OPTIONS]


@pytest.fixture(autouse=True)
def no_batchseg_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for opt in OPTIONS:
        for name in opt.envvars:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("BATCHSEG_JOB", raising=False)


def example(opt: Option, folder: Path) -> tuple[list[str], str, str, Any]:
    """A value that is not the default, as (flags, BATCHSEG_* text, TOML literal, expected value)."""
    kind, flag = opt.kind, opt.cli_name
    if isinstance(kind, Flag):
        value = not opt.default
        flags = [flag if value else f"--no-{flag[2:]}"]
        return flags, "yes" if value else "off", json.dumps(value), value
    if isinstance(kind, PromptMap):  # PROMPT=VALUE pairs
        one, two = ("a b=0.25", "c=0.5") if isinstance(kind.item.value, Fraction) else ("a b=x y", "c=z")
        expected_pairs = tuple(kind.item.from_text(p) for p in (one, two))
        return [flag, one, flag, two], f"{one};{two}", json.dumps([one, two]), expected_pairs
    if isinstance(kind, TextList):
        return [flag, "a b", flag, "*.c"], "a b;*.c", '["a b", "*.c"]', ("a b", "*.c")
    if isinstance(kind, ExemplarsKind):
        boxes = folder / "boxes.csv"
        boxes.write_text("path,x0,y0,x1,y1,label\na.png,1,1,5,5,1\n", encoding="utf-8")
        given = ExemplarFile(boxes.resolve(), file_digest(boxes))
        return [flag, str(boxes)], str(boxes), json.dumps(str(boxes)), given
    candidates: list[tuple[str, Any]] = {
        Duration: [("90m", 5400.0), ("1h30m15s", 5415.0)],
        TimeOfDay: [("6:30", "06:30"), ("7:45", "07:45")],
        Fraction: [("0.25", 0.25), ("0.75", 0.75)],
        Device: [("cuda:1", "cuda:1"), ("cpu", "cpu")],
        ModelRef: [("owner/name", "owner/name"), ("other/name", "other/name")],
        EngineRef: [("threshold", BUILT_IN_ENGINES["threshold"]), ("some.module:load", "some.module:load")],
        PathValue: [(str(folder / "there"), folder / "there"), (str(folder / "else"), folder / "else")],
        InputPath: [
            ("s3://bucket/prefix", Path("/vsis3/bucket/prefix")),
            (str(folder / "else"), folder / "else"),
        ],
        Text: [("some text", "some text"), ("other text", "other text")],
        TileSide: [("off", "off"), ("auto", "auto")],
        BandList: [("4,3,2", (4, 3, 2)), ("2", (2,))],
    }.get(type(kind), [])
    if isinstance(kind, Number):
        candidates = [(str(kind.minimum + x), kind.minimum + x) for x in (1.5, 2.5)]
    if isinstance(kind, (Count, CountOrAuto)):
        minimum = kind.minimum if isinstance(kind, Count) else kind.count.minimum
        candidates = [(str(minimum + x), minimum + x) for x in (2, 3)]
    if isinstance(kind, Choice):
        candidates = [(c, c) for c in kind.choices]
    assert candidates, f"no example for {type(kind).__name__}: add one here"
    text, expected = next((t, e) for t, e in candidates if e != opt.default)
    if isinstance(kind, (Count, CountOrAuto)):
        return [flag, text], text, text, expected
    flags = [text] if opt.argument else [flag, text]
    return flags, text, text if isinstance(kind, (Fraction, Number)) else json.dumps(text), expected


def base_args(opt: Option, folder: Path) -> list[str]:
    """What `run` needs besides the option under test: INPUT and a prompt."""
    args = [] if opt.name == "input" else [str(folder)]
    return args + ([] if opt.name == "prompts" else ["--prompt", "p"])


def command_context(name: str, args: list[str]) -> click.Context:
    """``batchseg NAME ARGS`` parsed as a real call parses it: under the group's context, whose
    settings (``-h``) the command takes. Click caches a command's help option the first time it
    is made, so a context without the group's would drop ``-h`` from every later ``--help``."""
    root = cli.make_context("batchseg", [], resilient_parsing=True)
    return cli.commands[name].make_context(name, list(args), parent=root)


def parse_run(args: list[str]) -> RunConfig:
    with command_context("run", args) as ctx:
        return run_config(ctx)


# ----------------------------------------------------------------------------- one meaning everywhere


@pytest.mark.parametrize("name", NAMES)
def test_a_value_means_the_same_as_flag_variable_job_key_and_for_retry(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opt = next(o for o in OPTIONS if o.name == name)
    flags, text, toml, expected = example(opt, tmp_path)
    assert expected != opt.default
    base = base_args(opt, tmp_path)

    from_flags = parse_run(base + flags)
    job = tmp_path / "job.toml"
    job.write_text(f"{opt.cli_name.lstrip('-').lower()} = {toml}\n", encoding="utf-8")
    from_job = parse_run(base + ["--job", str(job)])
    monkeypatch.setenv(opt.envvars[0], text)
    from_env = parse_run(base)
    monkeypatch.delenv(opt.envvars[0])

    assert getattr(from_flags, name) == getattr(from_env, name) == getattr(from_job, name) == expected
    assert opt.kind.from_text(text) == expected
    if opt.retry:
        with command_context("retry", [str(tmp_path), *flags]) as ctx:
            assert ctx.params[name] == expected


def test_timeout_90m_on_the_command_line_in_the_environment_and_in_a_job_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tmp_path / "job.toml"
    job.write_text('timeout = "90m"\nmax-runtime = "1h30m"\n', encoding="utf-8")
    assert parse_run([str(tmp_path), "--prompt", "p", "--job", str(job)]).timeout == 5400.0
    assert parse_run([str(tmp_path), "--prompt", "p", "--timeout", "90m"]).timeout == 5400.0
    monkeypatch.setenv("BATCHSEG_TIMEOUT", "90m")
    config = parse_run([str(tmp_path), "--prompt", "p", "--job", str(job)])
    assert (config.timeout, config.max_runtime) == (5400.0, 5400.0)
    assert parse_run([str(tmp_path), "--prompt", "p", "--timeout", "60"]).timeout == 60.0  # flag wins


def test_precedence_flag_variable_job_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = tmp_path / "job.toml"
    job.write_text('prompt = "roof"\nmax-attempts = 3\nlog-keep = 4\nworkers = 2\n', encoding="utf-8")
    monkeypatch.setenv("BATCHSEG_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("BATCHSEG_WORKERS", "auto")
    config = parse_run([str(tmp_path), "--job", str(job), "--log-keep", "6"])
    assert config.prompts == ("roof",)  # job file
    assert config.max_attempts == 5  # variable over job file
    assert config.log_keep == 6  # flag over job file
    assert config.workers is None  # "auto" from a variable beats the job file's 2
    assert config.timeout == 300.0  # default


def test_a_prompt_with_spaces_in_a_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHSEG_PROMPT", "solar panel")
    assert parse_run([str(tmp_path)]).prompts == ("solar panel",)
    monkeypatch.setenv("BATCHSEG_PROMPT", "solar panel;roof")
    assert parse_run([str(tmp_path)]).prompts == ("solar panel", "roof")


def test_flag_words_are_clicks() -> None:
    for word, value in click.types.BoolParamType.bool_states.items():
        if word:
            assert BOOL_WORDS[word] is value
            assert Flag().from_text(word.upper()) is value
    assert set(BOOL_WORDS) == {w for w in click.types.BoolParamType.bool_states if w}


# ----------------------------------------------------------------------------- every option, every place


@pytest.mark.parametrize("name", NAMES)
def test_every_option_reaches_click_the_job_file_and_the_environment(name: str) -> None:
    from batchseg.jobfile import option_for_key

    opt = next(o for o in OPTIONS if o.name == name)
    params = {p.name: p for p in cli.commands["run"].params}
    assert name in params
    assert list(params[name].envvar or []) == list(opt.envvars)
    assert opt.envvars[0] == "BATCHSEG_" + opt.cli_name.lstrip("-").replace("-", "_").upper()
    retry_params = {p.name for p in cli.commands["retry"].params if isinstance(p, click.Option)}
    assert (name in retry_params) is opt.retry
    for spelling in opt.spellings:
        assert option_for_key(spelling) is opt
        assert option_for_key(spelling.replace("_", "-")) is opt


@pytest.mark.parametrize("name", NAMES)
def test_every_default_reads_back_through_its_kind(name: str) -> None:
    opt = next(o for o in OPTIONS if o.name == name)
    if opt.required:
        return
    given = {} if name == "prompts" else {"prompts": ("p",)}  # a prompt, or --exemplars, is needed
    assert getattr(RunConfig(input=Path("x"), **given), name) == opt.default
    assert opt.kind.from_json(json.loads(json.dumps(opt.kind.to_json(opt.default)))) == opt.default
    if opt.default not in (None, ()):
        text = str(opt.default).lower() if isinstance(opt.default, bool) else str(opt.default)
        assert opt.kind.from_text(text) == opt.default


def test_the_registry_is_consistent() -> None:
    assert [o.name for o in OPTIONS] == [f.name for f in fields(RunConfig)]
    # An option never leaves the fingerprint: stored fingerprints hold it, and would then differ.
    assert {o.name for o in fingerprint_options()} >= {
        "model", "engine", "prompts", "threshold", "mask_threshold", "max_detections", "dtype", "max_pixels"
    }  # fmt: skip
    for opt in OPTIONS:
        assert opt.help.strip() and opt.help.endswith("."), opt.name
        assert not (opt.fingerprint and opt.retry), f"{opt.name}: retry cannot change the outputs"
        assert opt.reader in Reader
    assert sum(o.argument for o in OPTIONS) == 1


def test_pool_options_reach_the_pool(tmp_path: Path) -> None:
    from batchseg.supervise.pool import PoolSettings

    for opt in (o for o in OPTIONS if o.reader is Reader.POOL):
        value = example(opt, tmp_path)[3]
        settings = PoolSettings.from_config(make_config(**{opt.name: value}))
        assert getattr(settings, opt.name) == value, opt.name


# ----------------------------------------------------------------------------- the fingerprint

#: RunConfig.fingerprint_fields() of tests/_storage.make_config(), as batchseg wrote it before the
#: registry, and its hash: a change in these fields means existing output folders refuse to resume.
#: Fields added later (with an upgrade value) come on top of these.
FINGERPRINT_JSON = (
    '{"dtype": "auto", "engine": "batchseg.engines.sam3.engine:load_engine", "mask_threshold": 0.5, '
    '"max_detections": 100, "max_pixels": 250000000, "model": "models/sam3", "output_format": 1, '
    '"prompts": ["roof"], "threshold": 0.3}'
)


def existing_fields(config: RunConfig) -> str:
    fields = config.fingerprint_fields()
    return json.dumps({k: fields[k] for k in json.loads(FINGERPRINT_JSON)}, sort_keys=True)


def test_the_fingerprint_of_existing_options_is_byte_identical() -> None:
    assert existing_fields(make_config()) == FINGERPRINT_JSON
    assert hashlib.sha256(FINGERPRINT_JSON.encode()).hexdigest()[:16] == "950521dfe6a043c6"
    blob = json.dumps(make_config().fingerprint_fields(), sort_keys=True).encode()
    assert make_config().fingerprint() == hashlib.sha256(blob).hexdigest()[:16]  # hashed the same way
    other = make_config(prompts=("roof", "solar panel"), threshold=0.0, max_detections=7, dtype="float16")
    assert hashlib.sha256(existing_fields(other).encode()).hexdigest()[:16] == "32a46143708ebf16"


def test_a_fingerprint_written_by_0_1_0_reads_as_today_and_every_later_option_declares_an_upgrade() -> None:
    with sqlite3.connect(DATA / "run-made-by-0.1.0" / "checkpoint.sqlite") as db:
        stored = json.loads(db.execute("SELECT fingerprint FROM run").fetchone()[0])
    current = make_config().fingerprint_fields()
    assert set(current) - set(stored) == set(FINGERPRINT_UPGRADES)  # a new option without upgrade fails
    assert upgrade_fingerprint(stored) == current
    assert FINGERPRINT_UPGRADES["engine"] == DEFAULT_ENGINE


def test_the_stored_configuration_round_trips(tmp_path: Path) -> None:
    config = make_config(output=tmp_path, include=("*.jpg",), deadline="06:30", workers=2)
    stored = json.loads(json.dumps(config.to_dict()))
    assert RunConfig.from_dict(stored) == config
    assert RunConfig.from_dict({**stored, "extra": {"k": 1}}) == config  # as earlier versions stored it
    assert stored["output"] == str(tmp_path) and stored["include"] == ["*.jpg"]


# ----------------------------------------------------------------------------- refusals, error boundary


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_a_bad_value_is_a_usage_error_naming_the_option_from_a_flag_or_a_variable(tmp_path: Path) -> None:
    expected = 'expected seconds > 0 or a duration like "90m" or "1h30m", got "soon"'
    flag = invoke("run", str(tmp_path), "--prompt", "p", "--timeout", "soon")
    variable = invoke("run", str(tmp_path), "--prompt", "p", env={"BATCHSEG_TIMEOUT": "soon"})
    for result in (flag, variable):
        assert result.exit_code == ExitCode.USAGE == click.UsageError.exit_code
        assert f"Invalid value for '--timeout': {expected}" in result.output
    assert f"{expected} (from BATCHSEG_TIMEOUT)" in variable.output
    assert "(from" not in flag.output
    gpu = invoke("run", str(tmp_path), "--prompt", "p", "--device", "gpu")
    assert gpu.exit_code == 2 and "got \"gpu\"; did you mean 'cuda'?" in gpu.output


def test_a_bad_job_file_is_a_usage_error_like_a_bad_flag(tmp_path: Path) -> None:
    job = tmp_path / "night.toml"
    job.write_text("worker = 2\n", encoding="utf-8")
    result = invoke("run", "--job", str(job))
    assert result.exit_code == ExitCode.USAGE  # as an unknown --worker flag is
    assert result.output.strip() == f"error: {job}: unknown key 'worker'; did you mean 'workers'?"
    job.write_text('timeout = "soon"\n', encoding="utf-8")
    result = invoke("run", "--job", str(job))
    assert result.exit_code == ExitCode.USAGE
    assert "key 'timeout': expected seconds > 0" in result.output and 'got "soon" (string)' in result.output
    job.write_text("timeout = \n", encoding="utf-8")
    assert invoke("run", "--job", str(job)).exit_code == ExitCode.USAGE  # TOML syntax
    assert invoke("run", "--job", str(tmp_path / "none.toml")).exit_code == ExitCode.USAGE


#: One bad value of each kind, as text (a flag, a variable) and in a job file.
BAD_VALUES = [
    ("--timeout", "timeout", "soon", '"soon"'),
    ("--workers", "workers", "two", '"two"'),
    ("--threshold", "threshold", "1.5", "1.5"),
    ("--device", "device", "gpu", '"gpu"'),
    ("--deadline", "deadline", "25:00", '"25:00"'),
    ("--tile", "tile", "32", "32"),
    ("--hash", "hash", "maybe", '"maybe"'),
]


@pytest.mark.parametrize("flag, key, text, toml", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_a_bad_value_is_exit_2_wherever_it_comes_from(
    tmp_path: Path, flag: str, key: str, text: str, toml: str
) -> None:
    (tmp_path / "in").mkdir()
    base = ["run", str(tmp_path / "in"), "--prompt", "p", "--output", str(tmp_path / "out")]
    option = by_name(key)
    job = tmp_path / "night.toml"
    job.write_text(f"{key} = {toml}\n", encoding="utf-8")
    variable = {option.envvars[0]: text}
    as_flag = [flag, text] if not isinstance(option.kind, Flag) else []
    sources = {
        "job file": invoke(*base, "--job", str(job)),
        "variable": invoke(*base, env=variable),
    }
    if as_flag:
        sources["flag"] = invoke(*base, *as_flag)
    for where, result in sources.items():
        assert result.exit_code == ExitCode.USAGE, (where, result.output)
    assert not (tmp_path / "out").exists()


def test_retry_refuses_options_fixed_by_the_fingerprint(tmp_path: Path) -> None:
    result = invoke("retry", str(tmp_path), "--threshold", "0.5")
    assert result.exit_code == 2 and "No such option '--threshold'" in result.output
    missing = invoke("retry", str(tmp_path))
    assert missing.exit_code == 1
    assert missing.output.startswith("error: ") and "holds no batchseg run" in missing.output


@pytest.mark.parametrize(
    "raised, code, message",
    [
        (ConfigError("bad option"), 1, "error: bad option"),
        (BadValueError("bad value"), 2, "error: bad value"),
        (OutputError("disk full"), 1, "error: disk full"),
        (StoppedEarly("deadline"), 4, "error: deadline"),
        (CircuitBreakerTripped("same error"), 4, "error: same error"),
        (KeyboardInterrupt(), 4, "interrupted: stopped at once; run the same command again to resume"),
    ],
)
def test_the_error_boundary(raised: BaseException, code: int, message: str) -> None:
    group = Commands()

    @group.command()
    def fail() -> None:
        raise raised

    result = CliRunner().invoke(group, ["fail"], catch_exceptions=False)
    assert (result.exit_code, result.output.strip()) == (code, message)


# ----------------------------------------------------------------------------- a whole run


def test_a_run_through_the_cli_stores_the_same_values_from_each_source(tmp_path: Path) -> None:
    make_image(tmp_path / "photos" / "a.png", (32, 24), 1)
    job = tmp_path / "job.toml"
    job.write_text('input = "photos"\nprompt = "roof"\nload-timeout = "1h30m"\n', encoding="utf-8")
    output = tmp_path / "out"
    result = invoke(
        "run", "--job", str(job), "--engine", "fault_engine:load_faulty", "--output", str(output),
        "--timeout", "90m", "--workers", "1",
        env={"BATCHSEG_MAX_RUNTIME": "90m"},
    )  # fmt: skip
    assert result.exit_code == ExitCode.OK, result.output
    with Checkpoint.open_existing(output, read_only=True) as checkpoint:
        stored = checkpoint.stored_config()
        assert checkpoint.counts()["ok"] == 1
    assert stored["timeout"] == stored["load_timeout"] == stored["max_runtime"] == 5400.0
    assert stored["engine"] == "fault_engine:load_faulty" and stored["workers"] == 1

    # retry: a value given (even "auto") replaces the stored one; the rest stays as stored.
    again = invoke("retry", str(output), "--workers", "auto", env={"BATCHSEG_TIMEOUT": "1h"})
    assert again.exit_code == ExitCode.OK, again.output
    with Checkpoint.open_existing(output, read_only=True) as checkpoint:
        stored = checkpoint.stored_config()
    assert stored["workers"] is None and stored["timeout"] == 3600.0 and stored["load_timeout"] == 5400.0


# ----------------------------------------------------------------------------- long values, cut


def test_a_long_value_is_echoed_cut_with_its_length() -> None:
    assert show("a" * 10_000) == '"' + "a" * 76 + f"... ({10_000:,} characters)"
    assert show("short") == '"short"'
    lines = describe_fingerprint_change({"prompts": ["x" * 10_000]}, {"prompts": ["roof"]})
    assert lines[0].startswith("--prompt: [") and len(lines[0]) < 2 * SHOWN_CHARS, lines


@pytest.mark.parametrize(
    "engine, extra, words",
    [
        ("batchseg.engines.threshold:load", [], "is not one"),
        ("batchseg.engines.sam3.engine:load_engine", ["--model"], "tokens long"),
        ("batchseg.engines.threshold:load", ["--tile"], "expected auto, off or a tile side"),
    ],
    ids=["a-prompt-the-engine-refuses", "a-prompt-the-model-cannot-read", "a-bad-value"],
)
def test_a_10000_character_value_is_not_echoed_whole(
    tiny_model: Path, tmp_path: Path, engine: str, extra: list[str], words: str
) -> None:
    (tmp_path / "in").mkdir()
    long = "roof " * 2_000
    args = ["run", str(tmp_path / "in"), "--engine", engine, "--output", str(tmp_path / "out")]
    if extra == ["--model"]:
        args += ["--model", str(tiny_model), "--prompt", long]
    elif extra == ["--tile"]:
        args += ["--prompt", "red", "--tile", long]
    else:
        args += ["--prompt", long]
    result = invoke(*args)
    assert result.exit_code in (1, 2) and words in result.output, result.output[:500]
    assert "(10,000 characters)" in result.output and len(result.output) < 1_000, result.output[:500]
