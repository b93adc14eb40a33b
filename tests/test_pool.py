"""The supervisor with real spawned workers running a misbehaving engine (tests/fault_engine.py).

Every test checks, through an autouse fixture, that no worker process outlives ``run_pool``.
Timeouts are small (0.5-2 s) and slack is generous: these tests share two busy cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fault_engine
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import make_image
from fault_engine import write_settings

from batchseg.config import RunConfig
from batchseg.errors import ConfigError, ModelLoadError
from batchseg.records import Item, ItemResult, Status
from batchseg.signals import StopRequest
from batchseg.supervise import launch as launch_module
from batchseg.supervise.pool import PoolEvent, PoolOutcome, PoolSettings, describe_exit, run_pool
from batchseg.worker.contract import EngineSpec

FACTORY = f"{fault_engine.__name__}:load_faulty"
TESTS_DIR = Path(fault_engine.__file__).resolve().parent
# Test defaults: short watchdog, quick escalation, quick load retries; loads get room on busy cores.
DEFAULTS: dict[str, Any] = dict(timeout=2.0, load_timeout=30.0, stop_grace=1.0, load_backoff=0.1)


def _children() -> list[psutil.Process]:
    """Child processes of this test process, less multiprocessing's shared resource tracker."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("resource_tracker" in part for part in child.cmdline()):
                continue
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
        found.append(child)
    return found


@pytest.fixture(autouse=True)
def no_orphans() -> Iterator[None]:
    before = {p.pid for p in _children()}
    yield
    left = [p for p in _children() if p.pid not in before]
    assert not left, f"processes left behind: {left}"


def make_spec(tmp_path: Path, **chosen: Any) -> EngineSpec:
    """A spec for the fault engine, its settings (state_dir: tmp_path) beside the inputs."""
    write_settings(tmp_path, state_dir=str(tmp_path), **chosen)
    config = RunConfig(input=tmp_path, output=tmp_path / "out", prompts=("roof",))
    return EngineSpec(config, factory=FACTORY)


def items(*names: str) -> list[Item]:
    return [Item(f"{name}.jpg", 100, 1) for name in names]


@dataclass
class Run:
    outcome: PoolOutcome
    results: dict[str, ItemResult]
    events: list[PoolEvent]
    elapsed: float
    order: list[str] = field(default_factory=list)

    def kinds(self, kind: str) -> list[PoolEvent]:
        return [event for event in self.events if event.kind == kind]


def run(
    spec: EngineSpec,
    todo: list[Item],
    should_stop: Callable[[], str | None] = lambda: None,
    on_result: Callable[[ItemResult], None] | None = None,
    on_event: Callable[[PoolEvent], None] | None = None,
    **settings: Any,
) -> Run:
    results: dict[str, ItemResult] = {}
    order: list[str] = []
    events: list[PoolEvent] = []

    def record(result: ItemResult) -> None:
        assert result.path not in results, f"{result.path} reported twice"
        results[result.path] = result
        order.append(result.path)
        if on_result is not None:
            on_result(result)

    def note(event: PoolEvent) -> None:
        events.append(event)
        if on_event is not None:
            on_event(event)

    started = time.monotonic()
    outcome = run_pool(spec, todo, PoolSettings(**{**DEFAULTS, **settings}), record, should_stop, note)
    return Run(outcome, results, events, time.monotonic() - started, order)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- normal runs -------------------------------------------------------------------------------------


def test_every_item_reported_once_with_its_worker(tmp_path: Path) -> None:
    todo = items(*(f"ok_{k}" for k in range(7)))
    done = run(make_spec(tmp_path), todo, workers=2, task_size=3)
    assert set(done.results) == {item.path for item in todo}
    assert done.outcome == PoolOutcome(None, "", {"ok": 7}, "cpu fault-engine")
    started = {event.pid for event in done.kinds("worker_started")}
    for result in done.results.values():
        assert result.status is Status.OK and result.attempts == 1
        assert result.worker_pid in started and result.device == "cpu fault-engine"
        assert result.duration_s is not None and result.duration_s >= 0


def test_given_workers_all_load_at_once(tmp_path: Path) -> None:
    # --workers N: no worker waits for another's load (one after the other cost a model load per GPU).
    done = run(make_spec(tmp_path), items(*(f"ok_{k}" for k in range(4))), workers=3, task_size=1)
    kinds = [event.kind for event in done.events]
    assert kinds[:3] == ["worker_started"] * 3 and "pool_size" not in kinds
    assert len({event.slot for event in done.kinds("worker_started")}) == 3


def test_items_are_consumed_lazily(tmp_path: Path) -> None:
    pulled: list[str] = []

    def stream() -> Iterator[Item]:
        for item in items(*(f"ok_{k}" for k in range(5))):
            pulled.append(item.path)
            yield item

    done = run(make_spec(tmp_path), stream(), on_result=lambda r: pulled.append(f"done {r.path}"), workers=1)
    assert len(done.results) == 5
    # The third item is pulled only after the first is done: no copy of the whole input up front.
    assert pulled.index("done ok_0.jpg") < pulled.index("ok_2.jpg")


def test_nothing_to_do_starts_no_worker(tmp_path: Path) -> None:
    done = run(make_spec(tmp_path), [])
    assert not done.kinds("worker_started") and done.results == {}


def test_pool_modules_never_import_torch() -> None:
    code = (
        "import sys, batchseg.supervise.pool, batchseg.worker.process, batchseg.run_progress, "
        "batchseg.signals; "
        "heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="task-size must be greater than 0"):
        PoolSettings(task_size=0)
    with pytest.raises(ConfigError, match="timeout"):
        PoolSettings(timeout=0)


def test_settings_from_run_config(tmp_path: Path) -> None:
    config = RunConfig(input=tmp_path, prompts=("roof",), workers=3, timeout=9.0, max_images_per_worker=50)
    settings = PoolSettings.from_config(config, stop_grace=0.5)
    # No --batch-size: the pool takes each engine's suggestion (see the test below).
    assert (settings.workers, settings.timeout, settings.task_size) == (3, 9.0, None)
    assert settings.max_images_per_worker == 50 and settings.stop_grace == 0.5


# -- one status per kind of failure ---------------------------------------------------------------


def test_hang_times_out_and_the_run_goes_on(tmp_path: Path) -> None:
    done = run(make_spec(tmp_path), items("ok_1", "hang_1", "ok_2", "ok_3"), workers=1, timeout=1.0)
    hang = done.results["hang_1.jpg"]
    assert hang.status is Status.TIMEOUT and hang.attempts == 2
    assert hang.exit_code is None and "no result within 1 s" in (hang.error_message or "")
    assert hang.duration_s is not None and 1.0 <= hang.duration_s < 2.5  # the clock is the worker's Ack
    assert all(done.results[f"ok_{k}.jpg"].status is Status.OK for k in (1, 2, 3))
    assert len(done.kinds("worker_timeout")) == 2
    # Recovery is bounded: two 1 s attempts plus a replacement start each.
    assert done.elapsed < 2 * 1.0 + 10
    assert gone(hang.worker_pid or 0)


def test_exit_is_crashed_with_exit_code_and_pid(tmp_path: Path) -> None:
    done = run(make_spec(tmp_path), items("exit_1", "ok_1"), workers=1, max_attempts=1)
    crash = done.results["exit_1.jpg"]
    assert crash.status is Status.CRASHED and crash.exit_code == 3 and crash.attempts == 1
    assert crash.error_message == f"worker process {crash.worker_pid} exited with code 3"
    assert done.results["ok_1.jpg"].status is Status.OK
    assert done.results["ok_1.jpg"].worker_pid != crash.worker_pid


def test_segfault_is_crashed_with_the_signal(tmp_path: Path) -> None:
    done = run(make_spec(tmp_path), items("segv_1", "ok_1"), workers=1, max_attempts=1)
    crash = done.results["segv_1.jpg"]
    assert crash.status is Status.CRASHED and crash.exit_code == -signal.SIGSEGV
    assert "killed by signal 11 (SIGSEGV)" in (crash.error_message or "")
    assert done.results["ok_1.jpg"].status is Status.OK


def test_exception_is_error_with_type_message_traceback(tmp_path: Path) -> None:
    done = run(make_spec(tmp_path), items("raise_1", "ok_1"), workers=1)
    error = done.results["raise_1.jpg"]
    assert error.status is Status.ERROR and error.attempts == 2
    assert (error.error_type, error.error_message) == ("ValueError", "bad pixels in raise_1.jpg")
    assert error.traceback and "fault_engine.py" in error.traceback and "ValueError" in error.traceback
    # The retry ran on a fresh worker process: with one worker, the one that failed was recycled.
    (failed,) = done.kinds("attempt_failed")
    assert failed.result is not None and failed.result.worker_pid != error.worker_pid
    assert done.results["ok_1.jpg"].status is Status.OK


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS cap and /proc are Linux's")
def test_memory_error_is_error_and_the_worker_survives(tmp_path: Path) -> None:
    done = run(make_spec(tmp_path), items("oom_1", "ok_1", "ok_2"), workers=1, max_attempts=1)
    oom = done.results["oom_1.jpg"]
    assert oom.status is Status.ERROR and oom.error_type == "MemoryError"
    assert {done.results[p].worker_pid for p in ("ok_1.jpg", "ok_2.jpg", "oom_1.jpg")} == {oom.worker_pid}


def test_invalid_input_is_final_at_once(tmp_path: Path) -> None:
    done = run(make_spec(tmp_path), items("invalid_1"), workers=1)
    assert done.results["invalid_1.jpg"].status is Status.INVALID_INPUT
    assert done.results["invalid_1.jpg"].attempts == 1


# -- attempts ----------------------------------------------------------------------------------------


def test_a_crash_then_success_is_ok_on_the_second_attempt(tmp_path: Path) -> None:
    done = run(make_spec(tmp_path), items("flakyexit_1", "ok_1"), workers=1)
    assert done.results["flakyexit_1.jpg"].status is Status.OK
    assert done.results["flakyexit_1.jpg"].attempts == 2
    (failed,) = done.kinds("attempt_failed")
    assert failed.result is not None and failed.result.status is Status.CRASHED


def test_an_error_then_success_with_two_workers_reloads_nothing(tmp_path: Path) -> None:
    done = run(make_spec(tmp_path), items("flakyraise_1", *(f"slow_{k}" for k in range(4))), workers=2)
    flaky = done.results["flakyraise_1.jpg"]
    assert flaky.status is Status.OK and flaky.attempts == 2
    (failed,) = done.kinds("attempt_failed")
    assert failed.result is not None and failed.result.worker_pid != flaky.worker_pid
    assert not done.kinds("recycle")  # the other worker took the retry
    assert len(fault_engine.loads(tmp_path)) == 2


@pytest.mark.parametrize("attempts", [1, 3])
def test_max_attempts_bounds_the_tries(tmp_path: Path, attempts: int) -> None:
    done = run(make_spec(tmp_path), items("hang_1"), workers=1, timeout=0.5, max_attempts=attempts)
    assert done.results["hang_1.jpg"].status is Status.TIMEOUT
    assert done.results["hang_1.jpg"].attempts == attempts
    assert len(done.kinds("worker_timeout")) == attempts


def test_an_all_hang_run_takes_images_x_attempts_x_timeout_over_workers(tmp_path: Path) -> None:
    todo = items(*(f"hang_{k}" for k in range(4)))
    done = run(make_spec(tmp_path), todo, workers=2, timeout=1.0, max_attempts=2)
    assert [r.status for r in done.results.values()] == [Status.TIMEOUT] * 4
    expected = 4 * 2 * 1.0 / 2
    # Each worker sees 4 timeouts, each followed by a replacement start (well under 1 s each).
    assert expected - 0.5 < done.elapsed < expected + 4 * 1.5


# -- batches -----------------------------------------------------------------------------------------


def test_a_failed_batch_is_retried_one_by_one(tmp_path: Path) -> None:
    todo = items("ok_1", "hang_1", "ok_2", "segv_1", "ok_3", "ok_4")
    done = run(make_spec(tmp_path), todo, workers=1, task_size=3, timeout=0.5, max_attempts=1)
    assert done.results["hang_1.jpg"].status is Status.TIMEOUT
    assert done.results["segv_1.jpg"].status is Status.CRASHED
    for name in ("ok_1", "ok_2", "ok_3", "ok_4"):
        assert done.results[f"{name}.jpg"].status is Status.OK
        assert done.results[f"{name}.jpg"].attempts == 1  # the failed batch was not charged to them
    assert len(done.kinds("batch_split")) == 2
    assert "1.5 s" in done.kinds("worker_timeout")[0].message  # the budget is timeout x items


def test_an_exception_in_a_batch_marks_only_its_image(tmp_path: Path) -> None:
    done = run(make_spec(tmp_path), items("ok_1", "raise_1", "ok_2"), workers=1, task_size=3, max_attempts=1)
    assert done.results["raise_1.jpg"].status is Status.ERROR
    assert done.results["ok_1.jpg"].status is Status.OK and done.results["ok_2.jpg"].status is Status.OK
    assert not done.kinds("batch_split")  # the worker reran the items itself, no process was lost


# -- worker lifecycle --------------------------------------------------------------------------------


def test_workers_are_recycled_after_max_images(tmp_path: Path) -> None:
    todo = items(*(f"ok_{k}" for k in range(5)))
    done = run(make_spec(tmp_path), todo, workers=1, task_size=2, max_images_per_worker=2)
    per_pid: dict[int | None, int] = {}
    for result in done.results.values():
        per_pid[result.worker_pid] = per_pid.get(result.worker_pid, 0) + 1
    assert sorted(per_pid.values()) == [1, 2, 2]
    assert len(done.kinds("recycle")) == 2  # the third worker is closed at the end, not recycled
    assert len(fault_engine.loads(tmp_path)) == 3


def test_the_pool_grows_to_one_worker_per_gpu(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, device="cuda", gpu_count=2, slow_s=0.2)
    done = run(spec, items(*(f"slow_{k}" for k in range(8))), workers=None)
    assert {r.device for r in done.results.values()} == {"cuda:0 fake", "cuda:1 fake"}
    assert sorted(slot for _pid, slot in fault_engine.loads(tmp_path)) == [0, 1]


@pytest.mark.parametrize(("workers", "gpus", "each"), [(None, 2, 4), (3, 0, 2), (None, 0, 8)])
def test_threads_are_shared_out_so_the_total_never_exceeds_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int | None, gpus: int, each: int
) -> None:
    # 8 cores: with --workers unset on two GPUs the first worker loads before the pool knows its
    # size (with all 8) and is then told its share; the engine sees what the worker uses.
    monkeypatch.setattr(launch_module, "usable_cores", lambda: 8)
    extra: dict[str, Any] = dict(device="cuda", gpu_count=gpus) if gpus else {}
    spec = make_spec(tmp_path, slow_s=0.2, **extra)
    done = run(spec, items(*(f"threads_{k}" for k in range(8))), workers=workers)
    used = {r.worker_pid: r.height for r in done.results.values()}
    assert set(used.values()) == {each} and len(used) == (workers or max(1, gpus))


def test_near_the_end_tasks_shrink_to_a_fair_share_of_what_is_left(tmp_path: Path) -> None:
    # Two GPUs, an engine that asks for tasks of 8, and 10 images: 8 + 2 would leave one GPU
    # working alone; fair shares are 5 + 5 (or smaller, as what is left shrinks).
    spec = make_spec(tmp_path, device="cuda", gpu_count=2, preferred_task_size=8, slow_s=0.1)
    done = run(spec, items(*(f"slow_{k}" for k in range(10))), workers=None, task_size=None)
    assert all(r.status is Status.OK for r in done.results.values())
    assert max(r.width or 0 for r in done.results.values()) == 5
    assert {r.device for r in done.results.values()} == {"cuda:0 fake", "cuda:1 fake"}


def test_the_engine_suggests_the_task_size(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, preferred_task_size=3, slow_s=0.05)
    done = run(spec, items(*(f"slow_{k}" for k in range(12))), workers=1, task_size=None)
    assert {r.width for r in done.results.values()} == {3}, "items travel in the engine's task size"


def test_heartbeats_give_each_part_of_a_task_its_own_budget(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, slow_s=0.6)
    spec = EngineSpec(spec.config, "fault_engine:load_heartbeat")
    todo = items("slow_1", "slow_2", "slow_3", "hang_1")
    done = run(spec, todo, workers=1, task_size=4, timeout=1.0, max_attempts=1)
    # Without heartbeats the task's budget would be 4 x 1 s from the Ack and nothing would time out
    # before 4 s; each heartbeat restarts a 1 s clock, so the hang is caught 1 s after the last one.
    timeouts = done.kinds("worker_timeout")  # the batch, then hang_1 alone after the batch split
    assert timeouts and all("within 1 s" in t.message for t in timeouts)
    assert done.results["hang_1.jpg"].status is Status.TIMEOUT
    assert all(done.results[f"slow_{k}.jpg"].status is Status.OK for k in (1, 2, 3))


SUB_BATCH = f"{fault_engine.__name__}:load_sub_batch"


@pytest.mark.parametrize("factory", [FACTORY, f"{fault_engine.__name__}:load_streaming", SUB_BATCH])
def test_a_task_longer_than_the_timeout_of_images_each_within_it_is_not_timed_out(
    tmp_path: Path, factory: str
) -> None:
    # --timeout is per image: four images of half the timeout each, in one task (two timeouts in
    # all), with no heartbeat (a budget of timeout x 4 from the Ack), a heartbeat per image (a
    # timeout each) and one per sub-batch of two (timeout x 2 each). Half the timeout is the margin
    # for a loaded machine: one image would have to take twice as long as its sleep to time out.
    timeout = 3.0
    spec = EngineSpec(make_spec(tmp_path, slow_s=timeout / 2, sub_batch=2).config, factory)
    todo = items(*(f"slow_{k}" for k in range(4)))
    done = run(spec, todo, workers=1, task_size=4, timeout=timeout, max_attempts=1)
    assert [event.paths for event in done.kinds("task_started")] == [tuple(i.path for i in todo)]
    assert not done.kinds("worker_timeout") and not done.kinds("batch_split")
    assert all(r.status is Status.OK and r.attempts == 1 for r in done.results.values())
    assert len(done.results) == 4 and len(fault_engine.loads(tmp_path)) == 1  # no worker replaced
    started = min(r.started_at or 0 for r in done.results.values())
    finished = max(r.finished_at or 0 for r in done.results.values())
    assert finished - started >= 4 * timeout / 2 * 0.99  # the task itself was twice the timeout


def test_a_pinned_gpu_gets_one_worker(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, device="cuda", gpu_count=2)
    spec = EngineSpec(spec.config.with_changes(device="cuda:1"), FACTORY)
    done = run(spec, items("ok_1", "ok_2"), workers=None)
    assert len(done.kinds("worker_started")) == 1


def test_a_replacement_loading_does_not_stall_the_other_worker(tmp_path: Path) -> None:
    """The replacement of a timed-out worker loads for longer than the run lasts: the other worker
    takes every task left meanwhile. (Counted, not timed: a pool that waited on the replacement
    would finish nothing until its load timed out, and fail with a load failure.)"""
    todo = items("hang_1", *(f"slow_{k}" for k in range(40)))
    spec = make_spec(tmp_path, fast_loads=2, load_delay=600, slow_s=0.1)  # only the replacement is slow
    done = run(spec, todo, workers=2, timeout=1.0, max_attempts=1)
    assert done.results["hang_1.jpg"].status is Status.TIMEOUT
    assert all(r.status is Status.OK for path, r in done.results.items() if path.startswith("slow"))
    (timeout,) = done.kinds("worker_timeout")
    (replacement,) = [e for e in done.kinds("worker_started") if e.time > timeout.time]
    assert replacement.slot == timeout.slot
    assert not [e for e in done.kinds("worker_ready") if e.time > timeout.time]  # it never loaded
    assert not done.kinds("load_failed")
    during = [r for r in done.results.values() if (r.finished_at or 0) > replacement.time]
    assert len(during) >= 5, "the healthy worker kept taking tasks while the replacement loaded"


# -- load failures -----------------------------------------------------------------------------------


def test_a_model_that_fails_to_load_is_fatal_before_any_image(tmp_path: Path) -> None:
    seen: list[ItemResult] = []
    events: list[PoolEvent] = []
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="RuntimeError: weights are corrupt"):
        run_pool(
            make_spec(tmp_path, load="fail"),
            items("ok_1"),
            PoolSettings(**DEFAULTS),
            seen.append,
            on_event=events.append,
        )
    assert seen == [] and time.monotonic() - started < 10
    assert len(fault_engine.loads(tmp_path)) == 1  # no respawn loop
    (failed,) = [e for e in events if e.kind == "load_failed"]
    assert failed.traceback and "weights are corrupt" in failed.traceback


def test_a_worker_killed_while_loading_is_replaced_and_the_run_goes_on(tmp_path: Path) -> None:
    """SIGKILL during the first load (the out-of-memory killer on a busy machine) says nothing about
    the model: the worker is replaced after the back-off, and the run does every image."""
    done = run(make_spec(tmp_path, load="killonce"), items("ok_1", "ok_2"), workers=1)
    assert {r.status for r in done.results.values()} == {Status.OK}
    assert len(fault_engine.loads(tmp_path)) == 2
    (failed,) = done.kinds("load_failed")
    assert "was killed by signal 9 (SIGKILL" in failed.message and "while loading" in failed.message


def test_workers_that_keep_dying_while_loading_end_the_run_after_their_retries(tmp_path: Path) -> None:
    with pytest.raises(
        ModelLoadError, match=r"could not be loaded \(3 tries\): .*exited with code 5 while loading"
    ):
        run(make_spec(tmp_path, load="exit"), items("ok_1"), workers=1, load_retries=2)
    assert len(fault_engine.loads(tmp_path)) == 3


def test_every_worker_dying_while_loading_ends_the_run(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="exited with code 5 while loading"):
        run(make_spec(tmp_path, load="exit"), items("ok_1"), workers=2, load_retries=2)
    assert len(fault_engine.loads(tmp_path)) >= 3


def test_loads_past_load_timeout_are_retried_then_end_the_run(tmp_path: Path) -> None:
    events: list[PoolEvent] = []
    with pytest.raises(ModelLoadError, match="did not load within 1 s"):
        spec = make_spec(tmp_path, load="hang")
        run(spec, items("ok_1"), on_event=events.append, load_timeout=1.0, load_retries=1)
    failed = [e for e in events if e.kind == "load_failed"]
    assert len(failed) == 2 and all("did not load within 1 s" in e.message for e in failed)


def test_replacements_that_keep_failing_to_load_end_the_run(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, ok_loads=1)
    with pytest.raises(ModelLoadError, match="failed to load the model 3 times in a row"):
        run(spec, items("hang_1", "ok_1", "ok_2"), workers=1, timeout=0.5, load_retries=2)
    assert len(fault_engine.loads(tmp_path)) == 4  # the first load, then three failed ones


def test_a_slot_whose_replacements_keep_failing_is_given_up_while_another_worker_serves(
    tmp_path: Path,
) -> None:
    """The crashed worker's replacements all fail to load: after ``load_retries`` + 1 of them the
    slot is given up and the other worker finishes the run (its first image waits for those
    loads; the images queued behind it are what the replacements are started for)."""
    spec = make_spec(tmp_path, ok_loads=2, await_loads=5)
    todo = items("exit_1", "await_1", "ok_1", "ok_2")
    done = run(spec, todo, workers=2, timeout=60.0, max_attempts=1, load_retries=2)
    assert done.results.pop("exit_1.jpg").status is Status.CRASHED
    assert {r.status for r in done.results.values()} == {Status.OK} and len(done.results) == 3
    assert len(fault_engine.loads(tmp_path)) == 5  # two workers, three failed replacements, no more
    assert "3 loads failed in a row; going on with 1 worker(s)" in done.kinds("load_failed")[-1].message


def test_a_worker_killed_while_loading_does_not_end_a_cli_run(tmp_path: Path, no_process_left: str) -> None:
    """Through ``python -m batchseg run --workers 2``: one worker is SIGKILLed during its load and
    the other may not be ready before the killed one is replaced (tests/load_kill_engine.py); the
    run exits 0 with every image ok."""
    folder = tmp_path / "in"
    for k in range(4):
        make_image(folder / f"img_{k}.png", seed=k)
    loads = tmp_path / "loads"
    loads.mkdir()
    output = tmp_path / "out"
    args = ["run", folder, "--engine", "load_kill_engine:load", "--prompt", "roof", "--workers", "2"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "BATCHSEG_TEST_LOADS": str(loads),
    }
    done = subprocess.run(
        [sys.executable, "-m", "batchseg", *map(str, [*args, "--output", output])],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (loads / "killed").exists() and len((loads / "loads.txt").read_text().split()) >= 3
    rows = pq.read_table(output / "manifest" / "images.parquet").to_pylist()
    assert sorted(r["path"] for r in rows) == [f"img_{k}.png" for k in range(4)]
    assert {r["status"] for r in rows} == {"ok"}


# -- circuit breaker ---------------------------------------------------------------------------------


def test_the_same_error_on_consecutive_images_trips_the_breaker(tmp_path: Path) -> None:
    todo = items(*(f"raise_{k}" for k in range(10)))
    done = run(make_spec(tmp_path), todo, workers=1, max_attempts=1, max_consecutive_failures=3)
    assert done.outcome.stopped == "circuit_breaker"
    assert "3 images in a row failed with ValueError" in done.outcome.message
    assert "raise_2.jpg" in done.outcome.message
    assert len(done.results) == 3


def test_invalid_input_neither_trips_nor_resets_the_breaker(tmp_path: Path) -> None:
    only_bad_files = run(
        make_spec(tmp_path), items(*(f"invalid_{k}" for k in range(5))), workers=1, max_consecutive_failures=2
    )
    assert only_bad_files.outcome.stopped is None
    assert only_bad_files.outcome.counts == {"invalid_input": 5}

    mixed = items("raise_1", "invalid_1", "raise_2", "ok_1", "ok_2")
    done = run(make_spec(tmp_path), mixed, workers=1, max_attempts=1, max_consecutive_failures=2)
    assert done.outcome.stopped == "circuit_breaker"
    assert "ok_1.jpg" not in done.results


def test_an_ok_result_resets_the_breaker(tmp_path: Path) -> None:
    todo = items("exit_1", "ok_1", "exit_2", "ok_2", "exit_3")
    done = run(make_spec(tmp_path), todo, workers=1, max_attempts=1, max_consecutive_failures=2)
    assert done.outcome.stopped is None and len(done.results) == 5


# -- stopping and orphans ----------------------------------------------------------------------------


def test_should_stop_drains_the_tasks_in_flight(tmp_path: Path) -> None:
    ready_at: list[float] = []

    def should_stop() -> str | None:
        return "deadline" if ready_at and time.monotonic() - ready_at[0] > 0.3 else None

    def on_event(event: PoolEvent) -> None:
        if event.kind == "worker_ready":
            ready_at.append(time.monotonic())

    spec = make_spec(tmp_path, slow_s=1.0)
    done = run(spec, items(*(f"slow_{k}" for k in range(5))), should_stop, on_event=on_event, workers=1)
    assert done.outcome.stopped == "deadline"
    (finished,) = done.results.values()  # the image in progress finished; no new one started
    assert finished.status is Status.OK and (finished.duration_s or 0) >= 1.0


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_an_exception_in_on_result_stops_every_worker(tmp_path: Path, error: BaseException) -> None:
    def on_result(result: ItemResult) -> None:
        raise error

    todo = items("ok_1", *(f"hang_{k}" for k in range(3)))
    with pytest.raises(type(error)):
        run(make_spec(tmp_path), todo, on_result=on_result, workers=2, timeout=30.0)
    # the autouse fixture checks that no worker is left


PARENT_SCRIPT = """
import sys, time
from pathlib import Path
from batchseg.config import RunConfig
from batchseg.worker.contract import EngineSpec
from batchseg.supervise.pool import PoolSettings, run_pool
from batchseg.records import Item
from batchseg.signals import StopRequest
from fault_engine import write_settings

def main():
    state = sys.argv[1]
    config = RunConfig(input=write_settings(Path(state), state_dir=state, slow_s=1.5), prompts=("roof",))
    spec = EngineSpec(config, factory="fault_engine:load_faulty")
    todo = [Item(f"{sys.argv[2]}_{k}.jpg", 1, 1) for k in range(20)]

    def on_event(event):
        if event.kind == "worker_ready":
            print("READY", event.pid, flush=True)
        if event.kind == "stopping":
            print("DRAINING", event.message.split("finishing ")[1].split()[0], flush=True)

    with StopRequest() as stop:
        outcome = run_pool(spec, todo, PoolSettings(workers=2, timeout=60), lambda r: print("RESULT", r.path),
                           stop, on_event)
    print("STOPPED", outcome.stopped, flush=True)

if __name__ == "__main__":
    main()
"""


def start_parent(tmp_path: Path, kind: str) -> tuple[subprocess.Popen[str], list[int]]:
    """A real parent process running a pool (a SIGKILL or a signal must hit a whole process)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), kind],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert parent.stdout is not None
    pids = []
    while len(pids) < 2:
        line = parent.stdout.readline()
        assert line, f"parent ended early: {parent.stderr.read() if parent.stderr else ''}"
        if line.startswith("READY"):
            pids.append(int(line.split()[1]))
    time.sleep(0.3)  # let both workers take a task
    return parent, pids


def wait_gone(pids: list[int], limit: float) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def test_a_sigkilled_parent_leaves_no_worker_behind(tmp_path: Path) -> None:
    parent, pids = start_parent(tmp_path, "hang")
    parent.kill()
    parent.wait()
    for pipe in (parent.stdout, parent.stderr):  # not communicate(): an orphan would hold them open
        if pipe is not None:
            pipe.close()
    try:
        assert wait_gone(pids, 5.0), f"workers {pids} outlived their SIGKILLed parent"
    finally:
        for pid in pids:  # so a failure here leaves nothing running
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_first_signal_drains_second_kills(tmp_path: Path) -> None:
    parent, pids = start_parent(tmp_path, "slow")
    parent.send_signal(signal.SIGTERM)
    out, err = parent.communicate(timeout=20)
    assert parent.returncode == 0, err
    assert "STOPPED interrupted" in out
    in_flight = int(out.split("DRAINING ")[1].split()[0])
    assert in_flight >= 1 and out.split("DRAINING")[1].count("RESULT") == in_flight  # they finished
    assert wait_gone(pids, 2.0)

    parent, pids = start_parent(tmp_path, "hang")
    parent.send_signal(signal.SIGINT)
    time.sleep(0.3)
    parent.send_signal(signal.SIGINT)
    out, err = parent.communicate(timeout=20)
    assert "KeyboardInterrupt" in err and "STOPPED" not in out
    assert wait_gone(pids, 2.0)


# -- signals -----------------------------------------------------------------------------------------


@pytest.mark.skipif(os.name == "nt", reason="os.kill with POSIX signals")
def test_stop_request_drains_then_interrupts_then_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGINT)
    notices: list[str] = []
    with StopRequest(notice=notices.append) as stop:
        assert stop() is None
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop() == "interrupted" and stop.signal_name == "SIGINT"
        assert "send it again to stop at once" in notices[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_request_outside_the_main_thread_installs_nothing() -> None:
    before = signal.getsignal(signal.SIGINT)
    seen: list[object] = []

    def body() -> None:
        with StopRequest() as stop:
            seen.append(signal.getsignal(signal.SIGINT))
            stop.request("deadline")
            stop.request("later reason")
            seen.append(stop())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before, "deadline"]


def test_describe_exit() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL; the out-of-memory killer does this)"


# -- results reported during a task ------------------------------------------------------------------

STREAMING = f"{fault_engine.__name__}:load_streaming"


@pytest.mark.parametrize("fault", ["hang", "exit"])
def test_a_failure_late_in_a_task_keeps_what_was_reported(tmp_path: Path, fault: str) -> None:
    spec = EngineSpec(make_spec(tmp_path).config, STREAMING)
    names = ["ok_0", "ok_1", "ok_2", f"{fault}_1", "ok_3", "ok_4", "ok_5"]
    done = run(spec, items(*names), workers=1, task_size=7, timeout=1.0, max_attempts=1)
    assert done.results[f"{fault}_1.jpg"].status is (Status.TIMEOUT if fault == "hang" else Status.CRASHED)
    assert all(done.results[f"ok_{k}.jpg"].status is Status.OK for k in range(6))
    # The three before the fault were recorded as they finished; the engine said it had not
    # touched the three after it, so they went back to the queue: the fault was the lone suspect
    # (no batch split) and every image was started exactly once.
    assert not done.kinds("batch_split")
    assert fault_engine.started(tmp_path) == [f"{name}.jpg" for name in names]
    assert done.order[:3] == ["ok_0.jpg", "ok_1.jpg", "ok_2.jpg"]


def test_results_reported_during_a_task_are_recorded_at_once_and_once(tmp_path: Path) -> None:
    spec = EngineSpec(make_spec(tmp_path, slow_s=0.2).config, STREAMING)
    recorded: dict[str, float] = {}
    todo = items(*(f"slow_{k}" for k in range(5)))
    done = run(
        spec, todo, workers=1, task_size=5, on_result=lambda r: recorded.setdefault(r.path, time.time())
    )
    assert set(done.results) == {item.path for item in todo}  # run() fails on a second report
    assert all(r.status is Status.OK for r in done.results.values())
    # One task of five 0.2 s items: the first is recorded while the last is still to come.
    assert recorded["slow_0.jpg"] < (done.results["slow_4.jpg"].finished_at or 0) - 0.5


def test_an_engine_that_raises_reruns_only_what_it_had_not_reported(tmp_path: Path) -> None:
    spec = EngineSpec(make_spec(tmp_path).config, STREAMING)
    names = ["ok_0", "ok_1", "raise_1", "ok_2"]
    done = run(spec, items(*names), workers=1, task_size=4, max_attempts=1)
    assert done.results["raise_1.jpg"].status is Status.ERROR
    assert all(done.results[f"ok_{k}.jpg"].status is Status.OK for k in range(3))
    # First pass: ok_0, ok_1 (reported), raise_1 raises; then each unreported item alone.
    assert fault_engine.started(tmp_path) == [
        "ok_0.jpg",
        "ok_1.jpg",
        "raise_1.jpg",
        "raise_1.jpg",
        "ok_2.jpg",
    ]


@pytest.mark.parametrize("factory", [FACTORY, STREAMING])
def test_a_warning_in_a_worker_reaches_the_supervisor(tmp_path: Path, factory: str) -> None:
    # e.g. the engine halving its batch after CUDA ran out of memory: it belongs in the run log.
    spec = EngineSpec(make_spec(tmp_path).config, factory)
    done = run(spec, items("ok_1", "warn_1", "ok_2"), workers=1, task_size=3)
    assert all(r.status is Status.OK for r in done.results.values())
    (warning,) = done.kinds("worker_warning")
    assert "RuntimeWarning: something to know about warn_1.jpg" in warning.message
    assert warning.pid == done.results["warn_1.jpg"].worker_pid


def test_workers_let_idle_openmp_threads_sleep_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spinning OpenMP thread takes the core an I/O thread needs (see configure_openmp)."""
    from batchseg.worker.process import THREAD_ENV_VARS, configure_openmp

    for name in (*THREAD_ENV_VARS, "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    configure_openmp(3)
    assert [os.environ[name] for name in THREAD_ENV_VARS] == ["3"] * len(THREAD_ENV_VARS)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    configure_openmp(None)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
