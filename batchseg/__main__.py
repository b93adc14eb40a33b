"""``python -m batchseg``: the same entry point as the ``batchseg`` console script."""

from batchseg.cli import main

if __name__ == "__main__":  # guard needed: spawned workers import __main__ on Windows
    main()
