"""Value checks of check_cache (the part that reads the per-sample arrays), mixed into its verifier."""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from yolc_kd.cache.arrays import IMAGE_IDS, STATUS_OK, STATUS_SKIPPED, sample_specs
from yolc_kd.data.view_steps import scaled_hw


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


def _two_positive_ints(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                       for x in v)


def image_row_problem(params: Mapping[str, Any], scale: float, canvas_hw: Sequence[int],
                      image_hw: Optional[Sequence[int]] = None, mirrored: bool = False) -> Optional[str]:
    """Why a stored image-kind row's aug_params are not its image at `scale` (the layout's scale of its place),
    mirrored or not as its place says, on a row canvas of canvas_hw (None: they are). image_hw: the image's
    (height, width) in the annotation file, when known. The reason is the same text for every row with that
    fault (one line names them all)."""
    if params.get("kind") != "image":
        return "not an image row (kind is not 'image')"
    if not _two_positive_ints(params.get("ori_hw")) or not _two_positive_ints(params.get("scaled_hw")):
        return "ori_hw or scaled_hw is not two positive integers"
    s = params.get("scale")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or s != scale:
        return "scale is not the layout's scale of the row's variant (layout.scales[variant // mirrors])"
    if params.get("mirrored", False) is not bool(mirrored):
        return "mirrored is not the layout's for the row's variant (odd variants are mirrored)"
    if list(scaled_hw(params["ori_hw"], s)) != params["scaled_hw"]:
        return "scaled_hw is not round(ori_hw * scale)"
    if params["scaled_hw"][0] > canvas_hw[0] or params["scaled_hw"][1] > canvas_hw[1]:
        return f"scaled image larger than the {canvas_hw[1]}x{canvas_hw[0]} row canvas (layout.input_hw)"
    if image_hw is not None and list(image_hw) != params["ori_hw"]:
        return "ori_hw differs from the image's height and width in the annotation file"
    return None


class ValueChecks:
    """Methods of the verifier that check values; they use its fault helpers and the arrays it has read.

    Args:
        annotation_hw: image id -> (height, width) from the annotation file, when the verifier has one.
    """

    annotation_hw: Optional[Dict[int, Tuple[int, int]]] = None
    _params: Optional[Dict[int, Dict[str, Any]]] = None  # _stored_params, parsed once

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
        """image_ids unique, every array's value check of the table (cache/arrays.py ArraySpec.check) on the rows
        where it and what the check needs decoded, then the rows' augmentation and crop boxes."""
        d = self.data
        if IMAGE_IDS in d and self.ok_rows[IMAGE_IDS].all():
            ids = d[IMAGE_IDS]
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                dup = uniq[counts > 1]
                self.fault(f"array '{IMAGE_IDS}': duplicate image id(s) {dup[:5].tolist()} "
                           f"(image positions {format_ranges(np.flatnonzero(np.isin(ids, dup)))})")
        for s in sample_specs():
            if s.check is None:
                continue
            rows = self._rows(s.name, *s.needs)
            if rows.any():
                for bad, what in s.check(self):
                    self.sample_fault(s.name, np.flatnonzero(rows & bad), what)
        params = self._stored_params()
        if self.layout.kind == "image":
            self._check_image_params(params)
        else:
            self._check_view_keys(params)
        rows = self._rows("patch_boxes", "patch_valid")
        if rows.any():
            self._check_boxes(rows, d["patch_boxes"].astype(np.float64), d["patch_valid"].astype(bool))

    def _stored_params(self) -> Dict[int, Dict[str, Any]]:
        """aug_params of the stored rows (status 1) that are JSON objects, parsed once; faults for rows whose
        text is no JSON object and for skipped rows without a reason."""
        if self._params is None:
            self._params, bad_json, bad_skip = self._parse_params()
            self.sample_fault("aug_params", bad_json, "not a JSON object")
            self.sample_fault("aug_params", bad_skip, "skipped sample without a 'skipped' reason")
        return self._params

    def _parse_params(self) -> Tuple[Dict[int, Dict[str, Any]], List[int], List[int]]:
        """(stored row -> its aug_params object, rows whose text is no JSON object, skipped rows without a
        'skipped' reason), over the committed rows where aug_params and status decoded."""
        d = self.data
        st = d.get("status")
        rows = self._rows("aug_params", "status")
        bad_json, bad_skip, out = [], [], {}
        for r in np.flatnonzero(rows & np.isin(st if st is not None else np.zeros(0), (STATUS_OK, STATUS_SKIPPED))):
            try:
                params = json.loads(str(d["aug_params"][r]))
                if not isinstance(params, dict):
                    raise ValueError
            except ValueError:
                bad_json.append(int(r))
                continue
            if st[r] == STATUS_OK:
                out[int(r)] = params
            elif "skipped" not in params:
                bad_skip.append(int(r))
        return out, bad_json, bad_skip

    def _image_ids(self) -> Optional[np.ndarray]:
        """image_ids when it decoded whole, else None."""
        return self.data.get(IMAGE_IDS) if IMAGE_IDS in self.data and self.ok_rows[IMAGE_IDS].all() else None

    def _check_view_keys(self, params: Mapping[int, Mapping[str, Any]]) -> None:
        """View kind: every stored row's augmentation key is (seed, image_id, variant) of its place."""
        k, seed, ids = self.layout.variants, self.manifest.get("seed"), self._image_ids()
        if ids is None:
            return
        bad = [r for r, p in params.items() if p.get("key") != [seed, int(ids[r // k]), int(r % k)]]
        self.sample_fault("aug_params", bad, "augmentation key is not (seed, image_id, variant) of the sample")

    def _image_row_problems(self, params: Mapping[int, Mapping[str, Any]]) -> Dict[int, str]:
        """Image kind: row -> why its aug_params (in params) are not its image at the layout's scale of its place
        (image_row_problem; against the annotation file's image size when the verifier has it)."""
        lay, ids, sizes = self.layout, self._image_ids(), self.annotation_hw
        out = {}
        for r, p in params.items():
            known = sizes.get(int(ids[r // lay.variants])) if sizes is not None and ids is not None else None
            v = r % lay.variants
            problem = image_row_problem(p, lay.row_scale(v), lay.input_hw, known, lay.row_mirrored(v))
            if problem:
                out[r] = problem
        return out

    def _check_image_params(self, params: Mapping[int, Mapping[str, Any]]) -> None:
        """Image kind: every stored row is its image at the layout's scale of its place, and the rows of one
        image agree on the image's size and fingerprint."""
        lay = self.layout
        problems = self._image_row_problems(params)
        for what in dict.fromkeys(problems.values()):
            self.sample_fault("aug_params", [r for r, p in problems.items() if p == what], what)
        by_image: Dict[int, List[int]] = {}
        for r in params:
            by_image.setdefault(r // lay.variants, []).append(r)
        sound = [[r for r in rs if r not in problems] for rs in by_image.values()]
        split = [rs for rs in sound if len({tuple(params[r]["ori_hw"]) for r in rs}) > 1]
        self.sample_fault("aug_params", [r for rs in split for r in rs], "rows of one image disagree on ori_hw")
        if "fingerprint" in self.data:
            fp, ok = self.data["fingerprint"], self.ok_rows["fingerprint"]
            split = [rs for rs in by_image.values() if ok[rs].all() and len({fp[r].tobytes() for r in rs}) > 1]
            self.sample_fault("fingerprint", [r for rs in split for r in rs],
                              "rows of one image have different fingerprints (each is the image's own)")

    def content_hw(self, params: Mapping[int, Mapping[str, Any]]) -> np.ndarray:
        """(num_samples, 2) (h, w) of the image each row's maps and crops lie on: the view (view kind); the row's
        scaled image (image kind: from `params`, the stored rows' aug_params; -1 for rows not in params and
        where they are no sound image row of the row's place)."""
        lay = self.layout
        out = np.tile(np.asarray(lay.input_hw, np.int64), (lay.num_samples, 1))
        if lay.kind != "image":
            return out
        out[:] = -1
        problems = self._image_row_problems(params)
        for r, p in params.items():
            if r not in problems:
                out[r] = p["scaled_hw"]
        return out

    def _check_boxes(self, rows: np.ndarray, boxes: np.ndarray, valid: np.ndarray) -> None:
        """Valid crop boxes [x, y, w, h]: finite, integral, at least a pixel, inside the row's content_hw."""
        hw = self.content_hw(self._stored_params())
        known = (hw >= 0).all(axis=1)
        h, w = hw[:, :1].astype(np.float64), hw[:, 1:].astype(np.float64)
        finite = np.isfinite(boxes).all(axis=(1, 2))
        self.sample_fault("patch_boxes", np.flatnonzero(rows & ~finite), "NaN or inf values")
        with np.errstate(invalid="ignore"):
            x, y, bw, bh = (boxes[..., i] for i in range(4))
            inside = (x >= 0) & (y >= 0) & (bw >= 1) & (bh >= 1) & (x + bw <= w) & (y + bh <= h)
            integral = (boxes == np.round(boxes)).all(axis=2)
        outside = rows & finite & known & (valid & ~inside).any(axis=1)
        lay = self.layout
        where = f"the {lay.input_hw[1]}x{lay.input_hw[0]} view" if lay.kind != "image" else \
            "its scaled image (aug_params scaled_hw)"
        self.sample_fault("patch_boxes", np.flatnonzero(outside), f"valid crop box outside {where} or empty")
        self.sample_fault("patch_boxes", np.flatnonzero(rows & finite & (valid & ~integral).any(axis=1)),
                          "valid crop box with non-integer coordinates")

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

