"""yolc-kd's YOLC against outputs of the original (mmdet 2.26 + YOLC) on the same random weights."""
import json

import numpy as np
import torch

from conftest import findclusters, plain_metas


def assert_close(actual: torch.Tensor, expected: np.ndarray, rel: float = 1e-4):
    expected = torch.from_numpy(np.asarray(expected)).to(actual.dtype)
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp(min=1e-6)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"max error {err:.2e} of the largest value exceeds {rel}"


def assert_same_dets(ours: np.ndarray, theirs: np.ndarray, rel: float = 1e-4):
    """Equal scores may leave topk in either order: match each box to an unused one of the same score."""
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours[:, 4], theirs[:, 4], rtol=1e-4, atol=1e-6)
    tol = rel * np.abs(theirs[:, :4]).max()
    used = np.zeros(len(theirs), bool)
    for row in ours:
        cand = np.where(~used & (np.abs(theirs[:, 4] - row[4]) <= 1e-5 * max(1.0, abs(row[4]))))[0]
        err = np.abs(theirs[cand, :4] - row[:4]).max(axis=1)
        assert len(cand) and err.min() <= tol, f"no original detection matches {row}"
        used[cand[err.argmin()]] = True


def test_forward_matches_original(reference, ref_model):
    img = torch.from_numpy(reference["img"])
    with torch.no_grad():
        heat, coarse, refine = ref_model.bbox_head(ref_model.extract_feat(img))
    assert_close(heat[0], reference["heatmap"])
    assert_close(coarse[0], reference["coarse"])
    assert_close(refine[0], reference["refine"])
    assert float(heat[0].min()) >= 0 and float(heat[0].max()) <= 1  # already probabilities


def test_detections_match_original(reference, ref_model):
    img = torch.from_numpy(reference["img"])
    with torch.no_grad():
        outs = ref_model.bbox_head(ref_model.extract_feat(img))
        metas = plain_metas(2, 320, 512)
        dets = ref_model.bbox_head.get_bboxes(*outs, metas, rescale=False, with_nms=False)
        dets_nms = ref_model.bbox_head.get_bboxes(*outs, metas, rescale=False, with_nms=True)
    for i in range(2):
        assert_same_dets(dets[i][0].numpy(), reference[f"dets{i}"])
        assert sorted(dets[i][1].tolist()) == sorted(reference[f"labels{i}"].tolist())
    assert_same_dets(dets_nms[0][0].numpy(), reference["dets_nms0"])


def test_losses_match_original(reference, ref_model):
    img = torch.from_numpy(reference["img"])
    gt_bboxes = [torch.tensor(b, dtype=torch.float32) for b in json.loads(str(reference["gt_bboxes"]))]
    gt_labels = [torch.tensor(l) for l in json.loads(str(reference["gt_labels"]))]
    expected = json.loads(str(reference["losses"]))
    ref_model.train()
    try:
        losses, _ = ref_model.forward_train(img, plain_metas(2, 320, 512), gt_bboxes, gt_labels)
    finally:
        ref_model.eval()
    assert set(losses) == set(expected)
    for key, value in expected.items():
        assert abs(float(losses[key].detach()) - value) <= 1e-4 * abs(value) + 1e-5, key


def test_lsm_matches_original(reference, ref_model):
    coords = findclusters(ref_model.bbox_head, reference["lsm_heat"])
    np.testing.assert_array_equal(coords, reference["lsm_coords"])


def test_state_dict_names_match_original(reference, ref_model):
    assert list(ref_model.state_dict()) == json.loads(str(reference["state_keys"]))


def test_w48_teacher_has_yolc_names_and_shapes(reference):
    from yolc_kd.config import load_config
    from yolc_kd.models import build_detector
    from conftest import REPO

    big = json.loads(str(reference["big_keys"]))
    model = build_detector(load_config(REPO / "configs" / "yolc_hrnet_w48_visdrone.py")["model"])
    sd = model.state_dict()
    assert list(sd) == list(big)
    assert all(list(sd[k].shape) == shape for k, shape in big.items())
