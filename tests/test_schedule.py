"""Scheduling: the Task Scheduler XML parsed back element by element, its file encoding, schtasks and cron."""

from __future__ import annotations

import datetime as dt
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchseg.cli import cli
from batchseg.errors import ConfigError
from batchseg.schedule import (
    LOGON_ADVICE,
    TASK_NAMESPACE,
    crontab_line,
    current_user,
    default_task_name,
    parse_days,
    schtasks_commands,
    task_xml,
    write_task_xml,
)

NS = {"t": TASK_NAMESPACE}
DAY = dt.date(2025, 3, 1)
WIN_PYTHON = "C:\\Program Files\\Python311\\python.exe"


@pytest.fixture()
def job(tmp_path: Path) -> Path:
    folder = tmp_path / "night jobs & <stuff>"  # spaces and XML-special characters
    folder.mkdir()
    path = folder / "aerial-nightly.toml"
    path.write_text('prompt = "roof"\n', encoding="utf-8")
    return path


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml.split("\n", 1)[1])  # fromstring refuses a str with an encoding declaration


def text(root: ET.Element, path: str) -> str | None:
    element = root.find(path, NS)
    assert element is not None, f"missing element {path}"
    return element.text


# ----------------------------------------------------------------------------- task XML


def test_daily_task_element_by_element(job: Path) -> None:
    xml = task_xml(job, "02:00", None, python=WIN_PYTHON, start_date=DAY)
    assert xml.startswith('<?xml version="1.0" encoding="UTF-16"?>\n')
    root = parse(xml)
    assert root.tag == f"{{{TASK_NAMESPACE}}}Task" and root.get("version") == "1.2"

    trigger = "t:Triggers/t:CalendarTrigger"
    assert len(root.findall("t:Triggers/*", NS)) == 1
    assert text(root, f"{trigger}/t:StartBoundary") == "2025-03-01T02:00:00"
    assert text(root, f"{trigger}/t:Enabled") == "true"
    assert text(root, f"{trigger}/t:ScheduleByDay/t:DaysInterval") == "1"
    assert root.find(f"{trigger}/t:ScheduleByWeek", NS) is None

    action = "t:Actions/t:Exec"
    assert len(root.findall("t:Actions/*", NS)) == 1
    assert text(root, f"{action}/t:Command") == WIN_PYTHON
    assert text(root, f"{action}/t:Arguments") == f'-m batchseg run --job "{job.resolve()}"'
    assert text(root, f"{action}/t:WorkingDirectory") == str(job.resolve().parent)

    settings_element = root.find("t:Settings", NS)
    assert settings_element is not None
    settings = {child.tag.split("}")[1]: child.text for child in settings_element}
    assert settings["MultipleInstancesPolicy"] == "IgnoreNew"
    assert settings["ExecutionTimeLimit"] == "PT12H"
    assert settings["StartWhenAvailable"] == "true"
    assert settings["DisallowStartIfOnBatteries"] == "false"
    assert settings["StopIfGoingOnBatteries"] == "false"
    assert settings["Enabled"] == "true" and settings["AllowStartOnDemand"] == "true"
    assert text(root, "t:Settings/t:IdleSettings/t:StopOnIdleEnd") == "false"
    assert text(root, "t:Principals/t:Principal/t:LogonType") == "InteractiveToken"
    assert root.find("t:Principals/t:Principal", NS).get("id") == root.find("t:Actions", NS).get("Context")


def test_weekly_task_lists_the_days_in_week_order(job: Path) -> None:
    root = parse(task_xml(job, "23:45", ["fri", "Mon", "wednesday"], python=WIN_PYTHON, start_date=DAY))
    week = "t:Triggers/t:CalendarTrigger/t:ScheduleByWeek"
    assert text(root, "t:Triggers/t:CalendarTrigger/t:StartBoundary") == "2025-03-01T23:45:00"
    assert text(root, f"{week}/t:WeeksInterval") == "1"
    days = [d.tag.split("}")[1] for d in root.findall(f"{week}/t:DaysOfWeek/*", NS)]
    assert days == ["Monday", "Wednesday", "Friday"]
    assert root.find("t:Triggers/t:CalendarTrigger/t:ScheduleByDay", NS) is None


def test_start_date_defaults_to_today_and_time_limit_is_an_iso_duration(job: Path) -> None:
    root = parse(task_xml(job, "7:05", None, time_limit_hours=1.5))
    assert text(root, "t:Triggers/t:CalendarTrigger/t:StartBoundary") == f"{dt.date.today()}T07:05:00"
    assert text(root, "t:Settings/t:ExecutionTimeLimit") == "PT1H30M"
    assert text(root, "t:Actions/t:Exec/t:Command") is not None
    root = parse(task_xml(job, "7:05", None, time_limit_hours=0.25))
    assert text(root, "t:Settings/t:ExecutionTimeLimit") == "PT15M"


def test_special_characters_are_escaped_and_round_trip(job: Path) -> None:
    xml = task_xml(job, "02:00", None, python=WIN_PYTHON, start_date=DAY)
    assert "&amp;" in xml and "&lt;stuff&gt;" in xml and "& <" not in xml
    assert str(job.resolve()) in text(parse(xml), "t:Actions/t:Exec/t:Arguments")  # type: ignore[operator]


@pytest.mark.parametrize(
    "at, days, message",
    [
        ("25:00", None, '--at: expected a time of day HH:MM on the 24-hour clock (e.g. 02:00), got "25:00"'),
        ("2am", None, '--at: expected a time of day HH:MM on the 24-hour clock (e.g. 02:00), got "2am"'),
        (
            "02:00",
            ["mon", "funday"],
            "--days: unknown day 'funday'; expected mon, tue, wed, thu, fri, sat or sun",
        ),
        (
            "02:00",
            [" ", ""],
            "--days: no day given; expected days like mon,tue,wed (or leave it out for daily)",
        ),
    ],
)
def test_bad_time_or_days(job: Path, at: str, days: list[str] | None, message: str) -> None:
    for build in (lambda: task_xml(job, at, days), lambda: crontab_line(job, at, days)):
        with pytest.raises(ConfigError) as info:
            build()
        assert str(info.value) == message


def test_bad_time_limit(job: Path) -> None:
    with pytest.raises(ConfigError, match="time limit must be more than 0 hours, got 0"):
        task_xml(job, "02:00", None, time_limit_hours=0)


@pytest.mark.parametrize(
    "days, expected",
    [
        (None, None),
        ("mon,wed", ["Monday", "Wednesday"]),
        (["sun", "sat"], ["Saturday", "Sunday"]),
        (["MON,tue", "tue"], ["Monday", "Tuesday"]),
        (["mon", "tue", "wed", "thu", "fri", "sat", "sun"], None),  # every day is daily
    ],
)
def test_parse_days(days: list[str] | str | None, expected: list[str] | None) -> None:
    assert parse_days(days) == expected


# ----------------------------------------------------------------------------- the file


def test_task_file_is_utf16_with_bom_and_parses_back(job: Path, tmp_path: Path) -> None:
    xml = task_xml(job, "02:00", ["sat"], python=WIN_PYTHON, start_date=DAY)
    path = tmp_path / "out" / "aerial.task.xml"
    path.parent.mkdir()
    path.write_bytes(b"old content")
    write_task_xml(path, xml)
    raw = path.read_bytes()
    assert raw[:2] == b"\xff\xfe"  # UTF-16 LE byte order mark
    decoded = raw[2:].decode("utf-16-le")
    assert decoded == xml.replace("\n", "\r\n")
    assert "\r\n" in decoded and "\n" not in decoded.replace("\r\n", "")
    root = ET.parse(path).getroot()  # expat reads the declaration and the BOM
    assert text(root, "t:Actions/t:Exec/t:Arguments") == f'-m batchseg run --job "{job.resolve()}"'
    assert sorted(p.name for p in path.parent.iterdir()) == ["aerial.task.xml"]  # no temp file left


# ----------------------------------------------------------------------------- schtasks


def test_schtasks_command_lines() -> None:
    xml_path = Path("C:\\jobs\\aerial nightly.task.xml")
    create, delete = schtasks_commands("aerial-nightly", xml_path)
    assert create == f'schtasks /Create /TN "batchseg\\aerial-nightly" /XML "{xml_path}" /F'
    assert delete == 'schtasks /Delete /TN "batchseg\\aerial-nightly" /F'


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", 'x"y', "what?", "a:b"])
def test_bad_task_names(name: str) -> None:
    with pytest.raises(ConfigError, match="task name"):
        schtasks_commands(name, Path("t.xml"))


def test_default_task_name_is_always_accepted() -> None:
    assert default_task_name(Path("jobs/aerial-nightly.toml")) == "aerial-nightly"
    assert default_task_name(Path("jobs/a:b?c.toml")) == "a_b_c"
    assert default_task_name(Path("jobs/...toml")) == "job"
    schtasks_commands(default_task_name(Path("jobs/a:b?c.toml")), Path("t.xml"))


# ----------------------------------------------------------------------------- cron


def test_crontab_line_daily_exact(tmp_path: Path) -> None:
    job = tmp_path / "aerial.toml"
    line = crontab_line(job, "02:30", None, python="/opt/venv/bin/python")
    folder = tmp_path.resolve()
    assert line == (
        f"30 2 * * * cd {folder} && /opt/venv/bin/python -m batchseg run --job {folder / 'aerial.toml'} "
        f">> {folder / 'aerial.cron.log'} 2>&1"
    )


def test_crontab_line_days_quoting_and_percent(tmp_path: Path) -> None:
    folder = tmp_path / "my jobs"
    folder.mkdir()
    job = folder / "roofs 100%.toml"
    line = crontab_line(job, "23:05", ["sun", "mon", "fri"], python="/opt/py env/bin/python")
    minute, hour, dom, month, dow, command = line.split(" ", 5)
    assert (minute, hour, dom, month, dow) == ("5", "23", "*", "*", "1,5,0")
    # cron turns a bare % into a newline; escaped, cron hands the shell a plain %.
    assert "%" not in command.replace("\\%", "")
    words = shlex.split(command.replace("\\%", "%"))
    assert words == [
        "cd",
        str(folder.resolve()),
        "&&",
        "/opt/py env/bin/python",
        "-m",
        "batchseg",
        "run",
        "--job",
        str(job.resolve()),
        ">>",
        str(folder.resolve() / "roofs 100%.cron.log"),
        "2>&1",
    ]


# ----------------------------------------------------------------------------- logon and wake


@pytest.mark.parametrize(
    "logon, logon_type, user_id",
    [
        ("interactive", "InteractiveToken", None),
        ("s4u", "S4U", "PC\\night"),
        ("password", "Password", "PC\\night"),
    ],
)
def test_logon_types(job: Path, logon: str, logon_type: str, user_id: str | None) -> None:
    root = parse(
        task_xml(job, "02:00", None, python=WIN_PYTHON, start_date=DAY, logon=logon, user="PC\\night")
    )
    principal = "t:Principals/t:Principal"
    assert text(root, f"{principal}/t:LogonType") == logon_type
    element = root.find(f"{principal}/t:UserId", NS)
    assert (element.text if element is not None else None) == user_id
    # Task Scheduler's schema wants UserId before LogonType.
    children = [c.tag.split("}")[1] for c in root.find(principal, NS)]  # type: ignore[union-attr]
    assert children == (["UserId"] if user_id else []) + ["LogonType", "RunLevel"]


def test_logon_user_defaults_to_the_windows_account(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USERDOMAIN", "OFFICE")
    monkeypatch.setenv("USERNAME", "anna")
    assert current_user() == "OFFICE\\anna"
    root = parse(task_xml(job, "02:00", None, logon="s4u"))
    assert text(root, "t:Principals/t:Principal/t:UserId") == "OFFICE\\anna"
    create, _ = schtasks_commands("n", Path("C:\\j\\n.task.xml"), "password")
    assert create.endswith(' /F /RU "OFFICE\\anna" /RP')


def test_wake_to_run(job: Path) -> None:
    for wake, expected in ((False, "false"), (True, "true")):
        root = parse(task_xml(job, "02:00", None, start_date=DAY, wake=wake))
        assert text(root, "t:Settings/t:WakeToRun") == expected


def test_password_logon_registers_with_a_password_prompt() -> None:
    xml_path = Path("C:\\jobs\\aerial.task.xml")
    create, delete = schtasks_commands("aerial", xml_path, "password", "PC\\night")
    assert create == f'schtasks /Create /TN "batchseg\\aerial" /XML "{xml_path}" /F /RU "PC\\night" /RP'
    assert (
        schtasks_commands("aerial", xml_path, "s4u", "PC\\night")[0]
        == schtasks_commands("aerial", xml_path)[0]
    )
    with pytest.raises(
        ConfigError, match="--logon: expected one of interactive, s4u, password, got 'system'"
    ):
        schtasks_commands("aerial", xml_path, "system")
    with pytest.raises(ConfigError, match="--logon"):
        task_xml(Path("j.toml"), "02:00", None, logon="batch")


def test_schedule_command_prints_which_logon_and_why(job: Path) -> None:
    args = [
        "schedule",
        "--job",
        str(job),
        "--at",
        "02:00",
        "--logon",
        "password",
        "--user",
        "PC\\night",
        "--wake",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    xml_path = job.resolve().with_suffix(".task.xml")
    assert result.output.splitlines() == [
        f"wrote {xml_path}",
        f'register it:  schtasks /Create /TN "batchseg\\aerial-nightly" /XML "{xml_path}" /F'
        ' /RU "PC\\night" /RP',
        'remove it:    schtasks /Delete /TN "batchseg\\aerial-nightly" /F',
        f"logon password: {LOGON_ADVICE['password']}",
        "in the morning: report.html in the output folder, beside logs/ (job key previews = true)",
    ]
    root = ET.parse(xml_path).getroot()
    assert text(root, "t:Settings/t:WakeToRun") == "true"
    assert text(root, "t:Principals/t:Principal/t:LogonType") == "Password"
    plain = CliRunner().invoke(cli, ["schedule", "--job", str(job), "--at", "02:00"])
    assert "logon interactive: runs only while you are logged on" in plain.output
    assert "--wake wakes it instead" in plain.output
    cron = CliRunner().invoke(cli, ["schedule", "--job", str(job), "--at", "02:00", "--cron", "--wake"])
    assert cron.exit_code == 2 and "--wake and --logon are Task Scheduler settings" in cron.output
