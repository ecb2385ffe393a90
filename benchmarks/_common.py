"""Shared by the benchmark scripts: print the results as JSON and write them to --out."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional


def emit(results: Any, out: Optional[str]) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text)


def log(msg: str) -> None:
    """A timestamped progress line on stderr (stdout carries the JSON)."""
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
