"""Model descriptions: a layer stack as plain data, and the net built from it.

A description is what ``SequentialLayers.get_config()`` returns and what the
``[model]`` table of a job file holds: the layers in order, each named by its
class and given its constructor arguments (without ``dtype`` and ``rng``, which
the builder passes). ``Residual`` takes ``layers``, a list of the same entries::

    description = {"layers": [
        {"type": "ReshapeLayer", "shape": [8, 8]},
        {"type": "Residual", "layers": [{"type": "MultiHeadAttention", "d_model": 8, "n_heads": 2}]},
        {"type": "ReshapeLayer", "shape": [64]},
        {"type": "LinearLayer", "shape": [64, 10]},
        {"type": "CrossEntropyLossLayer"},
    ]}
    net = build_net(description, dtype=np.float64, rng=0)
    net.get_config()        # the same description, with every default filled in

In TOML the same description reads ``[[model.layers]]`` tables, one per layer
(``[[model.layers.layers]]`` for the layers inside a ``Residual``).

A GPT-style language model has a short form, ``{"gpt": {"vocab": 99, "n_layers": 2,
"d_model": 128, "n_heads": 4, "context": 64, "dropout": 0.1}}`` (``[model.gpt]``
in TOML), which :func:`gpt_description` spells out as layers. Every mistake
is a ``ValueError`` naming the entry (``model.layers[2]``) and saying what was
expected: an unknown type or argument (the closest valid one suggested when one
is close), a missing argument, a bad value, a loss layer that is not last,
Residuals nested more than :data:`MAX_NESTING` deep.
Whether the layers fit together (widths that chain) depends on the input, so
:func:`check_fits` runs a small batch through the net.

:func:`model_size` counts a description's parameters (and roughly the numbers
a forward pass keeps for backward) without building it, so that a job can be
refused before it allocates memory the machine does not have.
"""
from __future__ import annotations

import inspect
import math
import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnn.checks import as_generator, did_you_mean, is_int
import mnn.layer
from mnn.layer import Layer, LossLayer
from mnn.layer.conv import as_pair, output_length
from mnn.seq_layers import Residual, SequentialLayers

__all__ = ["LAYER_TYPES", "LOSS_HEADS", "GPT_KEYS", "GPT_INIT_STD", "MAX_GPT_BLOCKS", "MAX_LAYERS", "MAX_NESTING", "ModelSize", "build_net", "build_layers",
           "model_size", "mlp_description", "gpt_description", "expand_gpt", "check_fits"]

#: Every layer a description may name, by class name: each concrete layer of the
#: library (a new one in mnn.layer is nameable at once) and the Residual container.
LAYER_TYPES = {name: getattr(mnn.layer, name) for name in mnn.layer.__all__
               if getattr(mnn.layer, name) not in (Layer, LossLayer)} | {"Residual": Residual}

#: The layers that end an MLP for each ``loss`` of the shorthand.
LOSS_HEADS = {
    "cross_entropy": ["CrossEntropyLossLayer"],
    "nll": ["LogSoftmaxLayer", "NllLossLayer"],
    "mse": ["MSELossLayer"],
}

# Arguments the builder passes itself; a description never gives them.
_BUILDER_ARGUMENTS = ("dtype", "rng")

#: The most layers one list of a description may hold: far more than any net, and a
#: bound on the memory and time a description can cost before its size is checked.
MAX_LAYERS = 100_000

#: How deep Residuals may nest inside each other. A real net nests them one deep;
#: the bound keeps every walk over a description (building it, get_config, writing
#: config.toml) far from Python's recursion limit, whatever a job file holds.
MAX_NESTING = 32

# Values in messages: a deeply nested or huge value (from Python, or a damaged
# file) is shown cut short, never as megabytes of text or a RecursionError.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 4, 8, 8, 60, 60


def _shown(value: Any) -> str:
    return _SHOWN.repr(value)


def mlp_description(widths: list[int], loss: str = "cross_entropy") -> dict[str, Any]:
    """The description of an MLP: Linear layers of ``widths`` with ReLU between
    them, then the layers of ``LOSS_HEADS[loss]`` (the ``layers = [...]`` shorthand)."""
    layers: list[dict[str, Any]] = []
    for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        if index > 0:
            layers.append({"type": "ReluLayer"})
        layers.append({"type": "LinearLayer", "shape": [n_in, n_out]})
    layers += [{"type": name} for name in LOSS_HEADS[loss]]
    return {"layers": layers}


GPT_KEYS = {"vocab": None, "n_layers": 2, "d_model": 128, "n_heads": 4, "context": 64, "dropout": 0.0}
#: The most blocks a ``gpt`` table may ask for (GPT-3 has 96): its description lists every
#: block's layers, so n_layers = 10**9 would take all the memory before any size is checked.
MAX_GPT_BLOCKS = 1000
#: The standard deviation of GPT-2's initial weights (nanoGPT's too).
GPT_INIT_STD = 0.02


def gpt_description(vocab: int, n_layers: int = 2, d_model: int = 128, n_heads: int = 4, context: int = 64,
                    dropout: float = 0.0) -> dict[str, Any]:
    r"""The layers of a GPT-style character model (Radford et al. 2019, as nanoGPT has it):
    token and position embeddings, then ``n_layers`` blocks of [LayerNorm, causal
    self-attention] and [LayerNorm, Linear to 4 d, GELU, Linear to d], each inside a
    residual connection, then a LayerNorm and a Linear to the vocabulary, and the cross
    entropy of the next character at every position. With ``dropout`` > 0, dropout
    follows the embeddings and the end of each residual branch, as in GPT-2.

    The weights start as GPT-2's (Radford et al. 2019, section 2.3; nanoGPT's
    ``model.py``), and the description says so: every Linear and attention
    weight from :math:`\mathcal{N}(0, 0.02^2)` (``init_std``), the two that write
    into the residual stream (attention's ``w_o``, the MLP's second Linear) from
    :math:`\mathcal{N}(0, 0.02^2 / (2 L))` for :math:`L` = ``n_layers``, since
    the stream sums :math:`2L` branches; the embeddings from
    :math:`\mathcal{N}(0, 0.02^2)` (their default); biases zero, LayerNorms
    :math:`\gamma = 1, \beta = 0`. The logits start near zero, so the untrained
    loss is near :math:`\log V` (He's initialisation, the Linear default, starts
    far above it)."""
    def dropped(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return layers + [{"type": "DropoutLayer", "p": dropout}] if dropout else layers

    residual_std = GPT_INIT_STD / math.sqrt(2 * n_layers)

    layers = dropped([{"type": "EmbeddingLayer", "vocab": vocab, "d": d_model},
                      {"type": "PositionalEmbeddingLayer", "context": context, "d": d_model}])
    for _ in range(n_layers):
        layers.append({"type": "Residual", "layers": dropped([
            {"type": "LayerNormLayer", "d": d_model},
            {"type": "MultiHeadAttention", "d_model": d_model, "n_heads": n_heads, "causal": True,
             "init_std": GPT_INIT_STD, "out_init_std": residual_std}])})
        layers.append({"type": "Residual", "layers": dropped([
            {"type": "LayerNormLayer", "d": d_model},
            {"type": "LinearLayer", "shape": [d_model, 4 * d_model], "init_std": GPT_INIT_STD}, {"type": "GeluLayer"},
            {"type": "LinearLayer", "shape": [4 * d_model, d_model], "init_std": residual_std}])})
    layers += [{"type": "LayerNormLayer", "d": d_model},
               {"type": "LinearLayer", "shape": [d_model, vocab], "init_std": GPT_INIT_STD},
               {"type": "CrossEntropyLossLayer"}]
    return {"layers": layers}


def build_net(description: Any, dtype: Any = np.float32, rng: Any = None,
              where: str = "model") -> SequentialLayers:
    """The ``SequentialLayers`` of ``description``, its parameters drawn from ``rng``
    (a Generator or int seed) layer by layer, so the same seed builds the same net."""
    entries = _layer_entries(description, where)
    return SequentialLayers(build_layers(entries, dtype, as_generator(rng), f"{where}.layers"))


def _layer_entries(description: Any, where: str) -> Any:
    """The list of layer entries of a description (a ``gpt`` table spelled out)."""
    if isinstance(description, dict) and set(description) == {"gpt"}:
        description = {"layers": expand_gpt(description["gpt"], f"{where}.gpt")["layers"]}
    if not isinstance(description, dict) or set(description) != {"layers"}:
        raise ValueError(f"{where}: expected a table with one key, 'layers' (a list of layers) or 'gpt' "
                         f"(a GPT's sizes), got {_shown(description)}")
    return description["layers"]


def expand_gpt(sizes: Any, where: str = "model.gpt") -> dict[str, Any]:
    """The layers of a ``gpt`` table (its keys checked: those of :func:`gpt_description`)."""
    if not isinstance(sizes, dict):
        raise ValueError(f"{where}: expected a table of sizes ({', '.join(GPT_KEYS)}), got {_shown(sizes)}")
    unknown = sorted(set(sizes) - set(GPT_KEYS))
    if unknown:
        named = ", ".join(f"{_shown(key)}{did_you_mean(key, GPT_KEYS)}" for key in unknown)
        raise ValueError(f"{where}: unknown key(s) {named}; expected {', '.join(GPT_KEYS)}")
    if sizes.get("vocab") is None:
        raise ValueError(f"{where}: missing vocab (the number of characters; the trainer takes it from the text)")
    values = {**GPT_KEYS, **sizes}
    for key in ("vocab", "n_layers", "d_model", "n_heads", "context"):
        if not (is_int(values[key]) and values[key] >= 1):
            raise ValueError(f"{where}: expected {key} a positive integer, got {_shown(values[key])}")
    if values["n_layers"] > MAX_GPT_BLOCKS:
        raise ValueError(f"{where}: expected n_layers at most {MAX_GPT_BLOCKS}, got {values['n_layers']}")
    if values["d_model"] % values["n_heads"]:
        raise ValueError(f"{where}: expected d_model divisible by n_heads (each head gets d_model / n_heads "
                         f"features), got d_model={values['d_model']}, n_heads={values['n_heads']}")
    if isinstance(values["dropout"], bool) or not isinstance(values["dropout"], (int, float)) \
            or not 0 <= values["dropout"] < 1:
        raise ValueError(f"{where}: expected dropout a number in [0, 1), got {_shown(values['dropout'])}")
    return gpt_description(**values)


def build_layers(entries: Any, dtype: Any, rng: np.random.Generator, where: str,
                 loss_allowed: bool = True, depth: int = 0) -> list[Any]:
    """The layers of a list of entries; ``where`` names the list in messages, ``depth``
    the Residuals it is inside."""
    _check_entries(entries, where)
    layers = [_build_layer(entry, dtype, rng, f"{where}[{index}]", depth) for index, entry in enumerate(entries)]
    _check_losses([type(layer) for layer in layers], where, loss_allowed)
    return layers


def _check_entries(entries: Any, where: str) -> None:
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: expected a non-empty list of layers, got {_shown(entries)}")
    if len(entries) > MAX_LAYERS:
        raise ValueError(f"{where}: expected at most {MAX_LAYERS:,} layers, got {len(entries):,}")


def _check_losses(classes: list[type], where: str, loss_allowed: bool) -> None:
    """A loss layer comes last, and never inside a Residual (``loss_allowed`` False)."""
    for index, cls in enumerate(classes):
        if issubclass(cls, LossLayer) and not loss_allowed:
            raise ValueError(f"{where}[{index}] ({cls.__name__}): a loss layer cannot be inside a Residual")
        if issubclass(cls, LossLayer) and index != len(classes) - 1:
            raise ValueError(f"{where}[{index}] ({cls.__name__}): a loss layer must come last, but "
                             f"{len(classes) - 1 - index} more layer(s) follow it")


def _build_layer(entry: Any, dtype: Any, rng: np.random.Generator, where: str, depth: int) -> Any:
    cls, positional, arguments, where = _resolve(entry, where)
    if cls is Residual:
        _check_nesting(depth, where)
        arguments["layers"] = build_layers(arguments["layers"], dtype, rng, f"{where}.layers",
                                           loss_allowed=False, depth=depth + 1)
    builder_arguments = {key: value for key, value in (("dtype", dtype), ("rng", rng))
                         if key in inspect.signature(cls).parameters}
    try:
        return cls(*positional, **arguments, **builder_arguments)
    except (ValueError, TypeError) as error:
        message = str(error).removeprefix(f"{cls.__name__}: ")  # the entry already names the type
        raise ValueError(f"{where}: {message}") from None


def _resolve(entry: Any, where: str) -> tuple[type, list[Any], dict[str, Any], str]:
    """The class an entry names, its positional and keyword arguments (checked against
    the class's signature), and ``where`` with the type added."""
    if not isinstance(entry, dict) or "type" not in entry:
        raise ValueError(f"{where}: expected a table with a 'type' key (a layer class such as 'LinearLayer'), "
                         f"got {_shown(entry)}")
    name = entry["type"]
    if not isinstance(name, str) or name not in LAYER_TYPES:
        raise ValueError(f"{where}: unknown layer type {_shown(name)}{did_you_mean(name, LAYER_TYPES)}; "
                         f"expected one of {', '.join(LAYER_TYPES)}")
    cls = LAYER_TYPES[name]
    arguments = {key: value for key, value in entry.items() if key != "type"}
    where = f"{where} ({name})"
    if cls is Residual:
        arguments.setdefault("layers", None)  # checked as a list of layers, where the list is named
    parameters = {key: parameter for key, parameter in inspect.signature(cls).parameters.items()
                  if key not in _BUILDER_ARGUMENTS}
    accepted = ", ".join(parameters) or "no arguments"
    for key in arguments:
        if key not in parameters:
            raise ValueError(f"{where}: unknown argument {_shown(key)}{did_you_mean(key, parameters)}; "
                             f"{name} takes {accepted}")
    positional: list[Any] = []
    for key, parameter in parameters.items():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL and key in arguments:
            # LinearLayer(*shape): the description gives shape = [n_in, n_out].
            value = arguments.pop(key)
            if not isinstance(value, list):
                raise ValueError(f"{where}: expected {key} as a list, got {_shown(value)}")
            positional = value
        elif parameter.default is inspect.Parameter.empty and parameter.kind is not parameter.VAR_POSITIONAL \
                and key not in arguments:
            raise ValueError(f"{where}: missing argument {key!r}; {name} takes {accepted}")
    return cls, positional, arguments, where


def _check_nesting(depth: int, where: str) -> None:
    """Refuse a Residual ``depth`` Residuals deep beyond the limit, naming the outermost one."""
    if depth >= MAX_NESTING:
        outermost = where[:where.index(" (Residual)") + len(" (Residual)")]
        raise ValueError(f"{outermost}: Residuals nested more than {MAX_NESTING} deep inside it; a "
                         f"description may nest them at most {MAX_NESTING} deep")


# ------------------------------------------------------------------ size without building
@dataclass(frozen=True)
class ModelSize:
    """What a description costs, counted in numbers (multiply by the dtype's itemsize
    for bytes): ``parameters``, and ``activations``, a rough bound on the numbers a
    forward pass of one sample keeps for backward and hands on."""

    parameters: int
    activations: int


def model_size(description: Any, sample_numbers: int = 1, where: str = "model") -> ModelSize:
    """The size of the net ``description`` describes, without building it.

    Checks what :func:`build_net` checks without a layer's constructor (the
    structure, the types, the arguments' names, where the loss is, the nesting), so a description
    that passes here and is far too large can be refused before the allocation.
    A size argument that is not a positive integer counts as 0 here; the layer's
    constructor refuses it. ``sample_numbers`` is the numbers in one input
    sample (features, or a text window's positions), from which the activations
    are counted layer by layer.
    """
    entries = _layer_entries(description, where)
    parameters, activations, _ = _entries_size(entries, sample_numbers, f"{where}.layers", depth=0)
    return ModelSize(parameters, activations)


def _entries_size(entries: Any, numbers: int, where: str, depth: int) -> tuple[int, int, int]:
    """(parameters, kept numbers, output numbers per sample) of a list of entries."""
    _check_entries(entries, where)
    parameters = kept = 0
    classes = []
    for index, entry in enumerate(entries):
        cls, positional, arguments, entry_where = _resolve(entry, f"{where}[{index}]")
        if cls is Residual:
            _check_nesting(depth, entry_where)
            inner = _entries_size(arguments["layers"], numbers, f"{entry_where}.layers", depth + 1)
            layer = (inner[0], inner[1] + numbers, numbers)
        else:
            layer = _layer_size(cls.__name__, positional, arguments, numbers)
        parameters, kept, numbers = parameters + layer[0], kept + layer[1], layer[2]
        classes.append(cls)
    _check_losses(classes, where, loss_allowed=depth == 0)
    return parameters, kept, numbers


def _layer_size(name: str, positional: list[Any], arguments: dict[str, Any],
                numbers: int) -> tuple[int, int, int]:
    r"""(parameters, kept numbers, output numbers per sample) of one layer that gets
    ``numbers`` per sample; the parameter shapes are those the constructors allocate.

    With :math:`N` numbers in, :math:`P = N / n` positions of :math:`n` features:
    LinearLayer :math:`nm + m` parameters, keeps its input and :math:`Pm` out;
    MultiHeadAttention :math:`4d^2 + 4d`, keeps about :math:`6N` (q, k, v, the
    context, its input and output) and :math:`2hP^2` (scores and their softmax);
    EmbeddingLayer :math:`vd`, :math:`Nd` out; PositionalEmbeddingLayer :math:`Td`;
    LayerNormLayer :math:`2d`, keeps :math:`2N`; BatchNormLayer :math:`2C` (and :math:`2C`
    running statistics, buffers not counted), keeps :math:`2N`; every other layer keeps its output.
    """
    def positive(*values: Any) -> bool:  # sizes that are not are the constructor's to refuse
        return all(is_int(value) and value > 0 for value in values)

    if name == "LinearLayer" and len(positional) == 2 and positive(*positional):
        n_in, n_out = map(int, positional)
        positions = max(1, numbers // n_in)
        bias = n_out if arguments.get("bias", True) else 0
        return n_in * n_out + bias, numbers + positions * n_out, positions * n_out
    if name == "MultiHeadAttention" and positive(arguments["d_model"], arguments["n_heads"]):
        d_model, n_heads = int(arguments["d_model"]), int(arguments["n_heads"])
        positions = max(1, numbers // d_model)
        return 4 * d_model * d_model + 4 * d_model, 6 * numbers + 2 * n_heads * positions ** 2, numbers
    vocab, context, d = (arguments.get(key) for key in ("vocab", "context", "d"))
    vocab, context, d = (int(size) if is_int(size) else size for size in (vocab, context, d))
    if name == "EmbeddingLayer" and positive(vocab, d):
        return vocab * d, numbers * d, numbers * d
    if name == "PositionalEmbeddingLayer" and positive(context, d):
        return context * d, numbers, numbers
    if name == "LayerNormLayer" and positive(d):
        return 2 * d, 2 * numbers, numbers
    if name == "BatchNormLayer" and positive(arguments.get("channels")):
        return 2 * int(arguments["channels"]), 2 * numbers, numbers
    if name in ("Conv2DLayer", "MaxPool2DLayer", "AvgPool2DLayer"):
        return _image_layer_size(name, arguments, numbers)
    return 0, numbers, numbers


def _image_layer_size(name: str, arguments: dict[str, Any], numbers: int) -> tuple[int, int, int]:
    r""":func:`_layer_size` of a convolution or pooling layer. The numbers per sample do
    not say the image's height and width, so the image is taken to be square.

    Conv2DLayer: :math:`O C k_h k_w + O` parameters; of :math:`N` numbers in,
    :math:`H = W = \sqrt{N / C}`; keeps its im2col columns, :math:`C k_h k_w H_o W_o`,
    and gives :math:`O H_o W_o`. Pooling (channels unknown): about
    :math:`N / (s_h s_w)` out, which each keeps (MaxPool2DLayer's backward finds the
    arg-max by comparing it with the input, which the layer before holds).
    """
    try:
        kernel = as_pair(name, arguments.get("kernel"), 1)
        stride_default = 1 if name == "Conv2DLayer" else kernel  # pooling windows tile the image by default
        stride = as_pair(name, stride_default if arguments.get("stride") is None else arguments["stride"], 1)
        padding = as_pair(name, arguments.get("padding", 0), 0)
    except ValueError:  # the constructor's to refuse
        return 0, numbers, numbers
    if name != "Conv2DLayer":
        out = max(1, numbers // (stride[0] * stride[1]))
        return 0, out, out
    in_channels, out_channels = arguments.get("in_channels"), arguments.get("out_channels")
    if not all(is_int(value) and value > 0 for value in (in_channels, out_channels)):
        return 0, numbers, numbers
    side = math.isqrt(max(1, numbers // in_channels))
    positions = output_length(side, kernel[0], stride[0], padding[0]) * output_length(side, kernel[1], stride[1],
                                                                                       padding[1])
    window = in_channels * kernel[0] * kernel[1]
    bias = out_channels if arguments.get("bias", True) else 0
    return out_channels * window + bias, (window + out_channels) * positions, out_channels * positions


def check_fits(net: SequentialLayers, inputs: np.ndarray, targets: Any = None) -> Any:
    """Run a small batch through ``net`` layer by layer and return the last output.

    A layer that does not fit what the layers before it give (widths that do
    not chain, a reshape of the wrong size, targets that the loss layer cannot
    take) raises ``ValueError`` naming it and the shape it received. Without
    ``targets`` the loss layer is not run.
    """
    outputs = inputs
    # The shapes are checked, not the values: weights that overflow (a diverged state
    # resumed) are the trainer's to report, not a warning from here.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for index, layer in enumerate(net.layers):
            if layer is net.loss_layer and targets is None:
                break
            received = np.shape(outputs)
            try:
                outputs = layer.forward(outputs, targets if layer is net.loss_layer else None)
            except (ValueError, TypeError) as error:
                raise ValueError(f"layer {index} ({layer.name}) does not fit its input of shape {received[1:]} "
                                 f"per sample: {error}") from None
    return outputs
