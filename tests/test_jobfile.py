"""Job files: parsing into RunConfig fields, path rules (Windows paths kept), and every kind of bad file."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from batchseg.config import RunConfig
from batchseg.errors import ConfigError
from batchseg.jobfile import JOB_OPTIONS, duration_seconds, is_local_model_path, load_job_file, parse_hhmm

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_JOBS = sorted((REPO / "jobs").glob("*.toml"))


def write_job(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> dict[str, object]:
    return load_job_file(write_job(tmp_path, text))


def error_of(tmp_path: Path, text: str) -> str:
    path = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_job_file(path)
    return str(info.value).replace(str(path), "JOB")


# ----------------------------------------------------------------------------- the example jobs


def test_job_options_cover_every_run_option() -> None:
    assert sorted(JOB_OPTIONS) == sorted(f.name for f in fields(RunConfig))


@pytest.mark.parametrize("job", EXAMPLE_JOBS, ids=lambda p: p.name)
def test_example_job_is_valid_and_builds_a_config(job: Path) -> None:
    options = load_job_file(job)
    assert set(options) <= set(JOB_OPTIONS)
    config = RunConfig(**options)
    assert config.prompts
    assert Path(config.input).is_absolute()


def test_example_marks_the_keys_fixed_by_the_fingerprint() -> None:
    from batchseg.jobfile import option_for_key

    marked, fixed, section_fixed = set(), set(), False
    for line in (REPO / "jobs" / "aerial-nightly.toml").read_text(encoding="utf-8").splitlines():
        if line.startswith("# ---"):
            section_fixed = "(all fixed)" in line
        if "=" not in line or line.startswith("#"):
            continue
        found = option_for_key(line.split("=", 1)[0].strip())
        assert found is not None, line
        if section_fixed or "# fixed" in line:
            marked.add(found.name)
        if found.fingerprint:
            fixed.add(found.name)
    assert marked == fixed


def test_example_values_are_converted(tmp_path: Path) -> None:
    options = load_job_file(REPO / "jobs" / "aerial-nightly.toml")
    jobs = (REPO / "jobs").resolve()
    assert options["input"] == (jobs / "../data/aerial/incoming").resolve()
    assert options["model"] == str((jobs / "../models/sam3").resolve())
    assert options["prompts"] == ("roof", "solar panel")
    assert options["timeout"] == 300.0 and options["max_runtime"] == 4 * 3600.0
    assert options["deadline"] == "06:30"
    assert options["batch_size"] == 1 and options["dtype"] == "float16"


# ----------------------------------------------------------------------------- good values


def test_dashes_and_underscores_and_prompt_string(tmp_path: Path) -> None:
    options = load_text(
        tmp_path,
        'input = "imgs"\nprompt = "roof"\nmax-attempts = 3\nmax_detections = 7\nnew_run = true\n',
    )
    assert options == {
        "input": tmp_path.resolve() / "imgs",
        "prompts": ("roof",),
        "max_attempts": 3,
        "max_detections": 7,
        "new_run": True,
    }


def test_prompts_list_include_exclude_and_auto(tmp_path: Path) -> None:
    options = load_text(
        tmp_path,
        'prompts = ["roof", "pool"]\ninclude = "*.jpg"\nexclude = ["raw/**", "*.tmp"]\n'
        'workers = "auto"\nthreads = 2\nbatch-size = "auto"\n',
    )
    assert options["prompts"] == ("roof", "pool")
    assert options["include"] == ("*.jpg",)
    assert options["exclude"] == ("raw/**", "*.tmp")
    assert options["workers"] is None and options["batch_size"] is None and options["threads"] == 2


def test_numbers_durations_and_times(tmp_path: Path) -> None:
    options = load_text(
        tmp_path,
        'threshold = 0\nmask-threshold = 1\ntimeout = 90\nload-timeout = "1h30m"\n'
        'max-runtime = 7200.5\nprogress-interval = "45s"\ndeadline = 06:05:00\n',
    )
    assert options == {
        "threshold": 0.0,
        "mask_threshold": 1.0,
        "timeout": 90.0,
        "load_timeout": 5400.0,
        "max_runtime": 7200.5,
        "progress_interval": 45.0,
        "deadline": "06:05",
    }
    assert all(isinstance(options[k], float) for k in ("threshold", "timeout", "max_runtime"))


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_devices(tmp_path: Path, device: str) -> None:
    assert load_text(tmp_path, f'device = "{device}"\n') == {"device": device}


def test_utf8_bom_crlf_and_utf16_are_read(tmp_path: Path) -> None:
    text = 'prompt = "Dach"\r\ninput = "bilder/Ü"\r\n'
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (tmp_path / "u16.toml").write_bytes(text.encode("utf-16"))  # Notepad's "Unicode"
    for name in ("bom.toml", "u16.toml"):
        options = load_job_file(tmp_path / name)
        assert options == {"prompts": ("Dach",), "input": tmp_path.resolve() / "bilder" / "Ü"}


def test_empty_job_file_is_empty_options(tmp_path: Path) -> None:
    assert load_text(tmp_path, "# nothing set\n") == {}


# ----------------------------------------------------------------------------- paths


def test_relative_paths_are_relative_to_the_job_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the scheduler's working folder must not matter
    options = load_job_file(write_job(jobs, 'input = "../data/in"\noutput = "out"\nmodel = "./m"\n'))
    assert options == {
        "input": tmp_path.resolve() / "data" / "in",
        "output": jobs.resolve() / "out",
        "model": str(jobs.resolve() / "m"),
    }


def test_absolute_posix_paths_are_kept(tmp_path: Path) -> None:
    options = load_text(tmp_path, 'input = "/srv/aerial"\noutput = "/srv/out"\n')
    assert options == {"input": Path("/srv/aerial"), "output": Path("/srv/out")}


def test_tilde_is_expanded(tmp_path: Path) -> None:
    options = load_text(tmp_path, 'input = "~/aerial"\n')
    assert options["input"] == Path(os.path.expanduser("~/aerial"))


@pytest.mark.parametrize(
    "toml_value, expected",
    [
        (r"'C:\data\aerial'", "C:\\data\\aerial"),  # literal string: backslashes as written
        ('"D:\\\\aerial\\\\incoming"', "D:\\aerial\\incoming"),  # basic string, doubled backslashes
        (r"'\\nas\photos\2024'", "\\\\nas\\photos\\2024"),  # UNC share
        ("'E:/aerial/incoming'", "E:/aerial/incoming"),  # drive letter with forward slashes
        (r"'C:\Users\Jürgen\Luftbilder'", "C:\\Users\\Jürgen\\Luftbilder"),
    ],
)
def test_windows_paths_are_kept_intact(tmp_path: Path, toml_value: str, expected: str) -> None:
    options = load_text(tmp_path, f"input = {toml_value}\noutput = {toml_value}\nmodel = {toml_value}\n")
    assert options == {"input": Path(expected), "output": Path(expected), "model": expected}
    assert str(options["input"]) == expected  # kept exactly as written


@pytest.mark.skipif(os.name == "nt", reason="on Windows a relative backslash path is joined normally")
def test_relative_windows_path_is_kept_on_posix(tmp_path: Path) -> None:
    assert load_text(tmp_path, r"input = 'photos\new'" + "\n") == {"input": Path("photos\\new")}


def test_backslash_escape_in_double_quotes_is_explained(tmp_path: Path) -> None:
    # "C:\new" is valid TOML: \n becomes a newline. Silently using that path would be worse than failing.
    message = error_of(tmp_path, 'input = "C:\\new\\tiles"\n')
    assert message == (
        "JOB: key 'input': the value contains a control character (tab, newline, ...), "
        'got "C:\\new\\tiles" (string); a backslash escape in a double-quoted string? '
        "in TOML, write Windows paths in single quotes ('D:\\aerial\\incoming') "
        'or double every backslash ("D:\\\\aerial\\\\incoming")'
    )


def test_invalid_backslash_escape_is_a_syntax_error_with_a_hint(tmp_path: Path) -> None:
    message = error_of(tmp_path, 'prompt = "roof"\ninput = "D:\\aerial"\n')
    assert message == (
        "JOB: line 2, column 14: TOML syntax error: unescaped '\\' in a string "
        "(in TOML, write Windows paths in single quotes ('D:\\aerial\\incoming') "
        'or double every backslash ("D:\\\\aerial\\\\incoming"))'
    )


@pytest.mark.parametrize(
    "value, local",
    [
        ("facebook/sam3", False),  # hub id: owner/name
        ("./facebook/sam3", True),
        ("../models/sam3", True),
        ("sam3", True),  # no slash: not a hub id
        ("models/v1/sam3", True),  # several slashes
        ("C:\\models\\sam3", True),
        ("~/models/sam3", True),
    ],
)
def test_model_local_or_hub(tmp_path: Path, value: str, local: bool) -> None:
    assert is_local_model_path(value, tmp_path) is local


def test_model_hub_id_kept_but_existing_folder_of_that_shape_is_local(tmp_path: Path) -> None:
    assert load_text(tmp_path, 'model = "facebook/sam3"\n') == {"model": "facebook/sam3"}
    (tmp_path / "facebook" / "sam3").mkdir(parents=True)
    assert load_text(tmp_path, 'model = "facebook/sam3"\n') == {
        "model": str(tmp_path.resolve() / "facebook" / "sam3")
    }


# ----------------------------------------------------------------------------- bad values

BAD_VALUES = [
    ('workers = "two"', 'key \'workers\': expected an integer >= 1 or "auto", got "two" (string)'),
    ("workers = 0", "key 'workers': expected an integer >= 1 or \"auto\", got 0 (integer)"),
    ("max-attempts = 2.5", "key 'max-attempts': expected an integer >= 1, got 2.5 (float)"),
    ("max_attempts = true", "key 'max_attempts': expected an integer >= 1, got true (boolean)"),
    ('max-pixels = "1e9"', "key 'max-pixels': expected an integer >= 1, got \"1e9\" (string)"),
    ("log-keep = -3", "key 'log-keep': expected an integer >= 1, got -3 (integer)"),
    ("threshold = 1.5", "key 'threshold': expected a number from 0 to 1, got 1.5 (float)"),
    ('threshold = "0.3"', "key 'threshold': expected a number from 0 to 1, got \"0.3\" (string)"),
    ("mask-threshold = false", "key 'mask-threshold': expected a number from 0 to 1, got false (boolean)"),
    ("threshold = nan", "key 'threshold': expected a number from 0 to 1, got nan (float)"),
    ("hash = 1", "key 'hash': expected true or false, got 1 (integer)"),
    ('new-run = "yes"', "key 'new-run': expected true or false, got \"yes\" (string)"),
    (
        'device = "gpu"',
        "key 'device': expected one of auto, cpu, cuda, cuda:N (N = 0, 1, ...), got \"gpu\" (string); "
        "did you mean 'cuda'?",
    ),
    (
        'device = "cuda:x"',
        "key 'device': expected one of auto, cpu, cuda, cuda:N (N = 0, 1, ...), got \"cuda:x\" (string); "
        "did you mean 'cuda'?",
    ),
    (
        'dtype = "bfloat"',
        "key 'dtype': expected one of auto, float32, bfloat16, float16, got \"bfloat\" (string); "
        "did you mean 'bfloat16'?",
    ),
    ("dtype = 16", "key 'dtype': expected one of auto, float32, bfloat16, float16, got 16 (integer)"),
    (
        "timeout = -1",
        'key \'timeout\': expected seconds > 0 or a duration like "90m" or "1h30m", got -1 (integer)',
    ),
    (
        'max-runtime = "six hours"',
        'key \'max-runtime\': expected seconds > 0 or a duration like "90m" or "1h30m", '
        'got "six hours" (string)',
    ),
    (
        'deadline = "25:00"',
        'key \'deadline\': expected a time of day "HH:MM" on the 24-hour clock (e.g. "06:30"), '
        'got "25:00" (string)',
    ),
    (
        "deadline = 06:30:15",
        'key \'deadline\': expected a time of day "HH:MM" on the 24-hour clock (e.g. "06:30"), '
        "got 06:30:15 (date/time)",
    ),
    (
        "prompt = []",
        "key 'prompt': expected a non-empty string or a list of non-empty strings (prompts), got [] (array)",
    ),
    (
        'prompt = ["roof", 3]',
        "key 'prompt': expected a non-empty string or a list of non-empty strings (prompts), "
        'got ["roof", 3] (array)',
    ),
    (
        'prompt = "  "',
        "key 'prompt': expected a non-empty string or a list of non-empty strings (prompts), "
        'got "  " (string)',
    ),
    (
        "include = 5",
        "key 'include': expected a non-empty string or a list of non-empty strings "
        "(glob patterns), got 5 (integer)",
    ),
    ("input = 42", "key 'input': expected a non-empty string, got 42 (integer)"),
    ("[input]\npath = 'x'", "key 'input': expected a non-empty string, got {...} (table)"),
    ('model = ""', "key 'model': expected a non-empty string, got \"\" (string)"),
]


@pytest.mark.parametrize("text, expected", BAD_VALUES, ids=[t for t, _ in BAD_VALUES])
def test_bad_values(tmp_path: Path, text: str, expected: str) -> None:
    assert error_of(tmp_path, text + "\n") == f"JOB: {expected}"


BAD_KEYS = [
    ("worker = 2", "unknown key 'worker'; did you mean 'workers'?"),
    ("mask-treshold = 0.5", "unknown key 'mask-treshold'; did you mean 'mask-threshold'?"),
    ("max_detection = 5", "unknown key 'max_detection'; did you mean 'max_detections'?"),
    ("colour = 'red'", "unknown key 'colour'"),
    ("extra = 1", "unknown key 'extra'"),
    ("job = 'other.toml'", "key 'job': a job file cannot name another job file"),
    ("max-attempts = 2\nmax_attempts = 3", "keys 'max-attempts' and 'max_attempts' set the same option"),
    ("prompt = 'a'\nprompts = ['b']", "keys 'prompt' and 'prompts' set the same option"),
]


@pytest.mark.parametrize("text, expected", BAD_KEYS, ids=[t for t, _ in BAD_KEYS])
def test_bad_keys(tmp_path: Path, text: str, expected: str) -> None:
    assert error_of(tmp_path, text + "\n") == f"JOB: {expected}"


def test_error_names_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "jobs").mkdir()
    write_job(tmp_path / "jobs", 'workers = "two"\n', name="x.toml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_job_file(Path("jobs/x.toml"))
    assert str(info.value) == (
        f'{Path("jobs/x.toml")}: key \'workers\': expected an integer >= 1 or "auto", got "two" (string)'
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("prompt = 'roof'\nworkers = \n", "line 2, column 11: TOML syntax error: invalid value"),
        ('prompt = "roof\nworkers = 1\n', "line 1, column 15: TOML syntax error: illegal character '\\n'"),
        ("prompt = 'roof\n", 'at the end of the file: TOML syntax error: expected "\'"'),
        (
            "deadline = 06:30\n",
            "line 1, column 13: TOML syntax error: expected newline or end of document after a statement",
        ),
        ("workers = 1\nworkers = 2\n", "line 2, column 12: TOML syntax error: a key is set twice"),
    ],
)
def test_toml_syntax_errors_give_line_and_column(tmp_path: Path, text: str, expected: str) -> None:
    assert error_of(tmp_path, text) == f"JOB: {expected}"


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: job file not found$"):
        load_job_file(tmp_path / "nope.toml")
    (tmp_path / "latin1.toml").write_bytes('prompt = "Dächer"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_job_file(tmp_path / "latin1.toml")
    assert str(info.value).endswith("latin1.toml: the job file is not UTF-8 text (byte 11); save it as UTF-8")


# ----------------------------------------------------------------------------- durations and times


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("6h", 21600.0),
        ("90m", 5400.0),
        ("45s", 45.0),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        ("3600", 3600.0),
        (" 10M ", 600.0),
        ("0.5", 0.5),
    ],
)
def test_duration_seconds(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "6x", "1m30h", "-5m", "0", "0m", "six hours", "inf", "1h 30"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        duration_seconds(text)
    assert str(info.value) == (
        f'expected a duration like 6h, 90m, 45s or 1h30m (more than zero), got "{text}"'
    )


@pytest.mark.parametrize(
    "text, hm", [("02:00", (2, 0)), ("2:05", (2, 5)), ("23:59", (23, 59)), ("00:00", (0, 0))]
)
def test_parse_hhmm(text: str, hm: tuple[int, int]) -> None:
    assert parse_hhmm(text) == hm


@pytest.mark.parametrize("text", ["24:00", "12:60", "2", "02:5", "2pm", "", "02:00:00", "-1:00"])
def test_bad_hhmm(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hhmm(text)
    assert str(info.value) == (
        f'expected a time of day HH:MM on the 24-hour clock (e.g. 02:00), got "{text}"'
    )


# ----------------------------------------------------------------------------- no torch in the parent


def test_parent_side_modules_do_not_import_torch() -> None:
    # A fresh interpreter: this test process may already hold torch from other tests.
    code = (
        "import sys; import batchseg.jobfile, batchseg.schedule, batchseg.logs, batchseg.doctor; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
