"""mnn-generate: sampling from a character model that train() wrote, and its errors."""
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest

from mnn.distributed.training.checkpoint import load_checkpoint, save_checkpoint
from mnn.distributed.comm import SingleProcessCommunicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.training.trainer import train
from mnn.model import build_net
from mnn.scripts.generate import main
from mnn.text import CharVocab, generate, sample_characters

TEXT = "def add(a, b):\n    return a + b\n\n" * 60


@pytest.fixture(name="run", scope="module")
def run_fixture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt")
    (folder / "code.py").write_text(TEXT)
    config = TrainConfig(dataset=f"text:{folder / 'code.py'}", epochs=3, steps_per_epoch=20, batch_size=16,
                         optimizer="adam", lr=0.01, output=str(folder / "run"),
                         model={"gpt": {"n_layers": 1, "d_model": 16, "n_heads": 2, "context": 16}})
    train(config, SingleProcessCommunicator())
    return folder / "run"


def test_generated_text_continues_the_prompt_in_the_vocabulary(run, capsys):
    assert main(["--checkpoint", str(run), "--prompt", "def ", "--tokens", "60", "--seed", "1"]) == 0
    text = capsys.readouterr().out[:-1]
    assert text.startswith("def ") and len(text) == 64 and set(text) <= set(TEXT)
    assert main(["--checkpoint", str(run / "checkpoint.npz"), "--prompt", "def ", "--tokens", "60", "--seed", "1"]) == 0
    assert capsys.readouterr().out[:-1] == text  # the same seed, the same sample
    assert "return" in generate_from(run, temperature=0.1)  # trained on one function: it learned it


def test_a_runs_model_npz_samples_as_its_checkpoint(run, tmp_path, capsys):
    """model.npz, the finished run's model, reads its job from the config.toml beside it:
    the same model as the run's last checkpoint, so the same seed gives the same sample."""
    def sampled(path, *options):
        assert main(["--checkpoint", str(path), "--tokens", "60", "--seed", "4", *options]) == 0, \
            capsys.readouterr().err
        return capsys.readouterr().out
    for options in ([], ["--top-k", "3", "--temperature", "1.5"]):
        assert sampled(run / "model.npz", *options) == sampled(run / "checkpoint.npz", *options)
    # A run directory that kept no checkpoint: its model.npz.
    kept_no_checkpoint = tmp_path / "no-checkpoint"
    kept_no_checkpoint.mkdir()
    for name in ("model.npz", "config.toml"):
        shutil.copy(run / name, kept_no_checkpoint / name)
    assert sampled(kept_no_checkpoint) == sampled(run)
    # Without its config.toml, the arrays are not a model: one line that names what is missing.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "model.npz", alone / "model.npz")
    assert main(["--checkpoint", str(alone / "model.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "expected the run's config.toml beside it" in err and f"{alone / 'config.toml'} does not exist" in err
    assert main(["--checkpoint", str(alone / "gone" / "model.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_top_k_1_is_greedy_at_any_temperature(run, capsys):
    outputs = []
    for options in (["--temperature", "0"], ["--top-k", "1", "--temperature", "5", "--seed", "7"]):
        assert main(["--checkpoint", str(run), "--tokens", "40", *options]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    # A K beyond the vocabulary is no limit: the draws of no --top-k.
    assert main(["--checkpoint", str(run), "--tokens", "40", "--top-k", "1000"]) == 0
    unlimited = capsys.readouterr().out
    assert main(["--checkpoint", str(run), "--tokens", "40"]) == 0
    assert capsys.readouterr().out == unlimited


class FixedLogits:
    """A stand-in language model whose next-character logits are always ``logits``."""

    def __init__(self, logits):
        self.logits = np.asarray(logits, dtype=np.float64)

    def evaluating(self):
        return nullcontext()

    def __call__(self, tokens):
        return np.broadcast_to(self.logits, (*tokens.shape, self.logits.size))


def test_top_k_draws_among_the_k_likeliest_only():
    vocab = CharVocab("abcd")
    drawn = generate(FixedLogits([3.0, 1.0, 2.0, 0.0]), vocab, "a", 300, context=4, temperature=100.0, rng=0,
                     top_k=2)[1:]
    assert set(drawn) == {"a", "c"}  # nearly uniform over the two likeliest at this temperature
    # Equal logits: the lower id, as greedy decoding picks.
    tied = FixedLogits([0.0, 1.0, 1.0, 1.0])
    assert generate(tied, vocab, "a", 10, context=4, rng=0, top_k=1) == "a" + "b" * 10
    assert generate(tied, vocab, "a", 10, context=4, temperature=0) == "a" + "b" * 10
    assert set(generate(tied, vocab, "a", 100, context=4, rng=0, top_k=2)[1:]) == {"b", "c"}
    with pytest.raises(ValueError, match="top_k: expected an integer >= 1, got 0"):
        generate(tied, vocab, "a", 5, context=4, top_k=0)
    with pytest.raises(TypeError, match="top_k: expected an integer"):
        generate(tied, vocab, "a", 5, context=4, top_k=1.5)


def generate_from(run, temperature):
    from mnn.scripts.generate import sample
    return sample(str(run), "def add(a, b):\n    ", 40, temperature, seed=0)


def test_bad_checkpoints_and_prompts_are_named(run, tmp_path, capsys):
    assert main(["--checkpoint", str(run), "--prompt", "§"]) == 2
    assert "character '§' is not in the vocabulary" in capsys.readouterr().err
    train(TrainConfig(epochs=1, output=str(tmp_path / "mlp")), SingleProcessCommunicator())
    assert main(["--checkpoint", str(tmp_path / "mlp")]) == 2
    assert "is not a character model: its job trained on 'digits'" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_cold_temperature_picks_the_likeliest_character_and_the_context_slides():
    vocab = CharVocab("abc")
    net = build_net({"gpt": {"vocab": 3, "n_layers": 1, "d_model": 8, "n_heads": 2, "context": 4}}, rng=0)
    # GPT-2's initialisation starts every logit near 0 (differences of 1e-3, which T = 1e-4
    # does not make certain): a larger head gives the untrained model clear favourites.
    net.layers[-2].params["w"] *= 100
    greedy = [0]
    for _ in range(20):
        net.set_training(False)
        greedy.append(int(net(np.array([greedy[-4:]]))[0, -1].argmax()))
    assert generate(net, vocab, "a", 20, context=4, temperature=1e-4, rng=0) == vocab.decode(greedy)
    warm = generate(net, vocab, "a", 200, context=4, temperature=50.0, rng=0)
    assert set(warm) == {"a", "b", "c"}
    # 0 is greedy, and so is a temperature so small that z / T overflows (the trial's 1e-320
    # said "Probabilities contain NaN").
    assert generate(net, vocab, "a", 20, context=4, temperature=0.0) == vocab.decode(greedy)
    assert generate(net, vocab, "a", 20, context=4, temperature=1e-320, rng=0) == vocab.decode(greedy)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="expected a finite temperature >= 0"):
            generate(net, vocab, "a", 5, context=4, temperature=bad)
    np.testing.assert_equal(generate(net, vocab, "ab", 0, context=4), "ab")


def test_a_model_of_another_vocabulary_is_named_not_sampled():
    net = build_net({"gpt": {"vocab": 3, "n_layers": 1, "d_model": 8, "n_heads": 2, "context": 4}}, rng=0)
    with pytest.raises(ValueError, match="the model predicts 3 characters, but the vocabulary has 4"):
        generate(net, CharVocab("abcd"), "a", 5, context=4)


def test_characters_come_one_at_a_time_without_end():
    net = build_net({"gpt": {"vocab": 3, "n_layers": 1, "d_model": 8, "n_heads": 2, "context": 4}}, rng=0)
    characters = sample_characters(net, CharVocab("abc"), "ab", context=4, rng=0)
    first = [next(characters) for _ in range(50)]  # as many as wanted, each when asked for
    assert set(first) <= {"a", "b", "c"}
    assert "".join(first) == generate(net, CharVocab("abc"), "ab", 50, context=4, rng=0)[2:]


@pytest.mark.parametrize("option, value", [("--seed", "-1"), ("--tokens", "-5"), ("--tokens", "10**12"),
                                           ("--temperature", "-0.5"), ("--temperature", "nan"),
                                           ("--top-k", "0"), ("--top-k", "-3"), ("--top-k", "1.5")])
def test_bad_options_are_named(run, capsys, option, value):
    with pytest.raises(SystemExit) as exited:
        main(["--checkpoint", str(run), option, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected " in err and "Traceback" not in err


def test_the_characters_the_run_recorded_are_used_though_the_text_changed(run, tmp_path, capsys):
    """The trial's case: after the text changed (same number of characters, another mapping),
    mnn-generate sampled with the new mapping, or said "a and p must have same size"."""
    assert main(["--checkpoint", str(run), "--tokens", "40", "--seed", "3"]) == 0
    before = capsys.readouterr().out
    text_file = run.parent / "code.py"
    original = text_file.read_text()
    try:
        for changed in (original.replace("a", "z"), original + "é§"):  # remapped; more characters
            text_file.write_text(changed)
            assert main(["--checkpoint", str(run), "--tokens", "40", "--seed", "3"]) == 0
            assert capsys.readouterr().out == before
        text_file.unlink()  # the text is not needed at all
        assert main(["--checkpoint", str(run), "--tokens", "40", "--seed", "3"]) == 0
        assert capsys.readouterr().out == before
    finally:
        text_file.write_text(original)


def test_a_checkpoint_without_a_record_of_its_text_refuses_a_text_that_changed(run, tmp_path, capsys):
    checkpoint = load_checkpoint(run / "checkpoint.npz")
    del checkpoint.config["text_fingerprint"]  # as written before runs recorded their text
    old = tmp_path / "old.npz"
    save_checkpoint(old, checkpoint)
    assert main(["--checkpoint", str(old), "--tokens", "5"]) == 0
    capsys.readouterr()
    text_file = run.parent / "code.py"
    original = text_file.read_text()
    try:
        text_file.write_text(original + "é")
        assert main(["--checkpoint", str(old), "--tokens", "5"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "holds a model of 16 characters, but text" in err and "now has 17: the text changed" in err
    finally:
        text_file.write_text(original)


def test_a_long_sample_is_printed_as_it_is_drawn(run):
    """The trial's case: --tokens 1000000000000 printed nothing for 30 s (it built the
    whole string first). The first characters must come at once; then stop it."""
    process = subprocess.Popen([sys.executable, "-m", "mnn.scripts.generate", "--checkpoint", str(run),
                                "--prompt", "def ", "--tokens", str(10 ** 12)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        received = b""
        deadline = time.monotonic() + 120
        while len(received) < 20 and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(process.stdout.fileno(), 100)
                if not chunk:
                    break
                received += chunk
        assert received.startswith(b"def ") and len(received) >= 20, (received, process.poll())
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130 and b"interrupted after" in err and b"Traceback" not in err, err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
