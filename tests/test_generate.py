"""mnn-generate: sampling from a character model that train() wrote, and its errors."""
import numpy as np
import pytest

from mnn.distributed.comm import SingleProcessCommunicator
from mnn.distributed.config import TrainConfig
from mnn.distributed.trainer import train
from mnn.model import build_net
from mnn.scripts.generate import main
from mnn.text import CharVocab, generate

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
    greedy = [0]
    for _ in range(20):
        net.set_training(False)
        greedy.append(int(net(np.array([greedy[-4:]]))[0, -1].argmax()))
    assert generate(net, vocab, "a", 20, context=4, temperature=1e-4, rng=0) == vocab.decode(greedy)
    warm = generate(net, vocab, "a", 200, context=4, temperature=50.0, rng=0)
    assert set(warm) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="expected a temperature > 0"):
        generate(net, vocab, "a", 5, context=4, temperature=0.0)
    np.testing.assert_equal(generate(net, vocab, "ab", 0, context=4), "ab")
