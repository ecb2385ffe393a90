"""Manifest checks of check_cache (cache/verify.py): the root group's manifest present and parseable, a known
schema version and kind, its fields consistent with each other and with the layout; and the image sizes of an
annotation file that an image-kind cache's rows must match."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from yolc_kd.cache.arrays import IMAGE_MAP_TILE
from yolc_kd.cache.manifest import sha256_file
from yolc_kd.cache.schema import ALL_SHARD_FILES, CACHE_KINDS, MANIFEST_KEY, SCHEMA_VERSION, Layout
from yolc_kd.cache.verify_values import _first_line, _short
from yolc_kd.stride import BOX_STRIDE


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
        checks.append((f"patch_canvas / {BOX_STRIDE}", [canvas[0] // BOX_STRIDE, canvas[1] // BOX_STRIDE],
                       list(lay.refine_hw)))
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


class ManifestChecks:
    """Methods of the verifier that read and check the manifest; they use its fault helpers."""

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
