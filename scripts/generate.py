"""mnn-generate: text sampled from a character model that mnn-train trained (``main`` is the console script).

    mnn-generate --checkpoint runs/gpt-example --prompt "def " --tokens 300 --temperature 0.8

``--checkpoint`` is a run's output directory (its checkpoint.npz) or a
checkpoint file. The model and the text it learned from are those the
checkpoint's job names; the text is read again (from its cache) for the
vocabulary. One process, no MPI. Exit status 2 for a bad checkpoint or prompt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnn.distributed.checkpoint import CHECKPOINT_NAME, load_checkpoint
from mnn.distributed.config import TrainConfig
from mnn.distributed.preflight import TEXT_DATASET, load_job_dataset
from mnn.model import build_net
from mnn.text import TextDataset, generate

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnn-generate", description="Continue a prompt with characters sampled from a trained character model.")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run's output directory or a checkpoint .npz of a model trained on a text")
    parser.add_argument("--prompt", default="def ", help="the text to continue (default: 'def ')")
    parser.add_argument("--tokens", type=int, default=300, help="characters to generate (default 300)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="below 1: likelier characters, above 1: more varied (default 0.8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(sample(args.checkpoint, args.prompt, args.tokens, args.temperature, args.seed), flush=True)
    except (ValueError, TypeError) as error:
        print(f"mnn-generate: error: {error}", file=sys.stderr)
        return 2
    return 0


def sample(checkpoint: str, prompt: str, tokens: int, temperature: float, seed: int) -> str:
    path = Path(checkpoint)
    path = path / CHECKPOINT_NAME if path.is_dir() else path
    saved = load_checkpoint(path)
    config = TrainConfig.from_dict(saved.config, source=f"the config in {str(path)!r}")
    if not (config.dataset == TEXT_DATASET or config.dataset.startswith(TEXT_DATASET + ":")):
        raise ValueError(f"{path} is not a character model: its job trained on {config.dataset!r}, not a text")
    corpus = load_job_dataset(config)
    assert isinstance(corpus, TextDataset), corpus
    net = build_net(config.model_description(), dtype=config.dtype)
    net.load_state_dict(saved.model_state)
    return generate(net, corpus.vocab, prompt, tokens, corpus.train.context, temperature, rng=seed)


if __name__ == "__main__":
    sys.exit(main())
