"""Shared by the benchmark scripts: print the results as JSON and write them to --out."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def emit(results: Any, out: Optional[str]) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text)
