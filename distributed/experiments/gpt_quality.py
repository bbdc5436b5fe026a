"""How well the GPT trains in mnn beside PyTorch: the same run twice, and both curves.

``mnn-bench --model gpt --quality --steps 2000 --out docs/gpt`` trains the GPT
of :mod:`mnn.distributed.experiments.gpt_bench` once in mnn and once in PyTorch, from the
same initial weights (drawn by mnn from the seed and copied), on the same
batches (global batch :math:`k` drawn from ``(seed, k)`` by
:class:`~mnn.distributed.sampler.DrawnBatchSampler`, as ``mnn-train`` draws
them), with the same Adam, learning rate and step count, without dropout
(PyTorch's dropout masks could not be mnn's counter-based ones). The two runs
go in two processes side by side, one thread each.

mnn is evaluated by the trainer's own :func:`~mnn.distributed.training.task.evaluate`
(bits per character on the validation windows, what ``mnn-train`` reports);
PyTorch on the same windows in the same batches. Both evaluate the untrained
model too, where their weights are equal, so the first point of the two
validation curves must agree: a check of the comparison itself.

Writes into the output folder: ``curves.csv`` (one row per logged training
loss and per evaluation), ``quality.json`` (the settings, the final figures,
the times), ``curves.png`` (with matplotlib, the optional extra ``plot``) and
``report.md``. Usage::

    from mnn.distributed.experiments.gpt_quality import QualityRun, compare
    summary = compare(QualityRun(steps=2000), "docs/gpt")
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from mnn import Adam
from mnn.text import TextDataset, load_text
from mnn.distributed.comm import SingleProcessCommunicator
from mnn.distributed.environment import install_hint
from mnn.distributed.experiments.gpt_bench import GptSizes, build_gpt, torch_gpt
from mnn.distributed.sampler import DrawnBatchSampler
from mnn.distributed.experiments.scaling.report import plots_available
from mnn.distributed.training.task import EVAL_WINDOWS, choose_task, evaluate

__all__ = ["QualityRun", "train_curve", "compare", "IMPLEMENTATIONS", "TARGET"]

#: The runs compared, in the order they are reported.
IMPLEMENTATIONS = ("mnn", "torch")
#: The target of the comparison: mnn's validation figure within this share of PyTorch's.
TARGET = 0.03


@dataclass(frozen=True)
class QualityRun:
    """What both runs share: the model and batch (``sizes.batch`` windows a step),
    steps, Adam's learning rate, the seed of the weights and of the batches, how
    often the training loss is logged (its mean over the steps since the last
    log) and the validation loss evaluated, and the text (None: the standard library)."""

    sizes: GptSizes = field(default_factory=GptSizes)
    steps: int = 2000
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    text: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "eval_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"QualityRun: expected {name} a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"QualityRun: expected lr > 0, got {self.lr!r}")


# ------------------------------------------------------------------ one run
class _TorchModel:
    """The PyTorch twin behind the two calls a run makes: a training step and a mean loss."""

    def __init__(self, net: Any, lr: float):
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        self.model = torch_gpt(net)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        self.optimizer.zero_grad()
        loss = self.model(self.torch.from_numpy(x), self.torch.from_numpy(y))
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def validation_loss(self, text: TextDataset) -> float:
        """Mean loss per character over the validation windows, batched as ``evaluate`` batches them."""
        loss_sum, labels = 0.0, 0
        with self.torch.no_grad():
            for start in range(0, len(text.test), EVAL_WINDOWS):
                x, y = text.test.batch(np.arange(start, min(start + EVAL_WINDOWS, len(text.test))))
                loss_sum += self.model(self.torch.from_numpy(x), self.torch.from_numpy(y)).item() * y.size
                labels += y.size
        return loss_sum / labels


class _MnnModel:
    """mnn's side of a run: the net, Adam, and the trainer's evaluation."""

    def __init__(self, net: Any, lr: float, text: TextDataset):
        self.net = net
        self.optimizer = Adam(net, lr=lr)
        self.task = choose_task(net, text, "float32")
        self.comm = SingleProcessCommunicator()

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        self.net.zero_grads()
        loss = float(self.net(x, y))
        self.net.backward()
        self.optimizer.step()
        return loss

    def validation_loss(self, text: TextDataset) -> float:
        return evaluate(self.net, text.test, self.task, self.comm)["loss"]


def train_curve(impl: str, run: QualityRun) -> dict[str, Any]:
    """Train ``impl`` ("mnn" or "torch") as ``run`` says; return its curves.

    ``train``: ``[step, mean training loss of the steps since the last log]``;
    ``validation``: ``[step, validation loss]`` at step 0, every ``eval_every``
    steps and at the end (losses in nats per character); ``train_s``: seconds
    spent in training steps, ``eval_s`` in evaluations.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"train_curve: expected impl one of {', '.join(IMPLEMENTATIONS)}, got {impl!r}")
    with threadpool_limits(limits=1):
        text = load_text(run.text, context=run.sizes.context)
        net = build_gpt(run.sizes, len(text.vocab), run.seed)
        model = _MnnModel(net, run.lr, text) if impl == "mnn" else _TorchModel(net, run.lr)
        sampler = DrawnBatchSampler(len(text.train), run.sizes.batch, steps_per_epoch=run.steps, seed=run.seed)
        curves: dict[str, Any] = {"impl": impl, "train": [], "validation": [], "train_s": 0.0, "eval_s": 0.0}
        window: list[float] = []
        for step in range(run.steps + 1):
            # evaluate before the update of this step (step 0: the untrained model)
            if step % run.eval_every == 0 or step == run.steps:
                started = time.perf_counter()
                curves["validation"].append([step, float(model.validation_loss(text))])
                curves["eval_s"] += time.perf_counter() - started
            if step == run.steps:
                break
            started = time.perf_counter()
            x, y = text.train.batch(sampler.global_batch(0, step))
            window.append(model.train_step(x, y))
            curves["train_s"] += time.perf_counter() - started
            if (step + 1) % run.log_every == 0 or step + 1 == run.steps:
                curves["train"].append([step + 1, float(np.mean(window))])
                window = []
    return curves


# ------------------------------------------------------------------ both runs and what they write
def compare(run: QualityRun, out: str | os.PathLike, log: Any = print) -> dict[str, Any]:
    """Train mnn and PyTorch side by side (two processes), write the outputs into ``out``;
    return the summary that ``quality.json`` holds. Needs PyTorch (ImportError without it)."""
    import torch  # noqa: F401 -- fail here, not in a worker, when the reference is missing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"training mnn and PyTorch for {run.steps} steps each, side by side ...")
    # Spawned, not forked: PyTorch's threads do not survive a fork.
    with ProcessPoolExecutor(max_workers=len(IMPLEMENTATIONS),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {impl: pool.submit(train_curve, impl, run) for impl in IMPLEMENTATIONS}
        curves = {impl: future.result() for impl, future in futures.items()}
    summary = _summary(run, curves, time.perf_counter() - started)
    _write_csv(curves, out / "curves.csv")
    plotted = plots_available()
    if plotted:
        _plot(run, curves, summary, out / "curves.png")
    else:
        summary["notes"].append(f"curves.png skipped: matplotlib is not installed ({install_hint('plot')})")
        log(summary["notes"][-1])
    (out / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(_report(run, summary, out, plotted))
    return summary


def _bits(loss: float) -> float:
    return loss / math.log(2)


def _summary(run: QualityRun, curves: dict[str, dict[str, Any]], wall_s: float) -> dict[str, Any]:
    final = {impl: _bits(curve["validation"][-1][1]) for impl, curve in curves.items()}
    untrained = {impl: _bits(curve["validation"][0][1]) for impl, curve in curves.items()}
    return {
        "settings": {**asdict(run.sizes), "steps": run.steps, "lr": run.lr, "optimizer": "adam", "seed": run.seed,
                     "dropout": 0.0, "dtype": "float32", "log_every": run.log_every, "eval_every": run.eval_every,
                     "text": run.text or "the Python standard library"},
        "final_validation_bits_per_char": {impl: round(bits, 5) for impl, bits in final.items()},
        "relative_difference": float(f"{final['mnn'] / final['torch'] - 1:.3g}"),
        "largest_relative_difference": float(f"{_largest_difference(curves, 'validation'):.3g}"),
        "largest_train_relative_difference": float(f"{_largest_difference(curves, 'train'):.3g}"),
        "untrained_validation_bits_per_char": {impl: round(bits, 6) for impl, bits in untrained.items()},
        "train_s": {impl: round(curve["train_s"], 1) for impl, curve in curves.items()},
        "ms_per_step": {impl: round(curve["train_s"] / run.steps * 1e3, 2) for impl, curve in curves.items()},
        "eval_s": {impl: round(curve["eval_s"], 1) for impl, curve in curves.items()},
        "wall_s": round(wall_s, 1),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "torch": _torch_version()},
        "notes": [],
    }


def _largest_difference(curves: dict[str, dict[str, Any]], series: str) -> float:
    """The largest |mnn / PyTorch - 1| over the points of ``series``, with its sign."""
    ratios = [mine / theirs - 1 for (_, mine), (_, theirs) in zip(curves["mnn"][series], curves["torch"][series])]
    return max(ratios, key=abs)


def _write_csv(curves: dict[str, dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["impl", "series", "step", "loss", "bits_per_char"])
        for impl, curve in curves.items():
            for series in ("train", "validation"):
                for step, loss in curve[series]:
                    writer.writerow([impl, series, step, f"{loss:.6f}", f"{_bits(loss):.6f}"])


# The two runs give the same numbers to 6 digits, so their curves lie on each other: mnn's
# is drawn wide and pale, PyTorch's thin, dashed and on top, so both stay visible.
_NAMES = {"mnn": "mnn", "torch": "PyTorch"}
_LINES = {"mnn": {"color": "tab:blue", "linestyle": "-", "linewidth": 4.5, "alpha": 0.45, "zorder": 2},
          "torch": {"color": "tab:red", "linestyle": (0, (4, 3)), "linewidth": 1.2, "alpha": 1.0, "zorder": 3}}
_MARKERS = {"mnn": {"marker": "o", "markersize": 7}, "torch": {"marker": "x", "markersize": 5}}


def _plot(run: QualityRun, curves: dict[str, dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Above: validation and training loss in bits per character (the training loss
    converted from nats) on one logarithmic axis, mnn's curves under PyTorch's; below,
    mnn relative to PyTorch for both series, inside the band of the target."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    figure, (losses, relative) = plt.subplots(2, 1, figsize=(8, 6.8), sharex=True,
                                               gridspec_kw={"height_ratios": [3, 1]})
    _plot_losses(losses, run, curves, summary)
    _plot_differences(relative, curves, summary)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _plot_losses(axes: Any, run: QualityRun, curves: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    from matplotlib.ticker import FormatStrFormatter

    for impl, curve in curves.items():
        line, name = _LINES[impl], _NAMES[impl]
        steps, loss = np.array(curve["validation"]).T
        axes.plot(steps, _bits(loss), **line, **_MARKERS[impl],
                  label=f"{name} validation ({summary['final_validation_bits_per_char'][impl]:.3f} at the end)")
        steps, loss = np.array(curve["train"]).T
        axes.plot(steps, _bits(loss), **{**line, "linewidth": line["linewidth"] * 0.6},
                  label=f"{name} training loss (mean of {run.log_every} steps)")
    # A log axis shows the untrained model (log2 of the vocabulary) and the end (2-3) alike.
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    axes.set_ylabel("bits per character")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    sizes = run.sizes
    axes.set_title(f"GPT of {sizes.n_layers} blocks, d_model {sizes.d_model}, {sizes.n_heads} heads, context "
                   f"{sizes.context}; batch {sizes.batch}, Adam lr {run.lr:g}; same weights, same batches\n"
                   f"the two runs' curves coincide: mnn's wide and pale, PyTorch's dashed on top", fontsize=9)


def _plot_differences(axes: Any, curves: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    """mnn / PyTorch - 1 in percent, per evaluation and per logged training loss."""
    largest = {"validation": summary["largest_relative_difference"],
               "train": summary["largest_train_relative_difference"]}
    for series, color, marker in (("validation", "tab:green", "o"), ("train", "tab:purple", None)):
        steps = [step for step, _ in curves["mnn"][series]]
        percent = [(mine / theirs - 1) * 100 for (_, mine), (_, theirs) in zip(curves["mnn"][series],
                                                                                 curves["torch"][series])]
        axes.plot(steps, percent, color=color, marker=marker, markersize=3, linewidth=1,
                  label=f"mnn / PyTorch - 1, {series} (largest: {largest[series] * 100:+.2g} %)")
    limit = max(TARGET * 100 * 1.3, 120 * max(abs(value) for value in largest.values()))
    axes.axhspan(-TARGET * 100, TARGET * 100, color="tab:green", alpha=0.1, label=f"target: within {TARGET:.0%}")
    axes.axhline(0, color="gray", linewidth=0.8)
    axes.set_ylim(-limit, limit)
    axes.set_ylabel("difference (%)")
    axes.set_xlabel("training step")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")


def _report(run: QualityRun, summary: dict[str, Any], out: Path, has_plot: bool) -> str:
    settings, final = summary["settings"], summary["final_validation_bits_per_char"]
    untrained = summary["untrained_validation_bits_per_char"]
    sizes = run.sizes
    lines = [
        "# GPT training quality: mnn beside PyTorch",
        "",
        f"`mnn-bench --model gpt --quality --steps {run.steps} --lr {run.lr:g} --seed {run.seed} "
        f"--log-every {run.log_every} --eval-every {run.eval_every}"
        + (f" --batch {sizes.batch} --context {sizes.context} --d-model {sizes.d_model} --heads {sizes.n_heads} "
           f"--layers {sizes.n_layers}" if sizes != GptSizes() else "")
        + (f" --text {run.text}" if run.text else "") + f" --out {out}`",
        "",
        f"The GPT of `[model.gpt]` n_layers = {sizes.n_layers}, d_model = {sizes.d_model}, n_heads = "
        f"{sizes.n_heads}, context = {sizes.context}, dropout = 0, float32, trained for {run.steps} steps of "
        f"{sizes.batch} windows by Adam (lr {run.lr:g}, betas 0.9/0.999, eps 1e-8, no weight decay) on "
        f"{settings['text']}, once in mnn and once in PyTorch {summary['machine']['torch']}: the same initial weights "
        f"(mnn's, drawn from seed {run.seed}, copied into PyTorch), the same batches (global batch k drawn "
        f"from (seed, k), as mnn-train draws them), one thread each.",
        "",
        "| | mnn | PyTorch |",
        "| --- | ---: | ---: |",
        f"| validation bits/char after {run.steps} steps | **{final['mnn']:.4f}** | **{final['torch']:.4f}** |",
        f"| validation bits/char untrained (same weights) | {untrained['mnn']:.6f} | {untrained['torch']:.6f} |",
        f"| ms per training step (side by side) | {summary['ms_per_step']['mnn']:.1f} | "
        f"{summary['ms_per_step']['torch']:.1f} |",
        "",
        f"mnn's final validation figure is {summary['relative_difference']:+.2g} relative to PyTorch's "
        f"(the target: within {TARGET:.0%}); the largest relative difference over all evaluations is "
        f"{summary['largest_relative_difference']:+.2g}, over the logged training losses "
        f"{summary['largest_train_relative_difference']:+.2g}. Both runs took {summary['wall_s'] / 60:.1f} minutes "
        f"side by side on {summary['machine']['cores']} cores: where other jobs share the cores, both "
        f"runs slow down and their times vary, so the ratio of the times is the figure to compare.",
        "",
    ]
    if has_plot:
        lines += ["![training loss and validation bits per character of mnn and PyTorch](curves.png)", ""]
    if summary["notes"]:
        lines += [f"- {note}" for note in summary["notes"]] + [""]
    lines += ["The curves are in `curves.csv` (losses in nats and bits per character), the figures in "
              "`quality.json`.", ""]
    return "\n".join(lines)


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]
