"""Every rank logs warnings and errors with its rank; only rank 0 logs info."""
from __future__ import annotations

import logging
import sys


def setup_logging(rank: int = 0, level: str = "INFO") -> None:
    root = logging.getLogger("stackgan_dist")
    root.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank} %(levelname)s] %(message)s", "%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    root.propagate = False
