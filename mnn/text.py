r"""Character-level text for language models: a vocabulary, the encoded corpus, and windows of it.

A corpus is one long string: a text file, every text file below a directory
(sorted by path, joined as they are), or by default the Python standard
library's own ``.py`` sources of the running interpreter (without its test
suites), which are always present and make a useful corpus for a character
model of code: about 11 M characters of 222 kinds for Python 3.11. Usage::

    from mnn.text import load_text
    corpus = load_text(context=64)                 # or load_text("notes/", context=64)
    x, y = corpus.train.batch(np.array([0, 100]))  # (2, 64) token ids, and the same shifted by one
    corpus.vocab.decode(x[0])                      # back to text

The vocabulary is the sorted set of characters of the whole corpus; a token is
a character's index in it, stored in the smallest unsigned type that holds
every index (uint8 up to 256 characters, uint16 up to 65,536, else uint32).
The encoded corpus is cached as ``.npy`` files (beside the text, or in
``~/.cache/mnn`` for the standard library) that every rank memory-maps: the
tokens, the vocabulary and the SHA-256 of the text's UTF-8 bytes; the cache is
rebuilt when a source file changes.

A model learns token ids, so it is bound to the characters in id order: the
same ids mean other characters once the text gains or loses one. A text's
:attr:`TextDataset.fingerprint` (its characters in id order and its SHA-256)
is what a run records (mnn-train keeps it in the job's ``text_fingerprint``),
and :func:`fingerprint_difference` says how a text differs from a record.

Samples are windows: sample :math:`i` of a split is the tokens
:math:`t_{s_i}, \dots, t_{s_i + T - 1}` and its targets the next characters
:math:`t_{s_i + 1}, \dots, t_{s_i + T}`, with :math:`T` the context. The split
is by position: the first 90 % of the text trains, the rest validates, so no
window crosses from one into the other. Training windows start at every
position (a sampler draws them at random); validation windows do not overlap,
and at most ``VALIDATION_WINDOWS`` of them, spread evenly over the validation
text, are used, so that an evaluation costs the same for any corpus.
"""
from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from collections import deque
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from mnn.checks import as_generator, check_int
from mnn.datasets import Dataset, cached_arrays

__all__ = ["CharVocab", "TextSplit", "TextDataset", "load_text", "stdlib_sources", "generate", "sample_characters",
           "fingerprint_difference", "TRAIN_FRACTION", "VALIDATION_WINDOWS"]

#: The share of the text, from its start, that trains; the rest validates.
TRAIN_FRACTION = 0.9
#: The most validation windows an evaluation uses.
VALIDATION_WINDOWS = 512
# Folders of the standard library that are not its own code: test suites (with
# deliberately odd text) and what pip installed.
_STDLIB_SKIPPED = {"site-packages", "dist-packages", "test", "tests", "idlelib"}


class CharVocab:
    """The characters of a corpus, sorted; a character's token is its index."""

    def __init__(self, chars: str):
        if not chars or len(set(chars)) != len(chars):
            raise ValueError(f"a vocabulary needs distinct characters, got {len(chars)} with "
                             f"{len(chars) - len(set(chars))} repeated")
        self.chars = "".join(sorted(chars))
        self._index = {char: token for token, char in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``; ValueError naming a character the vocabulary lacks."""
        try:
            return np.fromiter((self._index[char] for char in text), dtype=np.int64, count=len(text))
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in the vocabulary of {len(self)} characters") \
                from None

    def decode(self, tokens) -> str:
        return "".join(self.chars[int(token)] for token in np.ravel(tokens))


class TextSplit:
    """Windows of ``context`` tokens of an encoded text, with the next tokens as targets.

    ``starts`` are the windows' first positions (None: every position, for
    training). ``y`` is the token array itself, so that label checks see every
    token the split holds.
    """

    has_labels = True

    def __init__(self, name: str, tokens: np.ndarray, context: int, source: str, starts: np.ndarray | None = None):
        if len(tokens) <= context:
            raise ValueError(f"the {name} text in {source} has {len(tokens)} characters: a window of context "
                             f"{context} needs at least {context + 1}")
        self.name, self.tokens, self.context, self.source = name, tokens, context, source
        self.starts = starts
        self.y = tokens

    def __len__(self) -> int:
        return len(self.tokens) - self.context if self.starts is None else len(self.starts)

    def __repr__(self) -> str:
        return f"TextSplit({self.name!r}, windows={len(self)}, context={self.context}, source={self.source!r})"

    def batch(self, indices, dtype=None) -> tuple[np.ndarray, np.ndarray]:
        """Windows ``indices`` as ``(tokens (b, T), next tokens (b, T))``, both int64
        (``dtype`` is the net's, for the interface of :class:`mnn.datasets.Split`; tokens stay integers)."""
        indices = np.asarray(indices, dtype=np.int64)
        starts = indices if self.starts is None else self.starts[indices]
        positions = starts[:, None] + np.arange(self.context + 1)
        windows = np.asarray(self.tokens[positions], dtype=np.int64)
        return windows[:, :-1], windows[:, 1:]

    def check_dtype(self, dtype) -> np.dtype:
        """Any floating dtype trains on tokens (they are indices, not values)."""
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"{self.name} split: the net's dtype must be a floating type, got {dtype}")
        return dtype


@dataclass(frozen=True)
class TextDataset(Dataset):
    """A text's training and validation windows, its vocabulary, and the SHA-256 of the text
    (hex digits of its UTF-8 bytes)."""

    vocab: CharVocab = None
    sha256: str = ""

    @property
    def fingerprint(self) -> dict[str, str]:
        """What a model trained on this text is bound to: ``{"chars": the characters in id
        order, "sha256": the text's digest}``."""
        return {"chars": self.vocab.chars, "sha256": self.sha256}


def fingerprint_difference(reference: dict[str, str], current: dict[str, str],
                           reference_is: str = "recorded") -> str | None:
    """How the text of ``current`` differs from that of ``reference`` (both
    :attr:`TextDataset.fingerprint`), in words that call the reference ``reference_is``;
    None when they are the same text."""
    if reference == current:
        return None
    old, new = reference["chars"], current["chars"]
    if old == new:
        return (f"its {len(new)} characters are the same, but the text is not (SHA-256 "
                f"{current['sha256'][:12]}..., {reference_is} {reference['sha256'][:12]}...)")
    parts = [f"{len(new)} characters, {reference_is} {len(old)}"]
    for word, chars in (("gained", sorted(set(new) - set(old))), ("lost", sorted(set(old) - set(new)))):
        if chars:
            shown = ", ".join(map(repr, chars[:5])) + (f" and {len(chars) - 5} more" if len(chars) > 5 else "")
            parts.append(f"{word} {shown}")
    return "its characters changed (" + "; ".join(parts) + "), so a token id would mean another character"


def stdlib_sources() -> list[Path]:
    """The standard library's own ``.py`` files of the running interpreter, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(path for path in root.rglob("*.py")
                  if not _STDLIB_SKIPPED & set(path.relative_to(root).parts[:-1]))


def load_text(source: str | os.PathLike | None = None, context: int = 64,
              cache_dir: str | os.PathLike | None = None) -> TextDataset:
    """The corpus of ``source`` (a text file, a directory of text files, or None for the
    standard library's sources) as windows of ``context`` characters."""
    context = check_int("context", context, minimum=1)
    if source is None:
        files, name = stdlib_sources(), "the Python standard library"
        data_dir = Path(sysconfig.get_paths()["stdlib"])
        cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnn"
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(file for file in path.rglob("*") if file.is_file() and not _hidden(file, path))
            data_dir = path
        elif path.is_file():
            files, data_dir = [path], path.parent
        else:
            raise ValueError(f"text {str(source)!r} does not exist: expected a text file or a directory of them")
        name = str(path)
    if not files:
        raise ValueError(f"text {name}: no files to read")

    def build() -> dict[str, np.ndarray]:
        text = "".join(_read(file) for file in files)
        if not text:
            what = f"text file {files[0]} is" if len(files) == 1 else f"the {len(files)} files of text {name} are"
            raise ValueError(f"{what} empty: a character model needs text to learn from")
        vocab = CharVocab("".join(sorted(set(text))))
        return {"tokens": vocab.encode(text).astype(_token_dtype(len(vocab))),
                "chars": np.frombuffer(vocab.chars.encode("utf-32-le"), dtype=np.uint32),
                "sha256": np.frombuffer(hashlib.sha256(text.encode("utf-8")).digest(), dtype=np.uint8)}

    arrays = cached_arrays(build, files, data_dir, cache_dir, ["tokens", "chars", "sha256"])
    vocab = CharVocab(np.asarray(arrays["chars"]).tobytes().decode("utf-32-le"))
    tokens = arrays["tokens"]
    cut = int(len(tokens) * TRAIN_FRACTION)
    validation = tokens[cut:]
    windows = (len(validation) - 1) // context
    starts = np.linspace(0, windows - 1, min(windows, VALIDATION_WINDOWS)).astype(np.int64) * context \
        if windows > 0 else np.zeros(0, np.int64)
    train = TextSplit("train", tokens[:cut], context, f"{name} (the first {TRAIN_FRACTION:.0%})")
    test = TextSplit("validation", validation, context, f"{name} (the last {1 - TRAIN_FRACTION:.0%})", starts)
    return TextDataset(name=f"text {name}", train=train, test=test, n_features=context, n_classes=len(vocab),
                       vocab=vocab, sha256=np.asarray(arrays["sha256"]).tobytes().hex())


def _token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id of the vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise AssertionError(vocab_size)  # Unicode has fewer than 2**32 characters


def _hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"text file {file} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ValueError(f"text file {file} cannot be read: {error.strerror or error}") from None


def generate(net, vocab: CharVocab, prompt: str, tokens: int, context: int, temperature: float = 1.0,
             rng=None, top_k: int | None = None) -> str:
    """``prompt`` continued by ``tokens`` characters sampled from ``net`` (see :func:`sample_characters`)."""
    tokens = check_int("tokens", tokens, minimum=0)
    with closing(sample_characters(net, vocab, prompt, context, temperature, rng, top_k)) as characters:
        return prompt + "".join(islice(characters, tokens))


def sample_characters(net, vocab: CharVocab, prompt: str, context: int, temperature: float = 1.0,
                      rng=None, top_k: int | None = None) -> Iterator[str]:
    r"""The characters that continue ``prompt``, sampled from ``net`` one at a time, without end
    (take as many as you want: each costs one forward pass, and memory does not grow).

    The net (a language model ending in a loss layer, e.g. a ``gpt``) sees the
    last ``context`` characters; its output at the last position are the logits
    :math:`z` of the next character, drawn from

    .. math:: p = \operatorname{softmax}\big((z - \max_k z_k) / \tau\big) = \operatorname{softmax}(z / \tau) \tag{1}

    with temperature :math:`\tau` (below 1: safer, above: more varied). The
    shift by the largest logit changes nothing but keeps every exponent
    :math:`\le 0`: however small :math:`\tau`, nothing overflows, and a
    :math:`\tau` so small that every other exponent underflows gives the limit
    :math:`\tau \to 0`, the likeliest character. :math:`\tau = 0` is that
    limit (greedy decoding).

    ``top_k`` :math:`= k` draws only among the :math:`k` likeliest characters,
    the set :math:`K` of the :math:`k` largest logits (of equal logits, the
    lower id first, as greedy decoding picks), renormalised:

    .. math:: p_i = \frac{\exp\big((z_i - m) / \tau\big)}{\sum_{l \in K} \exp\big((z_l - m) / \tau\big)}
              \ \text{for } i \in K, \qquad p_i = 0 \ \text{otherwise}, \qquad m = \max_j z_j \tag{2}

    so :math:`k = 1` is greedy decoding at any temperature, and a :math:`k`
    of the vocabulary's size or more (or None, the default) is no limit.
    Dropout is off while sampling. ValueError for an empty prompt, a character
    the vocabulary lacks, a temperature that is negative or not finite, a
    ``top_k`` below 1, or a net whose output is not one logit per character of
    ``vocab``.
    """
    if not prompt:
        raise ValueError("generate: the prompt must hold at least one character")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"generate: expected a finite temperature >= 0 (0: always the likeliest character), "
                         f"got {temperature}")
    context = check_int("context", context, minimum=1)
    if top_k is not None:
        top_k = check_int("top_k", top_k, minimum=1)
    window = deque(vocab.encode(prompt)[-context:].tolist(), maxlen=context)
    return _sampled(net, vocab, window, temperature, top_k, as_generator(rng))


def _sampled(net, vocab: CharVocab, window: deque, temperature: float, top_k: int | None,
             rng: np.random.Generator) -> Iterator[str]:
    with net.evaluating():
        while True:
            logits = np.asarray(net(np.array([window])), dtype=np.float64)[0, -1]
            if logits.shape != (len(vocab),):
                raise ValueError(f"generate: the model predicts {logits.size} characters, but the vocabulary has "
                                 f"{len(vocab)}: it was trained on another text")
            if not np.isfinite(logits).all():
                raise ValueError("generate: the model's output holds NaN or infinite values")
            token = _drawn(logits, temperature, top_k, rng)
            window.append(token)
            yield vocab.chars[token]


def _drawn(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """The id of the next character, drawn from ``logits`` as :func:`sample_characters` says."""
    if temperature == 0:
        return int(logits.argmax())
    if top_k is None or top_k >= logits.size:
        candidates = None  # every character: the same draws as before top_k existed
    else:
        # The k largest; a stable sort keeps equal logits in id order, as argmax picks the first.
        candidates = np.argsort(-logits, kind="stable")[:top_k]  # Eq. (2): K
        logits = logits[candidates]
    with np.errstate(over="ignore"):  # to -inf, for a tiny temperature: exp gives 0
        probabilities = np.exp((logits - logits.max()) / temperature)  # Eq. (1), (2)
    drawn = int(rng.choice(logits.size, p=probabilities / probabilities.sum()))
    return drawn if candidates is None else int(candidates[drawn])
