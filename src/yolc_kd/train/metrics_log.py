"""The run's metrics: one JSON line per record in metrics.jsonl, and the numbers in TensorBoard when installed."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from yolc_kd.diskio import append_text


def set_aside(path: Path) -> Path:
    """Rename an earlier run's file to NAME.<its mtime stamp>[-n]SUFFIX beside it and return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    n = 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
    os.replace(path, kept)
    return kept


class MetricsLog:
    """Appends records to metrics.jsonl (whole lines, yolc_kd.diskio) and their numbers to a TensorBoard
    SummaryWriter when torch's tensorboard support is installed. Only rank 0 writes.

    Args:
        path: the metrics.jsonl file.
        tb_dir: the TensorBoard folder.
        rank: this process's rank; others write nothing.
    """

    def __init__(self, path: Path, tb_dir: Path, rank: int):
        self.path, self.rank = Path(path), rank
        self.tb: Optional[Any] = None
        if rank == 0:
            try:  # TensorBoard when it is installed; metrics.jsonl always
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(tb_dir))
            except ImportError:
                pass

    def write(self, record: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        append_text(self.path, json.dumps(record) + "\n")
        if self.tb is not None:
            flat = {**record, **{f"eval/{k}": v for k, v in (record.get("eval") or {}).items()}}
            for key, value in flat.items():
                if isinstance(value, (int, float)) and key not in ("iter", "epoch"):
                    self.tb.add_scalar(key, value, record["iter"])
