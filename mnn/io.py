"""Files that are replaced whole or not at all, and dicts of arrays stored as .npz without pickle.

Everything mnn writes to disk goes through :func:`atomic_write`: checkpoints,
the final model, the run's config and summary (written by rank 0), and the
dataset cache (written by every rank that finds it missing, possibly at the
same moment). Usage::

    from mnn.io import atomic_write_text, load_arrays, save_arrays
    save_arrays("runs/a/model.npz", net.state_dict())
    state = load_arrays("runs/a/model.npz")      # ValueError naming the file if unreadable
    atomic_write_text("runs/a/summary.json", text)

The bytes go to a temporary file with a name of its own in the target's
directory; it is flushed and fsynced, renamed over the target with
``os.replace`` and the directory is fsynced. Readers, and a crash at any point,
see the old file or the new one, never a torn one. Because each writer has its
own temporary file, several processes may write the same path at once: each
rename puts one complete file in place and the last one wins. A process killed
mid-write leaves its hidden ``.NAME.*.tmp`` file behind; nothing reads it, and
it cannot be told apart from another writer's live one, so it is not removed
automatically.

Pure Python and NumPy; nothing here knows about ranks.
"""
from __future__ import annotations

import os
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "save_arrays", "load_arrays"]

_MEMBER_SUFFIX = ".npy"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` so that readers (and crashes) see the old or the new file, whole.

    ``write(handle)`` fills a temporary file next to ``path``, opened for binary
    writing; it is then flushed, fsynced and renamed over ``path``, and the
    directory entry is fsynced. If ``write`` (or anything after it) raises, the
    temporary file is removed and ``path`` is untouched. Safe for several
    processes writing the same path at once.
    """
    path = Path(path)
    # A name of its own per call, never a fixed one: two writers sharing a
    # temporary file would interleave their bytes. Opened with "x" (O_EXCL), and
    # created with the usual permissions (umask applies), unlike tempfile.mkstemp's 0600.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text (config.toml, summary.json, cache metadata)."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write a dict of arrays as an uncompressed .npz.

    Written member by member rather than through ``np.savez(file, **arrays)``, whose
    keyword arguments would swallow keys named ``file`` or ``allow_pickle``, and
    with pickling refused (ValueError for object arrays, nothing written), so
    every file written here loads with :func:`load_arrays`.
    """
    def write(handle: BinaryIO) -> None:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(name + _MEMBER_SUFFIX, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

    atomic_write(path, write)


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file (stored or compressed), refusing pickled objects.

    Raises ValueError naming the file when it does not exist, is not a zip
    archive, is cut short or corrupt, or holds a member that is not a .npy array
    or that would need pickle (an object array).
    """
    path = Path(path)
    # The archive is opened as a zip and each member read as .npy, the mirror of
    # save_arrays: np.load would guess the format from the first bytes and hand
    # back a bare array for a .npy file that merely carries an .npz name.
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {}
            for info in archive.infolist():
                name = _array_name(path, info.filename)
                arrays[name] = _read_member(path, archive, info)
            return arrays
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        # What zipfile raises for a file that is not a zip or is cut short.
        raise ValueError(f"{str(path)!r} is not a readable .npz file: {error}") from None


def _array_name(path: Path, member_name: str) -> str:
    if not member_name.endswith(_MEMBER_SUFFIX):
        raise ValueError(f"{str(path)!r} is not a readable .npz file: member {member_name!r} "
                         f"is not a {_MEMBER_SUFFIX} array")
    return member_name[:-len(_MEMBER_SUFFIX)]


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    try:
        with archive.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        # A bad header, data cut short, a CRC mismatch, or an object array.
        raise ValueError(f"{str(path)!r} is not a readable .npz file: member {info.filename!r}: "
                         f"{error}") from None
