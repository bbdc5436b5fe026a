"""The GPT of ``mnn-bench --model gpt``: one character model in mnn and in PyTorch, from the same weights.

The mnn model is what ``mnn-train`` builds from a ``[model.gpt]`` table
(:func:`mnn.model.gpt_description`, parameters drawn from the seed);
:func:`torch_gpt` writes the same architecture in PyTorch the way a PyTorch
user would (nanoGPT's blocks: one fused q/k/v projection, the fused
``scaled_dot_product_attention``) and copies mnn's parameters into it, so
that both compute the same loss from the same batch. The windows are the
training text's (by default the Python standard library's sources, whose
characters are the vocabulary), drawn as ``mnn-train`` draws them
(:class:`~mnn.distributed.sampler.DrawnBatchSampler`: from (seed, step)).

A step is forward, backward and an Adam update (the same Adam in both:
:class:`mnn.optim.Adam` is PyTorch's formula), in float32. Usage::

    from mnn.distributed.experiments.bench import measure
    from mnn.distributed.experiments.gpt_bench import GptSizes, gpt_steps
    sizes = GptSizes(batch=32)
    results = measure(gpt_steps(sizes, comm, load_text(context=sizes.context)), comm, batch_size=32)

PyTorch is a reference only, imported lazily: without it :func:`gpt_steps`
gives mnn's step alone.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from mnn import Adam, SequentialLayers
from mnn.layer import (CrossEntropyLossLayer, EmbeddingLayer, GeluLayer, LayerNormLayer, LinearLayer,
                       MultiHeadAttention, PositionalEmbeddingLayer)
from mnn.model import build_net
from mnn.seq_layers import Residual
from mnn.text import TextDataset
from mnn.distributed.experiments.bench import (Step, build_step, copy_to_torch, evaluation_steps, has_torch,
                                               torch_dtype, torch_no_grad_loss, torch_training_step)
from mnn.distributed.comm import Communicator
from mnn.distributed.data_parallel import DEFAULT_BUCKET_BYTES
from mnn.distributed.sampler import DrawnBatchSampler

__all__ = ["GptSizes", "build_gpt", "torch_gpt", "drawn_windows", "gpt_steps", "gpt_evaluation_steps",
           "LEARNING_RATE"]

#: Adam's learning rate in the timed steps (any value times the same).
LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class GptSizes:
    """The model and batch of the benchmark: ``batch`` windows of ``context``
    characters per rank, ``n_layers`` blocks of width ``d_model`` with ``n_heads`` heads."""

    batch: int = 32
    context: int = 64
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2

    def model(self, vocab: int) -> dict[str, Any]:
        """The ``[model]`` table of a job training this model (without dropout)."""
        sizes = {key: value for key, value in asdict(self).items() if key != "batch"}
        return {"gpt": {"vocab": vocab, **sizes, "dropout": 0.0}}


def build_gpt(sizes: GptSizes, vocab: int, seed: int = 0) -> SequentialLayers:
    """The mnn GPT in float32, its parameters drawn from ``seed`` as ``mnn-train --seed`` draws them."""
    return build_net(sizes.model(vocab), dtype=np.float32, rng=seed)


def drawn_windows(text: TextDataset, sizes: GptSizes, comm: Communicator, step: int = 0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """This rank's windows of global batch ``step`` (``sizes.batch`` per rank), their next
    characters, and the global batch size: the batch ``mnn-train`` trains on at that step."""
    sampler = DrawnBatchSampler(len(text.train), sizes.batch * comm.size, steps_per_epoch=step + 1,
                                rank=comm.rank, world_size=comm.size, seed=seed)
    shard = next(sampler.batches(0, start_step=step))
    x, y = text.train.batch(shard.indices)
    return x, y, shard.global_batch_size


# ------------------------------------------------------------------ the same model in PyTorch
def _gpt_layers(net: SequentialLayers) -> tuple[Any, Any, list[tuple[Any, ...]], Any, Any]:
    """The layers of a net of ``gpt_description`` without dropout: the two embeddings,
    each block's (LayerNorm, attention, LayerNorm, Linear, Linear), the final LayerNorm
    and the head; ValueError for any other net."""
    def kinds(layers: list[Any]) -> list[type]:
        return [type(layer) for layer in layers]

    layers = list(net.layers)
    ends = [EmbeddingLayer, PositionalEmbeddingLayer], [LayerNormLayer, LinearLayer, CrossEntropyLossLayer]
    attention_branch = [LayerNormLayer, MultiHeadAttention]
    mlp_branch = [LayerNormLayer, LinearLayer, GeluLayer, LinearLayer]
    middle = layers[2:-3]
    blocks = []
    shaped = (kinds(layers[:2]) == ends[0] and kinds(layers[-3:]) == ends[1] and len(middle) % 2 == 0)
    for attention, mlp in zip(middle[::2], middle[1::2]):
        if not (isinstance(attention, Residual) and isinstance(mlp, Residual)
                and kinds(attention.layers) == attention_branch and kinds(mlp.layers) == mlp_branch):
            shaped = False
            break
        blocks.append((*attention.layers, mlp.layers[0], mlp.layers[1], mlp.layers[3]))
    if not shaped or not blocks or not all(block[1].causal for block in blocks):
        raise ValueError(f"torch_gpt: expected a net of gpt_description without dropout (embeddings, "
                         f"blocks of causal attention and MLP, LayerNorm, Linear, cross entropy), got "
                         f"{[layer.name for layer in layers]}")
    return layers[0], layers[1], blocks, layers[-3], layers[-2]


def _torch_classes() -> tuple[type, type]:
    """The PyTorch modules of the model: a block and the whole GPT (defined here so
    that PyTorch is imported only when it is used)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        """Pre-LN block: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x))."""

        def __init__(self, d_model: int, n_heads: int):
            super().__init__()
            self.n_heads = n_heads
            self.ln_1 = nn.LayerNorm(d_model, eps=1e-5)
            self.qkv = nn.Linear(d_model, 3 * d_model)   # rows: q, k, v, each (d_model, d_model)
            self.out = nn.Linear(d_model, d_model)
            self.ln_2 = nn.LayerNorm(d_model, eps=1e-5)
            self.fc = nn.Linear(d_model, 4 * d_model)
            self.fc_out = nn.Linear(4 * d_model, d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, length, d_model = x.shape
            # (B, T, 3d) -> q, k, v of shape (B, h, T, d / h): head h is columns h d_k ... of each.
            q, k, v = self.qkv(self.ln_1(x)).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
            heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(heads.transpose(1, 2).reshape(batch, length, d_model))
            return x + self.fc_out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        """Token and position embeddings, blocks, LayerNorm, Linear to the vocabulary;
        ``forward(ids, targets)`` is the mean cross entropy over all positions."""

        def __init__(self, vocab: int, context: int, d_model: int, n_heads: int, n_layers: int):
            super().__init__()
            self.tokens = nn.Embedding(vocab, d_model)
            self.positions = nn.Parameter(torch.zeros(context, d_model))
            self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
            self.ln_f = nn.LayerNorm(d_model, eps=1e-5)
            self.head = nn.Linear(d_model, vocab)

        def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            x = self.tokens(ids) + self.positions[:ids.shape[1]]
            for block in self.blocks:
                x = block(x)
            logits = self.head(self.ln_f(x))
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return Block, GPT


def torch_gpt(net: SequentialLayers) -> Any:
    """A PyTorch ``nn.Module`` of the same GPT as ``net`` (a net of ``gpt_description``
    without dropout), holding copies of ``net``'s parameters in its dtype (float32 or
    float64): ``module(ids, targets)`` is the loss ``net(ids, targets)`` is, up to rounding."""
    import torch

    embedding, positions, blocks, final_norm, head = _gpt_layers(net)
    attention = blocks[0][1]
    _, GPT = _torch_classes()
    model = GPT(embedding.vocab, positions.context, attention.d_model, attention.n_heads, len(blocks))
    model.to(torch_dtype(net.dtype))

    def copy_linear(module: Any, layer: Any) -> None:
        copy_to_torch(module.weight, layer.params["w"])  # both (out, in)
        copy_to_torch(module.bias, layer.params["b"])

    def copy_norm(module: Any, layer: Any) -> None:
        copy_to_torch(module.weight, layer.params["g"])
        copy_to_torch(module.bias, layer.params["b"])

    with torch.no_grad():
        copy_to_torch(model.tokens.weight, embedding.params["w"])
        copy_to_torch(model.positions, positions.params["w"])
        for block, (norm_1, attention, norm_2, fc, fc_out) in zip(model.blocks, blocks):
            copy_norm(block.ln_1, norm_1)
            copy_to_torch(block.qkv.weight, *(attention.params[f"w_{role}"] for role in "qkv"))
            copy_to_torch(block.qkv.bias, *(attention.params[f"b_{role}"] for role in "qkv"))
            copy_to_torch(block.out.weight, attention.params["w_o"])
            copy_to_torch(block.out.bias, attention.params["b_o"])
            copy_norm(block.ln_2, norm_2)
            copy_linear(block.fc, fc)
            copy_linear(block.fc_out, fc_out)
        copy_norm(model.ln_f, final_norm)
        copy_linear(model.head, head)
    return model


# ------------------------------------------------------------------ the timed steps
def gpt_steps(sizes: GptSizes, comm: Communicator, text: TextDataset, with_torch: bool = True,
              bucket_bytes: int = DEFAULT_BUCKET_BYTES, seed: int = 0) -> dict[str, Step]:
    """The GPT's steps on this rank's windows of the first drawn batch: "mnn", and
    "torch" (one process) or "torch-ddp" when PyTorch is importable and wanted.
    Both models start from the same parameters, drawn from ``seed``."""
    x, y, global_batch_size = drawn_windows(text, sizes, comm, seed=seed)
    steps = {}
    if with_torch and has_torch():
        import torch

        # Built first, from the untouched parameters (mnn's steps change them).
        model = torch_gpt(build_gpt(sizes, len(text.vocab), seed))
        adam = functools.partial(torch.optim.Adam, lr=LEARNING_RATE)
        steps["torch" if comm.size == 1 else "torch-ddp"] = (torch_training_step(model, adam, x, y, comm), None)
    net = build_gpt(sizes, len(text.vocab), seed)
    mnn_step = build_step(net, Adam(net, lr=LEARNING_RATE), [(x, y)], global_batch_size, comm,
                          bucket_bytes=bucket_bytes)
    return {"mnn": mnn_step, **steps}


def gpt_evaluation_steps(sizes: GptSizes, comm: Communicator, text: TextDataset, with_torch: bool = True,
                         seed: int = 0) -> dict[str, Step]:
    """:func:`~mnn.distributed.experiments.bench.evaluation_steps` of the GPT on the first
    drawn batch's windows (``sizes.batch`` of them): mnn's forward in training and in
    evaluation mode, and PyTorch's under ``torch.no_grad()`` from the same weights."""
    x, y, _ = drawn_windows(text, sizes, comm, seed=seed)

    def torch_loss(net: SequentialLayers) -> Callable[[], Any]:
        return torch_no_grad_loss(torch_gpt(net), x, y)
    return evaluation_steps(lambda: build_gpt(sizes, len(text.vocab), seed), x, y,
                            torch_loss if with_torch and has_torch() else None)
