"""Shared test setup: the repository root on sys.path and the real data of ../shared/realdata."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Real public data for the tests (see its SOURCES.md); SPML_REALDATA points elsewhere if needed.
REALDATA = Path(os.environ.get("SPML_REALDATA") or ROOT.parent / "shared" / "realdata")
if not (REALDATA / "SOURCES.md").is_file():
    raise RuntimeError(f"real test data not found at {REALDATA}: the tests need the project's shared/realdata "
                       f"beside the checkout, or SPML_REALDATA set to its path")
