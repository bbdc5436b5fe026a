"""mnn-generate: text sampled from a character model that mnn-train trained (``main`` is the console script).

    mnn-generate --checkpoint runs/gpt-example --prompt "def " --tokens 300 --temperature 0.8
    mnn-generate --checkpoint runs/gpt-example/model.npz --top-k 5

``--checkpoint`` is a run's output directory (its checkpoint.npz, or its
model.npz when the run kept no checkpoint), a checkpoint file, or a run's
model.npz. A checkpoint holds the job it was trained by; model.npz holds the
model's arrays alone, and its job is the config.toml the run wrote beside it.
The model is the one that job names, and the characters its token ids stand
for are those the run recorded (``text_fingerprint``), so the text need not be
there any more, and a text that changed since cannot remap them. A checkpoint written before runs
recorded their text reads the text again (from its cache) and is refused when
its vocabulary is not the model's. The characters are printed as they are
drawn. One process, no MPI. Exit status 2 for a bad checkpoint, prompt or
option, 1 when stdout cannot take the text (a full disk, stdout closed), 130
when interrupted (Ctrl-C, SIGTERM or SIGHUP, each with a line saying how many
characters it printed).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from itertools import islice
from pathlib import Path
from typing import Iterator

from mnn.distributed.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from mnn.distributed.training.config import TrainConfig, load_toml
from mnn.distributed.training.job_data import is_text_job, load_job_dataset, text_context
from mnn.distributed.training.task import build_job_net
from mnn.io import load_arrays
from mnn.model import model_size
from mnn.scripts.arguments import at_least
from mnn.text import CharVocab, TextDataset, generate, sample_characters

__all__ = ["main", "build_parser", "sample"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnn-generate", description="Continue a prompt with characters sampled from a trained character model.")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run's output directory, a checkpoint .npz or a run's model.npz (beside its "
                             "config.toml) of a model trained on a text")
    parser.add_argument("--prompt", default="def ", help="the text to continue (default: 'def ')")
    parser.add_argument("--tokens", type=at_least(0), default=300, metavar="N",
                        help="characters to generate, printed as they come (default 300)")
    parser.add_argument("--temperature", type=at_least(0, float), default=0.8, metavar="T",
                        help="below 1: likelier characters, above 1: more varied, 0: always the likeliest "
                             "(default 0.8)")
    parser.add_argument("--top-k", type=at_least(1), default=None, metavar="K",
                        help="draw only among the K likeliest characters; 1: always the likeliest "
                             "(default: among all)")
    parser.add_argument("--seed", type=at_least(0), default=0, metavar="N",
                        help="seed of the sampling (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    written, printing = 0, False
    # SIGTERM and SIGHUP (a closed terminal) stop it as Ctrl-C does: with the line that says how far it
    # got. One ignored before (nohup) stays ignored.
    previous = {signum: signal.signal(signum, signal.default_int_handler) for signum in _STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        characters = _characters(args.checkpoint, args.prompt, args.temperature, args.seed, args.top_k)
        if sys.stdout is None:  # started with stdout closed (`>&-`)
            print("mnn-generate: error: cannot print the text: stdout is closed", file=sys.stderr)
            return 1
        printing = True
        sys.stdout.write(args.prompt)
        # Each character as it is drawn: a long sample shows from its first character on.
        # (islice counts to sys.maxsize at most: more than any run will print.)
        for character in islice(characters, min(args.tokens, sys.maxsize)):
            sys.stdout.write(character)
            sys.stdout.flush()
            written += 1
        sys.stdout.write("\n")
        sys.stdout.flush()
    except (ValueError, TypeError) as error:
        print(f"mnn-generate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmnn-generate: interrupted after {written} characters", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read the output stopped reading (| head): nothing more to do. Python
        # flushes stdout again at exit: let that go nowhere instead of failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        if not printing:  # the checkpoint or its text could not be read
            print(f"mnn-generate: error: {error}", file=sys.stderr)
            return 2
        # stdout cannot take the text (a full disk): say so, and let Python's flush at exit go nowhere.
        print(f"mnn-generate: error: cannot print the text: {error}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def sample(checkpoint: str, prompt: str, tokens: int, temperature: float, seed: int,
           top_k: int | None = None) -> str:
    """``prompt`` and ``tokens`` characters sampled from the model of ``checkpoint``."""
    net, vocab, context = _model_of(checkpoint)
    return generate(net, vocab, prompt, tokens, context, temperature, rng=seed, top_k=top_k)


def _characters(checkpoint: str, prompt: str, temperature: float, seed: int,
                top_k: int | None) -> Iterator[str]:
    net, vocab, context = _model_of(checkpoint)
    return sample_characters(net, vocab, prompt, context, temperature, rng=seed, top_k=top_k)


# What a run writes beside its checkpoints: the final model's arrays and the job that trained them.
_MODEL_NAME = "model.npz"
_CONFIG_NAME = "config.toml"


def _model_of(checkpoint: str) -> tuple[object, CharVocab, int]:
    """The net of the checkpoint (or model.npz), the characters its ids stand for, and its context."""
    path, config, model_state = _saved_model(Path(checkpoint))
    if not is_text_job(config):
        raise ValueError(f"{path} is not a character model: its job trained on {config.dataset!r}, not a text")
    # Counted before it is built: an edited config must not allocate a model the file does not hold.
    described = model_size(config.model_description()).parameters
    stored = sum(array.size for array in model_state.values())
    if described != stored:
        raise ValueError(f"{path} does not hold the model its config describes: {described:,} parameters "
                         f"described, {stored:,} stored (the file was edited or damaged)")
    net = build_job_net(config)
    net.load_state_dict(model_state)
    if config.text_fingerprint is not None:
        return net, CharVocab(config.text_fingerprint["chars"]), text_context(config)
    # Written before runs recorded their text: the text as it is now must still fit the model.
    corpus = load_job_dataset(config)
    assert isinstance(corpus, TextDataset), corpus
    vocab_size = (config.model or {}).get("gpt", {}).get("vocab")
    if vocab_size is not None and vocab_size != len(corpus.vocab):
        raise ValueError(f"{path} holds a model of {vocab_size} characters, but {corpus.name} now has "
                         f"{len(corpus.vocab)}: the text changed since the model was trained (the run that wrote "
                         f"{path.name} predates the record of its characters)")
    return net, corpus.vocab, corpus.train.context


def _saved_model(path: Path) -> tuple[Path, TrainConfig, dict]:
    """The file that ``path`` names, the job that trained its model, and the model's arrays.

    A run directory names its checkpoint.npz, or its model.npz when it kept no
    checkpoint. A checkpoint holds its job; a model.npz is a state dict alone,
    and its job is the config.toml beside it (which the run wrote when it began).
    """
    if path.is_dir():
        kept_no_checkpoint = not (path / CHECKPOINT_NAME).exists() and (path / _MODEL_NAME).exists()
        path = path / (_MODEL_NAME if kept_no_checkpoint else CHECKPOINT_NAME)
    if path.name != _MODEL_NAME:
        saved = load_checkpoint(path)
        return path, TrainConfig.from_dict(saved.config, source=f"the config in {str(path)!r}"), saved.model_state
    model_state = load_arrays(path)  # first: a model.npz that is not there is named as such
    config_path = path.with_name(_CONFIG_NAME)
    if not config_path.exists():
        raise ValueError(f"{path} holds a model's arrays without its job: expected the run's {_CONFIG_NAME} "
                         f"beside it, which says which model and characters they are, but {config_path} does "
                         f"not exist (keep {_MODEL_NAME} in its run directory, or give a checkpoint .npz, which "
                         f"holds its job)")
    source = f"config file {str(config_path)!r}"
    return path, TrainConfig.from_dict(load_toml(config_path), source=source), model_state


if __name__ == "__main__":
    sys.exit(main())
