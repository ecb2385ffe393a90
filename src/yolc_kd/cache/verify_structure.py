"""Structure checks of check_cache (cache/verify.py), all from the table of arrays (cache/arrays.py): every
array's metadata (dtype, shape, shard and inner-chunk shapes, crc32c codecs), its files (one per committed shard,
none empty, no stray or `*.partial` ones), the checksums of the small arrays (read whole) and of the maps' shard
indexes, with deep=True every map chunk decoded and the maps' own value checks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import zarr

from yolc_kd.cache.arrays import (IMAGE_IDS, SHARD_DONE, STATUS_OK, STATUS_SKIPPED, map_names, names, sample_names,
                                  spec, specs)
from yolc_kd.cache.schema import padded
from yolc_kd.cache.shards import chunk_files, index_problem, shard_key
from yolc_kd.cache.verify_values import _first_line, format_ranges


class StructureChecks:
    """Methods of the verifier that check the arrays' metadata, files and checksums and read the small arrays;
    they use its fault helpers and fill its `usable`, `missing_files`, `empty_files`, `data`, `ok_rows` and
    `committed`."""

    # ------------------------------------------------------------------ metadata
    def _expected(self, name: str) -> Tuple[str, Tuple[int, ...], Optional[Tuple[int, ...]], Tuple[int, ...]]:
        """(zarr data_type, shape, shard shape or None, inner chunk shape): the table's (cache/arrays.py)."""
        lay, s = self.layout, spec(name)
        return s.zarr_dtype, (s.length(lay), *s.shape(lay)), s.shards(lay), s.chunks(lay)

    def _check_metadata(self) -> None:
        try:
            group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        except Exception as exc:
            self.fault(f"manifest: the root group cannot be opened ({_first_line(exc)})")
            return
        for name in names():
            meta_path = self.path / name / "zarr.json"
            if not meta_path.is_file():
                self.fault(f"array '{name}' is missing (no {name}/zarr.json)")
                continue
            try:
                meta = json.loads(meta_path.read_bytes().decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError("not a JSON object")
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                self.fault(f"array '{name}': its metadata {name}/zarr.json is unreadable ({_first_line(exc)})")
                continue
            problems = self._metadata_problems(name, meta)
            if problems:
                self.fault(f"array '{name}': " + "; ".join(problems))
                continue
            try:
                self.usable[name] = group[name]
            except Exception as exc:
                self.fault(f"array '{name}' cannot be opened ({_first_line(exc)})")

    def _metadata_problems(self, name: str, meta: Mapping[str, Any]) -> List[str]:
        dtype, shape, shard, inner = self._expected(name)
        out = []
        if meta.get("node_type") != "array":
            return ["its zarr.json is not array metadata"]
        if meta.get("data_type") != dtype:
            out.append(f"dtype {meta.get('data_type')!r}, expected {dtype!r}")
        if tuple(meta.get("shape") or ()) != shape:
            out.append(f"shape {tuple(meta.get('shape') or ())}, expected {shape}")
        try:
            grid = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            codecs = list(meta["codecs"])
        except (KeyError, TypeError):
            return out + ["chunk grid or codecs missing from its zarr.json"]
        names = [c.get("name") for c in codecs if isinstance(c, dict)]
        if shard is None:
            if grid != inner:
                out.append(f"chunks {grid}, expected {inner}")
            if "sharding_indexed" in names:
                out.append("is sharded, expected one plain chunk grid")
            elif not names or names[-1] != "crc32c":
                out.append(f"codecs {names} do not end with crc32c")
            return out
        if grid != shard:
            out.append(f"shards {grid}, expected {shard}")
        if names != ["sharding_indexed"]:
            return out + [f"codecs {names}, expected sharding_indexed"]
        conf = codecs[0].get("configuration") or {}
        if tuple(conf.get("chunk_shape") or ()) != inner:
            out.append(f"inner chunks {tuple(conf.get('chunk_shape') or ())}, expected {inner}")
        inner_names = [c.get("name") for c in conf.get("codecs") or [] if isinstance(c, dict)]
        if not inner_names or inner_names[-1] != "crc32c":
            out.append(f"inner-chunk codecs {inner_names} do not end with crc32c")
        index_names = [c.get("name") for c in conf.get("index_codecs") or [] if isinstance(c, dict)]
        if index_names != ["bytes", "crc32c"]:
            out.append(f"shard index codecs {index_names}, expected ['bytes', 'crc32c']")
        if conf.get("index_location", "end") not in ("start", "end"):
            out.append(f"unknown index_location {conf.get('index_location')!r}")
        return out

    # ------------------------------------------------------------------ files
    def _shard_file(self, name: str, j: int) -> Path:
        return self.path / name / shard_key(self.usable[name], j)

    def _check_files(self) -> None:
        lay = self.layout
        stray = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*.partial"))
        if stray:
            self.fault(f"leftover temporary file(s) of a killed write: {', '.join(stray[:3])}"
                       + (f" (+{len(stray) - 3} more)" if len(stray) > 3 else "")
                       + " (rerun the same `yolc-kd precompute` command to clean them)")
        for name, arr in self.usable.items():
            expected = {key: coords[0] for key, coords in chunk_files(arr).items()}  # key -> shard (chunk) j
            n_chunks, ndim = len(expected), arr.ndim
            found: Dict[int, Path] = {}
            extra: List[str] = []
            chunk_root = self.path / name / "c"
            if chunk_root.is_dir():
                for p in chunk_root.rglob("*"):
                    if p.is_dir() or p.name.endswith(".partial"):
                        continue
                    rel = p.relative_to(self.path / name).as_posix()
                    if rel in expected:
                        found[expected[rel]] = p
                    else:
                        extra.append(rel)
            if extra:
                self.fault(f"array '{name}': unexpected file(s) {', '.join(sorted(extra)[:3])}"
                           + (f" (+{len(extra) - 3} more)" if len(extra) > 3 else "")
                           + f" (the layout has {n_chunks} chunk file(s) of rank {ndim})")
            empty = sorted(j for j, p in found.items() if p.stat().st_size == 0)
            if empty:
                if spec(name).axis == "sample":
                    rows = [r for j in empty for r in range(*lay.shard_range(j))]
                    self.sample_fault(name, rows, "shard file is empty (zarr would read it as all zero)")
                else:
                    self.fault(f"array '{name}': chunk file(s) {format_ranges(empty)} are empty")
            self.missing_files[name] = {j for j in expected.values() if j not in found or j in empty}
            self.empty_files[name] = set(empty)

    # ------------------------------------------------------------------ small arrays
    def _read_blocks(self, name: str, arr: zarr.Array, ranges: Sequence[Tuple[int, int]],
                     empty: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Read arr whole; on a decoding error read it range by range. Returns (data, ok rows)."""
        n = arr.shape[0]
        ok = np.ones(n, dtype=bool)
        try:
            return np.asarray(arr[:]), ok
        except Exception:
            pass
        data = empty
        for a, b in ranges:
            try:
                data[a:b] = np.asarray(arr[a:b])
            except Exception as exc:
                ok[a:b] = False
                if spec(name).axis == "sample":
                    self.sample_fault(name, range(a, b), f"damaged chunk: "
                                                         f"{_first_line(exc)}")
                elif spec(name).axis == "image":
                    self.fault(f"array '{name}' (image positions {format_ranges(range(a, b))}): damaged chunk: "
                               f"{_first_line(exc)}")
                else:
                    self.fault(f"array '{name}', shard {a}: damaged marker: {_first_line(exc)}")
        return data, ok

    def _read_small(self) -> None:
        lay = self.layout
        ranges = dict(shard=[(j, j + 1) for j in range(lay.num_shards)], image=[(0, lay.num_images)],
                      sample=[lay.shard_range(j) for j in range(lay.num_shards)])
        small = [s for axis in ("shard", "image", "sample") for s in specs() if s.axis == axis and not s.map]
        for s in small:
            arr = self.usable.get(s.name)
            if arr is None:
                continue
            self.data[s.name], self.ok_rows[s.name] = self._read_blocks(s.name, arr, ranges[s.axis],
                                                                        s.empty(arr.shape[0], lay))
            for j in self.empty_files.get(s.name, ()):  # read as fill values: already reported, not data
                a, b = ranges[s.axis][j] if s.axis != "image" else ranges["image"][0]
                self.ok_rows[s.name][a:b] = False
        if SHARD_DONE in self.data:
            done = self.data[SHARD_DONE]
            bad = np.flatnonzero(~np.isin(done, (0, 1)) & self.ok_rows[SHARD_DONE])
            if bad.size:
                self.fault(f"array '{SHARD_DONE}', shard(s) {format_ranges(bad)}: values other than 0/1")
            self.committed = (done == 1) & self.ok_rows[SHARD_DONE]
            open_ = np.flatnonzero(~self.committed)
            if open_.size:
                rows = [r for j in open_ for r in range(*lay.shard_range(int(j)))]
                gone = sorted(set(open_.tolist()) & self.missing_files.get(SHARD_DONE, set()))
                self.sample_fault(SHARD_DONE, rows, f"shard(s) {format_ranges(open_)} not committed "
                                                    f"(shard_done != 1"
                                  + (f"; marker file of shard(s) {format_ranges(gone)} missing" if gone else "")
                                  + "): their samples are not usable")
        else:
            self.committed = np.zeros(lay.num_shards, dtype=bool)

    # ------------------------------------------------------------------ map shard indexes / deep read
    def _check_map_indexes(self) -> None:
        lay = self.layout
        maps = [n for n in map_names() if n in self.usable]
        bar = self._bar(lay.num_shards * len(maps), "verify maps" if self.deep else "verify indexes")
        try:
            for name in maps:
                arr = self.usable[name]
                for j in range(lay.num_shards):
                    bar.update(1)
                    a, b = lay.shard_range(j)
                    if j in self.missing_files.get(name, ()):
                        continue
                    problem = index_problem(arr, self._shard_file(name, j), b - a, self.exact and self.committed[j])
                    if problem:
                        self.sample_fault(name, range(a, b), problem)
                        continue
                    if self.deep:
                        self._deep_shard(name, arr, j)
        finally:
            bar.close()

    def _deep_shard(self, name: str, arr: zarr.Array, j: int) -> None:
        a, b = self.layout.shard_range(j)
        try:
            block = np.asarray(arr[a:b])
            bad_rows: List[int] = []
        except Exception:
            block, bad_rows, why = None, [], ""
            for r in range(a, b):  # one inner chunk per sample: find the damaged ones
                try:
                    arr[r]
                except Exception as exc:
                    bad_rows.append(r)
                    why = why or _first_line(exc)
            self.sample_fault(name, bad_rows, f"damaged chunk: {why}")
            return
        if not self.committed[j]:
            return
        status = self._status_rows(a, b)
        if status is not None:
            flat = block.reshape(b - a, -1)
            skipped_nonzero = [a + r for r in np.flatnonzero((status == STATUS_SKIPPED) & (flat != 0).any(axis=1))]
            self.sample_fault(name, skipped_nonzero, "non-zero data for a skipped sample (status 2)")
        if name == "refine" and "patch_valid" in self.data and self.ok_rows["patch_valid"][a:b].all():
            invalid = ~self.data["patch_valid"][a:b].astype(bool)
            slots = (block.reshape(b - a, block.shape[1], -1) != 0).any(axis=2)
            rows = [a + r for r in np.flatnonzero((invalid & slots).any(axis=1))]
            self.sample_fault(name, rows, "non-zero refine maps in invalid patch slots (patch_valid false)")
        if self.layout.kind == "image" and name in ("heatmap", "coarse") and status is not None:
            self._check_outside_content(name, block, a, status)

    def _check_outside_content(self, name: str, block: np.ndarray, a: int, status: np.ndarray) -> None:
        """Image kind: a stored row's heatmap is zero outside its scaled image [:h, :w], its coarse maps beyond
        the teacher's padded input (h, w rounded up to 32, at the map stride)."""
        if self._deep_hw is None:  # the maps are read before the values are checked: parsed here, no faults
            self._deep_hw = self.content_hw(self._parse_params()[0])
        hw = self._deep_hw
        stride = self.layout.input_hw[0] // self.layout.coarse_hw[0]
        bad = []
        for r in np.flatnonzero(status == STATUS_OK):
            h, w = (int(x) for x in hw[a + r])
            if h < 0:
                continue  # its aug_params are faulty (reported): no known content
            if name == "coarse":
                h, w = padded(h) // stride, padded(w) // stride
            if block[r][:, h:].any() or block[r][:, :h, w:].any():
                bad.append(a + r)
        what = "outside the row's scaled image (aug_params scaled_hw)" if name == "heatmap" else \
            "beyond the teacher's input (scaled_hw padded to 32, at the map stride)"
        self.sample_fault(name, bad, f"non-zero values {what}")

    def _status_rows(self, a: int, b: int) -> Optional[np.ndarray]:
        if "status" not in self.data or not self.ok_rows["status"][a:b].all():
            return None
        return self.data["status"][a:b]

    # ------------------------------------------------------------------ missing files
    def shard_values(self, name: str, j: int) -> Optional[np.ndarray]:
        """The decoded rows of shard j of a small per-sample array where they are data (its file is there and
        every row decoded), else None: what the table's may_be_fill rules read."""
        a, b = self.layout.shard_range(j)
        if name not in self.data or j in self.missing_files.get(name, ()) or not self.ok_rows[name][a:b].all():
            return None
        return self.data[name][a:b]

    def _check_missing_files(self) -> None:
        lay = self.layout
        for name in sample_names():
            if name not in self.usable:
                continue
            for j in sorted(self.missing_files.get(name, ())):
                if not self.committed[j] or (not self.exact and spec(name).may_be_fill(self, j)):
                    continue
                a, b = lay.shard_range(j)
                path = self._shard_file(name, j)
                if path.is_file() and path.stat().st_size == 0:
                    continue  # already reported as empty
                self.sample_fault(name, range(a, b), f"shard file {path.relative_to(self.path)} is missing "
                                                     f"although shard {j} is committed")
                if name in self.ok_rows:
                    self.ok_rows[name][a:b] = False
        for name in (IMAGE_IDS,):
            if name in self.usable and self.missing_files.get(name) and (self.exact or lay.num_images > 1):
                self.fault(f"array '{name}': its chunk file {shard_key(self.usable[name], 0)} is missing")
                self.ok_rows[name][:] = False
