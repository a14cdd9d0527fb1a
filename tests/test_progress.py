"""Progress on stderr: plain periodic lines where stderr is not a terminal (CI logs, nohup), a bar where it is."""

import io

from vitprune.train.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_interval_and_at_the_end():
    log = io.StringIO()
    bar = Progress(total=3, desc="search FLOPs <= 0.6", unit="evals", every=0.0, file=log)
    for _ in range(3):
        bar.update(1)
    bar.set_postfix(best="0.98")
    bar.close()
    bar.close()  # a second close writes nothing
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"search FLOPs <= 0.6: {i}/3 evals" for i in (1, 2, 3, 3)]
    assert lines[-1].endswith(", best 0.98") and "\r" not in log.getvalue()


def test_quiet_between_intervals_and_when_disabled():
    log = io.StringIO()
    bar = Progress(total=100, desc="eval", unit="batches", every=3600.0, file=log)
    for _ in bar.wrap(range(100)):
        pass
    assert log.getvalue() == ""  # no line within the interval ...
    bar.close()
    assert log.getvalue().startswith("eval: 100/100 batches, ")  # ... and one where the step ended
    off = io.StringIO()
    silent = Progress(total=2, enabled=False, every=0.0, file=off)
    silent.update(2)
    silent.close()
    assert off.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    term = _Terminal()
    bar = Progress(total=2, desc="finetune epoch 1/1", file=term, every=0.0)
    bar.update(2)
    bar.close()
    assert "finetune epoch 1/1" in term.getvalue() and "\r" in term.getvalue()
