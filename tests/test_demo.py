"""`yolc-kd demo`: the KD gain line and argument checks (the full demo runs in benchmarks, minutes long)."""
import json

from yolc_kd.cli import main
from yolc_kd.demo import kd_gain_line


def test_kd_gain_line_reports_gain_and_gap_share():
    table = {"teacher": dict(full_AP=0.40, fused_AP=0.42), "student (no KD)": dict(full_AP=0.10, fused_AP=0.12),
             "student (KD from cache)": dict(full_AP=0.175, fused_AP=0.12)}
    line = kd_gain_line(table)
    assert "full AP +0.0750 (25% of the gap to the teacher)" in line and "fused AP +0.0000 (0% of the gap" in line


def test_bad_demo_counts_are_one_line(tmp_path, capsys):
    for bad, msg in ((["--iters", "0"], "must be at least 1"), (["--batch-size", "-1"], "must be at least 1"),
                     (["--kind", "image", "--variants", "3"], "--variants is for --kind view")):
        assert main(["demo", "--out", str(tmp_path / "d"), *bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "d").exists()
    (tmp_path / "file").write_text("x")  # --out below a file: cannot be created
    assert main(["demo", "--out", str(tmp_path / "file" / "d"), "--iters", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output folder" in err[0], err


def test_run_parallel_trains_students_side_by_side_and_a_failure_is_one_line(tmp_path):
    """The demo trains its two students at once (one process each, an equal share of the threads); both end as
    a single run would, and a failing run stops the other and raises one line naming its log."""
    import pytest

    from conftest import write_config
    from yolc_kd.data.synth import make_synthetic_dataset
    from yolc_kd.demo import run_parallel
    from yolc_kd.errors import UserError

    root = make_synthetic_dataset(tmp_path / "d", 4, seed=3, size=(128, 96), num_classes=3)
    data = ["--ann", str(root / "annotations.json"), "--images", str(root)]
    cfg = write_config(tmp_path / "cfg.py")
    steps = {tmp_path / name: ["train", "--config", cfg, *data, "--work-dir", str(tmp_path / name), "--max-iters", "2",
                               "--seed", str(seed)] for seed, name in enumerate(("a", "b"))}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text('{"iter": 7}\n')  # an earlier, unfinished run's log
    run_parallel(steps, 2)
    for work in steps:
        assert (work / "iter_2.pth").exists()
        assert [json.loads(l)["iter"] for l in (work / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    slow = tmp_path / "slow"  # would take minutes: stopped when the other run fails
    failing = {tmp_path / "c": ["train", "--config", str(tmp_path / "missing.py"), *data, "--work-dir", str(tmp_path / "c")],
               slow: ["train", "--config", cfg, *data, "--work-dir", str(slow), "--max-iters", "5000"]}
    with pytest.raises(UserError) as exc:
        run_parallel(failing, 5000)
    msg = str(exc.value)
    assert "\n" not in msg and "missing.py" in msg and "train.log" in msg
    assert not (slow / "iter_5000.pth").exists()


def test_the_demo_prints_the_benchmarks_spread_over_seeds_beside_its_own_run():
    from yolc_kd.demo import seed_spread_line

    ref = dict(iters=400, batch=2, seeds=[0, 1, 2], machine="2-core Test CPU",
               no_kd=dict(full_AP=[0.10, 0.20, 0.15], fused_AP=[0.1, 0.2, 0.2]),
               kd=dict(full_AP=[0.15, 0.19, 0.25], fused_AP=[0.2, 0.2, 0.3]))
    line = seed_spread_line(ref)
    assert "over seeds 0-2" in line and "2-core Test CPU" in line
    assert "full AP +0.0467 (min -0.0100, max +0.1000; KD ahead on 2 of 3)" in line
    assert "fused AP +0.0667 (min +0.0000, max +0.1000; KD ahead on 2 of 3)" in line
    assert "one more draw" in line
    assert "no benchmark over seeds" in seed_spread_line(None)


def test_the_shipped_seed_reference_is_for_the_demos_defaults():
    """The demo with its defaults finds the reference; other settings get none (not a wrong one)."""
    from yolc_kd.demo import DEMO_BATCH, DEMO_ITERS, gains, seed_reference

    ref = seed_reference(DEMO_ITERS, DEMO_BATCH)
    assert ref is not None and len(ref["seeds"]) >= 5 and ref["machine"]
    assert len(gains(ref, "full")) == len(ref["seeds"]) == len(gains(ref, "fused"))
    assert seed_reference(DEMO_ITERS + 1, DEMO_BATCH) is None
    assert seed_reference(DEMO_ITERS, DEMO_BATCH, "view") is None  # the shipped one is for the image-level cache
