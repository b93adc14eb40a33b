"""batchseg: unattended SAM3 segmentation of image folders.

The package's public API; the CLI (``batchseg.cli``) is one client of it. Importing batchseg never
imports torch: only the worker processes do.
"""

from __future__ import annotations

__version__ = "0.1.0"
