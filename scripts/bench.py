"""mnn-bench: time one training step of mnn beside PyTorch, of an MLP, a GPT or a CNN.

``--model mlp`` (the default): the MLP 784-256-10, a step being forward +
backward + SGD update with cross entropy on random data. ``--model gpt``: the
GPT-style character model of ``[model.gpt]`` (2 blocks, d_model 128, 4 heads,
context 64, float32, the vocabulary of the Python standard library's sources),
a step being forward + backward + Adam update on drawn windows of that text,
in PyTorch from the same initial weights (see mnn.distributed.experiments.gpt_bench).
``--model cnn``: the Fashion-MNIST CNN of examples/fashion_cnn.toml (two blocks of
3x3 convolution, BatchNorm, ReLU and 2x2 max-pooling, then Linear 3136-128-10;
float32), a step being forward + backward + SGD with momentum 0.9 on random
28x28 images, in PyTorch from the same weights (see
mnn.distributed.experiments.cnn_bench); ``--profile`` adds where mnn's step goes,
per layer class.
One BLAS thread per process. One JSON line is printed per measurement (keys
``impl``, ``ranks``, ``batch_per_rank``, ``ms_per_step``, ``ms_min``,
``ms_max``, ``samples_per_s``, ...), and one ``compare`` line per batch size
with the throughput ratio when PyTorch is importable. The implementations are
timed in alternating rounds within one run, so a noisy machine slows them
alike; each figure is the median over rounds.

Usage::

    mnn-bench                                   # the MLP on one process: batch 64, 256, 1024
    mnn-bench --batch 256 --rounds 9
    mpiexec -n 2 mnn-bench --batch 256,1024     # data parallel; batch is per rank
    mnn-bench --scaling 1,2 --batch 1024        # starts itself on 1, 2, 1, 2, ... ranks, as mnn-launch
    mnn-bench --model gpt --rounds 9            # the GPT, batch 32 windows of 64 characters
    mpiexec -n 2 mnn-bench --model gpt          # ... data parallel, beside PyTorch DDP
    mnn-bench --model gpt --scaling 1,2 --no-torch --wait-idle   # each run on idle cores
    mnn-bench --model gpt --quality --steps 2000 --out docs/gpt   # train both, compare the curves
    mnn-bench --model gpt --restarts 3          # what a failure costs under mnn-launch --max-restarts
    mnn-bench --model gpt --inference           # evaluation's forward: training vs evaluation mode vs no_grad
    mnn-bench --model cnn --rounds 7 --profile  # the CNN, batch 64 images, and its per-layer breakdown

Under mpiexec each step is split into compute, communication and waiting
(``compute_ms``, ``comm_ms``, ``wait_ms``; waiting is the all-reduce time
that backward did not hide, including the time a rank waits for a slower
one; ``wait_ms_min`` is that of the round that waited least). For the MLP,
``sync_ms`` is the gradient synchronisation alone and ``allreduce_ms`` one
plain MPI Allreduce of the same number of bytes, timed alike; for the GPT,
``allreduce_ms`` is one blocking Allreduce of its whole gradient, timed as
the all-reduce micro-benchmark times it (what ``wait_ms`` would be if
backward hid nothing), ``buckets`` the number of gradient buckets of
``--bucket-kb``. ``peak_rss_mb`` is the largest peak resident memory over
the ranks, and PyTorch runs as DistributedDataParallel over gloo (``impl``
"torch-ddp"). ``--scaling`` starts each run as mnn-scaling starts its jobs
(through mnn-launch's plan: the mpiexec that belongs to mpi4py, or srun in a
SLURM allocation) and gives the weak-scaling speedup of each turn's median
rounds (median over turns, with its min and max) and of each turn's fastest
rounds (``speedup_fastest_rounds``); mnn-scaling measures the MLP's scaling
in full (other hosts, strong scaling, the all-reduce and the cost model).

``--inference`` times the forward of an evaluation (the batch's loss) on one
process instead of a training step, three ways in alternating rounds: mnn in
training mode (``mnn-training-forward``, keeping what backward needs, as
evaluation did before it became inference), mnn in evaluation mode (``mnn``,
keeping nothing) and PyTorch under ``torch.no_grad()`` from the same weights
(``torch-no-grad``); the ``compare`` lines give each mnn time over PyTorch's
(``time_ratio``, with the range of the per-round ratios). Its default batch is
evaluation's: 1024 samples of the MLP, 128 windows of the GPT.

``--quality`` trains the GPT in mnn and in PyTorch for ``--steps`` steps from
the same weights on the same batches, and writes both curves (curves.csv,
curves.png), quality.json and report.md into ``--out``.
"""

import argparse
import json
import os
import socket
import sys

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from mnn.distributed.comm import get_communicator
from mnn.distributed.data_parallel import DEFAULT_BUCKET_BYTES
from mnn.distributed.experiments.restart_cost import measure_checkpoint_cost, measure_failures
from mnn.distributed.experiments.bench import (measure, mlp_evaluation_steps, mlp_steps, peak_rss_mb,
                                               sync_and_allreduce_ms, wait_for_idle_cpus)
from mnn.distributed.experiments.collectives import measure_allreduce
from mnn.distributed.experiments.cnn_bench import cnn_evaluation_steps, cnn_steps, layer_profile
from mnn.distributed.experiments.gpt_bench import GptSizes, gpt_evaluation_steps, gpt_steps
from mnn.distributed.experiments.gpt_quality import QualityRun, compare
from mnn.distributed.experiments.scaling.driver import ChildJobs, turns
from mnn.distributed.experiments.timing import Spread
from mnn.distributed.launch import LaunchSettings
from mnn.distributed.training.task import EVAL_BATCH_SIZE, EVAL_WINDOWS
from mnn.scripts.arguments import at_least, int_list, positive
from mnn.text import load_text

__all__ = ["main"]

MODELS = ("mlp", "gpt", "cnn")
DEFAULT_BATCHES = {"mlp": [64, 256, 1024], "gpt": [32], "cnn": [64]}
# --inference: the batches of an evaluation (mnn-train's EVAL_BATCH_SIZE samples, EVAL_WINDOWS windows;
# the CNN's im2col columns of 1024 images would take 0.9 GB, so 256 of them).
EVALUATION_BATCHES = {"mlp": [EVAL_BATCH_SIZE], "gpt": [EVAL_WINDOWS], "cnn": [256]}


def _parser():
    parser = argparse.ArgumentParser(
        prog="mnn-bench", description=__doc__.split("\n\n")[0],
        epilog="Run under 'mpiexec -n N' for the data-parallel figures; see the README for the tables.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="mlp",
                        help="mlp: the MLP 784-256-10; gpt: the GPT-style character model; cnn: the "
                             "Fashion-MNIST CNN (default mlp)")
    parser.add_argument("--batch", type=int_list(1, "batch size"),
                        help="per-rank batch sizes, comma-separated (default 64,256,1024; gpt: 32 windows; "
                             "cnn: 64 images)")
    parser.add_argument("--rounds", type=positive(int), default=5, help="alternating rounds per batch size (default 5)")
    parser.add_argument("--target-ms", type=positive(float, unit="milliseconds"), default=300.0,
                        help="approximate length of one timed round in ms (default 300)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--profile", action="store_true",
                        help="--model cnn: after the timing, one line per layer class with mnn's forward and "
                             "backward ms per step on one process (the convolution's GEMMs and im2col/col2im apart)")
    parser.add_argument("--inference", action="store_true",
                        help="time evaluation's forward instead of a training step (one process): mnn in training "
                             "and in evaluation mode beside PyTorch under torch.no_grad() (default batch: "
                             "evaluation's, 1024 samples or 128 windows)")
    parser.add_argument("--scaling", type=int_list(1, "rank count"), metavar="N,N,...",
                        help="run this benchmark on each rank count in turns, started as mnn-launch starts jobs, "
                             "and print the weak-scaling efficiency (hosts, strong scaling, the cost model: "
                             "mnn-scaling)")
    parser.add_argument("--repeats", type=positive(int), default=3,
                        help="with --scaling: turns over the rank counts; the speedup is their median (default 3)")
    parser.add_argument("--wait-idle", action="store_true",
                        help="with --scaling: start each run only once the CPUs were 95%% idle for a second "
                             "(on a shared machine; at most 10 minutes per run)")
    gpt = parser.add_argument_group("the GPT (--model gpt)")
    gpt.add_argument("--context", type=positive(int), default=64, help="characters per window (default 64)")
    gpt.add_argument("--d-model", type=positive(int), default=128, help="width (default 128)")
    gpt.add_argument("--heads", type=positive(int), default=4, help="attention heads (default 4)")
    gpt.add_argument("--layers", type=positive(int), default=2, help="blocks (default 2)")
    gpt.add_argument("--text", metavar="PATH",
                     help="a text file or a folder of them (default: the Python standard library's sources)")
    gpt.add_argument("--bucket-kb", type=positive(int), default=DEFAULT_BUCKET_BYTES // 1024,
                     help=f"DataParallel's gradient bucket size in KiB, for the GPT and the CNN (default "
                          f"{DEFAULT_BUCKET_BYTES // 1024}, mnn-train's)")
    quality = parser.add_argument_group("training quality (--model gpt --quality)")
    quality.add_argument("--quality", action="store_true",
                         help="train the GPT in mnn and in PyTorch alike (batch: the first of --batch) and compare "
                              "their curves")
    quality.add_argument("--steps", type=positive(int), default=2000, help="training steps (default 2000)")
    quality.add_argument("--lr", type=positive(float), default=1e-3, help="Adam's learning rate (default 1e-3)")
    quality.add_argument("--seed", type=at_least(0), default=0,
                         help="seed of the weights and the batches (default 0)")
    quality.add_argument("--log-every", type=positive(int), default=10,
                         help="steps per logged training loss (default 10)")
    quality.add_argument("--eval-every", type=positive(int), default=100,
                         help="steps between validation evaluations (default 100)")
    quality.add_argument("--out", default="runs/gpt-quality", help="output folder (default runs/gpt-quality)")
    failures = parser.add_argument_group("what a failure costs (--restarts)")
    failures.add_argument("--restarts", type=positive(int), metavar="K",
                          help="run --model's job (examples/gpt.toml's model, or an MLP on digits) under mnn-launch "
                               "--max-restarts K, kill rank 1 K times, and print each failure's detection, restart "
                               "and redone steps; then the checkpoints' cost on the step time")
    failures.add_argument("--ranks", type=positive(int), default=2, help="ranks of that job (default 2)")
    failures.add_argument("--gap", type=positive(int), default=100,
                          help="steps a start trains before it is killed (default 100)")
    failures.add_argument("--checkpoint-steps", type=positive(int), default=20,
                          help="its --checkpoint-every-steps (default 20)")
    return parser


def _gpt_sizes(args, batch_size):
    return GptSizes(batch=batch_size, context=args.context, d_model=args.d_model, n_heads=args.heads,
                    n_layers=args.layers)


def _model_args(args):
    """The options that choose the model and its batch, to pass on to the runs of --scaling."""
    passed = ["--model", args.model, "--batch", ",".join(map(str, args.batch))]
    if args.model == "gpt":
        passed += ["--context", str(args.context), "--d-model", str(args.d_model), "--heads", str(args.heads),
                   "--layers", str(args.layers), "--bucket-kb", str(args.bucket_kb)]
        if args.text:
            passed += ["--text", args.text]
    return passed


def _run_scaling(args):
    """Run the benchmark on each rank count in turns; print every run's lines, then the
    weak-scaling speed-up of each rank count against the first.

    The runs start through mnn-scaling's driver
    (:class:`~mnn.distributed.experiments.scaling.driver.ChildJobs`: the
    launcher's plan, as ``mnn-launch -n N`` runs), the rank counts taking turns
    ``--repeats`` times (1, 2, 1, 2, ...), so a machine that slows down for a
    while slows each count alike. With ``--wait-idle`` each run starts only
    once the CPUs are idle, so that another user's job does not count as ours.
    RuntimeError when there is no MPI or a run fails.
    """
    jobs = ChildJobs.prepare(LaunchSettings(), dict(os.environ))
    command = [sys.executable, "-m", "mnn.scripts.bench", *_model_args(args),
               "--rounds", str(args.rounds), "--target-ms", str(args.target_ms)]
    if args.no_torch:
        command.append("--no-torch")
    throughput = {}  # (ranks, batch) -> (samples/s, samples/s of the fastest round) of each turn
    for _, ranks in turns(args.scaling, args.repeats):
        if args.wait_idle and not wait_for_idle_cpus():
            print("mnn-bench: the CPUs did not become idle within 10 minutes; running anyway",
                  file=sys.stderr, flush=True)
        stdout, _ = jobs.run(ranks, command, "the benchmark")
        for line in stdout.splitlines():
            print(line, flush=True)
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("impl") == "mnn":
                best = record["samples_per_s"] * record["ms_per_step"] / record["ms_min"]
                throughput.setdefault((ranks, record["batch_per_rank"]), []).append((record["samples_per_s"], best))
    _print_speedups(args, throughput)


def _print_speedups(args, throughput):
    """One ``compare`` line per rank count after the first and batch size: the speed-up of
    each turn against the same turn's run on the first rank count, median over the turns."""
    first = args.scaling[0]
    for (ranks, batch), turns_done in sorted(throughput.items()):
        reference = throughput[(first, batch)]
        if ranks == first:
            continue
        speedup = Spread.of([mine[0] / theirs[0] for mine, theirs in zip(turns_done, reference)])
        # On a shared machine the fastest round of a turn is the one the others disturbed least.
        best = Spread.of([mine[1] / theirs[1] for mine, theirs in zip(turns_done, reference)]).median
        print(json.dumps({"compare": f"mnn {ranks} ranks / {first} rank(s)", "model": args.model,
                          "batch_per_rank": batch, "speedup": round(speedup.median, 3),
                          "speedup_min": round(speedup.minimum, 3), "speedup_max": round(speedup.maximum, 3),
                          "speedup_fastest_rounds": round(best, 3), "repeats": len(turns_done),
                          "weak_scaling_efficiency": round(speedup.median * first / ranks, 3)}), flush=True)


def _steps(args, batch_size, comm, text):
    """The steps of ``--model`` to time at ``batch_size`` per rank (forwards only with ``--inference``)."""
    if args.inference:
        if args.model == "mlp":
            return mlp_evaluation_steps(batch_size, with_torch=not args.no_torch)
        if args.model == "cnn":
            return cnn_evaluation_steps(batch_size, with_torch=not args.no_torch)
        return gpt_evaluation_steps(_gpt_sizes(args, batch_size), comm, text, with_torch=not args.no_torch)
    if args.model == "mlp":
        return mlp_steps(batch_size, comm, with_torch=not args.no_torch)
    if args.model == "cnn":
        return cnn_steps(batch_size, comm, with_torch=not args.no_torch, bucket_bytes=args.bucket_kb * 1024)
    return gpt_steps(_gpt_sizes(args, batch_size), comm, text, with_torch=not args.no_torch,
                     bucket_bytes=args.bucket_kb * 1024)


def _mnn_details(args, batch_size, comm, parallel):
    """What mnn's line adds on several ranks (collective): for the MLP, its synchronisation
    beside a plain Allreduce; for the GPT and the CNN, its gradient buckets and one blocking Allreduce
    of the whole gradient, what ``wait_ms`` would be if backward hid nothing."""
    if parallel is None:
        return {}
    if args.model == "mlp":
        return sync_and_allreduce_ms(batch_size, comm)
    n_floats = sum(bucket.buffer.size for bucket in parallel.buckets)
    allreduce = measure_allreduce(comm, comm.allreduce, n_floats * 4)
    return {"grad_mb": round(n_floats * 4 / 2**20, 3), "buckets": len(parallel.buckets),
            "bucket_kb": args.bucket_kb, "allreduce_ms": round(allreduce["avg_us"] * 1e-3, 4)}


def _print_results(args, results, details):
    """Print each implementation's line and the comparison of mnn with PyTorch (rank 0)."""
    for result in results:
        if result["impl"] == "mnn":
            result.update(details)
        if args.model == "gpt":
            result["tokens_per_s"] = round(result["samples_per_s"] * args.context, 1)
        print(json.dumps(result), flush=True)
    if args.inference:
        _print_time_ratios(args, results)
    elif len(results) == 2:
        mnn_result, torch_result = results
        ratios = [theirs / mine for mine, theirs in zip(mnn_result["round_ms"], torch_result["round_ms"])]
        print(json.dumps({"compare": f"mnn / {torch_result['impl']}", "model": args.model, "ranks": results[0]["ranks"],
                          "batch_per_rank": mnn_result["batch_per_rank"],
                          "throughput_ratio": round(mnn_result["samples_per_s"] / torch_result["samples_per_s"], 3),
                          "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3)}),
              flush=True)


def _print_time_ratios(args, results):
    """``--inference``: one ``compare`` line per mnn mode, its time over PyTorch's (no_grad)."""
    by_impl = {result["impl"]: result for result in results}
    reference = by_impl.get("torch-no-grad")
    if reference is None:
        return
    for impl in ("mnn-training-forward", "mnn"):
        mine = by_impl[impl]
        ratios = [ms / theirs for ms, theirs in zip(mine["round_ms"], reference["round_ms"])]
        print(json.dumps({"compare": f"{impl} / torch-no-grad", "model": args.model,
                          "batch_per_rank": mine["batch_per_rank"],
                          "time_ratio": round(mine["ms_per_step"] / reference["ms_per_step"], 3),
                          "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3)}), flush=True)


def _run_restarts(args):
    """``--restarts K``: what a failure costs, then what the checkpoints cost (see
    mnn.distributed.experiments.restart_cost); one JSON line each."""
    def log(line):
        print(f"mnn-bench: {line}", file=sys.stderr, flush=True)
    try:
        for failure in measure_failures(args.model, args.ranks, args.restarts, args.gap, args.checkpoint_steps, log):
            print(json.dumps({"model": args.model, "ranks": args.ranks, **failure}), flush=True)
        cost = measure_checkpoint_cost(args.model, args.ranks, args.gap * 2, args.checkpoint_steps, args.rounds, log)
    except RuntimeError as error:
        print(f"mnn-bench: error: {error}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps({"model": args.model, "ranks": args.ranks, **cost}), flush=True)
    return 0


def _run_quality(args):
    run = QualityRun(sizes=_gpt_sizes(args, args.batch[0]), steps=args.steps, lr=args.lr, seed=args.seed,
                     log_every=args.log_every, eval_every=args.eval_every, text=args.text)
    try:
        summary = compare(run, args.out, log=lambda line: print(f"mnn-bench: {line}", file=sys.stderr, flush=True))
    except ImportError as error:
        print(f"mnn-bench: --quality needs PyTorch as its reference ({error})", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"quality": "validation bits/char", **summary["final_validation_bits_per_char"],
                      "relative_difference": summary["relative_difference"], "steps": args.steps,
                      "wall_s": summary["wall_s"], "out": str(args.out)}), flush=True)
    return 0


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    args.batch = args.batch or (EVALUATION_BATCHES if args.inference else DEFAULT_BATCHES)[args.model]
    if args.inference and (args.quality or args.restarts or args.scaling):
        parser.error("--inference times one process's forward: drop --quality, --restarts and --scaling")
    if args.quality and args.model != "gpt":
        parser.error("--quality trains the GPT: add --model gpt")
    if args.profile and args.model != "cnn":
        parser.error("--profile splits the CNN's step: add --model cnn")
    if args.model == "gpt" and args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    if args.quality:
        return _run_quality(args)
    if args.restarts:
        return _run_restarts(args)
    if args.scaling:
        try:
            _run_scaling(args)
        except RuntimeError as error:  # no MPI to start the runs with, or a run that failed
            print(f"mnn-bench: error: {error}", file=sys.stderr, flush=True)
            return 1
        return 0
    comm = get_communicator()
    if args.inference and comm.size > 1:
        parser.error(f"--inference times one process, not {comm.size} ranks: run it without mpiexec")
    text = load_text(args.text, context=args.context) if args.model == "gpt" else None
    with threadpool_limits(limits=1):
        if comm.rank == 0:
            blas = [(info["internal_api"], info.get("architecture"), info["num_threads"])
                    for info in threadpool_info()]
            header = {"machine": socket.gethostname(), "cores": os.cpu_count(), "blas": blas,
                      "numpy": np.__version__, "model": args.model}
            if text is not None:
                header.update({"dataset": text.name, "vocab": len(text.vocab)})
            print(json.dumps(header), flush=True)
        for batch_size in args.batch:
            steps = _steps(args, batch_size, comm, text)
            results = measure(steps, comm, batch_size, rounds=args.rounds, target_ms=args.target_ms)
            details = _mnn_details(args, batch_size, comm, steps["mnn"][1])
            peak = peak_rss_mb(comm)
            if comm.rank == 0:
                for result in results:
                    result["peak_rss_mb"] = round(peak, 1)
                _print_results(args, results, details)
            if args.profile and comm.rank == 0:
                for part in layer_profile(batch_size):
                    print(json.dumps({"profile": "mnn", "model": args.model, "batch_per_rank": batch_size, **part}),
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
