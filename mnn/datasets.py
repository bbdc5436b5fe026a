r"""Datasets for mnn: scikit-learn's digits, MNIST-format IDX files and .npz files.

Pure NumPy; nothing here knows about ranks. Usage::

    from mnn.datasets import load_dataset
    data = load_dataset("digits")            # or "path/to/mnist_dir", or "path/to/data.npz"
    data.check_classes(10)                   # ValueError if a label is outside [0, 10)
    x, y = data.train.batch(np.arange(64))   # standardised float32 (64, n_features), int64 (64,)

Three kinds of spec are understood by :func:`load_dataset`:

``"digits"``
    scikit-learn's 8x8 handwritten digits (1797 samples, 64 features, 10 classes),
    shipped inside scikit-learn, so no network is needed. The split is fixed and
    needs no random numbers: every fifth sample (index 4, 9, 14, ...) is a test
    sample, which gives 1438 training and 359 test samples with the classes
    spread evenly over both.

a directory of IDX files
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
    gzipped (``.gz``), as MNIST and Fashion-MNIST are distributed.

a ``.npz`` file
    holding ``x_train, y_train, x_test, y_test``; read without pickle by
    :func:`mnn.io.load_arrays`, so a cut-short, corrupt or non-zip file is a
    ValueError naming it.
    ``x`` is 2-D ``(N, features)`` or 3-D ``(N, height, width)``; ``y`` holds
    non-negative integer labels (floats are accepted only when every value is whole).

IDX and .npz data are converted once into plain ``.npy`` files in a cache folder
(by default ``.cache`` beside the data; ``cache_dir`` chooses another) and then
opened with ``np.load(..., mmap_mode="r")``: every rank on a host maps the same
pages instead of holding its own copy. Each cache file is written with
:func:`mnn.io.atomic_write` (a temporary file of its own, fsynced and renamed
into place), so ranks that build the cache at the same moment never see a
half-written file (they write identical bytes, and the last rename wins). A
small JSON file beside the arrays records each source file's size and
modification time; when either changes the cache is rebuilt. When the cache
folder cannot be written the data is parsed into memory instead, with a warning.

Scaling. Each feature is standardised, :math:`\hat x_j = (x_j - \mu_j) / \sigma_j`,
with the mean and standard deviation of the *training* split only, so nothing
about the test set leaks into training. Each feature's scale is its own: a
feature on a scale of 1e6 beside pixels of 0 to 16 changes nothing about the
pixels. Only a feature that is constant in the training data is left unscaled,
:math:`\sigma_j = 1` (it is centred, and would otherwise divide by zero); a
feature counts as constant when

.. math:: \sigma_j \le \epsilon_c \, s_j,

with :math:`s_j` the power of two at least :math:`\max_i |x_{ij}|` (see Large
values below), so that the test depends on the feature alone, and
:math:`\epsilon_c` = ``CONSTANT_RELATIVE_STD`` (:math:`2^{-32}`, about 2e-10):
above the standard deviation that rounding alone leaves in the statistics of
equal values, and far below any variation a float32 batch can carry (whose
precision is :math:`2^{-24}` of the value). (An earlier rule floored every
:math:`\sigma_j` at 1 % of the largest one, so that one feature of 1e6 made
all the others constant, and training on them learned nothing.)

Large values. The statistics never square a raw value: each feature is first
divided by a power of two at least its largest magnitude (exact, so ordinary
data gets the very same statistics), the chunks' means and sums of squares are
merged on values in [-1, 1], and the result is scaled back. A feature of 1e200
thus gets the statistics of the same feature at 1e10, scaled by 1e190. Only a
feature whose values span more than float64 can hold (below -9e307 and above
9e307 at once) cannot be standardised; loading rejects it with a message naming
the feature.

:meth:`Split.batch` standardises in the training dtype when every value fits
(the usual case, and the fast one); when a raw value, its difference from the
mean or the result would overflow that dtype (1e200 for float32, or 3e38 minus
-3e38), it redoes the batch in float64 and clips the standardised values to the
dtype's finite range, so a batch is always finite. Only test samples lie so far
from the training mean that the clip changes them. Data used as it is (arrays
given to :meth:`Dataset.from_arrays`) is never clipped: a value beyond the
dtype's range is a ValueError (:meth:`Split.check_dtype`).

Empty splits. A split with no samples, or samples with no features, is a
ValueError naming the source and the split when the dataset is loaded.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mnn.checks import is_int
from mnn.io import atomic_write, atomic_write_text, load_arrays

__all__ = [
    "Dataset",
    "Split",
    "load_dataset",
    "cached_arrays",
    "read_idx",
    "IDX_FILES",
    "CONSTANT_RELATIVE_STD",
    "DIGITS_TEST_EVERY",
]

#: IDX file names in an MNIST-format directory, by role; each may end in ``.gz``.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

#: A feature whose standard deviation is at most this fraction of its magnitude is constant (left unscaled).
CONSTANT_RELATIVE_STD = 2.0 ** -32

#: In "digits", sample i is a test sample when i % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1.
DIGITS_TEST_EVERY = 5

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# How messages name the splits.
_SPLIT_WORDS = {"train": "training", "test": "test"}
# Magic numbers of the two IDX kinds we read: unsigned bytes, 1-D labels and 3-D images.
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}
_IDX_UBYTE = 0x08
# Bump when the layout or meaning of the cached arrays changes, so old caches are rebuilt
# (2: each feature's std is its own, not floored by the largest one's).
_CACHE_FORMAT = 2
# Rows per chunk when computing statistics over a memory-mapped training split.
_STATS_CHUNK_ROWS = 4096


class Split:
    """One part of a dataset (train or test): raw features, labels or targets, and the scaling.

    ``x`` is ``(N, ...)`` as stored (``(N, n_features)`` for loaded datasets; a
    read-only memmap for cached data). ``y`` is ``(N,)`` int64 class labels, or
    float targets ``(N, ...)`` for regression. ``mean`` and ``std`` are the
    training split's per-feature statistics, applied by :meth:`batch`, or None
    for data used as it is. ``source`` names where the data came from, for messages.
    """

    def __init__(self, name: str, x: np.ndarray, y: np.ndarray, mean: np.ndarray | None,
                 std: np.ndarray | None, source: str):
        assert x.ndim >= 2 and len(x) == len(y), (x.shape, y.shape)
        assert (mean is None) == (std is None), "scaling needs both mean and std"
        assert mean is None or mean.shape == std.shape == x.shape[1:], (mean.shape, std.shape, x.shape)
        self.name = name
        self.x = x
        self.y = y
        self.mean = mean
        self.std = std
        self.source = source
        # Per training dtype: the mean and std in it, or None when they do not fit in it.
        self._scaling_by_dtype: dict[np.dtype, tuple[np.ndarray, np.ndarray] | None] = {}
        self._fits: set[np.dtype] = set()

    @property
    def has_labels(self) -> bool:
        """Whether ``y`` holds class labels (integers) rather than regression targets."""
        return self.y.dtype.kind in "iu"

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return (f"Split({self.name!r}, samples={len(self)}, sample shape={self.x.shape[1:]}, "
                f"source={self.source!r})")

    def batch(self, indices, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``indices`` (1-D integers, any order) as ``(x, y)``: ``x`` standardised
        (when the split has a scaling) in ``dtype``, ``y`` int64 labels or targets in ``dtype``.

        Only the requested rows are read, so a memory-mapped split stays cheap.
        Standardised values are always finite (see the module docstring);
        data used as it is must fit in ``dtype`` (:meth:`check_dtype`).
        """
        indices = np.asarray(indices)
        if indices.size == 0:
            indices = indices.astype(np.int64)
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise TypeError(f"{self.name} split: batch indices must be a 1-D integer array, "
                            f"got shape {indices.shape} of dtype {indices.dtype}")
        dtype = self.check_dtype(dtype)
        if self.mean is None:
            rows = np.asarray(self.x[indices], dtype=dtype)
        else:
            rows = self._standardised(indices, dtype)
        return rows, np.asarray(self.y[indices], dtype=np.int64 if self.has_labels else dtype)

    def check_dtype(self, dtype) -> np.dtype:
        """``dtype`` as a NumPy dtype if batches of this split can be given in it: a
        floating type (TypeError otherwise) and, for data used as it is, one whose range
        holds every value of ``x`` and of float targets (ValueError otherwise).

        The values are looked at once per dtype: call it before training to fail
        there rather than at the first batch that holds such a value.
        """
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"{self.name} split: batch dtype must be a floating type, got {dtype}")
        if self.mean is None and dtype not in self._fits:
            arrays = {"x": self.x, "y": self.y} if not self.has_labels else {"x": self.x}
            for key, array in arrays.items():
                # A dtype that holds every value of array.dtype needs no look (uint8 in float32).
                if len(array) and not np.can_cast(array.dtype, dtype):
                    largest, limit = max(float(array.max()), -float(array.min())), float(np.finfo(dtype).max)
                    if largest > limit:
                        raise ValueError(
                            f"{self.name} split ({self.source}): {key} holds values up to {largest:.3g} in "
                            f"magnitude, beyond {dtype}'s range ({limit:.3g}); the data is used as given, "
                            f"without standardisation: rescale it or train in float64")
            self._fits.add(dtype)
        return dtype

    def _standardised(self, indices: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Rows ``indices`` standardised in ``dtype``: computed in ``dtype`` when nothing
        overflows it, else in float64 and clipped to ``dtype``'s finite range."""
        scaling = self._scaling_in(dtype)
        if scaling is not None:
            mean, std = scaling
            with np.errstate(over="raise"):
                try:
                    rows = np.asarray(self.x[indices], dtype=dtype)
                    rows -= mean
                    rows /= std
                    return rows
                except FloatingPointError:
                    pass  # a value, a difference or a quotient beyond dtype's range: redo it wider
        wide = np.promote_types(dtype, np.float64)
        # Overflow to inf is expected here (a test value far outside the training
        # range); the clip turns it into the largest finite value.
        with np.errstate(over="ignore"):
            rows = np.asarray(self.x[indices], dtype=wide) - self.mean
            rows /= self.std
        limit = np.finfo(dtype).max
        np.clip(rows, -limit, limit, out=rows)
        return rows.astype(dtype)

    def _scaling_in(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray] | None:
        if dtype not in self._scaling_by_dtype:
            with np.errstate(over="raise", under="ignore"):
                try:
                    mean, std = self.mean.astype(dtype), self.std.astype(dtype)
                except FloatingPointError:
                    mean, std = None, None
            # A std that rounds to 0 in dtype would divide by zero.
            fits = std is not None and bool((std > 0).all())
            self._scaling_by_dtype[dtype] = (mean, std) if fits else None
        return self._scaling_by_dtype[dtype]


@dataclass(frozen=True)
class Dataset:
    """A train and a test :class:`Split` sharing the training split's scaling.

    ``n_classes`` is one more than the largest label, or None for regression targets.
    """

    name: str
    train: Split
    test: Split
    n_features: int
    n_classes: int | None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample's features: ``(n_features,)`` for loaded datasets."""
        return tuple(self.train.x.shape[1:])

    @classmethod
    def from_arrays(cls, x_train, y_train, x_test, y_test, name: str = "arrays") -> Dataset:
        """A dataset of a user's own arrays, used as they are (no standardisation).

        ``x`` is ``(N, ...)``, any per-sample shape, the same for both splits.
        ``y`` is ``(N,)`` integer class labels (``>= 0``), or floating targets
        ``(N, ...)`` for regression (the same kind in both splits). Arrays are
        not copied when they already are NumPy arrays.
        """
        arrays = {}
        for key, value in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test)):
            array = np.asarray(value)
            if array.dtype.kind not in "iuf":
                raise TypeError(f"{name}: {key} must hold numbers, got dtype {array.dtype}")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ValueError(f"{name}: {key} holds NaN or infinite values")
            if array.ndim < (2 if key.startswith("x") else 1):
                raise ValueError(f"{name}: {key} must have a first axis of samples"
                                 f"{' and features' if key.startswith('x') else ''}, got shape {array.shape}")
            if key.startswith("x") and math.prod(array.shape[1:]) == 0:
                raise ValueError(f"{name}: the samples of {key} have no features (shape {array.shape})")
            arrays[key] = array
        for part in ("train", "test"):
            x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
            if len(x) != len(y):
                raise ValueError(f"{name}: x_{part} has {len(x)} samples but y_{part} has {len(y)}")
        if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
            raise ValueError(f"{name}: x_train has samples of shape {arrays['x_train'].shape[1:]} but x_test "
                             f"{arrays['x_test'].shape[1:]}")
        kinds = {key: "labels" if arrays[key].dtype.kind in "iu" else "targets" for key in ("y_train", "y_test")}
        if kinds["y_train"] != kinds["y_test"]:
            raise ValueError(f"{name}: y_train holds {kinds['y_train']} ({arrays['y_train'].dtype}) but y_test "
                             f"{kinds['y_test']} ({arrays['y_test'].dtype}): integers are class labels, "
                             f"floats regression targets")
        if kinds["y_train"] == "labels":
            for key in ("y_train", "y_test"):
                arrays[key] = _checked_labels(name, key, arrays[key])
        sources = {"train": f"{name} x_train/y_train", "test": f"{name} x_test/y_test"}
        return _assemble(name, {**arrays, "mean": None, "std": None}, sources)

    def check_classes(self, n_classes: int) -> None:
        """Raise ValueError unless every label of both splits lies in ``[0, n_classes)``."""
        if not is_int(n_classes) or n_classes < 1:
            raise ValueError(f"check_classes: n_classes must be a positive integer, got {n_classes!r}")
        if self.n_classes is None:
            raise ValueError(f"{self.name}: the targets are floating-point numbers (regression), "
                             f"not class labels in [0, {n_classes})")
        for split in (self.train, self.test):
            if len(split) == 0:
                continue
            lowest, highest = int(split.y.min()), int(split.y.max())
            if lowest < 0 or highest >= n_classes:
                offending = lowest if lowest < 0 else highest
                raise ValueError(
                    f"{self.name}: the {split.name} labels in {split.source} include {offending}, "
                    f"but the model has {n_classes} classes (expected labels in [0, {n_classes}))")


def load_dataset(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Load ``"digits"``, a directory of MNIST-format IDX files, or a ``.npz`` file.

    ``cache_dir`` is where IDX and .npz data are cached as ``.npy`` files; by default
    a ``.cache`` folder in the dataset's directory. See the module docstring.
    """
    if isinstance(spec, str) and spec == "digits":
        return _load_digits()
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"dataset spec must be a string or path, got {type(spec).__name__}")
    path = Path(spec)
    if path.is_dir():
        return _load_idx_directory(path, cache_dir)
    if path.is_file() and path.suffix == ".npz":
        return _load_npz(path, cache_dir)
    problem = "is not a .npz file" if path.is_file() else "does not exist"
    raise ValueError(f"dataset {str(spec)!r} {problem}: expected 'digits', a directory of MNIST-format "
                     f"IDX files, or a .npz file with x_train, y_train, x_test, y_test")


# ------------------------------------------------------------------ digits
def _load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ModuleNotFoundError(
            "the 'digits' dataset comes with scikit-learn, which is not installed: "
            "pip install scikit-learn") from error
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    is_test = np.arange(len(y)) % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    arrays = {"x_train": x[~is_test], "y_train": y[~is_test], "x_test": x[is_test], "y_test": y[is_test]}
    arrays.update(_standardisation(arrays["x_train"], "scikit-learn digits"))
    return _assemble("digits", arrays, {"train": "scikit-learn digits", "test": "scikit-learn digits"})


# ------------------------------------------------------------------ IDX
def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read one unsigned-byte IDX file (raw or ``.gz``) with ``ndim`` dimensions (1 or 3).

    The header is 4 magic bytes (``0x00000801`` labels, ``0x00000803`` images)
    followed by ``ndim`` big-endian uint32 sizes; the data must fill exactly the
    product of the sizes. Raises ValueError naming the file otherwise. The sizes
    are multiplied as Python integers and compared with the file's size before
    its data is read, so a header claiming absurd sizes costs nothing.
    """
    if ndim not in _IDX_MAGIC:
        raise ValueError(f"read_idx: ndim must be 1 (labels) or 3 (images), got {ndim}")
    path = Path(path)
    gzipped = path.suffix == ".gz"
    opener = gzip.open if gzipped else open
    header_size = 4 + 4 * ndim
    try:
        with opener(path, "rb") as handle:
            header = handle.read(header_size)
            shape = _idx_shape(path, header, ndim)
            claimed = math.prod(shape)
            if not gzipped:
                _check_idx_size(path, shape, claimed, os.fstat(handle.fileno()).st_size - header_size, gzipped)
            # A gzip stream's size is known only once read: its real bytes, whatever the header claims.
            content = handle.read()
    except FileNotFoundError:
        raise ValueError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as error:  # gzip's errors for a corrupt or cut-off stream
        raise ValueError(f"IDX file {path} could not be read: {error}") from error
    _check_idx_size(path, shape, claimed, len(content), gzipped)
    return np.frombuffer(content, dtype=np.uint8).reshape(shape)


def _idx_shape(path: Path, header: bytes, ndim: int) -> tuple[int, ...]:
    """The sizes in an IDX header, after checking its magic number and length."""
    if len(header) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(header)} bytes, too short for a magic number")
    magic = int.from_bytes(header[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        kind = "labels" if ndim == 1 else "images"
        raise ValueError(f"IDX file {path} has bad magic number 0x{magic:08x}: expected "
                         f"0x{_IDX_MAGIC[ndim]:08x} (unsigned-byte {kind}, {ndim}-D)")
    if len(header) < 4 + 4 * ndim:
        raise ValueError(f"IDX file {path} is truncated: {len(header)} bytes, "
                         f"shorter than its {4 + 4 * ndim}-byte header")
    return tuple(int.from_bytes(header[4 + 4 * axis:8 + 4 * axis], "big") for axis in range(ndim))


def _check_idx_size(path: Path, shape: tuple[int, ...], claimed: int, found: int, gzipped: bool) -> None:
    if found == claimed:
        return
    problem = "is truncated" if found < claimed else "has trailing bytes"
    if len(shape) == 1:
        what = f"{shape[0]} labels"
    else:
        what = f"{shape[0]} images of {'x'.join(map(str, shape[1:]))}"
    file_has = "the decompressed file has" if gzipped else "the file has"
    raise ValueError(f"IDX file {path} {problem}: its header claims {what} = {claimed} bytes of data, "
                     f"{file_has} {found} after its {4 + 4 * len(shape)}-byte header")


def _find_idx_files(directory: Path) -> dict[str, Path]:
    found = {}
    for key, name in IDX_FILES.items():
        # The uncompressed file wins when both are present: it is the one read faster.
        candidates = [directory / name, directory / f"{name}.gz"]
        existing = [candidate for candidate in candidates if candidate.is_file()]
        if not existing:
            raise ValueError(f"IDX directory {directory} has no {name} (or {name}.gz); it needs "
                             f"{', '.join(IDX_FILES.values())}")
        found[key] = existing[0]
    return found


def _load_idx_directory(directory: Path, cache_dir) -> Dataset:
    files = _find_idx_files(directory)

    def build() -> dict[str, np.ndarray]:
        arrays = {}
        for part in ("train", "test"):
            images = read_idx(files[f"x_{part}"], ndim=3)
            labels = read_idx(files[f"y_{part}"], ndim=1)
            if len(images) != len(labels):
                raise ValueError(f"IDX {part} count mismatch: {files[f'x_{part}']} holds {len(images)} images "
                                 f"but {files[f'y_{part}']} holds {len(labels)} labels")
            arrays[f"x_{part}"] = _flattened(images, part, f"IDX file {files[f'x_{part}']}", "images")
            arrays[f"y_{part}"] = labels.astype(np.int64)
        _check_same_features(arrays, files["x_train"], files["x_test"])
        return arrays

    arrays = _cached(build, list(files.values()), directory, cache_dir, f"IDX file {files['x_train']}")
    sources = {"train": f"{files['y_train']}", "test": f"{files['y_test']}"}
    return _assemble(directory.resolve().name, arrays, sources)


# ------------------------------------------------------------------ npz
def _load_npz(path: Path, cache_dir) -> Dataset:
    def build() -> dict[str, np.ndarray]:
        raw = load_arrays(path)
        missing = [key for key in _NPZ_KEYS if key not in raw]
        if missing:
            raise ValueError(f"npz file {path} lacks {', '.join(missing)}: expected keys "
                             f"{', '.join(_NPZ_KEYS)}, found {', '.join(raw) or 'none'}")
        arrays = {}
        for part in ("train", "test"):
            x = _npz_features(path, part, raw[f"x_{part}"])
            y = _checked_labels(f"npz file {path}", f"y_{part}", raw[f"y_{part}"])
            if len(x) != len(y):
                raise ValueError(f"npz file {path}: x_{part} has {len(x)} samples but y_{part} has {len(y)} labels")
            arrays[f"x_{part}"], arrays[f"y_{part}"] = x, y
        _check_same_features(arrays, f"{path} (x_train)", f"{path} (x_test)")
        return arrays

    arrays = _cached(build, [path], path.parent, cache_dir, f"npz file {path}")
    return _assemble(path.stem, arrays, {"train": f"{path} (y_train)", "test": f"{path} (y_test)"})


def _npz_features(path: Path, part: str, x: np.ndarray) -> np.ndarray:
    key = f"x_{part}"
    if x.ndim not in (2, 3):
        raise ValueError(f"npz file {path}: {key} must be 2-D (samples, features) or 3-D "
                         f"(samples, height, width), got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"npz file {path}: {key} must hold numbers, got dtype {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"npz file {path}: {key} holds NaN or infinite values")
    return _flattened(x, part, f"npz file {path}", key)


def _flattened(x: np.ndarray, part: str, where: str, what: str) -> np.ndarray:
    """``x`` as ``(samples, features)``; ValueError naming ``where`` and the split when it
    has no samples or its samples no features (reshape would only say it cannot)."""
    if len(x) == 0:
        raise ValueError(f"{where}: the {_SPLIT_WORDS[part]} split has no samples ({what} of shape {x.shape})")
    if x.size == 0:
        raise ValueError(f"{where}: the samples of the {_SPLIT_WORDS[part]} split have no features "
                         f"({what} of shape {x.shape})")
    return x.reshape(len(x), -1)


def _checked_labels(where: str, key: str, y: np.ndarray) -> np.ndarray:
    """``y`` as int64 class labels; ValueError naming ``where`` and ``key`` unless they are
    1-D, whole numbers and non-negative."""
    if y.ndim != 1:
        raise ValueError(f"{where}: {key} must be 1-D (samples,), got shape {y.shape}")
    if y.dtype.kind == "f":
        whole = np.isfinite(y) & (y == np.round(y))
        if not whole.all():
            raise ValueError(f"{where}: {key} must hold integer labels, found {y[~whole][0].item()!r}")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{where}: {key} must hold integer labels, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{where}: {key} must hold non-negative labels, found {y.min().item()!r}")
    return y.astype(np.int64)


# ------------------------------------------------------------------ shared
def _check_same_features(arrays: dict[str, np.ndarray], train_source, test_source) -> None:
    train_features, test_features = arrays["x_train"].shape[1], arrays["x_test"].shape[1]
    if train_features != test_features:
        raise ValueError(f"train data {train_source} has {train_features} features per sample "
                         f"but test data {test_source} has {test_features}")


def _standardisation(x_train: np.ndarray, where: str) -> dict[str, np.ndarray]:
    r"""Per-feature mean and std of the training features, in float64 (1 for a constant feature).

    Two passes over chunks, so a memory-mapped split is never converted to
    float64 whole. The first finds each feature's smallest and largest value,
    hence a power of two :math:`s_j \ge \max_i |x_{ij}|`; the second merges the
    chunks' statistics of :math:`x_j / s_j` with Chan et al.'s pairwise update.
    Dividing by a power of two is exact, so ordinary data gets the statistics it
    would get unscaled, while a feature of 1e200 is never squared; values in
    [-1, 1] also lose no precision to a sum of squares. ValueError naming
    ``where`` for a feature whose range overflows float64.
    """
    n_features = x_train.shape[1]
    lowest, highest = np.full(n_features, np.inf), np.full(n_features, -np.inf)
    for chunk in _chunks(x_train):
        lowest, highest = np.minimum(lowest, chunk.min(axis=0)), np.maximum(highest, chunk.max(axis=0))
    with np.errstate(over="ignore"):
        too_wide = np.flatnonzero(~np.isfinite(highest - lowest))
    if too_wide.size:
        feature = int(too_wide[0])
        raise ValueError(f"{where}: feature {feature} of x_train spans {lowest[feature]:.3g} to "
                         f"{highest[feature]:.3g}, a range float64 cannot hold (its largest value is "
                         f"{np.finfo(np.float64).max:.3g}), so it cannot be standardised: rescale the data")
    # frexp: largest = m 2**e with m in [0.5, 1), so 2**e >= largest; 2**1024 would overflow.
    _, exponent = np.frexp(np.maximum(np.abs(lowest), np.abs(highest)))
    scale = np.ldexp(1.0, np.minimum(exponent, np.finfo(np.float64).maxexp - 1))

    count, mean, squares = 0, np.zeros(n_features), np.zeros(n_features)
    for chunk in _chunks(x_train):
        chunk /= scale
        chunk_mean = chunk.mean(axis=0)
        chunk_squares = ((chunk - chunk_mean) ** 2).sum(axis=0)
        delta = chunk_mean - mean
        total = count + len(chunk)
        mean = mean + delta * (len(chunk) / total)
        squares = squares + chunk_squares + delta ** 2 * (count * len(chunk) / total)
        count = total
    relative_std = np.sqrt(squares / max(count, 1))  # of x_j / s_j: its own scale, whatever the others'
    constant = relative_std <= CONSTANT_RELATIVE_STD
    return {"mean": mean * scale, "std": np.where(constant, 1.0, relative_std * scale)}


def _chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    """``x`` in float64 copies of ``_STATS_CHUNK_ROWS`` rows."""
    for start in range(0, len(x), _STATS_CHUNK_ROWS):
        yield np.array(x[start:start + _STATS_CHUNK_ROWS], dtype=np.float64)


def _assemble(name: str, arrays: dict[str, np.ndarray], sources: dict[str, str]) -> Dataset:
    for part in ("train", "test"):
        if len(arrays[f"y_{part}"]) == 0:
            raise ValueError(f"dataset {name}: the {_SPLIT_WORDS[part]} split in {sources[part]} has no samples")
    splits = {part: Split(part, arrays[f"x_{part}"], arrays[f"y_{part}"], arrays["mean"], arrays["std"],
                          sources[part])
              for part in ("train", "test")}
    n_classes = None
    if splits["train"].has_labels:
        n_classes = max((int(split.y.max()) for split in splits.values() if len(split)), default=-1) + 1
    return Dataset(name=name, train=splits["train"], test=splits["test"],
                   n_features=int(np.prod(arrays["x_train"].shape[1:])), n_classes=n_classes)


# ------------------------------------------------------------------ cache
def _cached(build: Callable[[], dict[str, np.ndarray]], sources: list[Path], data_dir: Path,
            cache_dir, x_train_source: str) -> dict[str, np.ndarray]:
    """The arrays of ``build()`` plus scaling, from the .npy cache when it is current.
    ``x_train_source`` names the training features in messages."""
    def build_with_scaling() -> dict[str, np.ndarray]:
        arrays = build()
        return {**arrays, **_standardisation(arrays["x_train"], x_train_source)}

    return cached_arrays(build_with_scaling, sources, data_dir, cache_dir,
                         ["x_train", "y_train", "x_test", "y_test", "mean", "std"])


def cached_arrays(build: Callable[[], dict[str, np.ndarray]], sources: list[Path], data_dir: Path,
                  cache_dir: str | os.PathLike | None, names: list[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` that ``build()`` makes from the files ``sources``, memory-mapped
    from a .npy cache in ``cache_dir`` (default ``data_dir/.cache``) when it is current.

    Cache files are named after the resolved source paths, so one ``cache_dir``
    can serve several datasets; a JSON file beside them records each source's
    size and modification time, and the cache is rebuilt when either changes.
    When the cache cannot be written, the arrays are returned from memory with
    a warning.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / ".cache"
    resolved = [source.resolve() for source in sources]
    key = hashlib.sha1("\n".join(map(str, resolved)).encode()).hexdigest()[:10]
    prefix = f"{data_dir.resolve().name or 'data'}-{key}"
    meta_path = cache_dir / f"{prefix}.json"
    stats = [source.stat() for source in resolved]
    meta = {"format": _CACHE_FORMAT,
            "sources": [{"path": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
                        for source, stat in zip(resolved, stats)]}
    array_paths = {name: cache_dir / f"{prefix}.{name}.npy" for name in names}

    cached = _read_cache(meta_path, meta, array_paths)
    if cached is not None:
        return cached
    arrays = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            atomic_write(array_paths[name], lambda handle, array=arrays[name]: np.save(handle, array, allow_pickle=False))
        # The metadata goes last: while it is missing or stale, readers rebuild.
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
    except OSError as error:
        warnings.warn(f"could not write the dataset cache in {cache_dir} ({error}); using the data in memory. "
                      f"Pass a writable cache_dir to share one mapped copy between processes.",
                      RuntimeWarning, stacklevel=3)
        return arrays
    reread = _read_cache(meta_path, meta, array_paths)
    # Another process may have replaced the files meanwhile; its bytes are the same.
    return reread if reread is not None else arrays


def _read_cache(meta_path: Path, meta: dict, array_paths: dict[str, Path]) -> dict[str, np.ndarray] | None:
    # A pipe would block the read until a writer comes: only regular files are a cache.
    if not all(path.is_file() for path in (meta_path, *array_paths.values())):
        return None
    try:
        if json.loads(meta_path.read_text()) != meta:
            return None
        return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in array_paths.items()}
    except (OSError, ValueError):
        return None  # missing, stale or unreadable: rebuild

