"""Preflight: every check a job needs before its first step, turned into a prepared job.

:func:`prepare_job` takes a config (and, from Python, a user's own net and
arrays) and returns a :class:`PreparedJob`: the net and optimizer (restored
from a checkpoint when resuming), the dataset, the task, the sampler and the
position to start from. Checks run where they must: the output directory and
the checkpoint on rank 0 (other hosts may not see its files; DataParallel then
broadcasts the restored state), the data everywhere. A problem anywhere raises
:class:`JobConfigError` on every rank, so all ranks stop together, before any
of them trains.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnn import SequentialLayers
from mnn.datasets import Dataset
from mnn.io import clean_stale_temporaries, unusable_path
from mnn.model import GPT_KEYS, model_size
from mnn.text import TextDataset, fingerprint_difference
from mnn.distributed.training.checkpoint import (CHECKPOINT_NAME, Checkpoint, find_checkpoints, load_checkpoint,
                                        load_newest_checkpoint)
from mnn.distributed.comm import Communicator, RankFailure, run_all, run_on_root
from mnn.distributed.training.config import DEFAULT_LAYERS, DEFAULT_LOSS, TrainConfig
from mnn.distributed.training.job_data import ARRAYS_DATASET, is_text_job, load_job_dataset, text_epoch_steps
from mnn.distributed.training.output_dir import OutputLock, set_aside_earlier_run
from mnn.distributed.training.position import Position
from mnn.distributed.training.restarts import restart_count
from mnn.distributed.training.ranks import data_disagreements, disagreements, gather_facts, limit_blas_threads
from mnn.distributed.sampler import DrawnBatchSampler, GlobalBatchSampler
from mnn.distributed.training.task import Task, build_job_net, build_optimizer, choose_task

__all__ = ["JobConfigError", "PreparedJob", "prepare_job", "RESUME_MUST_MATCH"]

# A checkpoint resumes exactly only if these settings are unchanged: they define
# the parameters' shapes, the optimizer state and the sequence of global batches.
# (The model itself, given by layers and loss or by model, is compared as the
# description it stands for.)
RESUME_MUST_MATCH = ("dataset", "batch_size", "seed", "dtype", "optimizer", "drop_last")
_MODEL_FIELDS = ("layers", "loss", "model")


class JobConfigError(RankFailure):
    """The job cannot start as configured; raised on every rank before training."""


@dataclass
class PreparedJob:
    """A job that passed preflight, at the position it starts from.

    ``config`` is the job as it runs (with the description of a user's net and
    ``dataset = "arrays"`` for a user's arrays); ``resumed_from`` is the
    checkpoint's path when resuming, and ``changed`` the settings that differ
    from the checkpoint's, as ``{name: [checkpoint's value, this job's value]}``.
    """

    config: TrainConfig
    net: SequentialLayers
    optimizer: Any
    dataset: Dataset
    task: Task
    sampler: GlobalBatchSampler
    position: Position
    resumed_from: str | None = None
    changed: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    lock: OutputLock | None = None

    def release(self, remove: bool = True) -> None:
        """Let other jobs use the output directory again (rank 0 holds its lock); without
        ``remove``, leave the lock as a killed job leaves it (see OutputLock.release)."""
        if self.lock is not None:
            self.lock.release(remove)
            self.lock = None


def prepare_job(config: TrainConfig, comm: Communicator, net: SequentialLayers | None = None,
                data: Any = None) -> PreparedJob:
    """Check the job and build what it trains (collective); JobConfigError on every rank if it cannot start.

    ``net``: a user's own ``SequentialLayers`` (ending in a loss layer) instead
    of the one the config describes; ``data``: a :class:`~mnn.datasets.Dataset`
    or the arrays ``(x_train, y_train, x_test, y_test)`` instead of ``config.dataset``.
    """
    lock = None
    try:
        config = run_all(comm, _adopt, config, net, data)
        notes = _check_ranks(comm, config)
        dataset = _load_data(config, data, comm)
        _check_same_data(comm, dataset)
        recorded = config
        config = run_all(comm, _with_text_record, config, dataset)
        notes += _text_change_note(recorded, config) if comm.rank == 0 else []
        if net is None:
            _check_memory(comm, config, dataset)
            net = run_all(comm, build_job_net, config)
        optimizer = build_optimizer(config, net)
        # Rank 0 alone: the output directory is its own (other hosts may not see it);
        # DataParallel broadcasts the parameters and optimizer state it restores.
        output = run_on_root(comm, lambda: _claim_output(config))
        lock, output_notes = output if output is not None else (None, [])
        restored = comm.broadcast_object(run_on_root(comm, lambda: _restore(config, net, optimizer)))
        task = comm.broadcast_object(run_on_root(comm, lambda: _choose_task(config, net, dataset)))
        sampler = run_all(comm, _sampler, config, dataset, comm)
        run_all(comm, _check_position, restored, sampler, dataset)
    except RankFailure as failure:
        if lock is not None:
            lock.release()
        raise JobConfigError(failure.failures, failure.world_size) from failure
    position, resumed_from, changed, resume_notes = restored or (Position(), None, {}, [])
    if config.batch_size < comm.size:
        idle = comm.size - config.batch_size
        notes.append(f"the global batch of {config.batch_size} is smaller than the {comm.size} ranks: {idle} "
                     f"rank{'s get' if idle > 1 else ' gets'} no sample in any step (the result is exact, but "
                     f"{config.batch_size} rank{'s' if config.batch_size > 1 else ''} would be as fast)")
    return PreparedJob(config, net, optimizer, dataset, task, sampler, position, resumed_from, changed,
                       notes=[*notes, *output_notes, *resume_notes], lock=lock)


# ------------------------------------------------------------------ a user's net and arrays
def _adopt(config: TrainConfig, net: SequentialLayers | None, data: Any) -> TrainConfig:
    """``config`` describing a user's own net and arrays, so that config.toml and the
    checkpoint say what was trained."""
    changes: dict[str, Any] = {}
    if net is not None:
        if not isinstance(net, SequentialLayers):
            raise TypeError(f"net: expected a SequentialLayers, got {type(net).__name__}")
        description = net.get_config()
        if config.layers is not None or config.loss is not None:
            given = "layers" if config.layers is not None else "loss"
            raise ValueError(f"{given}: the job describes an MLP, but a net was given too; leave out "
                             f"layers and loss when passing net=")
        if config.model is not None and config.model != description:
            raise ValueError("model: the job's [model] describes another net than the one given "
                             "(compare it with net.get_config())")
        if net.dtype != np.dtype(config.dtype):
            raise ValueError(f"dtype: the net is {net.dtype} but the job says {config.dtype}; set "
                             f"dtype = {net.dtype.name!r} or cast the net with net.astype")
        changes["model"] = description
    if data is not None:
        if config.dataset not in (TrainConfig().dataset, ARRAYS_DATASET):
            raise ValueError(f"dataset: the job names {config.dataset!r}, but arrays were given too; "
                             f"leave dataset out when passing data=")
        changes["dataset"] = ARRAYS_DATASET
    return dataclasses.replace(config, **changes) if changes else config


def _as_dataset(data: Any) -> Dataset:
    if isinstance(data, Dataset):
        return data
    expected = ("data: expected a Dataset, or the arrays (x_train, y_train, x_test, y_test) as a tuple or a dict "
                "with those keys")
    if isinstance(data, dict):
        missing = [key for key in _ARRAY_KEYS if key not in data]
        unknown = sorted(map(repr, set(data) - set(_ARRAY_KEYS)))
        if missing or unknown:
            problems = ([f"without {', '.join(missing)}"] if missing else []) + \
                ([f"with unknown key(s) {', '.join(unknown)}"] if unknown else [])
            raise TypeError(f"{expected}, got a dict {' and '.join(problems)}")
        data = tuple(data[key] for key in _ARRAY_KEYS)
    if not isinstance(data, (tuple, list)):
        raise TypeError(f"{expected}, got {type(data).__name__}")
    if len(data) != len(_ARRAY_KEYS):
        raise TypeError(f"{expected}, got a {type(data).__name__} of {len(data)} item{'s' if len(data) != 1 else ''}")
    empty = [key for key, part in zip(_ARRAY_KEYS, data) if part is None]
    if empty:
        raise TypeError(f"{expected}, got None for {', '.join(empty)}")
    return Dataset.from_arrays(*data, name=ARRAYS_DATASET)


_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


# ------------------------------------------------------------------ the ranks
def _check_ranks(comm: Communicator, config: TrainConfig) -> list[str]:
    """Stop unless every rank runs the same code, versions and job; keep BLAS within the
    cores. Returns the notes for rank 0 to show."""
    facts = gather_facts(comm, config.to_dict())
    different = disagreements(facts)
    if different:
        raise RankFailure({0: "the ranks do not run the same thing:\n  " + "\n  ".join(different)})
    note = limit_blas_threads(facts, comm.rank)
    return [note] if note is not None and comm.rank == 0 else []


def _check_same_data(comm: Communicator, dataset: Dataset) -> None:
    """Stop unless every rank read the same data (collective): ranks that read other copies
    of a file (one that differs between hosts) would train on other samples or token ids,
    and with other sizes run other numbers of steps or crash in mismatched collectives."""
    different = data_disagreements(comm, _data_facts(dataset))
    if different:
        raise RankFailure({0: "the ranks do not read the same data:\n  " + "\n  ".join(different)})


def _data_facts(dataset: Dataset) -> dict[str, Any]:
    """What the ranks compare of their data: its sizes, a digest of the training split's
    scaling (it changes with any training value), and a text's fingerprint. Cheap: no
    pass over the samples."""
    facts: dict[str, Any] = {"training samples": len(dataset.train), "test samples": len(dataset.test),
                             "classes": dataset.n_classes}
    if isinstance(dataset, TextDataset):
        facts["text"] = dataset.fingerprint
    else:
        facts["sample shape"] = tuple(dataset.sample_shape)
        if dataset.train.mean is not None:
            # In float32: a last bit that another machine's float64 sums may round otherwise is no difference
            # (and a scale beyond float32's range, inf on every rank alike, no warning).
            with np.errstate(over="ignore"):
                scaling = np.stack([dataset.train.mean, dataset.train.std]).astype(np.float32)
            facts["the training features' mean and std (digest)"] = hashlib.sha256(scaling.tobytes()).hexdigest()[:16]
    return facts


# ------------------------------------------------------------------ memory
# Numbers each parameter brings besides itself: its gradient, and the optimizer's state.
_COPIES_PER_PARAMETER = {"sgd": 2, "momentum": 3, "adam": 4}


def _check_memory(comm: Communicator, config: TrainConfig, dataset: Dataset) -> None:
    """Refuse, before anything is allocated, a net that cannot fit in the memory of its
    ranks' machines (collective). Ranks on one host share its memory."""
    hosts = comm.allgather(socket.gethostname())
    run_all(comm, _refuse_what_does_not_fit, config, dataset, comm.size, hosts.count(hosts[comm.rank]))


def _refuse_what_does_not_fit(config: TrainConfig, dataset: Dataset, world_size: int, ranks_here: int) -> None:
    r"""The estimate, in bytes per rank, with :math:`P` parameters, :math:`A` numbers kept
    per sample (:func:`mnn.model.model_size`), :math:`k` the copies of each parameter
    (itself, its gradient and the optimizer's slots: 0 for sgd, 1 for momentum, 2 for
    adam), :math:`b` samples per rank and :math:`s` the dtype's itemsize:

    .. math::
        \text{bytes} = (k P + 2 b A)\, s

    (the activations twice: kept by forward, and their gradients in backward). It is
    rough and is compared with all the memory there is, so only a job that clearly
    cannot fit is refused."""
    size = model_size(config.model_description(), dataset.n_features)
    itemsize = np.dtype(config.dtype).itemsize
    # A global batch larger than the training split is the whole split; a text's
    # windows are drawn with replacement, so its batch is as large as it says.
    batch = config.batch_size if isinstance(dataset, TextDataset) else min(config.batch_size, len(dataset.train))
    per_rank_batch = -(-batch // world_size)
    copies = _COPIES_PER_PARAMETER[config.optimizer]
    parameter_bytes = copies * size.parameters * itemsize
    activation_bytes = 2 * size.activations * per_rank_batch * itemsize
    needed = parameter_bytes + activation_bytes
    limits = _memory_limits(ranks_here)
    if not limits or needed <= min(limits.values()):
        return
    what = {2: "and their gradients", 3: "their gradients and momentum", 4: "their gradients and Adam's 2 moments"}
    has = "; ".join(f"{_gigabytes(room)} {source}" for source, room in limits.items())
    each = f" for each of its {ranks_here} ranks" if ranks_here > 1 else ""
    given_as = "model" if config.model is not None else "layers"
    raise ValueError(f"{given_as}: this job needs about {_gigabytes(needed)} of memory per rank ({size.parameters:,} "
                     f"parameters x {itemsize} bytes x {copies} for the parameters {what[copies]}: "
                     f"{_gigabytes(parameter_bytes)}; activations of {per_rank_batch} samples: about "
                     f"{_gigabytes(activation_bytes)}), more than this machine has{each}: {has}. Describe a "
                     f"smaller model or batch, or run on machines with more memory")


def _memory_limits(ranks_here: int) -> dict[str, int]:
    """The memory one rank may use, by where the bound comes from: the memory available
    on this host (and in its cgroup), shared by its ``ranks_here`` ranks, and the
    address-space limit (``ulimit -v``) of this process. Empty where nothing is known."""
    limits = {}
    available = _meminfo_available()
    if available is not None:
        limits["available (MemAvailable in /proc/meminfo)"] = available // ranks_here
    cgroup = _cgroup_room()
    if cgroup is not None:
        limits["left under this cgroup's memory limit"] = cgroup // ranks_here
    address_space = _address_space_room()
    if address_space is not None:
        limits["left under the address-space limit (ulimit -v, RLIMIT_AS)"] = address_space
    return limits


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux: the free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


# Where a cgroup keeps its memory limit and use: (the controller named in /proc/self/cgroup,
# the hierarchy's folder, limit file, usage file) for cgroup v2 (no name) and v1.
_CGROUP_MEMORY = (("", Path("/sys/fs/cgroup"), "memory.max", "memory.current"),
                  ("memory", Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"))
_PROC_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 writes "no limit" as a number near 2**63 (v2 writes "max").
_NO_CGROUP_LIMIT = 1 << 60


def _cgroup_room() -> int | None:
    """The limit less the use of this process's cgroup's memory (v2 or v1), if it has a limit.
    The cgroup's folder is looked for under its path, then at the root (as a container sees it)."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:  # "hierarchy-id:controllers:path"
        _, controllers, relative = (line.split(":", 2) + ["", ""])[:3]
        for named, root, limit_file, usage_file in _CGROUP_MEMORY:
            if named not in controllers.split(","):
                continue
            for folder in (root / relative.lstrip("/"), root):
                try:
                    limit = (folder / limit_file).read_text().strip()
                    limit = _NO_CGROUP_LIMIT if limit == "max" else int(limit)
                    used = int((folder / usage_file).read_text())
                except (OSError, ValueError):
                    continue
                if limit < _NO_CGROUP_LIMIT:
                    rooms.append(max(0, limit - used))
                break
    return min(rooms, default=None)


def _address_space_room() -> int | None:
    """RLIMIT_AS less the address space this process already maps (VmSize)."""
    try:
        import resource  # not on every platform
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        used = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmSize:"))
        return max(0, limit - used)
    except (ImportError, OSError, ValueError, StopIteration):
        return None


def _gigabytes(size: int) -> str:
    """``size`` bytes in GB (or MB, TB, PB when that reads better)."""
    unit = next((unit for unit in ("PB", "TB", "GB") if size >= _UNITS[unit]), "MB")
    return f"{size / _UNITS[unit]:.3g} {unit}"


_UNITS = {"PB": 1e15, "TB": 1e12, "GB": 1e9, "MB": 1e6}


# ------------------------------------------------------------------ output and checkpoint
def _claim_output(config: TrainConfig) -> tuple[OutputLock, list[str]] | None:
    """Lock the output directory for this job; a fresh run sets an earlier run's files aside.
    Returns the lock and what rank 0 should say about it."""
    if config.output is None:
        return None
    output = Path(config.output)
    _check_output_dir(config.output)
    lock = OutputLock.acquire(output)
    try:
        # Holding the lock, no other writer can own a temporary file here.
        notes = [lock.note] + [f"removed {path.name}, left by a write that was cut short"
                               for path in clean_stale_temporaries(output)]
        if not _resuming(config):
            notes.append(set_aside_earlier_run(output))
    except Exception:
        lock.release()
        raise
    return lock, [note for note in notes if note is not None]


def _check_output_dir(output: str) -> None:
    path = Path(output)
    problem = unusable_path(path)
    if problem is not None:
        raise ValueError(f"output directory {output!r} cannot be used: {problem}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output directory {output!r} is a file, not a directory")
    if path.is_symlink() and not path.exists():
        raise ValueError(f"output directory {output!r} is a symbolic link to {os.readlink(path)!r}, which does not "
                         f"exist (or cannot be followed); create that directory, or give another --output")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"output directory {output!r} is not writable: {error}") from None


def _resuming(config: TrainConfig) -> bool:
    """Whether the job continues a checkpoint: ``--resume PATH``, or ``--resume`` or a
    restart (:mod:`~mnn.distributed.training.restarts`) with checkpoints in OUTPUT
    (without any, it starts from scratch)."""
    if _continues_output(config):
        return True
    if config.resume is True:
        return False
    return config.resume is not False


def _continues_output(config: TrainConfig) -> bool:
    """Whether the job continues OUTPUT's newest checkpoint: ``--resume``, or a restart, with
    checkpoints there."""
    wanted = config.resume is True or restart_count() > 0
    return wanted and config.output is not None and bool(find_checkpoints(config.output))


def _checkpoint_to_resume(config: TrainConfig) -> tuple[Path, Checkpoint, list[str]] | None:
    """The checkpoint to continue, its path, and notes on the newer ones that did not load."""
    if not _resuming(config):
        return None
    if _continues_output(config):
        newest = load_newest_checkpoint(config.output)
        notes = [f"skipped {path}: {reason}" for path, reason in newest.skipped]
        return newest.path, newest.checkpoint, notes
    path = Path(config.resume)
    if path.is_dir():
        raise ValueError(f"resume: {config.resume!r} is a directory, not a checkpoint: give its checkpoint "
                         f"({str(path / CHECKPOINT_NAME)!r}), or --output {config.resume} with --resume alone")
    if not path.is_file():
        raise ValueError(f"resume: checkpoint {config.resume!r} does not exist")
    return path, load_checkpoint(path), []


def _restore(config: TrainConfig, net: SequentialLayers,
             optimizer: Any) -> tuple[Position, str, dict[str, list[Any]], list[str]] | None:
    """When resuming, load the checkpoint into ``net`` and ``optimizer``; return where it is,
    the settings that changed since, and notes on checkpoints skipped."""
    found = _checkpoint_to_resume(config)
    if found is None:
        return None
    path, checkpoint, notes = found
    try:
        saved = TrainConfig.from_dict(checkpoint.config, source=f"the config in {str(path)!r}")
    except (ValueError, TypeError) as error:
        raise ValueError(f"cannot resume from {str(path)!r}: its stored config is not a valid "
                         f"job: {error}") from None
    _check_same_text_as(path, saved, config)
    mismatched = [f"{key}: checkpoint has {getattr(saved, key)!r}, this job {getattr(config, key)!r}"
                  for key in RESUME_MUST_MATCH if getattr(saved, key) != getattr(config, key)]
    if _comparable_model(saved) != _comparable_model(config):
        mismatched.insert(0, _model_difference(saved, config))
    if is_text_job(config) and text_epoch_steps(saved) != text_epoch_steps(config):
        # The position counts steps within epochs of the checkpoint's length.
        mismatched.append(f"steps_per_epoch: checkpoint has {text_epoch_steps(saved)}, this job "
                          f"{text_epoch_steps(config)} (its position is counted in epochs of that many steps)")
    if mismatched:
        raise ValueError(f"cannot resume from {str(path)!r}: these settings must match the "
                         f"checkpoint's: " + "; ".join(mismatched))
    # `resume` itself always differs from the run that wrote the checkpoint; the text is compared above.
    ignored = (*RESUME_MUST_MATCH, *_MODEL_FIELDS, "resume", "steps_per_epoch", "text_fingerprint")
    changed = {key: [value, getattr(config, key)] for key, value in saved.to_dict().items()
               if key not in ignored and value != getattr(config, key)}
    net.load_state_dict(checkpoint.model_state)
    optimizer.load_state_dict(checkpoint.optimizer_state)
    return checkpoint.position, str(path), changed, notes


def _check_position(restored: tuple[Position, str, Any, Any] | None, sampler: Any, dataset: Dataset) -> None:
    """A resumed position must lie within this job's epochs: with fewer steps in an epoch
    than the checkpoint has done of one, the data it was trained on had more samples."""
    if restored is None:
        return
    position, path = restored[0], restored[1]
    if position.step_in_epoch > sampler.steps_per_epoch:
        raise ValueError(f"cannot resume from {path!r}: it stopped after step {position.step_in_epoch} of epoch "
                         f"{position.epochs_done + 1}, but an epoch of this job has {sampler.steps_per_epoch} steps "
                         f"({len(dataset.train)} training samples of {dataset.name}): the data changed since the "
                         f"checkpoint was written; restore it, or train afresh (without --resume)")


def _check_same_text_as(path: Path, saved: TrainConfig, config: TrainConfig) -> None:
    """Refuse to resume on a text other than the one the checkpoint was trained on (a
    checkpoint written before texts were recorded has nothing to compare)."""
    if saved.text_fingerprint is None or config.text_fingerprint is None:
        return
    difference = fingerprint_difference(saved.text_fingerprint, config.text_fingerprint)
    if difference is not None:
        raise ValueError(f"cannot resume from {str(path)!r}: the text of dataset {config.dataset!r} is not the one "
                         f"the checkpoint was trained on: {difference}; restore that text, or train afresh "
                         f"(without --resume, or with another --output)")


def _comparable_model(config: TrainConfig) -> dict[str, Any]:
    """The job's model description, a ``gpt`` table with its defaults filled in (so that
    leaving out a size and giving its default describe the same model)."""
    description = config.model_description()
    if isinstance(description.get("gpt"), dict):
        return {**description, "gpt": {**GPT_KEYS, **description["gpt"]}}
    return description


def _model_difference(saved: TrainConfig, config: TrainConfig) -> str:
    """How the checkpoint's model and this job's differ: the MLPs' widths and losses, or
    each setting of the descriptions that differs, by its path (model.gpt.n_layers)."""
    if saved.model is None or config.model is None:
        return f"model: checkpoint has {_model_text(saved)}, this job {_model_text(config)}"
    differences = _differences(_comparable_model(saved), _comparable_model(config), "model")
    shown = differences[:4] + ([f"and {len(differences) - 4} more differences"] if len(differences) > 4 else [])
    return "; ".join(shown)


def _differences(saved: Any, mine: Any, where: str) -> list[str]:
    """``"where: checkpoint has X, this job Y"`` for each leaf of two descriptions that differs."""
    if isinstance(saved, dict) and isinstance(mine, dict):
        return [line for key in sorted(set(saved) | set(mine), key=str)
                for line in _differences(saved.get(key), mine.get(key), f"{where}.{key}")]
    if isinstance(saved, list) and isinstance(mine, list) and len(saved) == len(mine):
        return [line for index, (first, second) in enumerate(zip(saved, mine))
                for line in _differences(first, second, f"{where}[{index}]")]
    if saved == mine:
        return []
    return [f"{where}: checkpoint has {_described(saved)}, this job {_described(mine)}"]


def _described(value: Any) -> str:
    """A part of a description, short: a list of layers by their types."""
    if value is None:
        return "none"
    if isinstance(value, list) and all(isinstance(entry, dict) and "type" in entry for entry in value):
        return f"{len(value)} layers [" + ", ".join(str(entry["type"]) for entry in value) + "]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _model_text(config: TrainConfig) -> str:
    """The model as the job gave it: the MLP widths and loss (defaults filled in), or a described model."""
    if config.model is None:
        widths = ",".join(map(str, config.layers or DEFAULT_LAYERS))
        return f"the MLP {widths} with loss {config.loss or DEFAULT_LOSS}"
    if "layers" in config.model:
        return "a [model] of " + _described(config.model["layers"])
    return "a [model.gpt]" if "gpt" in config.model else "a [model]"


# ------------------------------------------------------------------ data
def _load_data(config: TrainConfig, data: Any, comm: Communicator) -> Dataset:
    if data is not None:
        return run_all(comm, _as_dataset, data)
    # Rank 0 first, so that it alone builds the dataset cache; the others then
    # map the finished files (run_all ends with a collective, i.e. a barrier).
    # "digits" comes from scikit-learn with no cache to build: all load at once.
    loaded_by_root = None
    if config.dataset != "digits":
        loaded_by_root = run_on_root(comm, lambda: load_job_dataset(config))
    return run_all(comm, lambda: loaded_by_root or load_job_dataset(config))


def _with_text_record(config: TrainConfig, dataset: Dataset) -> TrainConfig:
    """The job with what it trains on recorded (so config.toml and the checkpoint say it): a
    text's fingerprint, and its vocabulary in a ``gpt`` model that gives none.

    A job file that recorded another text (a run's config.toml, reused after its text
    changed) trains on the text as it is now: a vocab that was the recorded text's is
    taken from this one. (Resuming on a changed text is refused when the checkpoint is
    compared.)"""
    changes: dict[str, Any] = {}
    fingerprint = dataset.fingerprint if isinstance(dataset, TextDataset) else None
    if fingerprint != config.text_fingerprint:
        changes["text_fingerprint"] = fingerprint
    gpt = (config.model or {}).get("gpt")
    if gpt is None:
        return dataclasses.replace(config, **changes) if changes else config
    if not isinstance(dataset, TextDataset):
        if gpt.get("vocab") is None:
            raise ValueError(f"model.gpt: missing vocab, and dataset {config.dataset!r} is not a text to take it "
                             f"from; give vocab, or use dataset = \"text\" or \"text:PATH\"")
    elif gpt.get("vocab") is None or _vocab_of_another_text(gpt["vocab"], config.text_fingerprint, fingerprint):
        changes["model"] = {"gpt": {**gpt, "vocab": dataset.n_classes}}
    elif gpt["vocab"] < dataset.n_classes:
        raise ValueError(f"model.gpt: vocab = {gpt['vocab']}, fewer than the {dataset.n_classes} characters of the "
                         f"text of dataset {config.dataset!r}; give vocab = {dataset.n_classes}, or leave it out "
                         f"to take it from the text")
    return dataclasses.replace(config, **changes) if changes else config


def _vocab_of_another_text(vocab: int, recorded: dict[str, str] | None, fingerprint: dict[str, str]) -> bool:
    """Whether ``vocab`` is the size of a recorded text that is not this one (so it was taken from that text)."""
    return recorded is not None and recorded != fingerprint and vocab == len(recorded["chars"])


def _text_change_note(recorded: TrainConfig, config: TrainConfig) -> list[str]:
    """A note when the job file recorded another text than the one this job trains on."""
    if recorded.text_fingerprint is None or config.text_fingerprint is None:
        return []
    difference = fingerprint_difference(recorded.text_fingerprint, config.text_fingerprint)
    if difference is None:
        return []
    vocab = ((config.model or {}).get("gpt") or {}).get("vocab")
    return [f"the text of dataset {config.dataset!r} differs from the one the job file recorded ({difference}): "
            f"training on it as it is now" + (f", with a vocab of {vocab}" if vocab is not None else "")]


def _sampler(config: TrainConfig, dataset: Dataset, comm: Communicator) -> Any:
    """The global batches: a shuffle of the samples each epoch, or for a text, windows drawn
    at random (one per character would make an epoch too long to shuffle)."""
    if isinstance(dataset, TextDataset):
        return DrawnBatchSampler(len(dataset.train), config.batch_size, text_epoch_steps(config),
                                 rank=comm.rank, world_size=comm.size, seed=config.seed)
    if config.steps_per_epoch is not None:
        raise ValueError(f"steps_per_epoch: applies to text data, whose windows are drawn at random; an epoch of "
                         f"{dataset.name} is one pass over its {len(dataset.train)} samples")
    return GlobalBatchSampler(len(dataset.train), config.batch_size, rank=comm.rank, world_size=comm.size,
                              seed=config.seed, drop_last=config.drop_last)


def _choose_task(config: TrainConfig, net: SequentialLayers, dataset: Dataset) -> Task:
    for split in (dataset.train, dataset.test):
        split.check_dtype(config.dtype)  # values the training dtype cannot hold, named
    # The MLP shorthand's first width says the features it expects: name it.
    widths = config.layers or list(DEFAULT_LAYERS)
    if config.model is None and dataset.n_features != widths[0]:
        default = "" if config.layers else f" (the default MLP {','.join(map(str, widths))})"
        raise ValueError(f"layers: the first width must equal the dataset's {dataset.n_features} features "
                         f"per sample ({dataset.name}), got layers[0] = {widths[0]}{default}")
    return choose_task(net, dataset, config.dtype)
