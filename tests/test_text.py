"""Character-level text data: vocabulary, windows, the split by position, the cache, clear errors."""
from pathlib import Path

import numpy as np
import pytest

from mnn.text import TRAIN_FRACTION, VALIDATION_WINDOWS, CharVocab, fingerprint_difference, load_text, stdlib_sources

TEXT = "def add(a, b):\n    return a + b\n" * 40


def test_vocabulary_encodes_and_decodes_every_character():
    vocab = CharVocab("".join(sorted(set(TEXT))))
    tokens = vocab.encode(TEXT)
    assert vocab.decode(tokens) == TEXT and tokens.max() == len(vocab) - 1
    with pytest.raises(ValueError, match="character 'z' is not in the vocabulary"):
        vocab.encode("zed")


def test_windows_are_the_text_and_the_next_character(tmp_path):
    (tmp_path / "a.py").write_text(TEXT)
    corpus = load_text(tmp_path / "a.py", context=8, cache_dir=tmp_path / "cache")
    cut = int(len(TEXT) * TRAIN_FRACTION)
    assert len(corpus.train) == cut - 8 and corpus.n_classes == len(set(TEXT))
    x, y = corpus.train.batch(np.array([0, 5]))
    assert x.shape == y.shape == (2, 8) and x.dtype == np.int64
    assert corpus.vocab.decode(x[1]) == TEXT[5:13] and corpus.vocab.decode(y[1]) == TEXT[6:14]
    # Validation windows do not overlap and stay inside the last part of the text.
    starts = corpus.test.starts
    assert np.all(np.diff(starts) >= 8) and len(starts) <= VALIDATION_WINDOWS
    vx, vy = corpus.test.batch(np.arange(len(corpus.test)))
    assert corpus.vocab.decode(vx[0]) == TEXT[cut:cut + 8] and corpus.vocab.decode(vy[-1])[-1] in TEXT[cut:]


def test_a_directory_is_read_in_path_order_and_the_cache_follows_changes(tmp_path):
    (tmp_path / "b.txt").write_text("bbbb" * 50)
    (tmp_path / "a.txt").write_text("aaaa" * 50)
    (tmp_path / ".hidden").write_text("zzzz")
    corpus = load_text(tmp_path, context=4, cache_dir=tmp_path / ".cache")
    assert corpus.vocab.chars == "ab" and corpus.vocab.decode(corpus.train.batch(np.array([0]))[0]) == "aaaa"
    assert list((tmp_path / ".cache").glob("*.tokens.npy"))
    (tmp_path / "a.txt").write_text("cccc" * 50)
    assert load_text(tmp_path, context=4, cache_dir=tmp_path / ".cache").vocab.chars == "bc"


def test_bad_text_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist: expected a text file or a directory"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 50)
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        load_text(tmp_path / "latin1.txt", cache_dir=tmp_path / "c")
    (tmp_path / "short.txt").write_text("x" * 20)
    with pytest.raises(ValueError, match="a window of context 64 needs at least 65"):
        load_text(tmp_path / "short.txt", cache_dir=tmp_path / "c")


def test_the_default_corpus_is_the_standard_library_code():
    files = stdlib_sources()
    assert files and all(file.suffix == ".py" for file in files)
    assert not [file for file in files if "test" in file.parts[:-1] or "site-packages" in file.parts]
    corpus = load_text(context=64)
    assert corpus.n_classes == len(corpus.vocab) > 90 and len(corpus.train) > 1_000_000
    assert "def " in corpus.vocab.decode(corpus.train.batch(np.arange(0, 64 * 50, 64))[0])


def test_an_empty_text_is_named_as_empty(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"text file .*empty.txt is empty: a character model needs text"):
        load_text(tmp_path / "empty.txt", cache_dir=tmp_path / "c")
    (tmp_path / "folder").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "folder" / name).write_text("")
    with pytest.raises(ValueError, match=r"the 2 files of text .*folder are empty"):
        load_text(tmp_path / "folder", cache_dir=tmp_path / "c")


def test_more_than_65536_characters_keep_their_ids(tmp_path):
    """The trial's case: ids were stored as uint16 and wrapped, and the run trained on."""
    chars = "".join(chr(code) for code in range(0x100, 0x100 + 70_000 + 2048) if not 0xD800 <= code < 0xE000)
    (tmp_path / "wide.txt").write_text(chars * 2, encoding="utf-8")
    corpus = load_text(tmp_path / "wide.txt", context=8, cache_dir=tmp_path / "c")
    assert len(corpus.vocab) == 70_000 and corpus.train.tokens.dtype == np.uint32
    x, y = corpus.train.batch(np.array([69_990]))
    assert corpus.vocab.decode(x[0]) == (chars * 2)[69_990:69_998]
    assert corpus.vocab.decode(corpus.train.tokens) == (chars * 2)[:len(corpus.train.tokens)]


def test_the_fingerprint_tells_what_changed(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    first = load_text(tmp_path / "a.txt", context=8, cache_dir=tmp_path / "c").fingerprint
    assert first["chars"] == "".join(sorted(set(TEXT))) and len(first["sha256"]) == 64
    assert fingerprint_difference(first, first) is None
    (tmp_path / "a.txt").write_text(TEXT.replace("add", "dad"))
    same_chars = load_text(tmp_path / "a.txt", context=8, cache_dir=tmp_path / "c").fingerprint
    assert "its 16 characters are the same, but the text is not" in fingerprint_difference(first, same_chars)
    (tmp_path / "a.txt").write_text(TEXT.replace("b", "q") + "é")
    other = load_text(tmp_path / "a.txt", context=8, cache_dir=tmp_path / "c").fingerprint
    assert fingerprint_difference(first, other, reference_is="rank 0's") == (
        "its characters changed (17 characters, rank 0's 16; gained 'q', 'é'; lost 'b'), so a token id would "
        "mean another character")


def test_a_text_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    (tmp_path / "locked.txt").write_text(TEXT)
    real_read_text = Path.read_text

    def refuse(path, *args, **kwargs):
        if path.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_read_text(path, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ValueError, match=r"text file .*locked.txt cannot be read: Permission denied"):
        load_text(tmp_path / "locked.txt", cache_dir=tmp_path / "c")
