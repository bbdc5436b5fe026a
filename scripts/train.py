"""mnn-train: train an mnn layer stack data-parallel over MPI ranks (``main`` is the console script).

Every option is a field of :class:`mnn.distributed.training.config.TrainConfig`; see
``mnn-train --help``. Exit status: 0 on success, 2 for usage and configuration
errors (found before training starts), 1 for failures during training, 130
when interrupted (Ctrl-C, SIGINT, SIGTERM or SIGHUP), on every rank.

An interrupt during training stops all ranks after the same step and, with
--output, saves a checkpoint of that step first: ``--resume`` continues exactly.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, NoReturn

from mnn.checks import did_you_mean
from mnn.distributed.comm import Communicator, get_communicator, launcher_rank, stop_all_on_error
from mnn.distributed.training.config import add_config_arguments, config_overrides, resolve_config
from mnn.distributed.training.preflight import JobConfigError
from mnn.distributed.training.stopping import StopRequests, TrainingInterrupted
from mnn.distributed.training.trainer import TrainingFailed, train

__all__ = ["main", "build_parser", "EXIT_INTERRUPTED"]

# The shell's status for a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130
# How long the other ranks leave rank 0 to print its line after an interrupt or a usage error.
_INTERRUPT_GRACE_S = 1.0

EXAMPLES = """\
examples:
  mnn-train --layers 64,128,10 --optimizer momentum --epochs 5
  mpiexec -n 2 mnn-train --layers 64,128,10 --optimizer momentum --output runs/digits
  mnn-launch -n 4 -- mnn-train --config examples/digits.toml --lr-scaling linear --warmup-epochs 1
  mnn-train --dataset data/mnist --layers 784,256,10 --optimizer adam --lr 1e-3 --output runs/mnist
  mnn-train --config runs/mnist/config.toml --resume        # continue from runs/mnist/checkpoint.npz
  mnn-launch -n 2 -- mnn-train --config examples/attention.toml   # a [model] of any layers

A job file (--config) holds the same settings as TOML keys (batch_size = 64);
options given on the command line override it. Any layer stack is described in
the job file, one [[model.layers]] table per layer, e.g.

  [[model.layers]]
  type = "LinearLayer"            # a class of mnn
  shape = [64, 128]               # its arguments
  [[model.layers]]
  type = "ReluLayer"

instead of --layers (the MLP shorthand) and --loss. OUTPUT receives config.toml,
metrics.jsonl, checkpoint.npz, model.npz and summary.json.
"""


class _OneRankParser(argparse.ArgumentParser):
    """Prints usage errors and --help on rank 0 only: every rank parses the same
    arguments and exits alike, so one copy of the message is enough.

    A usage error is two lines, a short usage line and the error, not argparse's
    usage block of every option (``--help`` lists them); an unrecognized option
    comes with the closest real one when one is close (``--batchsize`` ->
    ``--batch-size``), as Python 3.12's argparse does only for some mistakes.
    """

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        # argparse's own parse_args (3.11), with the closest option to a mistyped one.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestion(extras)}")
        return parsed

    def _suggestion(self, extras: list[str]) -> str:
        """The closest option to the first unrecognized one that looks like an option."""
        options = [option for action in self._actions for option in action.option_strings]
        for extra in extras:
            if extra.startswith("--"):
                suggestion = did_you_mean(extra.partition("=")[0], options)
                if suggestion:
                    return suggestion
        return ""

    def error(self, message: str) -> NoReturn:
        self._print_message(f"usage: {self.prog} [options]  ({self.prog} --help lists them)\n", sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _print_message(self, message: str, file: Any = None) -> None:
        if launcher_rank() == 0:
            super()._print_message(message, file)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        # Open MPI's mpiexec ends the job when the first rank leaves with an error:
        # the silent ranks let rank 0's message out first.
        if status and launcher_rank() != 0:
            time.sleep(_INTERRUPT_GRACE_S)
        super().exit(status, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneRankParser(
        prog="mnn-train",
        description="Train a stack of mnn layers (an MLP by default) with NumPy, data-parallel over MPI ranks. "
                    "The batch size is global: results do not depend on the number of ranks.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="TOML job file; options override its values")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run mnn-train with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    The program's entry point: from the parsed arguments to the process's end,
    SIGINT, SIGTERM and SIGHUP are requests to stop (see
    :class:`~mnn.distributed.training.stopping.StopRequests`), and once the run has
    ended they are ignored, so that a late signal does not change the exit status.
    """
    args = build_parser().parse_args(argv)  # exits with status 2 on a usage error
    # Counted from before MPI starts: a signal during start-up stops the job at the
    # first point every rank can agree on (after start-up), with the line below.
    with StopRequests() as requests:
        try:
            return _main(args)
        finally:
            requests.ignore_from_now()


def _main(args: argparse.Namespace) -> int:
    comm = None
    try:
        try:
            comm = get_communicator()
        except RuntimeError as error:
            # Started on several ranks that cannot talk to each other: each rank is
            # its own world, so each one prints; nothing has run, a bad job (2).
            print(f"mnn-train: error: {error}", file=sys.stderr)
            return 2
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
            except TrainingFailed as error:  # diverged, or OUTPUT not writable: raised on every rank alike
                if comm.rank == 0:
                    print(f"mnn-train: error: {error}", file=sys.stderr)
                return 1
    except KeyboardInterrupt as interrupt:
        # Every rank got the signal (the launcher forwards it): one line, from rank 0.
        rank = comm.rank if comm is not None else launcher_rank()
        if rank == 0:
            where = str(interrupt) if isinstance(interrupt, TrainingInterrupted) \
                else "interrupted before training started"
            print(f"mnn-train: {where}", file=sys.stderr, flush=True)
        if isinstance(interrupt, TrainingInterrupted) and interrupt.ranks_agreed:
            # No rank is inside a collective: leave together, after rank 0's
            # line is out (mpiexec may kill the other ranks once one has left).
            comm.barrier()
            return EXIT_INTERRUPTED
        return _leave_after_interrupt(comm)
    return 0


def _leave_after_interrupt(comm: Communicator | None) -> int:
    """Exit status 130 on every rank, without waiting for the others.

    On several ranks some rank may be blocked in a collective that the others
    left: MPI_Finalize (run at exit) would then wait forever. So every rank
    leaves at once with os._exit, and the launcher stops the ranks still
    running; the others first give rank 0 time to print its line.
    """
    if comm is None or comm.size == 1:
        return EXIT_INTERRUPTED
    sys.stdout.flush()
    sys.stderr.flush()
    if comm.rank != 0:
        time.sleep(_INTERRUPT_GRACE_S)
    os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
