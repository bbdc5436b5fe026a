"""mnn-train: train an MLP data-parallel over MPI ranks (``main`` is the console script).

Every option is a field of :class:`mnn.distributed.config.TrainConfig`; see
``mnn-train --help``. Exit status: 0 on success, 2 for usage and configuration
errors (found before training starts), 1 for failures during training.
"""
from __future__ import annotations

import argparse
import sys

from mnn.distributed.comm import get_communicator, stop_all_on_error
from mnn.distributed.config import add_config_arguments, config_overrides, resolve_config
from mnn.distributed.trainer import JobConfigError, train

__all__ = ["main", "build_parser"]

EXAMPLES = """\
examples:
  mnn-train --layers 64,128,10 --optimizer momentum --epochs 5
  mpiexec -n 2 mnn-train --layers 64,128,10 --optimizer momentum --output runs/digits
  mnn-launch -n 4 -- mnn-train --config examples/digits.toml --lr-scaling linear --warmup-epochs 1
  mnn-train --dataset data/mnist --layers 784,256,10 --optimizer adam --lr 1e-3 --output runs/mnist
  mnn-train --config runs/mnist/config.toml --resume        # continue from runs/mnist/checkpoint.npz

A job file (--config) holds the same settings as TOML keys (batch_size = 64);
options given on the command line override it. OUTPUT receives config.toml,
metrics.jsonl, checkpoint.npz, model.npz and summary.json.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnn-train",
        description="Train a multi-layer perceptron with NumPy, data-parallel over MPI ranks. "
                    "The batch size is global: results do not depend on the number of ranks.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="TOML job file; options override its values")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits with status 2 on a usage error
    try:
        comm = get_communicator()
    except RuntimeError as error:
        print(f"mnn-train: error: {error}", file=sys.stderr)
        return 1
    try:
        config = resolve_config(args.config, config_overrides(args))
    except (ValueError, TypeError) as error:
        # Every rank reads the same file and options, so every rank fails alike.
        if comm.rank == 0:
            print(f"mnn-train: error: {error}", file=sys.stderr)
        return 2
    with stop_all_on_error(comm, exit_code=1):
        try:
            train(config, comm)
        except JobConfigError as error:
            if comm.rank == 0:
                print(f"mnn-train: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
