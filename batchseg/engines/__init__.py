"""The engines: what a worker process loads to turn images into masks (the only code that may
import torch). ``sam3`` is the default; ``threshold`` reads each prompt as a colour. Any other
engine plugs in through ``batchseg.worker.contract`` and ``--engine MODULE:FUNCTION``.
"""
