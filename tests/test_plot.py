"""mnn-plot draws the curves of real runs into a PNG, and says in one line what it cannot draw.

Two tiny runs of mnn-train (30 steps, two learning rates) are trained once for
the module; the drawing tests need matplotlib (the extra ``plot``) and are
skipped without it. The errors are checked with metrics files written here, in
this process where a process adds nothing (``main(argv)``), and once as the
real program.
"""
import sys

import pytest

from mnn.distributed.experiments import run_plots
from mnn.distributed.experiments.scaling.report import plots_available
from mnn.scripts import plot
from processes import exit_status, run

PLOT = [sys.executable, "-m", "mnn.scripts.plot"]
needs_matplotlib = pytest.mark.skipif(not plots_available(), reason="matplotlib is not installed (extra 'plot')")

_TRAIN_LINE = ('{"event": "train", "epoch": 1, "step_in_epoch": %d, "global_step": %d, "loss": %s, '
               '"lr": 0.1, "samples_per_s": 1000.0}\n')


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of 30 steps, at lr 0.1 and 0.02: (their folder, [run directories])."""
    folder = tmp_path_factory.mktemp("runs")
    directories = [folder / "lr-0.1", folder / "lr-0.02"]
    for directory, lr in zip(directories, ("0.1", "0.02")):
        result = run(["--max-steps", "30", "--log-every", "5", "--lr", lr, "--output", str(directory)],
                     MNN_NO_MPI="1")
        assert result.returncode == 0, result.stderr
    return folder, directories


def write_metrics(path, text):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text(text)
    return path


@needs_matplotlib
@pytest.mark.slow
def test_two_runs_make_one_png_that_reads_back(runs, tmp_path):
    import matplotlib.image

    _, directories = runs
    out = tmp_path / "both.png"
    result = run([*map(str, directories), "--out", str(out)], command=PLOT)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{out}\n", "")
    assert 20_000 < out.stat().st_size < 2_000_000
    height, width, channels = matplotlib.image.imread(out).shape
    assert width > 1000 and height > 300 and channels in (3, 4)


@needs_matplotlib
@pytest.mark.slow
def test_the_legend_names_each_run_and_the_axes_say_what_they_show(runs):
    import matplotlib.pyplot as plt

    _, directories = runs
    figure = run_plots.curves_figure([run_plots.load_run(directory) for directory in directories])
    try:
        legend, = figure.legends
        assert [text.get_text() for text in legend.get_texts()] == ["lr-0.1", "lr-0.02"]
        loss, evaluation, speed = figure.axes
        assert evaluation.get_ylabel() == "test accuracy (%)"  # the digits have accuracies
        assert "samples / s" in speed.get_ylabel()
        assert all(axes.get_xlabel().startswith("global step") for axes in figure.axes)
        assert all(len(axes.get_lines()) == 2 for axes in figure.axes)
    finally:
        plt.close(figure)


@needs_matplotlib
@pytest.mark.slow
def test_one_run_is_drawn_into_its_own_directory(runs, tmp_path, monkeypatch, capsys):
    _, directories = runs
    monkeypatch.chdir(tmp_path)
    assert exit_status(plot.main, [str(directories[0] / "metrics.jsonl"), "--x", "samples"]) == 0
    assert capsys.readouterr().out == f"{directories[0] / 'curves.png'}\n"
    assert (directories[0] / "curves.png").stat().st_size > 20_000
    assert not (tmp_path / "plot.png").exists()


def test_without_an_accuracy_the_bits_per_character_then_the_test_loss(tmp_path):
    def run_with(eval_line):
        return run_plots.load_run(write_metrics(tmp_path / str(len(eval_line)), _TRAIN_LINE % (1, 1, "2.0")
                                                + eval_line))
    text = run_with('{"event": "eval", "global_step": 1, "test_loss": 1.0, "test_accuracy": 0.5, '
                    '"test_bits_per_char": 1.4}\n')
    regression = run_with('{"event": "eval", "global_step": 1, "test_loss": 1.0, "test_accuracy": null}\n')
    assert run_plots.eval_metric([text])[0] == "test_accuracy"
    assert run_plots.eval_metric([text, regression])[0] == "test_loss"


def test_a_line_being_written_is_skipped_and_labels_tell_same_named_runs_apart(tmp_path):
    first = write_metrics(tmp_path / "a" / "run", _TRAIN_LINE % (1, 1, "2.0") + '{"event": "train", "glo')
    second = write_metrics(tmp_path / "b" / "run", _TRAIN_LINE % (1, 1, "2.0") + "not json\n"
                           + _TRAIN_LINE % (2, 2, "1.5"))
    runs = [run_plots.load_run(first), run_plots.load_run(second)]
    assert [len(each.train) for each in runs] == [1, 2]
    assert run_plots.run_labels(runs) == ["a/run", "b/run"]


@pytest.mark.parametrize("case", ["missing", "no metrics.jsonl", "not metrics", "empty"])
def test_a_bad_run_is_one_error_line_and_exit_2(tmp_path, capsys, case):
    path = tmp_path / "run"
    if case == "no metrics.jsonl":
        path.mkdir()
    elif case == "not metrics":
        path.write_text('{"event": "summary"}\nhello\n')
    elif case == "empty":
        write_metrics(path, "")
    assert exit_status(plot.main, [str(path)]) == 2
    captured = capsys.readouterr()
    expected = {"missing": "does not exist", "no metrics.jsonl": "has no metrics.jsonl"}.get(case, "has no train events")
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("mnn-plot: error: ") and expected in captured.err


def test_the_real_program_says_the_same_in_one_line(tmp_path):
    result = run([str(tmp_path / "nowhere")], command=PLOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"mnn-plot: error: '{tmp_path / 'nowhere'}' does not exist: expected a run directory " \
                            "or a metrics.jsonl file\n"


def test_without_matplotlib_the_install_hint(tmp_path, capsys, monkeypatch):
    from mnn.distributed.environment import install_hint

    run_dir = write_metrics(tmp_path / "run", _TRAIN_LINE % (1, 1, "2.0"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert exit_status(plot.main, [str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"mnn-plot: error: matplotlib is not installed; add it with: {install_hint('plot')}\n"
    assert not (run_dir / "curves.png").exists()
