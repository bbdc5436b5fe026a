"""TensorBoard event files of a run's curves, written by mnn itself (no package needed).

``tensorboard --logdir runs`` shows each run directory that holds an event file
as one run, named by its folder. Rank 0's :class:`~mnn.distributed.training.reporting.Reporter`
writes one file per start of the job into OUTPUT, beside metrics.jsonl, with the
scalars of the curves that ``mnn-plot`` draws (:data:`SCALAR_TAGS`), against the
global step. Each event is appended and the file closed at once, as metrics.jsonl
is: nothing waits in a buffer, so Ctrl-C, an error or a killed job loses nothing
that metrics.jsonl kept.

The format is small enough to write here rather than pull in a writer package
(and what it imports). A file is a sequence of TFRecords, each

    uint64 length | uint32 masked CRC-32C of the length | data | uint32 masked CRC-32C of the data

(integers little-endian; the mask is ``rotate_right(crc, 15) + 0xa282ead8``), and each
record's data is a protocol-buffer ``Event`` (tensorflow/core/util/event.proto):
``wall_time`` (field 1, double), ``step`` (2, int64), ``file_version`` (3, string, the
first event: "brain.Event:2"), ``summary`` (5: repeated ``Value`` (1): ``tag`` (1,
string), ``simple_value`` (2, float)) and ``session_log`` (7: ``status`` (1), START = 1).

A resumed run (or a restart) starts its file with a SessionLog START at the step after
its checkpoint: TensorBoard then drops the points of earlier files from that step on
(the steps trained again), so each step is shown once, as metrics.jsonl tells it. A
run that starts afresh removes the event files of an earlier run in OUTPUT (as it
empties metrics.jsonl); one whose checkpoints are set aside takes them into previous/.
"""
from __future__ import annotations

import importlib.util
import math
import socket
import struct
import time
from pathlib import Path
from typing import Any, Iterable

__all__ = ["EVENT_FILE_MARK", "SCALAR_TAGS", "EventFile", "event_files", "event_files_wanted", "scalars_of",
           "tensorboard_installed"]

# TensorBoard reads the files whose name holds this.
EVENT_FILE_MARK = "tfevents"
#: metrics.jsonl's event and key -> the TensorBoard tag of its scalar: mnn-plot's panels
#: (the training loss, the evaluation metric, the throughput) and the learning rate.
SCALAR_TAGS = {
    "train": {"loss": "train/loss", "samples_per_s": "train/samples_per_s", "lr": "train/lr"},
    "eval": {"test_loss": "test/loss", "test_accuracy": "test/accuracy", "test_bits_per_char": "test/bits_per_char"},
}


def tensorboard_installed() -> bool:
    """Whether the ``tensorboard`` package (the extra ``tensorboard``) can be imported here
    (looked up, not imported)."""
    return importlib.util.find_spec("tensorboard") is not None


def event_files_wanted(choice: bool | None) -> bool:
    """The ``tensorboard`` setting: true or false as given; None (the default) writes event
    files where TensorBoard is installed."""
    return tensorboard_installed() if choice is None else choice


def event_files(directory: Path) -> list[Path]:
    """The TensorBoard event files directly in ``directory``, oldest first (by name)."""
    return sorted(path for path in directory.glob(f"events.out.{EVENT_FILE_MARK}.*") if path.is_file())


class EventFile:
    """One event file in ``directory``, begun with its file version and, when
    ``purge_step`` is given, a SessionLog START at that step. Its name,
    ``events.out.tfevents.<seconds>.<microseconds>.<host>``, sorts after the files of
    earlier starts, which is the order TensorBoard reads them in."""

    def __init__(self, directory: Path, purge_step: int | None = None):
        now = time.time()
        self.path = directory / f"events.out.{EVENT_FILE_MARK}.{now:017.6f}.{socket.gethostname()}"
        first = _event(now, purge_step or 0, _string_field(3, b"brain.Event:2"))
        if purge_step is not None:
            first += _event(now, purge_step, _message_field(7, _varint_field(1, 1)))  # SessionLog START
        self._append(first, mode="xb")

    def add_scalars(self, step: int, values: dict[str, Any]) -> None:
        """One event of the finite numbers of ``values`` ({tag: value}) at ``step``; none
        when there is none (a null in metrics.jsonl, as mnn-plot leaves it out)."""
        summary = b"".join(_message_field(1, _string_field(1, tag.encode()) + _float_field(2, value))
                           for tag, value in values.items() if _finite(value))
        if summary:
            self._append(_event(time.time(), step, _message_field(5, summary)))

    def _append(self, records: bytes, mode: str = "ab") -> None:
        with self.path.open(mode) as handle:
            handle.write(records)


def scalars_of(event: dict[str, Any]) -> dict[str, Any]:
    """The TensorBoard scalars ({tag: value}) of a metrics.jsonl event (none for most kinds)."""
    return {tag: event[key] for key, tag in SCALAR_TAGS.get(event.get("event"), {}).items() if key in event}


# -- the encoding ------------------------------------------------------------------------------

def _event(wall_time: float, step: int, *fields: bytes) -> bytes:
    """The TFRecord of an Event: its wall time, step and ``fields`` (encoded)."""
    return _record(struct.pack("<Bd", 1 << 3 | 1, wall_time) + _varint_field(2, step) + b"".join(fields))


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _varint(value: int) -> bytes:
    """Base-128, least significant group first, the high bit set on every byte but the last."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)  # wire type 0


def _string_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data  # wire type 2: length-delimited


_message_field = _string_field  # an embedded message is length-delimited too


def _float_field(number: int, value: float) -> bytes:
    if abs(value) > _FLOAT32_MAX:
        value = math.copysign(math.inf, value)  # a diverging loss beyond float32 is shown as infinite
    return _varint(number << 3 | 5) + struct.pack("<f", value)  # wire type 5: 32 bits


_FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]  # simple_value is a 32-bit float


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _crc_table(polynomial: int) -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = crc >> 1 ^ (polynomial if crc & 1 else 0)
        table.append(crc)
    return table


# CRC-32C (Castagnoli), bit-reflected: the checksum TFRecords carry.
_CRC32C_TABLE = _crc_table(0x82F63B78)


def _crc32c(data: Iterable[int]) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = crc >> 8 ^ _CRC32C_TABLE[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF
