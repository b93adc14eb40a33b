"""An engine whose first load is SIGKILLed, as the out-of-memory killer kills a worker mid-load.

``--engine load_kill_engine:load`` (tests/ on PYTHONPATH), with ``BATCHSEG_TEST_LOADS=FOLDER``:
every load appends its pid to FOLDER/loads.txt; the first one to claim FOLDER/killed kills its own
process with SIGKILL. Every other load waits until ``LOADS_BEFORE_READY`` loads have begun, so no
worker is ready before the pool has replaced the killed one: the case where a run used to end.
Images are then processed as ``misbehaving_engines`` does (an empty label map each, ``ok``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from misbehaving_engines import MisbehavingEngine

from batchseg.worker.contract import EngineSpec

#: The killed load, the other worker's first load, and the replacement of the killed one.
LOADS_BEFORE_READY = 3


def load(spec: EngineSpec, slot: int) -> MisbehavingEngine:
    folder = Path(os.environ["BATCHSEG_TEST_LOADS"])
    with (folder / "loads.txt").open("a") as log:
        log.write(f"{os.getpid()}\n")
    try:
        (folder / "killed").open("x").close()
    except FileExistsError:
        pass
    else:
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(6000):  # polls; the run's --load-timeout bounds a pool that never replaces it
        if len((folder / "loads.txt").read_text().split()) >= LOADS_BEFORE_READY:
            break
        time.sleep(0.05)
    return MisbehavingEngine(spec, lambda engine, item: None)
