"""What a failure costs a job that ``mnn-launch --max-restarts`` restarts, measured
(``mnn-bench --restarts K``), and what its checkpoints cost while nothing fails.

The job: the GPT-style character model of ``examples/gpt.toml`` (``--model gpt``)
or the digits MLP (``--model mlp``), on ``ranks`` ranks of this machine under
mnn-launch, writing a checkpoint every ``every`` steps in the background. It is
killed K times: each time rank 1 gets SIGKILL once the job has done ``gap`` more
steps (as its output's lock says) than where the start that is killed began, plus
a drawn number of steps below ``every`` (a failure comes at any step, not just
after a checkpoint). For
each failure, from the ``restart`` events of metrics.jsonl and the time of the
kill taken here:

* ``detect_s``: from the kill to mnn-launch seeing the job fail;
* ``restart_s``: from then to the restarted job's first step done again (the
  start itself, ``resumed_at - seen_at``, plus one step);
* ``redo_s``: the steps done twice (those after the checkpoint it continues
  from) at the job's mean step time;
* ``lost_s``: the three together: the wall time the failure cost.

The checkpoints' own cost: the same job without a kill, with and without
``--checkpoint-every-steps``, in alternating runs; each run's mean step time
(``train_s / steps`` of its summary, which counts the steps' own time, the
checkpoint's copy included), and their ratio.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import tomli_w

from mnn.distributed.launch.tree import local_ranks
from mnn.distributed.training.output_dir import recorded_step

__all__ = ["JOBS", "measure_failures", "measure_checkpoint_cost"]

_LAUNCH = [sys.executable, "-m", "mnn.scripts.launch"]
_TRAIN = [sys.executable, "-m", "mnn.scripts.train"]
#: The jobs, as job files: examples/gpt.toml's model, and the digits MLP.
JOBS: dict[str, dict[str, Any]] = {
    "gpt": {"dataset": "text", "steps_per_epoch": 200, "batch_size": 64, "optimizer": "adam", "lr": 0.001,
            "bucket_bytes": 262144, "eval_every": 0, "log_every": 50,
            "model": {"gpt": {"n_layers": 2, "d_model": 128, "n_heads": 4, "context": 64, "dropout": 0.0}}},
    "mlp": {"layers": [64, 512, 512, 10], "steps_per_epoch": None, "batch_size": 256, "optimizer": "momentum",
            "eval_every": 0, "log_every": 100},
}
_POLL_S = 0.01


def _job_file(model: str, folder: Path, steps: int, extra: dict[str, Any]) -> Path:
    job = {key: value for key, value in {**JOBS[model], **extra}.items() if value is not None}
    job["max_steps"] = steps
    job["epochs"] = 10**6
    path = folder / f"{model}.toml"
    path.write_text(tomli_w.dumps(job))
    return path


def _step_of(output: Path) -> int:
    return recorded_step(output) or 0


def _wait(condition: Callable[[], bool], job: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if job.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the job ended or took too long before {what}")
        time.sleep(_POLL_S)


def measure_failures(model: str, ranks: int, kills: int, gap: int, every: int,
                     log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Kill the job ``kills`` times (see the module docstring); one dict per failure."""
    with tempfile.TemporaryDirectory(prefix="mnn-restart-cost-") as folder:
        output = Path(folder) / "run"
        # Room for each kill to land late (a loaded machine): the job is ended by its steps.
        steps = 2 * (kills + 1) * gap + every
        job_file = _job_file(model, Path(folder), steps, {"checkpoint_every_steps": every})
        command = [*_LAUNCH, "-n", str(ranks), "--max-restarts", str(kills), "--", *_TRAIN, "--config",
                   str(job_file), "--output", str(output)]
        env = {**os.environ, "MNN_PROGRESS": "lines"}
        job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed_at = []
        try:
            began, draws = 0, random.Random(0)
            for kill in range(kills):
                target = began + gap + draws.randrange(every)
                _wait(lambda: _step_of(output) >= target, job, f"kill {kill + 1}")
                rank = local_ranks(job.pid).get(1)  # mnn-launch's launcher's rank on this machine
                if rank is None:
                    raise RuntimeError("rank 1 of the job was not found")
                killed_at.append(time.time())
                os.kill(rank, signal.SIGKILL)
                log(f"killed rank 1 at step {_step_of(output)}")
                _wait(lambda: len(_events(output, "restart")) > kill, job, f"restart {kill + 1}")
                began = _events(output, "restart")[-1]["checkpoint_step"]
            _, stderr = job.communicate(timeout=3600)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        if job.returncode != 0:
            raise RuntimeError(f"the job failed (exit status {job.returncode}): {stderr[-2000:]}")
        summary = json.loads((output / "summary.json").read_text())
        step_s = summary["train_s"] / max(1, summary["timings"]["steps"])
        return [_failure(event, kill, step_s) for event, kill in zip(_events(output, "restart"), killed_at)]


def _failure(event: dict[str, Any], killed_at: float, step_s: float) -> dict[str, Any]:
    detect = event["seen_at"] - killed_at
    restart = event["resumed_at"] - event["seen_at"] + step_s
    redo = event["redo_steps"] * step_s
    return {"restart": event["restart"], "detect_s": round(detect, 3), "restart_s": round(restart, 3),
            "redo_steps": event["redo_steps"], "redo_s": round(redo, 3), "lost_s": round(detect + restart + redo, 3),
            "step_ms": round(step_s * 1e3, 2)}


def _events(output: Path, kind: str) -> list[dict[str, Any]]:
    try:
        lines = (output / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written
        if event.get("event") == kind:
            found.append(event)
    return found


def measure_checkpoint_cost(model: str, ranks: int, steps: int, every: int, repeats: int,
                            log: Callable[[str], None]) -> dict[str, Any]:
    """Mean step time without checkpoints by steps and with one every ``every`` steps, in
    ``repeats`` alternating pairs of runs; their medians and the ratio of the medians."""
    times: dict[str, list[float]] = {"none": [], "every": []}
    with tempfile.TemporaryDirectory(prefix="mnn-checkpoint-cost-") as folder:
        for repeat in range(repeats):
            for kind, extra in (("none", {}), ("every", {"checkpoint_every_steps": every})):
                output = Path(folder) / f"{kind}-{repeat}"
                job_file = _job_file(model, Path(folder), steps, extra)
                result = subprocess.run([*_LAUNCH, "-n", str(ranks), "--", *_TRAIN, "--config", str(job_file),
                                         "--output", str(output)], capture_output=True, text=True,
                                        env={**os.environ, "MNN_PROGRESS": "lines"})
                if result.returncode != 0:
                    raise RuntimeError(f"the job failed: {result.stderr[-2000:]}")
                summary = json.loads((output / "summary.json").read_text())
                times[kind].append(summary["train_s"] / summary["timings"]["steps"])
                log(f"{kind}: {times[kind][-1] * 1e3:.2f} ms a step")
    median = {kind: sorted(values)[len(values) // 2] for kind, values in times.items()}
    return {"steps": steps, "checkpoint_every_steps": every, "repeats": repeats,
            "step_ms_without": round(median["none"] * 1e3, 3), "step_ms_with": round(median["every"] * 1e3, 3),
            "ratio": round(median["every"] / median["none"], 4)}
