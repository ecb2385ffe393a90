"""Value checks of verify_cache (the part that reads the per-sample arrays), mixed into its verifier."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, List, Tuple

import numpy as np

from yolc_kd.cache.schema import (IMAGE_IDS, STATUS_MISSING, STATUS_OK, STATUS_SKIPPED)


_MAX_RANGES = 6                            # sample ranges shown in one fault line


def format_ranges(indices: Iterable[int], limit: int = _MAX_RANGES) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0..2, 5, 7..8' (at most `limit` ranges, then '+N more')."""
    idx = sorted(set(int(i) for i in indices))
    ranges: List[Tuple[int, int]] = []
    for i in idx:
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], i)
        else:
            ranges.append((i, i))
    text = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in ranges[:limit])
    if len(ranges) > limit:
        text += f", +{len(ranges) - limit} more range(s)"
    return text

def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    if text and "checksum" in text[0].lower() and "match" in text[0].lower():
        return "crc32c mismatch"
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__

def _short(v: Any, width: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= width else text[:width - 3] + "..."


class ValueChecks:
    """Methods of the verifier that check values; they use its fault helpers and the arrays it has read."""

    def _rows(self, *names: str) -> np.ndarray:
        """Sample rows in committed shards where all the given arrays decoded."""
        lay = self.layout
        rows = np.repeat(self.committed, lay.shard_size)[:lay.num_samples].copy()
        for n in names:
            if n not in self.data:
                return np.zeros(lay.num_samples, dtype=bool)
            ok = self.ok_rows[n]
            rows &= ok[np.arange(lay.num_samples) // lay.variants] if n == IMAGE_IDS else ok
        return rows

    def _check_values(self) -> None:
        lay, d, m = self.layout, self.data, self.manifest
        k = lay.variants
        index = np.arange(lay.num_samples)
        if IMAGE_IDS in d and self.ok_rows[IMAGE_IDS].all():
            ids = d[IMAGE_IDS]
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                dup = uniq[counts > 1]
                self.fault(f"array '{IMAGE_IDS}': duplicate image id(s) {dup[:5].tolist()} "
                           f"(image positions {format_ranges(np.flatnonzero(np.isin(ids, dup)))})")
        rows = self._rows("status")
        if rows.any():
            st = d["status"]
            self.sample_fault("status", np.flatnonzero(rows & (st == STATUS_MISSING)),
                              "status 0 (never written) in a committed shard")
            self.sample_fault("status", np.flatnonzero(rows & ~np.isin(st, (STATUS_MISSING, STATUS_OK, STATUS_SKIPPED))),
                              "status values other than 0/1/2")
        rows = self._rows("image_id", IMAGE_IDS)
        if rows.any():
            want = d[IMAGE_IDS][index // k]
            self.sample_fault("image_id", np.flatnonzero(rows & (d["image_id"] != want)),
                              "image_id disagrees with image_ids[index // variants] (sample written at the "
                              "wrong place or twice)")
        rows = self._rows("variant")
        if rows.any():
            self.sample_fault("variant", np.flatnonzero(rows & (d["variant"] != index % k)),
                              "variant disagrees with index % variants (sample written at the wrong place or twice)")
        rows = self._rows("seed")
        if rows.any() and isinstance(m.get("seed"), int):
            self.sample_fault("seed", np.flatnonzero(rows & (d["seed"] != m["seed"])),
                              f"seed differs from the manifest's seed {m['seed']}")
        self._check_fingerprint_and_params()
        self._check_patches()

    def _check_fingerprint_and_params(self) -> None:
        lay, d = self.layout, self.data
        k, seed = lay.variants, self.manifest.get("seed")
        st = d.get("status")
        rows = self._rows("fingerprint", "status")
        if rows.any():
            nonzero = d["fingerprint"].any(axis=1)
            self.sample_fault("fingerprint", np.flatnonzero(rows & (st == STATUS_OK) & ~nonzero),
                              "all-zero fingerprint for a stored sample")
            self.sample_fault("fingerprint", np.flatnonzero(rows & (st == STATUS_SKIPPED) & nonzero),
                              "fingerprint set for a skipped sample")
        rows = self._rows("aug_params", "status")
        bad_json, bad_skip, bad_key = [], [], []
        ids = d.get(IMAGE_IDS) if IMAGE_IDS in d and self.ok_rows[IMAGE_IDS].all() else None
        for r in np.flatnonzero(rows & np.isin(st if st is not None else np.zeros(0), (STATUS_OK, STATUS_SKIPPED))):
            try:
                params = json.loads(str(d["aug_params"][r]))
                if not isinstance(params, dict):
                    raise ValueError
            except ValueError:
                bad_json.append(r)
                continue
            if st[r] == STATUS_SKIPPED:
                if "skipped" not in params:
                    bad_skip.append(r)
            elif ids is not None and params.get("key") != [seed, int(ids[r // k]), int(r % k)]:
                bad_key.append(r)
        self.sample_fault("aug_params", bad_json, "not a JSON object")
        self.sample_fault("aug_params", bad_skip, "skipped sample without a 'skipped' reason")
        self.sample_fault("aug_params", bad_key, "augmentation key is not (seed, image_id, variant) of the sample")

    def _check_patches(self) -> None:
        lay, d, m = self.layout, self.data, self.manifest
        h, w = lay.input_hw
        st = d.get("status")
        rows = self._rows("patch_valid", "num_valid_patches")
        valid = d["patch_valid"].astype(bool) if "patch_valid" in d else None
        if rows.any():
            nvp = d["num_valid_patches"].astype(np.int64)
            self.sample_fault("num_valid_patches", np.flatnonzero(rows & (nvp > lay.max_patches)),
                              f"more than max_patches={lay.max_patches} valid patches")
            self.sample_fault("num_valid_patches", np.flatnonzero(rows & (nvp != valid.sum(axis=1))),
                              "disagrees with patch_valid.sum(1)")
        rows = self._rows("patch_valid", "status")
        if rows.any():
            self.sample_fault("patch_valid", np.flatnonzero(rows & (st == STATUS_SKIPPED) & valid.any(axis=1)),
                              "valid patches for a skipped sample")
        rows = self._rows("patch_boxes", "patch_valid")
        if rows.any():
            boxes = d["patch_boxes"].astype(np.float64)
            finite = np.isfinite(boxes).all(axis=(1, 2))
            self.sample_fault("patch_boxes", np.flatnonzero(rows & ~finite), "NaN or inf values")
            with np.errstate(invalid="ignore"):
                x, y, bw, bh = (boxes[..., i] for i in range(4))
                inside = (x >= 0) & (y >= 0) & (bw >= 1) & (bh >= 1) & (x + bw <= w) & (y + bh <= h)
                integral = (boxes == np.round(boxes)).all(axis=2)
            outside = rows & finite & (valid & ~inside).any(axis=1)
            self.sample_fault("patch_boxes", np.flatnonzero(outside),
                              f"valid crop box outside the {w}x{h} view or empty")
            self.sample_fault("patch_boxes", np.flatnonzero(rows & finite & (valid & ~integral).any(axis=1)),
                              "valid crop box with non-integer coordinates")
        rows = self._rows("patch_scales", "patch_valid")
        if rows.any():
            scales = d["patch_scales"].astype(np.float64)
            finite = np.isfinite(scales).all(axis=1)
            self.sample_fault("patch_scales", np.flatnonzero(rows & ~finite), "NaN or inf values")
            upscale = (m.get("crop") or {}).get("upscale")
            with np.errstate(invalid="ignore"):
                bad = scales <= 0
                if isinstance(upscale, (int, float)) and math.isfinite(upscale):
                    bad |= scales > float(upscale) * (1 + 1e-6)
            self.sample_fault("patch_scales", np.flatnonzero(rows & finite & (valid & bad).any(axis=1)),
                              f"valid patch scale outside (0, upscale={upscale}]")

    # ------------------------------------------------------------------ counts
    def _check_counts(self) -> None:
        m, lay = self.manifest, self.layout
        if IMAGE_IDS in self.data and self.ok_rows[IMAGE_IDS].all() and len(self.data[IMAGE_IDS]) != lay.num_images:
            self.fault(f"array '{IMAGE_IDS}' has {len(self.data[IMAGE_IDS])} ids, layout.num_images {lay.num_images}")
        if not m.get("complete"):
            return
        counts = m.get("counts")
        if not isinstance(counts, dict):
            self.fault("manifest: complete but field 'counts' is missing")
            return
        expect = dict(samples=lay.num_samples, images=lay.num_images, shards=lay.num_shards)
        if "status" in self.data and self.ok_rows["status"].all():
            st = self.data["status"]
            skipped_rows = np.flatnonzero(st == STATUS_SKIPPED)
            expect.update(samples_written=int((st == STATUS_OK).sum()), samples_skipped=int(skipped_rows.size),
                          images_skipped=len({int(r) // lay.variants for r in skipped_rows}))
            self._check_skipped_list(skipped_rows)
        for key, want in expect.items():
            if counts.get(key) != want:
                self.fault(f"manifest: counts.{key} is {_short(counts.get(key))}, the arrays say {want}")

    def _check_skipped_list(self, skipped_rows: np.ndarray) -> None:
        m, lay = self.manifest, self.layout
        listed = m.get("skipped")
        if not isinstance(listed, list):
            self.fault("manifest: complete but field 'skipped' is missing")
            return
        want: Dict[int, List[int]] = {}
        for r in skipped_rows.tolist():
            want.setdefault(r // lay.variants, []).append(r % lay.variants)
        ids = self.data.get(IMAGE_IDS)
        if ids is None or not self.ok_rows[IMAGE_IDS].all():
            return
        got: Dict[int, List[int]] = {}
        for entry in listed:
            if isinstance(entry, dict) and isinstance(entry.get("image_id"), int):
                got[int(entry["image_id"])] = sorted(int(v) for v in entry.get("variants") or [])
        want_by_id = {int(ids[i]): sorted(v) for i, v in want.items()}
        if got != want_by_id:
            diff = sorted((set(got) ^ set(want_by_id)) | {i for i in got if i in want_by_id and got[i] != want_by_id[i]})
            self.fault(f"manifest: the 'skipped' list disagrees with status == 2 for image id(s) {diff[:5]}")

