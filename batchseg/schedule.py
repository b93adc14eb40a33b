"""Nightly runs: a Windows Task Scheduler task or a crontab line that runs ``batchseg run --job FILE``.

On Windows, :func:`task_xml` builds a task definition (Task Scheduler schema 1.2, what
``schtasks /Create /XML`` takes), :func:`write_task_xml` stores it as UTF-16 with a BOM, and
:func:`schtasks_commands` gives the command lines that register and remove it. The task:

- starts at HH:MM local time every day, or on the given days of the week;
- runs the absolute Python path with ``-m batchseg run --job "<absolute job path>"`` in the job's folder;
- logs on as ``logon`` says (:data:`LOGON_ADVICE` tells which to pick): ``interactive`` (the default)
  runs only while the user is logged on, ``s4u`` also while logged off but without network shares,
  ``password`` also while logged off with network shares (schtasks asks for the password once);
- wakes the computer from sleep for the run with ``wake`` (WakeToRun), at normal priority;
- does not start a second copy while one is running (``IgnoreNew``), starts late when the computer was
  off or asleep at the set time (``StartWhenAvailable``), runs on battery, and is stopped by Task
  Scheduler after ``time_limit_hours``. Give the job a ``max-runtime`` below that limit so batchseg
  stops itself cleanly (exit 4, resumable) before Task Scheduler ends it the hard way.

On Linux and macOS :func:`crontab_line` gives the equivalent line for ``crontab -e``.

This module is imported by the parent process: it never imports torch.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import math
import os
import re
import shlex
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from .atomic import atomic_write_bytes
from .errors import ConfigError
from .jobfile import parse_hhmm

__all__ = [
    "LOGON_ADVICE",
    "LOGON_TYPES",
    "TASK_FOLDER",
    "TASK_NAMESPACE",
    "crontab_line",
    "current_user",
    "default_task_name",
    "parse_days",
    "schtasks_commands",
    "task_xml",
    "write_task",
    "write_task_xml",
]

TASK_NAMESPACE = "http://schemas.microsoft.com/windows/2004/02/mit/task"
#: Task Scheduler folder the tasks are registered under.
TASK_FOLDER = "batchseg"

#: --logon choices and the Task Scheduler LogonType each one writes.
LOGON_TYPES = {"interactive": "InteractiveToken", "s4u": "S4U", "password": "Password"}
#: Which --logon to pick, and why; printed by ``batchseg schedule`` and repeated in docs/nightly-windows.md.
LOGON_ADVICE = {
    "interactive": "runs only while you are logged on (locked is fine); nothing is stored. A PC left "
    "logged off at the start time skips the night: use --logon s4u or password for that.",
    "s4u": "runs whether you are logged on or not, no password stored; Windows gives the task no "
    "network credentials, so input, output and model must be on local disks.",
    "password": "runs whether you are logged on or not, with your network credentials: the choice when "
    "images, output or model are on a network share. schtasks asks for your password once and "
    "Windows stores it; change the task after a password change. Write shares as UNC paths "
    "(\\\\server\\share\\...) in the job file: drive letters mapped at logon do not exist in the "
    "task's session.",
}

#: Week order, as Task Scheduler names the days; cron numbers them from Sunday = 0.
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_CRON_DAY = {day: (number + 1) % 7 for number, day in enumerate(_DAYS)}
# Characters Task Scheduler refuses in a task name (the folder separator is added by us).
_BAD_TASK_NAME = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def parse_days(days: Sequence[str] | str | None) -> list[str] | None:
    """``["mon", "wed"]`` or ``"mon,wed"`` -> ``["Monday", "Wednesday"]`` in week order; None = daily.

    Takes three-letter or full English day names, any case. All seven days is the same as daily.
    Raises ConfigError naming a day it does not know.
    """
    if days is None:
        return None
    words = [days] if isinstance(days, str) else list(days)
    tokens = [t.strip().lower() for word in words for t in str(word).split(",") if t.strip()]
    if not tokens:
        raise ConfigError("--days: no day given; expected days like mon,tue,wed (or leave it out for daily)")
    chosen: set[str] = set()
    for token in tokens:
        day = next((d for d in _DAYS if token in (d.lower(), d[:3].lower())), None)
        if day is None:
            raise ConfigError(f"--days: unknown day {token!r}; expected mon, tue, wed, thu, fri, sat or sun")
        chosen.add(day)
    if len(chosen) == len(_DAYS):
        return None
    return [d for d in _DAYS if d in chosen]


def _at(at: str) -> tuple[int, int]:
    try:
        return parse_hhmm(at)
    except ConfigError as exc:
        raise ConfigError(f"--at: {exc}") from None


def _job_path(job: Path) -> Path:
    path = Path(job).resolve()
    if '"' in str(path) or any(ord(ch) < 32 for ch in str(path)):
        raise ConfigError(f"job file path {str(path)!r} contains a quote or a control character")
    return path


def _iso_duration(hours: float) -> str:
    """12 -> ``PT12H``, 1.5 -> ``PT1H30M``: the xs:duration Task Scheduler expects."""
    if not math.isfinite(hours) or hours <= 0:
        raise ConfigError(f"time limit must be more than 0 hours, got {hours}")
    total_minutes = max(1, round(hours * 60))
    h, m = divmod(total_minutes, 60)
    return "PT" + (f"{h}H" if h else "") + (f"{m}M" if m else "")


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = text
    return element


def task_xml(
    job: Path,
    at: str,
    days: Sequence[str] | None,
    python: str = sys.executable,
    time_limit_hours: float = 12,
    start_date: _dt.date | None = None,
    *,
    wake: bool = False,
    logon: str = "interactive",
    user: str | None = None,
) -> str:
    """The Task Scheduler task definition (XML text) that runs the job at ``at`` (HH:MM, local time).

    ``days``: None for every day, else day names (see :func:`parse_days`). ``start_date``: the day the
    schedule begins (today by default; the time of day is what matters). ``wake``: wake the computer
    from sleep to run. ``logon``: a key of :data:`LOGON_TYPES`; ``s4u`` and ``password`` name the
    account (``user``, the current one by default). Raises ConfigError on a bad time, day, limit or
    logon.
    """
    logon_type = _logon_type(logon)
    hour, minute = _at(at)
    week = parse_days(days)
    limit = _iso_duration(time_limit_hours)
    job_path = _job_path(job)
    start = _dt.datetime.combine(start_date or _dt.date.today(), _dt.time(hour, minute))

    # Plain tag names under a default xmlns: the schema's attributes (version, id, Context) are unqualified.
    task = ET.Element("Task", {"version": "1.2", "xmlns": TASK_NAMESPACE})
    info = _sub(task, "RegistrationInfo")
    _sub(info, "Author", "batchseg")
    _sub(info, "Description", f"batchseg nightly run of {job_path}")
    _add_trigger(_sub(task, "Triggers"), start, week)
    principal = _sub(_sub(task, "Principals"), "Principal")
    principal.set("id", "Author")
    if logon != "interactive":  # InteractiveToken: the registering user, while logged on
        _sub(principal, "UserId", user or current_user())
    _sub(principal, "LogonType", logon_type)
    _sub(principal, "RunLevel", "LeastPrivilege")
    _add_settings(_sub(task, "Settings"), limit, wake)
    actions = _sub(task, "Actions")
    actions.set("Context", "Author")
    exec_ = _sub(actions, "Exec")
    _sub(exec_, "Command", str(python))
    _sub(exec_, "Arguments", f'-m batchseg run --job "{job_path}"')
    _sub(exec_, "WorkingDirectory", str(job_path.parent))

    ET.indent(task, space="  ")
    body = ET.tostring(task, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-16"?>\n' + body + "\n"


def _add_trigger(triggers: ET.Element, start: _dt.datetime, week: list[str] | None) -> None:
    trigger = _sub(triggers, "CalendarTrigger")
    # No UTC offset: the boundary is local time, so the run stays at HH:MM across daylight saving.
    _sub(trigger, "StartBoundary", start.strftime("%Y-%m-%dT%H:%M:%S"))
    _sub(trigger, "Enabled", "true")
    if week is None:
        _sub(_sub(trigger, "ScheduleByDay"), "DaysInterval", "1")
        return
    by_week = _sub(trigger, "ScheduleByWeek")
    _sub(by_week, "WeeksInterval", "1")
    days_of_week = _sub(by_week, "DaysOfWeek")
    for day in week:
        _sub(days_of_week, day)


def _logon_type(logon: str) -> str:
    if logon not in LOGON_TYPES:
        raise ConfigError(f"--logon: expected one of {', '.join(LOGON_TYPES)}, got {logon!r}")
    return LOGON_TYPES[logon]


def current_user() -> str:
    """``DOMAIN\\user`` on Windows (what Task Scheduler and schtasks /RU take), else the login name."""
    domain, name = os.environ.get("USERDOMAIN"), os.environ.get("USERNAME")
    if domain and name:
        return f"{domain}\\{name}"
    return getpass.getuser()


def _add_settings(settings: ET.Element, limit: str, wake: bool = False) -> None:
    for tag, value in (
        ("MultipleInstancesPolicy", "IgnoreNew"),  # a run still going at the next start continues alone
        ("DisallowStartIfOnBatteries", "false"),
        ("StopIfGoingOnBatteries", "false"),
        ("AllowHardTerminate", "true"),
        ("StartWhenAvailable", "true"),  # missed because the PC was off: run as soon as it is back
        ("RunOnlyIfNetworkAvailable", "false"),
    ):
        _sub(settings, tag, value)
    idle = _sub(settings, "IdleSettings")
    _sub(idle, "StopOnIdleEnd", "false")  # the user coming back must not kill the run
    _sub(idle, "RestartOnIdle", "false")
    for tag, value in (
        ("AllowStartOnDemand", "true"),  # "Run" in the Task Scheduler window, for a test
        ("Enabled", "true"),
        ("Hidden", "false"),
        ("RunOnlyIfIdle", "false"),
        # Waking also needs "Allow wake timers" on in the power plan (on by default on desktops).
        ("WakeToRun", "true" if wake else "false"),
        ("ExecutionTimeLimit", limit),
        # The default 7 is below-normal CPU and low I/O and memory priority: too slow for the night's job.
        ("Priority", "6"),
    ):
        _sub(settings, tag, value)


def write_task_xml(path: Path, xml: str) -> None:
    """Write a task definition as UTF-16 with a BOM and CRLF line ends (what schtasks reads), atomically."""
    text = xml.replace("\r\n", "\n").replace("\n", "\r\n")
    atomic_write_bytes(Path(path), b"\xff\xfe" + text.encode("utf-16-le"))


def default_task_name(job: Path) -> str:
    """A task name from the job file's name: ``jobs/aerial-nightly.toml`` -> ``aerial-nightly``."""
    name = _BAD_TASK_NAME.sub("_", Path(job).stem).strip(" .")
    return name or "job"


def schtasks_commands(
    task_name: str, xml_path: Path, logon: str = "interactive", user: str | None = None
) -> tuple[str, str]:
    """The exact command lines that register the task (replacing one of that name) and delete it.

    With ``logon="password"`` the register command ends in ``/RU "<user>" /RP``: schtasks then asks
    for the password (never on the command line, where it would stay in the shell's history).
    """
    _logon_type(logon)
    if not task_name or _BAD_TASK_NAME.search(task_name):
        raise ConfigError(
            f'task name {task_name!r} is empty or contains one of \\ / : * ? " < > | (see default_task_name)'
        )
    if '"' in str(xml_path):
        raise ConfigError(f"task file path {str(xml_path)!r} contains a quote")
    full_name = f"{TASK_FOLDER}\\{task_name}"
    create = f'schtasks /Create /TN "{full_name}" /XML "{xml_path}" /F'
    if logon == "password":
        account = user or current_user()
        if '"' in account:
            raise ConfigError(f"user name {account!r} contains a quote")
        create += f' /RU "{account}" /RP'
    delete = f'schtasks /Delete /TN "{full_name}" /F'
    return create, delete


def write_task(
    job: Path,
    at: str,
    days: Sequence[str] | None,
    python: str = sys.executable,
    *,
    name: str | None = None,
    time_limit_hours: float = 12,
    wake: bool = False,
    logon: str = "interactive",
    user: str | None = None,
) -> list[str]:
    """Write ``<job>.task.xml`` beside the job file; returns the lines to show: the file, the commands
    that register and remove the task, what the logon means, and where the morning's report is."""
    xml = task_xml(
        job, at, days, python, time_limit_hours=time_limit_hours, wake=wake, logon=logon, user=user
    )
    xml_path = Path(job).resolve().with_suffix(".task.xml")
    write_task_xml(xml_path, xml)
    create, delete = schtasks_commands(name or default_task_name(job), xml_path, logon, user)
    lines = [f"wrote {xml_path}", f"register it:  {create}", f"remove it:    {delete}"]
    lines.append(f"logon {logon}: {LOGON_ADVICE[logon]}")
    if not wake:
        lines.append("a PC asleep at the start time runs the job when it wakes; --wake wakes it instead")
    lines.append("in the morning: report.html in the output folder, beside logs/ (job key previews = true)")
    return lines


def _cron_quote(text: str) -> str:
    # cron turns an unescaped % into a newline before the shell sees the command.
    return shlex.quote(text).replace("%", "\\%")


def crontab_line(job: Path, at: str, days: Sequence[str] | None, python: str = sys.executable) -> str:
    """A crontab line running the job at ``at`` local time, in the job's folder.

    The output is appended to ``<job name>.cron.log`` beside the job file (cron mails or drops it
    otherwise); batchseg's own run log is in OUTPUT/logs. A second start while a run is going is
    refused by the run lock of the output folder.
    """
    hour, minute = _at(at)
    week = parse_days(days)
    job_path = _job_path(job)
    dow = "*" if week is None else ",".join(str(_CRON_DAY[d]) for d in week)
    log = job_path.with_name(job_path.stem + ".cron.log")
    command = (
        f"cd {_cron_quote(str(job_path.parent))} && "
        f"{_cron_quote(str(python))} -m batchseg run --job {_cron_quote(str(job_path))} "
        f">> {_cron_quote(str(log))} 2>&1"
    )
    return f"{minute} {hour} * * {dow} {command}"
