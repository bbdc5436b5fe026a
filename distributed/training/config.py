"""Training job configuration: one dataclass, a TOML job file, command-line overrides.

A job is described by :class:`TrainConfig`. It can come from three places, each
overriding the one before: the dataclass defaults, a TOML job file, and options
on the command line::

    mnn-train --config examples/digits.toml --epochs 3 --lr 0.05

All checking happens in :meth:`TrainConfig.validate`, which ``__post_init__``
calls, so a ``TrainConfig`` that exists is a valid one. A key in the job file
that is not a field is an error that names the key, suggests the closest field
when one is close, and lists the valid ones.
:meth:`TrainConfig.to_toml` writes the resolved job back out, so a run's output
directory says exactly what was run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import reprlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from mnn.checks import check_choice, check_float, check_int, did_you_mean, is_int
from mnn.distributed.data_parallel import ALLREDUCE_ALGORITHMS, DEFAULT_BUCKET_BYTES
from mnn.distributed.ring import COMPRESSIONS
from mnn.model import LOSS_HEADS, MAX_LAYERS, build_net, mlp_description, model_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

__all__ = [
    "LOSSES",
    "DEFAULT_LAYERS",
    "DEFAULT_LOSS",
    "OPTIMIZERS",
    "LR_SCALINGS",
    "LR_DECAYS",
    "DTYPES",
    "ON_NONFINITE",
    "TrainConfig",
    "load_toml",
    "resolve_config",
    "add_config_arguments",
    "config_overrides",
]

LOSSES = tuple(LOSS_HEADS)
# The net trained when a job describes none.
DEFAULT_LAYERS = (64, 128, 10)
DEFAULT_LOSS = "cross_entropy"
OPTIMIZERS = ("sgd", "momentum", "adam")
LR_SCALINGS = ("none", "linear")
LR_DECAYS = ("none", "cosine")
DTYPES = ("float32", "float64")
ON_NONFINITE = ("stop", "skip")
# validate() builds a described net to check the arguments only its layers' constructors
# check, when that is cheap: up to this many parameters (64 MB in float32).
_BUILT_TO_CHECK_MAX_PARAMETERS = 1 << 24


def _help(text: str, **extra: Any) -> Any:
    """A dataclass field whose metadata carries its command-line help."""
    return dict(metadata={"help": text, **extra})


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults train an MLP on digits."""

    layers: list[int] | None = field(
        default=None,
        **_help("the MLP shorthand: layer widths, input first and classes last; Linear layers with "
                "ReLU between them, then the loss of --loss (used when the job file has no "
                f"[model]: {','.join(map(str, DEFAULT_LAYERS))})", metavar="N,N,...,N"),
    )
    loss: str | None = field(
        default=None,
        **_help("the loss of the MLP shorthand: cross_entropy (softmax + cross entropy), nll "
                "(log-softmax + negative log likelihood) or mse (squared error on one-hot targets) "
                f"(used when the job file has no [model]: {DEFAULT_LOSS})"),
    )
    model: dict[str, Any] | None = field(
        default=None,
        **_help("any layer stack: the job file's [model] table, one [[model.layers]] table per layer "
                "naming its class (type = \"LinearLayer\") and its arguments; see mnn.model",
                cli=False),
    )
    dataset: str = field(
        default="digits",
        **_help("digits, a directory of MNIST-format IDX files, an .npz file, or text (the Python "
                "standard library's sources) / text:PATH (a text file or a folder of them) for a "
                "character model", metavar="SPEC"),
    )
    epochs: int = field(default=10, **_help("passes over the training split"))
    batch_size: int = field(
        default=64,
        **_help("GLOBAL batch size, split across ranks; the sequence of global "
                "batches does not depend on the number of ranks"),
    )
    lr: float = field(default=0.1, **_help("learning rate (before lr scaling)"))
    lr_scaling: str = field(
        default="none",
        **_help("none, or linear: multiply lr by the world size "
                "(Goyal et al. 2017); pair it with --warmup-epochs"),
    )
    warmup_epochs: float = field(
        default=0.0,
        **_help("ramp lr up linearly, step by step, over this many epochs"),
    )
    lr_decay: str = field(
        default="none",
        **_help("none, or cosine: after warm-up, lower lr step by step along half a cosine "
                "to 0 at the last step of --epochs (Loshchilov and Hutter 2017)"),
    )
    optimizer: str = field(
        default="sgd",
        **_help("sgd (plain), momentum (SGD with --momentum) or adam"),
    )
    momentum: float = field(default=0.9, **_help("momentum of the momentum optimizer"))
    weight_decay: float = field(default=0.0, **_help("L2 weight decay"))
    seed: int = field(
        default=0,
        **_help("seed of the parameter init and of the batch order"),
    )
    dtype: str = field(default="float32", **_help("float32 or float64 for parameters and data"))
    eval_every: int = field(
        default=1,
        **_help("evaluate on the test split every N epochs (0: only after the last)"),
    )
    output: str | None = field(
        default=None,
        **_help("directory for model.npz, metrics.jsonl, config.toml, "
                "summary.json and checkpoints", metavar="DIR"),
    )
    resume: bool | str = field(
        default=False,
        **_help("true: continue from OUTPUT/checkpoint.npz when it exists; "
                "a path: continue from that checkpoint (it must exist)"),
    )
    checkpoint_every: int = field(
        default=1,
        **_help("write OUTPUT/checkpoint.npz every N epochs (0: never)"),
    )
    checkpoint_every_steps: int = field(
        default=0,
        **_help("also write OUTPUT/checkpoint.npz every N optimizer steps (0: never), in the background of the "
                "next steps; with mnn-launch --max-restarts a failure then costs at most N steps"),
    )
    checkpoint_every_seconds: float = field(
        default=0.0,
        **_help("also write OUTPUT/checkpoint.npz after a step once S seconds have passed since the last one "
                "(0: never), in the background of the next steps", metavar="S"),
    )
    max_steps: int | None = field(
        default=None,
        **_help("stop after this many optimizer steps in total, mid-epoch if need "
                "be, writing a checkpoint there (for time-limited jobs)"),
    )
    log_every: int = field(default=10, **_help("log the training loss every N steps"))
    bucket_bytes: int = field(
        default=DEFAULT_BUCKET_BYTES,
        **_help("size of the gradient buckets all-reduced during backward"),
    )
    drop_last: bool = field(
        default=False,
        **_help("drop the last, short global batch of each epoch"),
    )
    steps_per_epoch: int | None = field(
        default=None,
        **_help("for text data, whose windows are drawn at random: the steps that make an "
                "epoch, the unit of evaluation, checkpoints and --epochs (default 200)"),
    )
    on_nonfinite: str = field(
        default="stop",
        **_help("when a step's loss or gradient is NaN or infinite on any rank: stop (the last "
                "checkpoint is kept as it was; the state before the step goes to OUTPUT/diverged.npz) "
                "or skip the step's update and go on"),
    )
    max_skipped_steps: int = field(
        default=10,
        **_help("with --on-nonfinite skip: stop, as diverged, after this many steps in a row were "
                "skipped (0: no limit)"),
    )
    keep_checkpoints: int = field(
        default=1,
        **_help("checkpoints to keep in OUTPUT: checkpoint.npz and the k-1 before it; "
                "--resume falls back to the newest one that loads"),
    )
    stall_timeout: float = field(
        default=300.0,
        **_help("seconds a rank may wait in a collective for the others before the job is "
                "stopped with a report of which ranks did not arrive (0: wait forever)"),
    )
    allreduce: str = field(
        default="mpi",
        **_help("how gradients are summed over the ranks: mpi (MPI's all-reduce, started during "
                "backward) or ring (mnn's bandwidth-optimal ring all-reduce, after backward)"),
    )
    grad_compression: str = field(
        default="none",
        **_help("none, or fp16: send gradients as float16 (half the bytes; sums kept in the "
                "training dtype); needs --allreduce ring"),
    )
    timeline: str | None = field(
        default=None,
        **_help("write every rank's forward, backward, all-reduce, wait and optimizer spans to FILE "
                "as Chrome trace events (open it in https://ui.perfetto.dev or chrome://tracing)",
                metavar="FILE"),
    )
    tensorboard: bool | None = field(
        default=None,
        **_help("also write the curves that mnn-plot draws (losses, the test metric, samples/s, lr) as "
                "TensorBoard event files into OUTPUT, for tensorboard --logdir: true, false, or unset: when "
                "the tensorboard package is installed (the extra tensorboard) and there is an OUTPUT",
                metavar="BOOL"),
    )
    text_fingerprint: dict[str, str] | None = field(
        default=None,
        **_help("recorded by the run, not set by hand: the text it trains on, as {chars = its characters "
                "in token-id order, sha256 = the digest of its UTF-8 bytes} (see mnn.text); --resume and "
                "mnn-generate use it to refuse or decode another text", cli=False),
    )

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check every field; raise ValueError/TypeError naming it, expected vs got.

        Ints given where floats are expected (``lr = 1`` in TOML) are converted,
        and paths given as ``os.PathLike`` become text, so that the resolved config
        always has one type per field.
        """
        self._check_model()
        self._check_training()
        self._check_engine()
        self._check_outputs()

    def _check_model(self) -> None:
        """The net: a ``[model]`` description, or the MLP shorthand ``layers`` and ``loss``."""
        if self.model is not None:
            given = [name for name in ("layers", "loss") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{given[0]}: belongs to the MLP shorthand, but the job describes its model "
                                 f"in [model] (whose last layer is the loss); give one or the other")
            # Every mistake in the description, named; a GPT's vocabulary may come from the text.
            # Counted first, without allocating: a net too large to build here is left for
            # preflight to measure against the machine's memory and build.
            described = _with_placeholder_vocab(self.model)
            if model_size(described).parameters <= _BUILT_TO_CHECK_MAX_PARAMETERS:
                build_net(described)
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or len(self.layers) < 2:
                raise ValueError(
                    f"layers: expected a list of at least 2 widths (input, ..., classes), "
                    f"got {reprlib.repr(self.layers)}")
            if len(self.layers) > MAX_LAYERS:
                raise ValueError(f"layers: expected at most {MAX_LAYERS:,} widths, got {len(self.layers):,}")
            if not all(is_int(width) and width >= 1 for width in self.layers):
                raise ValueError(f"layers: expected positive integers, got {reprlib.repr(self.layers)}")
            self.layers = [int(width) for width in self.layers]
        if self.loss is not None:
            check_choice("loss", self.loss, LOSSES)

    def _check_training(self) -> None:
        """What the steps are: the data and its batches, how many, the optimizer and its
        learning rate, the seed and dtype, and what a step that is not finite does."""
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset: expected a non-empty spec string, got {self.dataset!r}")
        self.epochs = check_int("epochs", self.epochs, minimum=1)
        self.batch_size = check_int("batch_size", self.batch_size, minimum=1)
        if not isinstance(self.drop_last, bool):
            raise TypeError(f"drop_last: expected true or false, got {self.drop_last!r}")
        if self.steps_per_epoch is not None:
            self.steps_per_epoch = check_int("steps_per_epoch", self.steps_per_epoch, minimum=1)
        if self.max_steps is not None:
            self.max_steps = check_int("max_steps", self.max_steps, minimum=1)
        self.lr = check_float("lr", self.lr)
        if self.lr <= 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr}")
        check_choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        check_choice("lr_decay", self.lr_decay, LR_DECAYS)
        self.warmup_epochs = check_float("warmup_epochs", self.warmup_epochs)
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"warmup_epochs: expected a number between 0 and epochs={self.epochs}, "
                f"got {self.warmup_epochs}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.momentum = check_float("momentum", self.momentum)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: expected 0 <= momentum < 1, got {self.momentum}")
        self.weight_decay = check_float("weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay}")
        self.seed = check_int("seed", self.seed, minimum=0)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        self.max_skipped_steps = check_int("max_skipped_steps", self.max_skipped_steps, minimum=0)

    def _check_engine(self) -> None:
        """How the ranks sum gradients, and how long one waits for the others."""
        self.bucket_bytes = check_int("bucket_bytes", self.bucket_bytes, minimum=1)
        check_choice("allreduce", self.allreduce, ALLREDUCE_ALGORITHMS)
        check_choice("grad_compression", self.grad_compression, COMPRESSIONS)
        if self.grad_compression != "none" and self.allreduce != "ring":
            raise ValueError(f"grad_compression: {self.grad_compression} needs allreduce = \"ring\" (MPI's "
                             f"all-reduce has no portable float16 sum), got allreduce = {self.allreduce!r}")
        self.stall_timeout = check_float("stall_timeout", self.stall_timeout)
        if self.stall_timeout < 0:
            raise ValueError(f"stall_timeout: expected seconds >= 0 (0: no limit), got {self.stall_timeout}")

    def _check_outputs(self) -> None:
        """What the run writes and reads back: OUTPUT, the checkpoint to resume, how often it
        evaluates, logs and saves, the timeline, and the text it recorded."""
        self.eval_every = check_int("eval_every", self.eval_every, minimum=0)
        self.log_every = check_int("log_every", self.log_every, minimum=1)
        self.checkpoint_every = check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        self.checkpoint_every_steps = check_int("checkpoint_every_steps", self.checkpoint_every_steps, minimum=0)
        self.checkpoint_every_seconds = check_float("checkpoint_every_seconds", self.checkpoint_every_seconds)
        if self.checkpoint_every_seconds < 0:
            raise ValueError(f"checkpoint_every_seconds: expected 0 (never) or more seconds, got "
                             f"{self.checkpoint_every_seconds}")
        self.keep_checkpoints = check_int("keep_checkpoints", self.keep_checkpoints, minimum=1)
        # Paths given as pathlib.Path (Python API) are stored as text, as TOML has them.
        for name in ("output", "resume", "timeline"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if self.output is not None and (not isinstance(self.output, str) or not self.output):
            raise ValueError(f"output: expected a directory path or None, got {self.output!r}")
        if not isinstance(self.resume, (bool, str)) or self.resume == "":
            raise ValueError(
                f"resume: expected true/false or a checkpoint path, got {self.resume!r}")
        if self.resume is True and self.output is None:
            raise ValueError(
                "resume: true means 'continue from OUTPUT/checkpoint.npz', but output is "
                "not set; give --output DIR or a checkpoint path")
        if self.tensorboard is not None and not isinstance(self.tensorboard, bool):
            raise TypeError(f"tensorboard: expected true or false (or unset), got {self.tensorboard!r}")
        if self.tensorboard and self.output is None:
            raise ValueError("tensorboard: true writes the event files into OUTPUT, but output is not set; "
                             "give --output DIR")
        if self.timeline is not None and (not isinstance(self.timeline, str) or not self.timeline):
            raise ValueError(f"timeline: expected a file path or None, got {self.timeline!r}")
        for name in ("dataset", "output", "resume", "timeline"):
            value = getattr(self, name)
            if isinstance(value, str) and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:  # a name in another encoding, as the shell passed its bytes
                    raise ValueError(f"{name}: expected a path that is UTF-8 text (the run records it in config.toml "
                                     f"and its checkpoints), got {value!r}") from None
        if self.text_fingerprint is not None and not (
                isinstance(self.text_fingerprint, dict) and set(self.text_fingerprint) == {"chars", "sha256"}
                and all(isinstance(value, str) for value in self.text_fingerprint.values())):
            raise ValueError(f"text_fingerprint: expected a table of the strings chars and sha256 (recorded by "
                             f"the run), got {self.text_fingerprint!r}")

    def model_description(self) -> dict[str, Any]:
        """The net this job trains: ``model`` if given, else the MLP of the
        shorthand ``layers`` and ``loss`` (with their defaults)."""
        if self.model is not None:
            return self.model
        return mlp_description(self.layers or list(DEFAULT_LAYERS), self.loss or DEFAULT_LOSS)

    # --------------------------------------------------------------- from/to
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys are an error naming them and the valid ones."""
        _check_keys(values, source)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved job as TOML; unset optional fields (None) are left out,
        which reads back as their default, None."""
        values = {key: value for key, value in self.to_dict().items() if value is not None}
        return tomli_w.dumps(values)


def _with_placeholder_vocab(model: Any) -> Any:
    """``model``, with a vocabulary of 1 where a ``gpt`` table leaves it to the text."""
    if isinstance(model, dict) and set(model) == {"gpt"} and isinstance(model["gpt"], dict) \
            and model["gpt"].get("vocab") is None:
        return {**model, "gpt": {**model["gpt"], "vocab": 1}}
    return model


def _check_keys(values: dict[str, Any], source: str) -> None:
    valid = TrainConfig.field_names()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        named = ", ".join(f"{key!r}{did_you_mean(key, valid)}" for key in unknown)
        raise ValueError(f"{source}: unknown key(s) {named}; valid keys are: {', '.join(valid)}")


# ---------------------------------------------------------------- job files
# Read no further: a job file is a few KB, and --config /dev/zero would never end.
_MAX_JOB_FILE_BYTES = 16 << 20


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML job file into a dict; a file that cannot be read or parsed is a
    ValueError naming it and the problem."""
    if os.fspath(path) == "":  # Path("") is ".", the current directory
        raise ValueError("config file: the option is empty (--config ''); give the path of a TOML job file")
    path = Path(path)
    where = f"config file {str(path)!r}"
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_JOB_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{where} is a directory, not a TOML job file") from None
    except OSError as error:
        raise ValueError(f"{where} cannot be read: {error.strerror or error}") from None
    if len(data) > _MAX_JOB_FILE_BYTES:
        raise ValueError(f"{where} is larger than {_MAX_JOB_FILE_BYTES >> 20} MiB, which no job file is "
                         f"(is it the right file?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{where} is not UTF-8 text (as TOML must be): byte {data[error.start]:#04x} on line "
                         f"{line} ({error.reason})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{where} is not valid TOML: {error}") from None
    except RecursionError:
        # The parser recurses once per level of nested arrays and inline tables.
        raise ValueError(f"{where} nests arrays or inline tables too deeply to read (the TOML parser ran "
                         f"out of Python's recursion depth); a job file needs a few levels") from None


def resolve_config(config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < job file < overrides (e.g. command-line options), then validate.

    A mistake in a value that the job file gave (and no override replaced) is
    named with the file: ``config file 'job.toml': epochs: expected ...``."""
    values: dict[str, Any] = {}
    source = "config"
    if config_file is not None:
        values = load_toml(config_file)
        source = f"config file {str(config_file)!r}"
    from_file = set(values) - set(overrides or {})
    values.update(overrides or {})
    try:
        return TrainConfig.from_dict(values, source=source)
    except (ValueError, TypeError) as error:
        # Messages start with the field they are about ("model.layers[2] (...): ...").
        field_named = re.match(r"[a-z_]*", str(error)).group()
        # (An unknown key is named with the file already: a key `config` is no field.)
        if field_named not in from_file or str(error).startswith(source):
            raise
        raise type(error)(f"{source}: {error}") from None


# ------------------------------------------------------------ command line
def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 64,128,10, got {text!r}") from None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_resume(text: str) -> bool | str:
    try:
        return _parse_bool(text)
    except argparse.ArgumentTypeError:
        return text  # a checkpoint path


_CHOICES = {"loss": LOSSES, "lr_scaling": LR_SCALINGS, "lr_decay": LR_DECAYS, "optimizer": OPTIMIZERS, "dtype": DTYPES,
            "on_nonfinite": ON_NONFINITE, "allreduce": ALLREDUCE_ALGORITHMS, "grad_compression": COMPRESSIONS}
_PARSERS = {"layers": _parse_layers, "loss": str, "drop_last": _parse_bool, "output": str,
            "dataset": str, "max_steps": int, "timeline": str, "steps_per_epoch": int}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--option`` per TrainConfig field (``batch_size`` -> ``--batch-size``).

    Options default to "not given" (argparse.SUPPRESS), so that only what the user
    typed overrides the job file; see :func:`config_overrides`.
    """
    defaults = TrainConfig()
    for spec in dataclasses.fields(TrainConfig):
        name = spec.name
        if not spec.metadata.get("cli", True):
            continue
        option = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        help_text = spec.metadata["help"] if name in ("layers", "loss", "tensorboard") else \
            f"{spec.metadata['help']} (default: {default})"
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if "metavar" in spec.metadata:
            kwargs["metavar"] = spec.metadata["metavar"]
        elif name not in _CHOICES:
            kwargs["metavar"] = {int: "N", float: "X", bool: "BOOL"}.get(type(default), "N")
        if name in _CHOICES:
            kwargs["choices"] = _CHOICES[name]
        if name == "resume":
            # `--resume` alone means true; `--resume PATH` names a checkpoint.
            kwargs.update(nargs="?", const=True, type=_parse_resume, metavar="PATH")
        elif name == "tensorboard":  # `--tensorboard` alone means true
            kwargs.update(nargs="?", const=True, type=_parse_bool)
        elif name in _PARSERS:
            kwargs["type"] = _PARSERS[name]
        else:
            kwargs["type"] = type(default)
        parser.add_argument(option, **kwargs)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the user gave on the command line."""
    given = vars(args)
    return {name: given[name] for name in TrainConfig.field_names() if name in given}
