"""The console scripts hold Ctrl-C, SIGTERM and SIGHUP while their program loads (mnn.scripts.entry).

A program under test stands in for the slow part of loading: a module on the
path that says when it starts loading, then sleeps. The signal is sent once it
has said so, while ``entry`` still imports it, so no timing margin is involved.
"""
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mnn.scripts.entry import HeldSignals
from processes import ENV, finish, wait_for

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


def start_slow_program(tmp_path, body, takes_over):
    """``entry._start`` of a module that sleeps 30 s while it loads (unless signalled), then runs ``body``."""
    (tmp_path / "slowly_loaded.py").write_text(textwrap.dedent(f"""\
        import pathlib, time
        pathlib.Path({str(tmp_path / 'loading')!r}).touch()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not pathlib.Path({str(tmp_path / 'signalled')!r}).exists():
            time.sleep(0.02)
        {body}
        """))
    code = ("import sys; from mnn.scripts.entry import _start; "
            f"sys.exit(_start('slowly_loaded', 'mnn-slow', takes_over={takes_over}))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**ENV, "PYTHONPATH": str(tmp_path)})


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda signum: signum.name)
def test_a_signal_while_a_program_loads_is_one_line_and_130(tmp_path, signum):
    process = start_slow_program(tmp_path, "def main():\n            print('ran')\n            return 0", False)
    wait_for(lambda: (tmp_path / "loading").exists(), "the program to start loading")
    process.send_signal(signum)
    (tmp_path / "signalled").touch()
    status, out, err = finish(process)
    assert (status, out, err) == (130, "", "mnn-slow: interrupted while starting; nothing was started\n")


def test_without_a_signal_the_program_runs_with_its_own_handlers_back(tmp_path):
    body = ("import signal\n        def main():\n"
            "            print(signal.getsignal(signal.SIGINT) is signal.default_int_handler,"
            " signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n            return 3")
    process = start_slow_program(tmp_path, body, False)
    (tmp_path / "signalled").touch()
    assert finish(process) == (3, "True True\n", "")


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda signum: signum.name)
@pytest.mark.slow
def test_mnn_train_takes_over_a_signal_that_came_while_it_loaded(tmp_path, signum):
    body = "from mnn.scripts.train import main"
    process = start_slow_program(tmp_path, body, True)
    wait_for(lambda: (tmp_path / "loading").exists(), "mnn-train to start loading")
    process.send_signal(signum)
    (tmp_path / "signalled").touch()
    status, out, err = finish(process)
    assert status == 130, err
    assert err == "mnn-train: interrupted before training started; nothing was trained\n"


def test_a_signal_ignored_before_stays_ignored(monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda signum, handler: calls.append((signum, handler)))
    calls = []
    original = signal.getsignal
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_IGN if signum == signal.SIGHUP
                        else original(signum))
    HeldSignals().install()
    assert [signum for signum, _ in calls] == [signal.SIGINT, signal.SIGTERM]


def test_the_count_and_the_first_signal_s_time(monkeypatch):
    held = HeldSignals()
    before = time.monotonic()
    held._count(signal.SIGINT, None)
    held._count(signal.SIGTERM, None)
    assert held.count == 2 and before <= held.first_at <= time.monotonic()
