"""Integrity check of a soft-label cache (data_schema.md), with zarr + numpy only (no torch, no models).

`verify_cache(path, deep)` returns the faults it finds, one line each, every line naming the array (or the
manifest) and the samples (rows) concerned; an empty list means the cache is sound. `check_cache` also returns
notes on what it could not check. Both kinds of cache (view: K augmented views per image; image: the whole
image at K = len(scales) scales) are checked for

* the manifest: present and parseable, a known schema version and kind, its fields consistent with each other
  (kind / scales / variants / shard size / classes / patch canvas vs the layout; view kind also input size
  and crop slots = distill.max_patches_per_img; image kind: variants = len(scales), scales positive and
  increasing, a row canvas of whole 256-pixel map tiles at one map stride) and, once complete, its counts and
  its `skipped` list consistent with the `status` array;
* the arrays' metadata: present, dtype, shape, shard and inner-chunk shapes, a crc32c in the inner-chunk and
  the shard-index codecs;
* the files: one per committed shard and array (`shard_done` markers vs files), no empty files (zarr reads an
  empty shard file as all-zero without complaint), no stray or `*.partial` files;
* checksums: the small per-sample arrays, `image_ids` and `shard_done` are read whole (every chunk's crc32c);
  the shard index of every map file (`heatmap`, `coarse`, `refine`) is checked (crc32c, offsets inside the
  file); with deep=True every map chunk is read and decoded as well;
* values: `status` in {1, 2} in committed shards, `image_id`/`variant`/`seed` agree with
  index = image_index * K + variant (every sample written exactly once, at its place), unique `image_ids`,
  fingerprints set exactly for stored samples, crop boxes integral and inside the row's image, scales in
  (0, upscale], `num_valid_patches == patch_valid.sum(1)` <= crop slots; with deep=True also zero maps for
  skipped samples and zero `refine` in invalid slots;
* view kind: `aug_params` JSON whose key is (seed, image_id, variant); crop boxes inside the view;
* image kind: `aug_params` an image row of its place (kind 'image', scale = layout.scales[variant // mirrors],
  mirrored for odd variants of a mirrored layout, scaled_hw = round(ori_hw * scale) inside the row canvas,
  ori_hw = the annotation file's height and width when the verifier has that file), the rows of one image
  agreeing on ori_hw and fingerprint; crop boxes inside the scaled image; with deep=True the heatmap zero outside the scaled image and the coarse maps zero
  beyond the teacher's input (the scaled image padded to 32).

A missing shard file of a committed shard is a fault in a cache whose manifest has `all_shard_files: true`
(its writer stored all-zero shards too), and so is an inner map chunk absent from a committed shard's index.
In an older cache (no such flag: zarr skipped all-zero shards) a missing file is only a fault where the data
it would hold cannot all be the fill value: never for the maps (a weak teacher's maps can quantise to zero),
nor e.g. `seed` of a cache made with seed 0; `status` and `aug_params` always.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import zarr

from yolc_kd.cache.manifest import sha256_file
from yolc_kd.cache.arrays import (IMAGE_IDS, IMAGE_MAP_TILE, SHARD_DONE, STATUS_OK, STATUS_SKIPPED, map_names,
                                  names, sample_names, spec, specs)
from yolc_kd.cache.schema import ALL_SHARD_FILES, CACHE_KINDS, MANIFEST_KEY, SCHEMA_VERSION, Layout, padded
from yolc_kd.cache.shards import chunk_files, index_problem, shard_key
from yolc_kd.cache.verify_values import ValueChecks, _first_line, _short, format_ranges
from yolc_kd.progress import progress_bar



def verify_cache(path: Any, deep: bool = False, progress: bool = False, annotations: Any = None) -> List[str]:
    """Faults of the cache at `path`, one line each (empty: sound). deep=True decodes every map chunk too.
    annotations: a COCO file whose image sizes an image-kind cache's rows must match (check_cache)."""
    return check_cache(path, deep, progress, annotations)[0]


def check_cache(path: Any, deep: bool = False, progress: bool = False,
                annotations: Any = None) -> Tuple[List[str], List[str]]:
    """(faults, notes) of the cache at `path`: verify_cache's faults, and lines saying what was not checked.
    An image-kind cache's rows are checked against the image sizes of `annotations` (a COCO file), or, when
    None, of the manifest's annotation file if it is still the file the cache was made from (same sha256)."""
    v = _Verifier(Path(path), deep, progress, annotations)
    return v.run(), v.notes


def annotation_sizes(path: Path) -> Dict[int, Tuple[int, int]]:
    """image id -> (height, width) of every image of a COCO file that gives both (ids as integers, as the cache
    keys them); ValueError or OSError when it is no COCO file."""
    coco = json.loads(path.read_bytes().decode("utf-8"))
    images = coco.get("images") if isinstance(coco, dict) else None
    if not isinstance(images, list):
        raise ValueError("no 'images' list")
    out = {}
    for im in images:
        if not isinstance(im, dict) or not all(type(im.get(k)) is int for k in ("height", "width")):
            continue
        try:
            out[int(im.get("id"))] = (im["height"], im["width"])
        except (TypeError, ValueError):
            continue  # no integer id: no cache row can name it
    return out


def _layout_checks(m: Mapping[str, Any], lay: Layout) -> List[Tuple[str, Any, Any]]:
    """(field, manifest value, value the layout implies) of every manifest field the layout fixes. Image kind:
    the layout's input_hw is the row canvas (not the view's input_size) and its max_patches the crop slots
    precompute chose (--regions or image_level.auto_regions, not distill.max_patches_per_img)."""
    checks = [
        ("kind", m.get("kind", "view"), lay.kind),
        ("scales", list(m.get("scales") or []), list(lay.scales)),
        ("mirrored", bool(m.get("mirrored", False)), lay.mirrored),
        ("variants", m.get("variants"), lay.variants),
        ("shard_size", m.get("shard_size"), lay.shard_size),
        ("annotations.num_images", (m.get("annotations") or {}).get("num_images"), lay.num_images),
        ("classes (count)", len(m.get("classes") or []), lay.num_classes),
    ]
    if lay.kind != "image":
        checks += [("input_size", list(m.get("input_size") or []), [lay.input_hw[1], lay.input_hw[0]]),
                   ("distill.max_patches_per_img", (m.get("distill") or {}).get("max_patches_per_img"),
                    lay.max_patches)]
    canvas = m.get("patch_canvas")
    if isinstance(canvas, list) and len(canvas) == 2 and all(isinstance(c, int) for c in canvas):
        checks.append(("patch_canvas / 4", [canvas[0] // 4, canvas[1] // 4], list(lay.refine_hw)))
    return checks


def _image_layout_problems(lay: Layout) -> List[str]:
    """What is wrong with an image-kind layout on its own (none for the view kind): one row per scale, scales
    positive and increasing, a canvas of whole map tiles with the same map stride on both axes."""
    if lay.kind != "image":
        return ([] if not lay.scales else [f"layout.scales is {_short(list(lay.scales))} in a view-kind cache"]) + \
            (["layout.mirrored is true in a view-kind cache"] if lay.mirrored else [])
    out = []
    if len(lay.scales) * lay.mirrors != lay.variants:
        out.append(f"layout.variants is {lay.variants} but layout.scales has {len(lay.scales)} scale(s)"
                   + (" with their mirrors" if lay.mirrored else ""))
    if not all(s > 0 for s in lay.scales) or list(lay.scales) != sorted(set(lay.scales)):
        out.append(f"layout.scales {_short(list(lay.scales))} are not positive and increasing")
    h, w = lay.input_hw
    if h % IMAGE_MAP_TILE or w % IMAGE_MAP_TILE or min(h, w) < 1:
        out.append(f"layout.input_hw {[h, w]} is not whole {IMAGE_MAP_TILE}-pixel map tiles")
    ch, cw = lay.coarse_hw
    if min(ch, cw) < 1 or h % ch or w % cw or h // ch != w // cw:
        out.append(f"layout.coarse_hw {[ch, cw]} is not input_hw {[h, w]} at one map stride")
    return out


class _Verifier(ValueChecks):
    def __init__(self, path: Path, deep: bool, progress: bool, annotations: Any = None):
        self.path, self.deep, self.progress = path, deep, progress
        self.annotations = Path(annotations) if annotations is not None else None
        self.faults: List[str] = []
        self.notes: List[str] = []                     # what was not checked, and why
        self._deep_hw: Optional[np.ndarray] = None     # image kind, deep: content_hw of the rows
        self.manifest: Dict[str, Any] = {}
        self.layout: Optional[Layout] = None
        self.usable: Dict[str, zarr.Array] = {}        # arrays whose metadata is as the schema says
        self.missing_files: Dict[str, Set[int]] = {}   # array -> shards without a file (or an empty one)
        self.empty_files: Dict[str, Set[int]] = {}     # array -> shards with an empty file (reported)
        self.data: Dict[str, np.ndarray] = {}          # decoded small arrays (+ image_ids, shard_done)
        self.ok_rows: Dict[str, np.ndarray] = {}       # rows of data[name] that decoded (bool per sample)
        self.committed: Optional[np.ndarray] = None    # per shard: shard_done == 1 (decoded)
        self.exact = False                             # manifest all_shard_files: every committed shard has files

    # ------------------------------------------------------------------ helpers
    def fault(self, what: str) -> None:
        self.faults.append(what)

    def sample_fault(self, name: str, rows: Iterable[int], what: str) -> None:
        rows = sorted(set(int(r) for r in rows))
        if not rows:
            return
        lay = self.layout
        shards = sorted({r // lay.shard_size for r in rows})
        where = f"sample{'s' if len(rows) > 1 else ''} {format_ranges(rows)}"
        where += f" (shard{'s' if len(shards) > 1 else ''} {format_ranges(shards, 3)})"
        self.fault(f"array '{name}', {where}: {what}")

    def _bar(self, total: int, desc: str):
        return progress_bar(total=total, desc=desc, unit="shard", disable=not self.progress, leave=False)

    # ------------------------------------------------------------------ run
    def run(self) -> List[str]:
        if not self._check_manifest():
            return self.faults
        if self.layout.kind == "image":
            self._load_annotation_sizes()
        self._check_metadata()
        self._check_files()
        self._read_small()
        self._check_map_indexes()
        self._check_missing_files()
        self._check_values()
        self._check_counts()
        return self.faults

    # ------------------------------------------------------------------ manifest
    def _check_manifest(self) -> bool:
        path = self.path
        root_json = path / "zarr.json"
        if not path.is_dir():
            self.fault(f"{path}: not a yolc-kd cache (no such folder)")
            return False
        if not root_json.is_file():
            self.fault(f"{path}: not a yolc-kd cache (no zarr.json): run `yolc-kd precompute --out {path}` first")
            return False
        try:
            root = json.loads(root_json.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.fault(f"manifest ({root_json}, the root group's zarr.json) is unreadable, truncated or damaged: "
                       f"{_first_line(exc)}")
            return False
        except OSError as exc:
            self.fault(f"manifest ({root_json}) cannot be read: {_first_line(exc)}")
            return False
        if not isinstance(root, dict) or root.get("node_type") != "group" or root.get("zarr_format") != 3:
            self.fault(f"manifest ({root_json}) is not the metadata of a Zarr v3 group")
            return False
        m = (root.get("attributes") or {}).get(MANIFEST_KEY)
        if not isinstance(m, dict):
            self.fault(f"manifest: {root_json} has no '{MANIFEST_KEY}' attribute (the cache's creation did not "
                       f"finish; rerun yolc-kd precompute)")
            return False
        self.manifest = m
        version = m.get("schema_version")
        if version != SCHEMA_VERSION:
            self.fault(f"manifest: schema_version {version!r} is unknown (this yolc-kd reads {SCHEMA_VERSION})")
            return False
        try:
            self.layout = lay = Layout.from_dict(m["layout"])
            if min(lay.num_images, lay.variants, lay.shard_size, lay.num_classes, lay.max_patches) < 1 and \
                    lay.num_images != 0:
                raise ValueError("non-positive sizes")
            if lay.kind not in CACHE_KINDS:
                raise ValueError(f"kind {lay.kind!r} is not one of {', '.join(CACHE_KINDS)}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.fault(f"manifest: field 'layout' is missing or malformed ({_first_line(exc)})")
            return False
        for key in ("variants", "shard_size", "seed", "classes", "input_size", "distill", "crop", "patch_canvas",
                    "annotations", "complete", "teacher", "augment"):
            if key not in m:
                self.fault(f"manifest: field '{key}' is missing")
        for name, got, want in _layout_checks(m, lay):
            if got != want:
                self.fault(f"manifest: {name} is {_short(got)} but layout implies {_short(want)}")
        for problem in _image_layout_problems(lay):
            self.fault(f"manifest: {problem}")
        flag = m.get(ALL_SHARD_FILES, False)
        if not isinstance(flag, bool):
            self.fault(f"manifest: {ALL_SHARD_FILES} is {_short(flag)}, expected true or false")
        self.exact = flag is True
        if not m.get("complete"):
            self.fault("manifest: complete is false (the precompute run did not finish: rerun the same "
                       "`yolc-kd precompute` command to complete it)")
        return True

    def _load_annotation_sizes(self) -> None:
        """annotation_hw from the given COCO file, else from the manifest's if it is unchanged; a note when
        there is none (the rows' image sizes are then checked for consistency only)."""
        ann_m = self.manifest.get("annotations") or {}
        path = self.annotations
        if path is None:
            cand = Path(str(ann_m.get("path") or ""))
            if ann_m.get("path") and cand.is_file() and sha256_file(cand) == ann_m.get("sha256"):
                path = cand
        if path is None:
            self.notes.append("the image-kind rows' image sizes (aug_params ori_hw) were not checked against an "
                              "annotation file: the manifest's is not here unchanged (pass --ann)")
            return
        try:
            self.annotation_hw = annotation_sizes(path)
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            self.fault(f"annotations: {path} cannot be read as a COCO file ({_first_line(exc)}): the rows' image "
                       f"sizes were not checked against it")

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

    # ------------------------------------------------------------------ values
