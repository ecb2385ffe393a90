"""`yolc-kd demo`: the KD gain line and argument checks (the full demo runs in benchmarks, minutes long)."""
from yolc_kd.cli import main
from yolc_kd.demo import kd_gain_line


def test_kd_gain_line_reports_gain_and_gap_share():
    table = {"teacher": dict(full_AP=0.40, fused_AP=0.42), "student (no KD)": dict(full_AP=0.10, fused_AP=0.12),
             "student (KD from cache)": dict(full_AP=0.175, fused_AP=0.12)}
    line = kd_gain_line(table)
    assert "full AP +0.0750 (25% of the gap to the teacher)" in line and "fused AP +0.0000 (0% of the gap" in line


def test_bad_demo_counts_are_one_line(tmp_path, capsys):
    for bad in (["--iters", "0"], ["--batch-size", "-1"]):
        assert main(["demo", "--out", str(tmp_path / "d"), *bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "must be at least 1" in err[0], err
    assert not (tmp_path / "d").exists()
