"""The ``batchseg`` command line: parses options, calls one library function, maps errors to exit codes.

Exit codes: 0 all ok · 1 fatal error · 2 usage error · 3 finished, some images not ok ·
4 stopped early (Ctrl-C, deadline, circuit breaker) and resumable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from . import __version__
from .config import RunConfig
from .errors import BatchsegError, ConfigError, StoppedEarly
from .logs import safe_echo
from .records import FINAL_FAILURES, Status

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = (
    "Exit codes: 0 all images ok; 1 fatal error (bad config, model cannot load, output not "
    "writable); 2 usage error; 3 finished, some images not ok; 4 stopped early (Ctrl-C, deadline, "
    "circuit breaker), run the same command again to resume."
)

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N. Asking for cuda without one is an error."
DTYPE_CHOICES = click.Choice(["auto", "float32", "bfloat16", "float16"])

# Options whose value may change between attempts (run and retry); the rest define the output and
# are fixed by the configuration fingerprint.
OPERATIONAL_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--device",), dict(help=f"Device: {DEVICE_HELP} [default: auto]")),
    (
        ("--workers",),
        dict(type=click.IntRange(min=1), help="Worker processes [default: 1 on CPU, one per GPU]."),
    ),
    (
        ("--threads",),
        dict(type=click.IntRange(min=1), help="Torch threads per worker [default: cores / workers]."),
    ),
    (
        ("--batch-size",),
        dict(
            type=click.IntRange(min=1),
            help="Images per forward pass [default: 1 on CPU, from free memory on a GPU].",
        ),
    ),
    (
        ("--compile",),
        dict(
            is_flag=True,
            default=None,
            help="CUDA: torch.compile the whole backbone (about a minute per worker, then ~8% faster).",
        ),
    ),
    (
        ("--cuda-graphs/--no-cuda-graphs",),
        dict(
            default=None,
            help="CUDA: replay the vision backbone as a CUDA graph (one launch per batch) [default: on].",
        ),
    ),
    (
        ("--fuse-rope/--no-fuse-rope",),
        dict(
            default=None,
            help="CUDA: the backbone's rotary embedding as one compiled kernel (seconds to compile) "
            "[default: on where Triton runs].",
        ),
    ),
    (
        ("--timeout",),
        dict(
            type=click.FloatRange(min=0, min_open=True),
            help="Seconds one image may take before its worker is killed [default: 300].",
        ),
    ),
    (
        ("--load-timeout",),
        dict(
            type=click.FloatRange(min=0, min_open=True),
            help="Seconds a worker may take to load the model [default: 600].",
        ),
    ),
    (
        ("--max-attempts",),
        dict(
            type=click.IntRange(min=1),
            help="Tries per image, each on a fresh worker after a failure [default: 2].",
        ),
    ),
    (
        ("--max-images-per-worker",),
        dict(
            type=click.IntRange(min=1),
            help="Recycle a worker after this many images, to bound leaks [default: never].",
        ),
    ),
    (
        ("--max-consecutive-failures",),
        dict(
            type=click.IntRange(min=1),
            help="Stop (exit 4) when the same error repeats on this many images in a row [default: 20].",
        ),
    ),
    (
        ("--deadline",),
        dict(metavar="HH:MM", help="Local time after which no new image starts; exits 4, resumable."),
    ),
    (("--max-runtime",), dict(metavar="DURATION", help="Like --deadline, as a duration: 6h, 90m, 1h30m.")),
    (
        ("--backend",),
        dict(
            type=click.Choice(["local", "ray"]),
            help="local: worker processes on this machine; ray: Ray actors, one per GPU of the "
            "cluster (pip install 'batchseg[ray]') [default: local].",
        ),
    ),
    (
        ("--ray-address",),
        dict(
            metavar="auto|HOST:PORT",
            help="With --backend ray: the cluster to join [default: a Ray started for this run].",
        ),
    ),
    (("--log-keep",), dict(type=click.IntRange(min=1), help="Log files kept in OUTPUT/logs [default: 30].")),
    (
        ("--manifest-interval",),
        dict(
            type=click.FloatRange(min=1),
            help="Seconds between manifest exports during a run [default: 300].",
        ),
    ),
    (
        ("--progress-interval",),
        dict(
            type=click.FloatRange(min=0.1),
            help="Seconds between progress lines when not on a terminal [default: 60].",
        ),
    ),
]

OUTPUT_DEFINING_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--prompt", "prompts"),
        dict(multiple=True, help="Text prompt; repeat for several (each image is encoded once)."),
    ),
    (
        ("--model",),
        dict(
            help="Local SAM3 folder (config.json, tokenizer files, model.safetensors) or hub id "
            "[default: facebook/sam3]."
        ),
    ),
    (
        ("--engine",),
        dict(
            metavar="MODULE:FUNCTION",
            help="Engine factory loaded in each worker (see README, 'Bring your own engine') "
            "[default: batchseg.engines.sam3.engine:load_engine].",
        ),
    ),
    (
        ("--output",),
        dict(type=click.Path(path_type=Path), help="Output folder [default: output/<input folder name>]."),
    ),
    (
        ("--dtype",),
        dict(
            type=DTYPE_CHOICES,
            help="auto: bfloat16 on recent GPUs, float16 on older ones, measured best on CPU "
            "[default: auto].",
        ),
    ),
    (("--threshold",), dict(type=click.FloatRange(0, 1), help="Minimum detection score [default: 0.3].")),
    (
        ("--mask-threshold",),
        dict(type=click.FloatRange(0, 1), help="Mask probability threshold [default: 0.5]."),
    ),
    (
        ("--max-detections",),
        dict(type=click.IntRange(min=1), help="Detections kept per prompt and image [default: 100]."),
    ),
    (
        ("--max-pixels",),
        dict(
            type=click.IntRange(min=1),
            help="Images with more pixels are refused as invalid_input [default: 250000000].",
        ),
    ),
    (
        ("--include",),
        dict(
            multiple=True,
            metavar="GLOB",
            help="Only paths matching this glob (relative, forward slashes); repeatable.",
        ),
    ),
    (("--exclude",), dict(multiple=True, metavar="GLOB", help="Skip paths matching this glob; repeatable.")),
    (
        ("--hash",),
        dict(
            is_flag=True,
            default=None,
            help="Detect changed images by content hash as well as size and mtime.",
        ),
    ),
    (
        ("--new-run",),
        dict(
            is_flag=True,
            default=None,
            help="Start a fresh run in OUTPUT; the old run's files are moved to OUTPUT/previous-runs/.",
        ),
    ),
]


def _add_options(specs: list[tuple[tuple[str, ...], dict[str, Any]]]) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        for decls, attrs in reversed(specs):
            name = decls[-1] if len(decls) > 1 else decls[0].lstrip("-").replace("-", "_")
            attrs = {"envvar": f"BATCHSEG_{name.upper()}", "show_envvar": False, **attrs}
            func = click.option(*decls, **attrs)(func)
        return func

    return decorate


def _collect(ctx: click.Context, params: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Flags and BATCHSEG_* variables > job file > RunConfig defaults."""
    values: dict[str, Any] = {}
    for name, value in params.items():
        source = ctx.get_parameter_source(name)
        given = source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        if given and value not in (None, ()):
            values[name] = value
        elif name in job:
            values[name] = job[name]
    return values


def _normalise(values: dict[str, Any]) -> dict[str, Any]:
    from .jobfile import duration_seconds, parse_hhmm

    out = dict(values)
    for key in ("prompts", "include", "exclude"):
        if key in out:
            value = out[key]
            out[key] = (value,) if isinstance(value, str) else tuple(value)
    if isinstance(out.get("max_runtime"), str):
        out["max_runtime"] = duration_seconds(out["max_runtime"])
    if out.get("deadline") is not None:
        parse_hhmm(str(out["deadline"]))
    for key in ("input", "output"):
        if out.get(key) is not None:
            out[key] = Path(out[key])
    return out


def _fail(exc: BatchsegError) -> None:
    safe_echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _report(summary: Any) -> None:
    from .runner import RunSummary

    assert isinstance(summary, RunSummary)
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
    elif summary.exit_code == 3:
        safe_echo(
            "some images are not ok: see the manifest, or rerun them with: "
            f"batchseg retry {summary.output_dir}",
            err=True,
        )


def _run_library(call: Callable[[], Any], note: str | None = None) -> None:
    try:
        summary = call()
    except KeyboardInterrupt:
        safe_echo("interrupted: stopped at once; run the same command again to resume", err=True)
        sys.exit(StoppedEarly.exit_code)
    except BatchsegError as exc:
        _fail(exc)
    _report(summary)
    if note:
        safe_echo(note)
    sys.exit(summary.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
@click.argument("input_", metavar="INPUT", required=False, type=click.Path(path_type=Path))
@click.option(
    "--job",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="BATCHSEG_JOB",
    help="TOML job file holding any of these options; flags override it.",
)
@_add_options(OUTPUT_DEFINING_OPTIONS)
@_add_options(OPERATIONAL_OPTIONS)
@click.pass_context
def run(ctx: click.Context, input_: Path | None, job: Path | None, **params: Any) -> None:
    """Segment every image of INPUT (a folder, walked recursively) with the given prompts.

    Running the same command again on the same output folder resumes: finished images are skipped,
    new and changed ones are processed.
    """
    from .runner import run as run_folder

    try:
        job_values = _load_job(job)
        values = _collect(ctx, params, job_values)
        if input_ is not None:
            values["input"] = input_
        elif "input" in job_values:  # INPUT is an argument, not an option: _collect skips it
            values["input"] = job_values["input"]
        values = _normalise(values)
        if "input" not in values:
            raise click.UsageError(
                "missing INPUT folder (give it as an argument or as 'input' in the job file)"
            )
        if not values.get("prompts"):
            raise click.UsageError("give at least one --prompt (or 'prompt' in the job file)")
        config = RunConfig(**values)
    except ConfigError as exc:
        _fail(exc)
    _run_library(lambda: run_folder(config, stream=sys.stderr))


def _load_job(job: Path | None) -> dict[str, Any]:
    if job is None:
        return {}
    from .jobfile import load_job_file

    return load_job_file(job)


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
@_add_options(OPERATIONAL_OPTIONS)
@click.pass_context
def retry(ctx: click.Context, output: Path, statuses: tuple[str, ...], **params: Any) -> None:
    """Rerun the images of OUTPUT whose status is not ok, with the configuration stored there.

    Works from the manifest alone when the checkpoint is gone.
    """
    from .runner import retry as retry_failed

    try:
        overrides = _normalise(_collect(ctx, params, {}))
    except ConfigError as exc:
        _fail(exc)
    chosen = tuple(Status(s) for s in statuses) or FINAL_FAILURES
    _run_library(lambda: retry_failed(output, chosen, overrides, stream=sys.stderr))


@cli.command(epilog="Example:\n\n\b\n  batchseg status output/aerial\n  batchseg status output/aerial --json")
@click.argument("output", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(output: Path, as_json: bool) -> None:
    """Counts per status, speed, top errors, and whether a run is live in OUTPUT."""
    from .status import collect_status, format_status

    try:
        report = collect_status(output)
    except BatchsegError as exc:
        _fail(exc)
    if as_json:
        click.echo(report.to_json())  # already JSON text: dumping it again printed one string
    else:
        safe_echo(format_status(report))


@cli.command(
    epilog="Example:\n\n\b\n"
    "  batchseg schedule --job jobs/aerial-nightly.toml --at 02:00 --days mon,tue,wed,thu,fri"
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
def schedule(job: Path, at: str, days: str | None, name: str | None, print_only: bool, cron: bool) -> None:
    """Write a Windows Task Scheduler task that runs a job file nightly, and print how to register it.

    The task runs this Python with `-m batchseg run --job <job>` in the job's folder, never twice at
    once, with a time limit, and starts late after a missed start.
    """
    from .schedule import crontab_line, default_task_name, schtasks_commands, task_xml, write_task_xml

    job = job.resolve()
    day_list = [d.strip() for d in days.split(",") if d.strip()] if days else None
    try:
        if cron:
            click.echo(crontab_line(job, at, day_list, sys.executable))
            return
        xml = task_xml(job, at, day_list, sys.executable, time_limit_hours=_time_limit_hours(job))
        if print_only:
            click.echo(xml)
            return
        xml_path = job.with_suffix(".task.xml")
        write_task_xml(xml_path, xml)
        create, delete = schtasks_commands(name or default_task_name(job), xml_path)
    except BatchsegError as exc:
        _fail(exc)
    safe_echo(f"wrote {xml_path}")
    safe_echo(f"register it:  {create}")
    safe_echo(f"remove it:    {delete}")


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
    sys.exit(doctor_exit_code(checks))


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

    _run_library(
        lambda: run_demo(output, stream=sys.stderr),
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
