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
mid-write leaves its hidden ``.NAME.<32 hex digits>.tmp`` file behind; nothing
reads it, and it cannot be told apart from another writer's live one, so it is
removed only when asked, by :func:`clean_stale_temporaries`, which a caller may
use when it knows that no writer is live (the trainer, holding its output
directory's lock, at start).

Reading never trusts the file: :func:`load_arrays` parses each ``.npy`` member's
header itself (``ast.literal_eval`` of the dict, never the Python 2 fallback of
``numpy.lib.format`` that raises ``tokenize.TokenError``), checks the size the
header claims against the bytes the member holds before reading any data (a
header claiming shape ``(10**12,)`` costs nothing), refuses object arrays
(pickle), and reports every failure as a ValueError naming the file, the member
and what is wrong.

Pure Python and NumPy; nothing here knows about ranks.
"""
from __future__ import annotations

import ast
import math
import os
import re
import shutil
import struct
import sys
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "atomic_copy", "clean_stale_temporaries", "save_arrays",
           "load_arrays", "unusable_path"]

_MEMBER_SUFFIX = ".npy"
# What atomic_write names its temporary files: ".NAME.<uuid4 hex>.tmp".
_TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")

# The .npy format (numpy.lib.format): the magic string, a major and a minor
# version byte, the header's length (2 bytes in version 1, 4 in versions 2 and
# 3, little-endian), then the header, the text of a dict literal with the keys
# "descr", "fortran_order" and "shape", and then the array's bytes.
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_LENGTH = {1: "<H", 2: "<I", 3: "<I"}
_NPY_HEADER_ENCODING = {1: "latin1", 2: "latin1", 3: "utf8"}
_NPY_HEADER_KEYS = {"descr", "fortran_order", "shape"}
# NumPy's own limit for headers of files it does not trust.
_MAX_HEADER_BYTES = 10_000
# Array data is read in pieces of this size (numpy's own: small enough to stay in cache).
_READ_CHUNK_BYTES = 1 << 18


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
    temporary = _temporary_name(path)
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


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


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


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Atomically make ``path`` hold the bytes of ``source`` (replacing ``path`` if it exists).

    A hard link when the file system has them, so no byte is copied; a copy
    through :func:`atomic_write` otherwise. The two are the same for files that
    are only ever replaced whole (everything written here), never changed in place.
    """
    source, path = Path(source), Path(path)
    temporary = _temporary_name(path)
    try:
        os.link(source, temporary)
    except OSError:
        # No hard links here (FAT, some network file systems), or source is missing:
        # copying raises the clear error for the latter.
        def copy(handle: BinaryIO) -> None:
            with open(source, "rb") as original:
                shutil.copyfileobj(original, handle)
        atomic_write(path, copy)
        return
    try:
        os.replace(temporary, path)
    finally:
        # Gone after a rename, but rename does nothing (and succeeds) when path
        # already is a link to the same file: then the new link is left over.
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def unusable_path(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot name a file at all (a name too long, a loop of links), as the
    system says it; None for a path that is there, or not there yet (or below a file),
    which whoever makes it checks with a message of its own."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        return error.strerror or str(error)
    return None


def clean_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writers killed inside :func:`atomic_write` left in ``directory``.

    Those are the hidden ``.NAME.<32 hex digits>.tmp`` files; nothing else is
    touched. Call it only when no process can be writing into ``directory``
    (e.g. while holding a lock on it): a live writer's temporary file looks the
    same. Returns the paths removed, sorted; a missing directory holds none.
    """
    directory = Path(directory)
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if _TEMPORARY_NAME.fullmatch(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


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


def load_arrays(path: str | os.PathLike, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Every array of an .npz file (stored or compressed), refusing pickled objects.

    With ``names``, only those arrays are read (the others are neither read nor
    checked), and a missing one is an error. Raises ValueError naming the file
    (and the member, when one is at fault) when it does not exist, is not a zip
    archive, is cut short or corrupt, holds a member that is not a .npy array,
    whose header is damaged or claims more or fewer bytes than the member
    holds, or that would need pickle (an object array). No failure allocates
    more memory than the file's own bytes.
    """
    path = Path(path)
    # A pipe would block the open until a writer comes, and a device has no end: only
    # a regular file (or a link to one) can be an archive.
    if path.exists() and not path.is_file() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a regular file (a pipe, socket or device), so not an .npz file")
    # The archive is opened as a zip and each member read as .npy, the mirror of
    # save_arrays: np.load would guess the format from the first bytes and hand
    # back a bare array for a .npy file that merely carries an .npz name.
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist") from None
    # zipfile and the decompressors behind it raise a dozen types for damaged
    # input (BadZipFile, EOFError, OSError, zlib.error, NotImplementedError for a
    # flipped version or method field, RuntimeError, struct.error, ...); each
    # means the same: this file cannot be read.
    except Exception as error:
        raise ValueError(f"{str(path)!r} is not a readable .npz file: {_zip_problem(error)}") from None
    with archive:
        # No member can hold more bytes than the file, unless it is compressed.
        room = os.path.getsize(path)
        members = {}
        for info in archive.infolist():
            name = _array_name(path, info.filename)
            if name in members:
                raise ValueError(f"{str(path)!r} is not a readable .npz file: member {info.filename!r} "
                                 f"appears twice")
            members[name] = info
        if names is not None:
            missing = [name for name in names if name not in members]
            if missing:
                raise ValueError(f"{str(path)!r} has no array named {', '.join(map(repr, missing))}")
            members = {name: members[name] for name in names}
        return {name: _read_member(path, archive, info, room) for name, info in members.items()}


def _zip_problem(error: Exception) -> str:
    if isinstance(error, NotImplementedError):
        return f"it needs a zip feature that is not supported ({error}), or that field is damaged"
    if isinstance(error, zipfile.BadZipFile):
        return str(error)
    return f"it is cut short or damaged ({type(error).__name__}: {error})"


def _array_name(path: Path, member_name: str) -> str:
    if not member_name.endswith(_MEMBER_SUFFIX):
        raise ValueError(f"{str(path)!r} is not a readable .npz file: member {member_name!r} "
                         f"is not a {_MEMBER_SUFFIX} array")
    return member_name[:-len(_MEMBER_SUFFIX)]


class _BadArray(Exception):
    """What is wrong with one .npy member; load_arrays adds the file and member."""


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, room: int) -> np.ndarray:
    try:
        with archive.open(info) as member:
            return _read_npy(member, info.file_size, room)
    except _BadArray as error:
        problem = str(error)
    except Exception as error:  # what zipfile raises for this member: see load_arrays
        problem = _zip_problem(error)
    raise ValueError(f"{str(path)!r} is not a readable .npz file: member {info.filename!r}: {problem}")


def _read_npy(member: BinaryIO, size: int, room: int) -> np.ndarray:
    """The array in ``member``, a .npy file of ``size`` bytes (as its zip entry says) in a
    file of ``room`` bytes; _BadArray saying what is wrong.

    Read the way ``numpy.lib.format.read_array`` does, with what it leaves out
    for untrusted files: every header error is one kind of error, and the size
    the header claims is checked against ``size`` before any data is read.
    """
    magic = _read_exactly(member, len(_NPY_MAGIC) + 2, "its .npy magic string and version")
    if magic[:len(_NPY_MAGIC)] != _NPY_MAGIC:
        raise _BadArray(f"it is not a .npy array: it starts with {magic[:len(_NPY_MAGIC)]!r}, "
                        f"not {_NPY_MAGIC!r}")
    major, minor = magic[-2], magic[-1]
    if major not in _NPY_HEADER_LENGTH or minor != 0:
        raise _BadArray(f"its .npy format version {major}.{minor} is not one of 1.0, 2.0, 3.0")
    length_format = _NPY_HEADER_LENGTH[major]
    header_length, = struct.unpack(length_format, _read_exactly(
        member, struct.calcsize(length_format), "the length of its .npy header"))
    if header_length > _MAX_HEADER_BYTES:
        raise _BadArray(f"its .npy header claims {header_length} bytes, more than the {_MAX_HEADER_BYTES} "
                        f"a .npy header may have")
    raw_header = _read_exactly(member, header_length, "its .npy header")
    shape, fortran_order, dtype = _parse_header(raw_header, _NPY_HEADER_ENCODING[major])
    data_bytes = size - len(magic) - struct.calcsize(length_format) - header_length

    count = math.prod(shape)  # Python ints: no overflow, whatever the header says
    claimed = count * dtype.itemsize
    if claimed != data_bytes:
        raise _BadArray(f"its .npy header claims shape {shape} of {dtype} = {claimed} bytes of data, "
                        f"but the member holds {data_bytes}")
    if count > sys.maxsize:
        raise _BadArray(f"its .npy header claims shape {shape}: {count} elements, more than NumPy can index")
    # np.ndarray, not np.empty, for no data: np.empty widens a zero-width string dtype ("S0").
    array = np.ndarray(count, dtype=dtype) if claimed == 0 else _read_data(member, claimed, room).view(dtype)
    if fortran_order:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def _read_data(member: BinaryIO, claimed: int, room: int) -> np.ndarray:
    """The next ``claimed`` bytes of ``member`` as a writable uint8 array."""
    if claimed <= room:
        # Allocated at once: the zip entry's size agrees with the header, and the file can hold it.
        data, filled = np.empty(claimed, dtype=np.uint8), 0
        while filled < claimed:
            chunk = member.read(min(_READ_CHUNK_BYTES, claimed - filled))
            if not chunk:
                break
            data[filled:filled + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            filled += len(chunk)
    else:
        # More than the whole file: a compressed member, or one whose zip entry
        # lies. Memory follows the bytes that really come out of it.
        grown = bytearray()
        while len(grown) < claimed:
            chunk = member.read(min(_READ_CHUNK_BYTES, claimed - len(grown)))
            if not chunk:
                break
            grown += chunk
        data, filled = np.frombuffer(grown, dtype=np.uint8), len(grown)
    if filled < claimed:
        raise _BadArray(f"it is cut short: {filled} of its {claimed} bytes of array data")
    return data


def _read_exactly(member: BinaryIO, size: int, what: str) -> bytes:
    data = member.read(size)
    if len(data) != size:
        raise _BadArray(f"it is cut short: {what} needs {size} bytes, found {len(data)}")
    return data


def _parse_header(raw_header: bytes, encoding: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        text = raw_header.decode(encoding)
    except UnicodeDecodeError as error:
        raise _BadArray(f"its .npy header is not {encoding} text: {error}") from None
    if not text.strip():
        raise _BadArray(f"its .npy header is empty ({len(raw_header)} bytes of blanks)")
    shown = text.strip() if len(text) <= 200 else text[:200] + "..."
    # literal_eval on damaged text raises SyntaxError, ValueError, TypeError,
    # MemoryError or RecursionError alike; each means the header is unreadable.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "invalid escape sequence" in a damaged header
            header = ast.literal_eval(text)
    except Exception as error:
        raise _BadArray(f"its .npy header is not a Python dict literal "
                        f"({type(error).__name__}: {error}): {shown!r}") from None
    if not isinstance(header, dict) or set(header) != _NPY_HEADER_KEYS:
        raise _BadArray(f"its .npy header is not a dict with the keys descr, fortran_order and shape: "
                        f"{shown!r}")
    shape = header["shape"]
    if not (isinstance(shape, tuple)
            and all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape)):
        raise _BadArray(f"its .npy header has shape {shape!r}, not a tuple of non-negative integers")
    if not isinstance(header["fortran_order"], bool):
        raise _BadArray(f"its .npy header has fortran_order {header['fortran_order']!r}, not True or False")
    # descr_to_dtype takes apart whatever nesting the text holds and raises
    # TypeError, ValueError, KeyError or IndexError for a wrong one.
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except Exception as error:
        raise _BadArray(f"its .npy header has descr {header['descr']!r}, not a NumPy dtype "
                        f"({type(error).__name__}: {error})") from None
    if dtype.subdtype is not None:
        # numpy stores an array of such a dtype with the subarray's axes in its shape.
        raise _BadArray(f"its .npy header has descr {header['descr']!r}, a subarray dtype, which no saved "
                        f"array has")
    if dtype.hasobject:
        raise _BadArray(f"it holds Python objects (dtype {dtype}), which only pickle can read: refused, "
                        f"as with allow_pickle=False")
    return shape, header["fortran_order"], dtype
