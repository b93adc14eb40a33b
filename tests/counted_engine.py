"""An engine that logs each of its loads: ``--engine counted_engine:load`` (tests/ on PYTHONPATH)
with ``BATCHSEG_TEST_LOADS=FOLDER`` appends a line 'PID SLOT' to FOLDER/loads.txt when a load begins; with
``BATCHSEG_TEST_LOAD_S=N`` the load then takes N seconds more; with ``BATCHSEG_TEST_READY_AFTER=N``
no load ends before N loads have begun (so a run of several workers cannot end before each
of them has loaded, however the machine schedules them). Images are processed as
``misbehaving_engines`` does (an empty label map each, ``ok``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from misbehaving_engines import MisbehavingEngine

from batchseg.worker.contract import EngineSpec


def load(spec: EngineSpec, slot: int) -> MisbehavingEngine:
    loads = Path(os.environ["BATCHSEG_TEST_LOADS"]) / "loads.txt"
    with loads.open("a") as log:
        log.write(f"{os.getpid()} {slot}\n")
    time.sleep(float(os.environ.get("BATCHSEG_TEST_LOAD_S", "0")))
    for _ in range(1200):  # polls; the run's --load-timeout bounds a wait that never ends
        if len(loads.read_text().split("\n")) > int(os.environ.get("BATCHSEG_TEST_READY_AFTER", "0")):
            break
        time.sleep(0.05)
    return MisbehavingEngine(spec, lambda engine, item: None)
