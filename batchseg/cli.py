"""The ``batchseg`` command line: parses options, calls one library function, maps errors to exit codes.

The options of ``run`` and ``retry`` are made from the registry (batchseg.options); a job file
(``--job``) becomes click's ``default_map``, so click itself resolves flags > ``BATCHSEG_*`` >
job file > defaults. ``Commands.invoke`` is the one place where a BatchsegError becomes a message
and an exit code (batchseg.errors.ExitCode).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

from . import __version__
from .config import RunConfig
from .errors import BatchsegError, ExitCode
from .logs import safe_echo
from .options import OPTIONS, Option, retry_options
from .records import FINAL_FAILURES, Status
from .values import Flag, Kind, Text, TextList

if TYPE_CHECKING:
    from .geo.export import ExportResult
    from .runner import RunSummary

    _ParamType = click.ParamType[Any]  # generic in newer click only: subscripted for the checker
else:
    _ParamType = click.ParamType

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = "Exit codes: " + "; ".join(f"{code.value} {code.meaning}" for code in ExitCode) + "."


class KindType(_ParamType):
    """A registry kind as a click type: one parser for flags, BATCHSEG_* and the job file."""

    def __init__(self, kind: Kind[Any], separator: str | None = None) -> None:
        self.kind = kind
        self.name = kind.metavar
        self.separator = separator

    def split_envvar_value(self, rv: str) -> Sequence[str]:
        # Lists in one variable: BATCHSEG_PROMPT="roof;solar panel" (a prompt may hold spaces).
        return rv.split(self.separator) if self.separator else super().split_envvar_value(rv)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        source = None
        if ctx is not None and param is not None and param.name is not None:
            source = ctx.get_parameter_source(param.name)
            if source is ParameterSource.DEFAULT_MAP:
                return value  # from the job file: already read by the same kind
        try:
            return self.kind.from_text(value)
        except BatchsegError as exc:
            where = _variable_of(param) if source is ParameterSource.ENVIRONMENT else ""
            self.fail(f"{exc}{where}", param, ctx)


def _variable_of(param: click.Parameter | None) -> str:
    """`` (from BATCHSEG_X)``: a bad value from the environment names its variable."""
    names = [] if param is None or param.envvar is None else param.envvar
    names = [names] if isinstance(names, str) else list(names)
    found = next((n for n in names if os.environ.get(n)), None)
    return f" (from {found})" if found else ""


def _help(opt: Option, retrying: bool) -> str:
    if retrying:  # retry's defaults are the values stored in the output folder
        return opt.help
    default = opt.shown_default.replace("`", "")
    return f"{opt.help} [default: {default}]" if default and not opt.required else opt.help


def _parameter(opt: Option, retrying: bool) -> Callable[[F], F]:
    """The click argument or option of a run option; its default is None: 'not given here'."""
    envvar = list(opt.envvars)
    if opt.argument:
        kind_type = KindType(opt.kind)
        return click.argument(opt.name, metavar=opt.cli_name, required=False, type=kind_type, envvar=envvar)
    attrs: dict[str, Any] = {"envvar": envvar, "default": None, "help": _help(opt, retrying)}
    decls = [opt.cli_name, opt.name]
    if isinstance(opt.kind, Flag):
        decls[0] = f"{opt.cli_name}/--no-{opt.cli_name[2:]}"
    elif isinstance(opt.kind, TextList):
        attrs |= {"multiple": True, "metavar": opt.kind.metavar}
        attrs["type"] = KindType(getattr(opt.kind, "item", Text()), separator=opt.kind.separator)
    else:
        attrs |= {"type": KindType(opt.kind), "metavar": opt.kind.metavar}
    return click.option(*decls, **attrs)


def _parameters(options: Iterable[Option], retrying: bool = False) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        for opt in reversed(list(options)):
            func = _parameter(opt, retrying)(func)
        return func

    return decorate


def _given(ctx: click.Context, names: Iterable[str]) -> dict[str, Any]:
    """The values given by a flag, a variable or the job file; ``auto`` (None) counts as given."""
    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) is not ParameterSource.DEFAULT}


def _use_job_file(ctx: click.Context, param: click.Parameter, job: Path | None) -> None:
    """``--job`` is eager: its values become the defaults of every other option of the command."""
    if job is not None:
        from .jobfile import load_job_file

        ctx.default_map = {**(ctx.default_map or {}), **load_job_file(job)}


def _report(summary: RunSummary) -> None:
    counts = ", ".join(f"{k}={v}" for k, v in sorted(summary.counts.items()) if v)
    safe_echo(f"processed {summary.processed} images in {summary.elapsed_s:.1f}s; totals: {counts or 'none'}")
    safe_echo(f"masks:    {summary.output_dir / 'masks'}")
    safe_echo(f"manifest: {summary.output_dir / 'manifest'}")
    if summary.log_path:
        safe_echo(f"log:      {summary.log_path}")
    for path, kept in summary.collisions.items():
        safe_echo(
            f"warning: '{path}' clashes with '{kept}' on a case-insensitive disk (invalid_input)", err=True
        )
    if summary.stopped:
        safe_echo(
            f"stopped early ({summary.stopped}): {summary.message or ''} - "
            "run the same command again to resume",
            err=True,
        )
    elif summary.exit_code == ExitCode.NOT_ALL_OK:
        safe_echo(
            "some images are not ok: see the manifest, or rerun them with: "
            f"batchseg retry {summary.output_dir}",
            err=True,
        )


def _finish(summary: RunSummary, note: str | None = None) -> None:
    _report(summary)
    if note:
        safe_echo(note)
    click.get_current_context().exit(summary.exit_code)


class Commands(click.Group):
    """The command group, and the one error boundary: a BatchsegError from any command (or from
    reading its options, such as a job file) becomes ``error: <message>`` and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            safe_echo("interrupted: stopped at once; run the same command again to resume", err=True)
            ctx.exit(ExitCode.STOPPED)
        except BatchsegError as exc:
            safe_echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchseg")
def cli() -> None:
    """Segment image folders with SAM3, unattended: watchdogs, resumable runs, Parquet manifests.

    \b
    Example:
      batchseg run ./aerial --prompt roof --model ./sam3
    """


@cli.command(
    epilog=EXIT_CODES_HELP
    + '\n\nExample:\n\n\b\n  batchseg run ./aerial --prompt roof --prompt "solar panel" --model ./sam3'
    + "\n  batchseg run --job jobs/aerial-nightly.toml --deadline 06:30"
)
@click.option(
    "--job",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="BATCHSEG_JOB",
    is_eager=True,
    expose_value=False,
    callback=_use_job_file,
    help="TOML job file holding any of these options; flags and BATCHSEG_* variables override it.",
)
@_parameters(OPTIONS)
def run(**_: Any) -> None:
    """Segment every image of INPUT (a folder, walked recursively) with the given prompts.

    Running the same command again on the same output folder resumes: finished images are skipped,
    new and changed ones are processed.
    """
    from .runner import run as run_folder

    _finish(run_folder(run_config(click.get_current_context()), stream=sys.stderr))


def run_config(ctx: click.Context) -> RunConfig:
    """The RunConfig of ``run``'s parsed options: flags > BATCHSEG_* > job file > defaults."""
    given = _given(ctx, (o.name for o in OPTIONS))
    if "input" not in given:
        raise click.UsageError("missing INPUT folder (give it as an argument or as 'input' in the job file)")
    if not given.get("prompts") and not given.get("exemplars"):
        raise click.UsageError("give at least one --prompt or --exemplars (or 'prompt' in the job file)")
    return RunConfig(**given)


@cli.command(
    epilog=EXIT_CODES_HELP
    + "\n\nExample:\n\n\b\n  batchseg retry output/aerial --status timeout --timeout 900"
)
@click.argument("output", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([str(s) for s in FINAL_FAILURES]),
    help="Only images with this status; repeatable [default: every status that is not ok].",
)
@_parameters(retry_options(), retrying=True)
def retry(output: Path, statuses: tuple[str, ...], **_: Any) -> None:
    """Rerun the images of OUTPUT whose status is not ok, with the configuration stored there.

    Works from the manifest alone when the checkpoint is gone. Only the options that may change
    between attempts are accepted; an option not given keeps the value stored in OUTPUT.
    """
    from .runner import retry as retry_failed

    chosen = tuple(Status(s) for s in statuses) or FINAL_FAILURES
    overrides = _given(click.get_current_context(), (o.name for o in retry_options()))
    _finish(retry_failed(output, chosen, overrides, stream=sys.stderr))


@cli.command(epilog="Example:\n\n\b\n  batchseg status output/aerial\n  batchseg status output/aerial --json")
@click.argument("output", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(output: Path, as_json: bool) -> None:
    """Counts per status, speed, top errors, and whether a run is live in OUTPUT."""
    from .status import collect_status, format_status

    report = collect_status(output)
    if as_json:
        click.echo(report.to_json())  # already JSON text: dumping it again printed one string
    else:
        safe_echo(format_status(report))


@cli.command(
    epilog="Example:\n\n\b\n"
    "  batchseg schedule --job jobs/aerial-nightly.toml --at 02:00 --days mon,tue,wed,thu,fri\n"
    "  batchseg schedule --job jobs/aerial-nightly.toml --at 02:00 --logon password --wake"
)
@click.option(
    "--job",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="Job file the task runs.",
)
@click.option("--at", "at", required=True, metavar="HH:MM", help="Start time, local.")
@click.option("--days", default=None, help="Comma-separated days (mon,tue,...) [default: every day].")
@click.option("--name", default=None, help="Task name [default: the job file's name].")
@click.option("--print", "print_only", is_flag=True, help="Print the task XML instead of writing it.")
@click.option("--cron", is_flag=True, help="Print a crontab line (Linux/macOS) instead.")
@click.option("--wake", is_flag=True, help="Wake the computer from sleep to run (WakeToRun).")
@click.option(
    "--logon",
    type=click.Choice(["interactive", "s4u", "password"]),
    default="interactive",
    show_default=True,
    help="interactive: only while you are logged on; s4u: also logged off, local disks only; "
    "password: also logged off, with network shares (schtasks asks for the password).",
)
@click.option("--user", default=None, help="Account of an s4u or password task [default: you].")
def schedule(
    job: Path,
    at: str,
    days: str | None,
    name: str | None,
    print_only: bool,
    cron: bool,
    wake: bool,
    logon: str,
    user: str | None,
) -> None:
    """Write a Windows Task Scheduler task that runs a job file nightly, and print how to register it.

    The task runs this Python with `-m batchseg run --job <job>` in the job's folder, never twice at
    once, with a time limit, and starts late after a missed start. Pick --logon by where your files
    are (see docs/nightly-windows.md); --wake for a PC that sleeps at night.
    """
    from .schedule import crontab_line, task_xml, write_task

    job = job.resolve()
    day_list = [d.strip() for d in days.split(",") if d.strip()] if days else None
    if cron:
        if wake or logon != "interactive":
            raise click.UsageError("--wake and --logon are Task Scheduler settings; cron has neither")
        click.echo(crontab_line(job, at, day_list, sys.executable))
        return
    options: dict[str, Any] = dict(time_limit_hours=_time_limit_hours(job), wake=wake, logon=logon, user=user)
    if print_only:
        click.echo(task_xml(job, at, day_list, sys.executable, **options))
        return
    lines = write_task(job, at, day_list, sys.executable, name=name, **options)
    for line in lines:
        safe_echo(line)


def _time_limit_hours(job: Path) -> float:
    """Task Scheduler's limit: the job's own --max-runtime plus an hour for the last images and the
    manifest, so Windows never kills a run that was about to stop cleanly; 12 h without one."""
    from .jobfile import load_job_file

    runtime = load_job_file(job).get("max_runtime")
    return 12.0 if runtime is None else float(runtime) / 3600 + 1.0


@cli.command(epilog="Example:\n\n\b\n  batchseg doctor --model ./sam3")
@click.option("--model", default=None, help="Model folder or hub id to check.")
def doctor(model: str | None) -> None:
    """Check the installation once: versions, CUDA, GPU memory, the model folder, the dtype auto picks."""
    from .doctor import doctor_exit_code, format_checks, run_doctor

    checks = run_doctor(model)
    safe_echo(format_checks(checks))
    click.get_current_context().exit(doctor_exit_code(checks))


@cli.command(epilog="Example:\n\n\b\n  batchseg demo\n  batchseg demo --output /tmp/demo")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("output"),
    show_default=True,
    help="Folder under which demo-model/, demo-images/ and demo/ are made.",
)
def demo(output: Path) -> None:
    """Run the whole pipeline on a tiny random SAM3 and generated images (no download needed).

    The masks are meaningless: the weights are random. It shows the outputs and proves the install.
    """
    from .demo import run_demo

    _finish(
        run_demo(output, stream=sys.stderr),
        note="the demo model has random weights: its masks are meaningless; the pipeline is real",
    )


def main() -> None:
    """Console-script entry point."""
    # Windows consoles may not be UTF-8: never crash on printing a file name.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="replace")
            except (ValueError, OSError):
                pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli(prog_name="batchseg")


@cli.command(
    epilog="Example:\n\n\b\n  batchseg export output/aerial --format gpkg\n"
    "  batchseg export output/aerial --format geojson --to-crs EPSG:4326\n"
    "  batchseg export output/aerial --split-by-crs --skip-unreferenced\n\n"
    "Exit codes: 0 written; 1 nothing written (no polygons.parquet, several CRSs without a choice); "
    "2 a bad option or CRS; 3 written, but some images' polygons could not be reprojected "
    "(named on stderr)."
)
@click.argument("output", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--format", "fmt", type=click.Choice(["gpkg", "geojson", "shp"]), default="gpkg", show_default=True,
    help="GeoPackage, GeoJSON or Shapefile.",
)  # fmt: skip
@click.option(
    "--to-crs", default=None, metavar="CRS", callback=lambda ctx, param, value: _a_crs(value),
    help="Reproject to this CRS (EPSG:XXXX) into one file.",
)  # fmt: skip
@click.option(
    "--split-by-crs", is_flag=True,
    help="One file per CRS, nothing reprojected: <dest stem>.EPSG_32633.<format>, ... "
    "(.pixels. for images without georeference).",
)  # fmt: skip
@click.option(
    "--skip-unreferenced", is_flag=True,
    help="Leave out the polygons of images without a CRS (no georeference, or a world file without .prj).",
)  # fmt: skip
@click.option(
    "--dest", type=click.Path(path_type=Path, dir_okay=False), default=None,
    help="File to write [default: OUTPUT/manifest/polygons.<format>].",
)  # fmt: skip
def export(
    output: Path, fmt: str, to_crs: str | None, split_by_crs: bool, skip_unreferenced: bool, dest: Path | None
) -> None:
    """Write the polygons of a run made with --vectors to files QGIS opens (needs batchseg[geo]).

    One file holds one CRS and nothing is reprojected unless --to-crs is given: images in several
    CRSs need --to-crs, --split-by-crs or --skip-unreferenced.
    """
    from .geo.export import export_polygons  # GeoExtraMissing (a ConfigError) names the extra

    if split_by_crs and to_crs is not None:
        raise click.UsageError("give --split-by-crs (one file per CRS) or --to-crs (one file), not both")
    done = export_polygons(
        output, fmt, to_crs, dest, skip_unreferenced=skip_unreferenced, split_by_crs=split_by_crs
    )
    _report_export(done)
    if done.skipped:  # the files are written, but without these images' polygons
        click.get_current_context().exit(ExitCode.NOT_ALL_OK)


def _a_crs(value: str | None) -> str | None:
    """A --to-crs PROJ cannot read is a bad value (exit 2), refused before anything is read."""
    if value is None:
        return None
    try:
        import pyproj
    except ImportError:
        return value  # the export itself names the missing extra
    try:
        pyproj.CRS.from_user_input(value)
    except pyproj.exceptions.CRSError as exc:
        raise click.BadParameter(f"{value!r} is not a CRS ({exc})") from None
    return value


def _report_export(done: ExportResult) -> None:
    for file in done.files:
        safe_echo(f"wrote {file.count} polygon(s) to {file.path} (CRS: {file.crs or 'none'})")
    if done.left_out:
        names = ", ".join(s.path for s in done.left_out[:5]) + (" ..." if len(done.left_out) > 5 else "")
        count = sum(s.count for s in done.left_out)
        safe_echo(f"left out {count} polygon(s) of {len(done.left_out)} image(s) without a CRS: {names}")
    for skipped in done.skipped:
        safe_echo(f"not written: {skipped.path}: {skipped.count} polygon(s) {skipped.reason}", err=True)
    if done.skipped:
        count = sum(s.count for s in done.skipped)
        safe_echo(f"{count} polygon(s) of {len(done.skipped)} image(s) are not in the file(s)", err=True)


@cli.command(
    epilog="Example:\n\n\b\n  batchseg report output/aerial\n  batchseg report output/aerial --previews"
)
@click.argument("output", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--previews", is_flag=True, help="First make the overlay previews that are missing.")
@click.option(
    "--preview-size",
    type=click.IntRange(min=64),
    default=1024,
    show_default=True,
    help="Long side of a preview, pixels.",
)
@click.option("--redo", is_flag=True, help="With --previews: remake every preview, not only missing ones.")
def report(output: Path, previews: bool, preview_size: int, redo: bool) -> None:
    """Write OUTPUT/report.html: summary, failures, detections per prompt, a gallery of previews.

    A static page (no server, nothing from the internet) that opens from a file share.
    """
    from .report import make_missing_previews, write_report

    if previews:
        made, failed = make_missing_previews(output, preview_size, redo=redo, stream=sys.stderr)
        safe_echo(f"previews: {made} made" + (f", {failed} could not be made (see above)" if failed else ""))
    safe_echo(f"report: {write_report(output)}")
