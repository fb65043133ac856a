"""Shared test setup: the repository root on sys.path and the real test data shipped in tests/data."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Small real public data inside the checkout (tests/data/SOURCES.md says where each file comes from and what
# was trimmed or downscaled). Nothing outside the repository is read.
REALDATA = Path(__file__).resolve().parent / "data"
if not (REALDATA / "SOURCES.md").is_file():
    raise RuntimeError(f"test data missing: {REALDATA} should be part of the checkout (tests/data/SOURCES.md)")
