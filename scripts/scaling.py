"""mnn-scaling: throughput, speed-up and efficiency against ranks, measured here and projected to a cluster.

Usage::

    mnn-scaling --ranks 1,2 --layers 784,1024,1024,10 --mode weak --batch-per-rank 256 --repeats 3 --out runs/scaling
    mnn-scaling --ranks 1,2,4 --mode strong --global-batch 1024 --out runs/strong   # 4 > cores: "oversubscribed"
    mnn-scaling --collectives --out runs/allreduce        # only the all-reduce micro-benchmark and its alpha-beta fit
    mnn-scaling --ranks 1,2 --network 25gbe --alpha 5e-6 --beta 1e-10 ...      # project to these networks
    mnn-scaling --ranks 1,8,16 --hostfile hosts.txt ...   # other hosts, as mnn-launch; inside SLURM: srun
    mnn-scaling --from runs/scaling --network 100gb-ib --max-ranks 4096   # report and project again, no runs

Each rank count runs as its own job, started as mnn-launch starts jobs (srun in
a SLURM allocation, else the mpiexec that matches mpi4py, with --hosts or
--hostfile); the rank counts take turns --repeats times. Then the all-reduce
micro-benchmark (OSU osu_allreduce's method, 4 B to 64 MiB) runs on the
largest rank count that fits the cores, alpha and beta are fitted to it, and
the cost model predicts the measured points and projects them to 1024 ranks on
the fitted and the preset networks. Writes results.csv, results.jsonl,
report.md, projection.csv, collectives.csv and, with matplotlib
(the extra "plot"), speedup.png, efficiency.png, breakdown.png,
collectives.png and model.png into --out. See the README, "Scaling experiments".

Exit status: 0 done, 1 a job failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mnn.distributed.experiments.costmodel import NETWORKS, Network
from mnn.distributed.experiments.scaling.settings import DEFAULT_RUN_TIMEOUT_S, MODES, ScalingSettings, load_experiment
from mnn.distributed.experiments.scaling.driver import run_experiment
from mnn.distributed.experiments.scaling.report import write_outputs
from mnn.distributed.launch import DEFAULT_START_TIMEOUT_S, parse_hostfile, parse_hosts
from mnn.scripts.arguments import at_least, int_list, positive

__all__ = ["build_parser", "parse_settings", "main"]


def _networks(text: str) -> list[Network]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in NETWORKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown network preset {unknown[0] if unknown else text!r}: expected "
                                         f"{', '.join(NETWORKS)} (comma-separated), or --alpha and --beta")
    return [NETWORKS[name] for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnn-scaling", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1].replace("::\n", ":\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment = parser.add_argument_group("the experiment")
    experiment.add_argument("--ranks", type=int_list(1, "rank count"), default=[1, 2], metavar="N,N,...",
                            help="rank counts, comma-separated (default 1,2)")
    experiment.add_argument("--layers", type=int_list(1, "layer width"), default=[784, 1024, 1024, 10],
                            metavar="W,W,...", help="MLP widths, inputs to classes (default 784,1024,1024,10)")
    experiment.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    experiment.add_argument("--mode", choices=MODES, default="weak",
                            help="weak: fixed samples per rank; strong: fixed global batch (default weak)")
    experiment.add_argument("--batch-per-rank", type=positive(int), default=256, metavar="B",
                            help="samples per rank and step in weak mode (default 256)")
    experiment.add_argument("--global-batch", type=positive(int), metavar="B",
                            help="samples per step over all ranks in strong mode (required there)")
    experiment.add_argument("--dataset", metavar="SPEC",
                            help="train on 'digits', an MNIST-format folder or a .npz instead of random data")
    experiment.add_argument("--repeats", type=positive(int), default=3,
                            help="turns over the rank counts; points are medians over them (default 3)")
    experiment.add_argument("--steps", type=positive(int),
                            help="timed steps per run (default: enough for --target-seconds)")
    experiment.add_argument("--target-seconds", type=positive(float, unit="seconds"), default=1.0, metavar="S",
                            help="approximate timed seconds per run when --steps is not given (default 1)")
    experiment.add_argument("--warmup-steps", type=at_least(0), default=5,
                            help="untimed steps before each run's timing (default 5)")
    experiment.add_argument("--train-allreduce", choices=("mpi", "ring"), default="mpi",
                            help="the all-reduce DataParallel trains with (default mpi)")
    experiment.add_argument("--grad-compression", choices=("none", "fp16"), default="none",
                            help="fp16: float16 on the wire, with --train-allreduce ring (default none)")
    experiment.add_argument("--threads-per-rank", type=positive(int), default=1,
                            help="BLAS/OpenMP threads of each rank (default 1)")
    experiment.add_argument("--out", type=Path, help="output folder (default runs/scaling, or --from's folder)")
    experiment.add_argument("--note", action="append", default=[], metavar="TEXT",
                            help="a line for the report's notes, e.g. what the network was (repeatable)")
    experiment.add_argument("--from", dest="from_folder", type=Path, metavar="DIR",
                            help="measure nothing: report and project again what DIR/results.jsonl holds, with "
                                 "this command's --network, --alpha/--beta and --max-ranks")

    micro = parser.add_argument_group("the all-reduce micro-benchmark")
    runs = micro.add_mutually_exclusive_group()
    runs.add_argument("--collectives", action="store_true",
                      help="run only the micro-benchmark (and the alpha-beta fit), no training")
    runs.add_argument("--no-collectives", action="store_true",
                      help="skip the micro-benchmark (the cost model then predicts nothing for this machine)")
    micro.add_argument("--collective-ranks", type=at_least(2), metavar="N",
                       help="ranks of the micro-benchmark (default: the largest of --ranks that fits the cores)")
    micro.add_argument("--allreduce", type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
                       metavar="NAME,...", help="all-reduces to measure: mpi, ring, ring-fp16 (default: all)")
    micro.add_argument("--min-bytes", type=at_least(4), default=4)
    micro.add_argument("--max-bytes", type=at_least(4), default=64 * 2**20)
    micro.add_argument("--seconds-per-size", type=positive(float, unit="seconds"), default=0.5, metavar="S",
                       help="time limit of the timed iterations of one size (default 0.5; at least 10 run)")

    model = parser.add_argument_group("the cost model's projection")
    model.add_argument("--network", type=_networks, metavar="NAME,...",
                       help=f"network presets to project to: {', '.join(NETWORKS)} (default: all, unless "
                            "--alpha/--beta are given)")
    model.add_argument("--alpha", type=positive(float, unit="seconds"), metavar="S",
                       help="latency of your network, seconds")
    model.add_argument("--beta", type=positive(float), metavar="S_PER_BYTE",
                       help="inverse bandwidth of your network, seconds per byte (1e-10 = 10 GB/s)")
    model.add_argument("--max-ranks", type=positive(int), default=1024,
                       help="largest rank count projected to (default 1024)")

    launch = parser.add_argument_group("launching (as mnn-launch)")
    hosts = launch.add_mutually_exclusive_group()
    hosts.add_argument("--hostfile", metavar="FILE", help="hosts, one per line: 'host:slots' or 'host slots=N'")
    hosts.add_argument("--hosts", metavar="H:S,...", help="comma-separated hosts with slots, e.g. a:2,b:2")
    launch.add_argument("--mpiexec", metavar="PATH", help="use this mpiexec (also inside SLURM)")
    launch.add_argument("--ssh", metavar="PROGRAM", help="remote shell for other hosts (default: ssh)")
    launch.add_argument("--start-timeout", type=positive(float, unit="seconds"), default=DEFAULT_START_TIMEOUT_S,
                        metavar="S",
                        help=f"seconds other hosts have to answer ssh (default {DEFAULT_START_TIMEOUT_S:g})")
    launch.add_argument("--run-timeout", type=positive(float, unit="seconds"), default=DEFAULT_RUN_TIMEOUT_S,
                        metavar="S",
                        help=f"seconds one run may take before it is stopped (default {DEFAULT_RUN_TIMEOUT_S:g})")
    return parser


def parse_settings(argv: list[str]) -> ScalingSettings:
    """The settings of ``argv``; argparse's usage error (SystemExit 2) for anything wrong."""
    parser = build_parser()
    return _settings(parser.parse_args(argv), parser)


def _settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ScalingSettings:
    if (args.alpha is None) != (args.beta is None):
        parser.error("--alpha and --beta go together: the latency and the inverse bandwidth of one network")
    networks = args.network if args.network is not None else ([] if args.alpha else list(NETWORKS.values()))
    if args.alpha is not None:
        networks = networks + [Network("custom", args.alpha, args.beta, "given with --alpha/--beta")]
    try:
        hosts = parse_hostfile(args.hostfile) if args.hostfile else parse_hosts(args.hosts) if args.hosts else None
        return ScalingSettings(
            ranks=args.ranks, layers=tuple(args.layers), dtype=args.dtype, mode=args.mode,
            per_rank_batch=args.batch_per_rank, global_batch=args.global_batch, repeats=args.repeats,
            steps=args.steps, warmup_steps=args.warmup_steps, target_seconds=args.target_seconds,
            dataset=args.dataset, out=args.out or Path("runs/scaling"), collectives=not args.no_collectives,
            collectives_only=args.collectives, collective_ranks=args.collective_ranks,
            smallest_bytes=args.min_bytes, largest_bytes=args.max_bytes, seconds_per_size=args.seconds_per_size,
            allreduces=args.allreduce, train_allreduce=args.train_allreduce,
            grad_compression=args.grad_compression, networks=networks, max_projected_ranks=args.max_ranks,
            threads_per_rank=args.threads_per_rank, run_timeout=args.run_timeout, hosts=hosts,
            mpiexec=args.mpiexec, ssh=args.ssh, start_timeout=args.start_timeout, notes=args.note).check()
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    """Run mnn-scaling; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    settings = _settings(args, parser)
    try:
        if args.from_folder is not None:
            experiment = load_experiment(args.from_folder, settings.networks, settings.max_projected_ranks, args.out)
        else:
            experiment = run_experiment(settings, dict(os.environ))
    except ValueError as error:  # --from's folder; the launcher's: hosts that do not answer, no way to start
        print(f"mnn-scaling: error: {error}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as error:
        print(f"mnn-scaling: error: {error}", file=sys.stderr, flush=True)
        return 1
    written = write_outputs(experiment)
    print(f"wrote {', '.join(path.name for path in written)} into {experiment.settings.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
