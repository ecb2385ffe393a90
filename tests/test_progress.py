"""progress_bar: tqdm's live bar on a terminal; in a log (not a TTY) a few short whole lines, no carriage
returns; disable=True writes nothing."""
import io

from tqdm import tqdm

from yolc_kd.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_stream_gets_a_few_short_lines():
    log = io.StringIO()
    for _ in progress_bar(range(1000), desc="synth", unit="img", file=log, log_seconds=0):
        pass
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text and text.endswith("\n")
    assert 2 <= len(lines) <= 11 and all(len(line) < 80 for line in lines), lines
    assert lines[0].startswith("synth: 0/1000 (0%)") and lines[-1].startswith("synth: 1000/1000 (100%)")
    assert len(set(lines)) == len(lines)  # the finished state once


def test_quick_run_in_a_log_writes_nothing():
    log = io.StringIO()
    with progress_bar(total=500, desc="verify", file=log) as bar:  # default: a line at most every 30 s
        for _ in range(500):
            bar.update(1)
    assert log.getvalue() == ""


def test_messages_between_log_lines_stay_whole():
    log = io.StringIO()
    bar = progress_bar(total=20, desc="precompute", unit="view", file=log, log_seconds=0, leave=False)
    for i in range(20):
        bar.update(1)
        if i == 4:
            tqdm.write("warning: skipping image id 7", file=log)
    bar.set_postfix(loss=0.5)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "warning: skipping image id 7" in lines and "\r" not in log.getvalue()
    assert all(line.startswith(("precompute: ", "warning: ")) for line in lines), lines
    assert lines[-1].startswith("precompute: 20/20")  # leave=False: no extra closing line


def test_unknown_total_and_initial():
    log = io.StringIO()
    bar = progress_bar(desc="train", unit="it", file=log, log_seconds=0, initial=5)
    bar.update(2)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("train: 5 it") and lines[-1].startswith("train: 7 it"), lines


def test_terminal_gets_tqdms_live_bar_and_disable_is_silent():
    term = _Terminal()
    bar = progress_bar(total=3, desc="infer", file=term)
    assert type(bar) is tqdm
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()
    quiet = io.StringIO()
    for _ in progress_bar(range(10), desc="synth", file=quiet, log_seconds=0, disable=True):
        pass
    assert quiet.getvalue() == ""
