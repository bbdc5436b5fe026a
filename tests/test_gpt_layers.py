"""The layers of a GPT-style language model, stacked: finite differences through a
2-block model, dropout masks that do not depend on the shards, and PyTorch as a
reference (skipped without it).

The layers one by one are checked in test_gradients.py (finite differences),
test_layers.py (dtypes, errors) and test_model.py (descriptions).
"""
import math

import numpy as np
import pytest

from mnn import (
    CrossEntropyLossLayer,
    DropoutLayer,
    EmbeddingLayer,
    GeluLayer,
    LayerNormLayer,
    LinearLayer,
    MultiHeadAttention,
    Residual,
    SequentialLayers,
)
from mnn.layer.dropout import _splitmix64
from mnn.model import build_net

F64 = np.float64
VOCAB, D_MODEL, HEADS, CONTEXT = 7, 8, 2, 6


def gpt_description(n_blocks=2, dropout=0.0, vocab=VOCAB, d_model=D_MODEL, n_heads=HEADS, context=CONTEXT):
    """token + position embedding -> blocks of [LayerNorm -> causal attention -> residual;
    LayerNorm -> Linear 4d -> GELU -> Linear d -> residual] -> LayerNorm -> Linear to the vocabulary,
    with dropout after the embeddings and at the end of each residual branch when ``dropout`` > 0."""
    drop = [{"type": "DropoutLayer", "p": dropout}] if dropout else []
    blocks = []
    for _ in range(n_blocks):
        blocks += [
            {"type": "Residual", "layers": [
                {"type": "LayerNormLayer", "d": d_model},
                {"type": "MultiHeadAttention", "d_model": d_model, "n_heads": n_heads, "causal": True}, *drop]},
            {"type": "Residual", "layers": [
                {"type": "LayerNormLayer", "d": d_model},
                {"type": "LinearLayer", "shape": [d_model, 4 * d_model]},
                {"type": "GeluLayer"},
                {"type": "LinearLayer", "shape": [4 * d_model, d_model]}, *drop]},
        ]
    return {"layers": [
        {"type": "EmbeddingLayer", "vocab": vocab, "d": d_model},
        {"type": "PositionalEmbeddingLayer", "context": context, "d": d_model},
        *drop, *blocks,
        {"type": "LayerNormLayer", "d": d_model},
        {"type": "LinearLayer", "shape": [d_model, vocab]},
        {"type": "CrossEntropyLossLayer"},
    ]}


def gpt_net(dropout=0.0, seed=0):
    """A float64 2-block model whose every parameter is away from its initial value
    (LayerNorm gains not 1, biases not 0), so every gradient path carries weight."""
    net = build_net(gpt_description(dropout=dropout), dtype=F64, rng=seed)
    rng = np.random.default_rng(seed + 100)
    for _, param, _ in net.named_params():
        param += 0.2 * rng.standard_normal(param.shape)
    return net


def token_batch(batch_size=3, length=5, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, (batch_size, length)), rng.integers(0, VOCAB, (batch_size, length))


def all_layers(layers):
    """Every layer at any depth of a list of layers."""
    for layer in layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer.layers)


# ------------------------------------------------------------------ the model end to end

@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_gpt_gradients_match_finite_differences(dropout, numerical_gradient):
    net = gpt_net(dropout)
    ids, targets = token_batch()

    def loss():
        net.start_batch(step=7, first_sample=0)  # with dropout: the same masks in every forward
        return net(ids, targets)

    loss()
    net.zero_grads()
    gradients = net.backward()
    assert gradients[0] is None  # the token ids have no gradient
    names = [name for name, _, _ in net.named_params()]
    assert sum("MultiHeadAttention" in name for name in names) == 2 * 8  # every block is checked
    for name, param, grad in net.named_params():
        np.testing.assert_allclose(grad, numerical_gradient(loss, param), rtol=1e-6, atol=1e-8, err_msg=name)


def test_gpt_loss_is_the_mean_over_positions_and_learns():
    net = build_net(gpt_description(), dtype=F64, rng=3)
    ids, _ = token_batch(batch_size=4, length=CONTEXT, seed=2)
    targets = np.roll(ids, -1, axis=1)  # next token, a learnable rule on this tiny data
    first = net(ids, targets)
    logits = net(ids)
    assert logits.shape == (4, CONTEXT, VOCAB)
    log_probabilities = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probabilities, targets[..., None], axis=-1)
    assert first == pytest.approx(-picked.mean(), rel=1e-12)
    for _ in range(60):
        net(ids, targets)
        net.backward()
        net.step(0.05)
        net.zero_grads()
    assert net(ids, targets) < 0.5 * first


# ------------------------------------------------------------------ initialisation

GPT_SIZES = {"vocab": 99, "n_layers": 3, "d_model": 128, "n_heads": 4, "context": 32}


def test_the_untrained_gpt_form_predicts_every_character_alike():
    """GPT-2's initialisation starts the logits near zero, so the loss of the untrained
    short form is close to log2(vocab) bits per character; He's (the layers' default),
    the spelled-out description without init_std, starts far above it."""
    ids = np.random.default_rng(1).integers(0, GPT_SIZES["vocab"], (16, GPT_SIZES["context"]))
    targets = np.roll(ids, -1, axis=1)
    uniform = math.log2(GPT_SIZES["vocab"])
    sizes = {key: GPT_SIZES[key] for key in ("vocab", "d_model", "context")}
    bits = {}
    for name, description in (("gpt", {"gpt": GPT_SIZES}),
                              ("he", gpt_description(n_blocks=3, n_heads=4, **sizes))):
        net = build_net(description, dtype=F64, rng=0)
        net.set_training(False)
        bits[name] = net(ids, targets) / math.log(2)
    assert abs(bits["gpt"] - uniform) < 0.2, bits
    assert bits["he"] > uniform + 1, bits


def test_the_gpt_form_draws_gpt2s_weights():
    """std 0.02 for every weight matrix and embedding, 0.02 / sqrt(2 n_layers) for the two
    projections into the residual stream; biases zero. The sample std of N normal numbers
    is within 3 % of the true one with a probability far above 1 - 1e-9 for N >= 12 288."""
    net = build_net({"gpt": GPT_SIZES}, dtype=F64, rng=0)
    residual = 0.02 / math.sqrt(2 * GPT_SIZES["n_layers"])
    expected = {}
    for name, param, _ in net.named_params():
        if name.endswith((".b", ".b_q", ".b_k", ".b_v", ".b_o")):
            assert not param.any(), name
        elif name.endswith(".w_o") or name.endswith("Residual.3.LinearLayer.w"):
            expected[name] = residual
        elif "LayerNormLayer" not in name:
            expected[name] = 0.02
    assert sum(std == residual for std in expected.values()) == 2 * GPT_SIZES["n_layers"]
    assert len(expected) == 2 + 6 * GPT_SIZES["n_layers"] + 1  # embeddings, q k v o and the MLP's, the head
    params = {name: param for name, param, _ in net.named_params()}
    for name, std in expected.items():
        assert params[name].std() == pytest.approx(std, rel=0.03), name
        assert abs(params[name].mean()) < 0.1 * std, name


def test_the_gpt_forms_initialisation_is_in_its_description():
    """get_config() names every init_std the short form chose; the description (through
    TOML, as config.toml holds it) rebuilds the same net."""
    import tomllib

    import tomli_w

    net = build_net({"gpt": GPT_SIZES}, dtype=F64, rng=0)
    config = net.get_config()
    attention, mlp = config["layers"][2]["layers"][1], config["layers"][3]["layers"]
    residual = 0.02 / math.sqrt(2 * GPT_SIZES["n_layers"])
    assert (attention["init_std"], attention["out_init_std"]) == (0.02, residual)
    assert (mlp[1]["init_std"], mlp[3]["init_std"]) == (0.02, residual)
    assert config["layers"][-2] == {"type": "LinearLayer", "shape": [128, 99], "bias": True, "init_std": 0.02}
    again = build_net(tomllib.loads(tomli_w.dumps({"model": config}))["model"], dtype=F64, rng=0)
    assert again.get_config() == config
    for (name, param, _), (_, other, _) in zip(net.named_params(), again.named_params()):
        np.testing.assert_array_equal(param, other, err_msg=name)


def test_layers_without_init_std_draw_as_before():
    """The default is unchanged for every other net: He for Linear, 1/d_model for attention,
    the same numbers from the same rng, and no init_std in the description."""
    linear = LinearLayer(5, 3, dtype=F64, rng=0)
    np.testing.assert_array_equal(linear.params["w"],
                                  np.random.default_rng(0).standard_normal((3, 5)) * np.sqrt(2 / 5))
    assert linear.get_config() == {"shape": [5, 3], "bias": True}
    attention = MultiHeadAttention(8, 2, dtype=F64, rng=0)
    normal = np.random.default_rng(0).standard_normal((4, 8, 8))
    for role, weights in zip("qkvo", normal):
        np.testing.assert_array_equal(attention.params[f"w_{role}"], weights * np.sqrt(1 / 8))
    assert attention.get_config() == {"d_model": 8, "n_heads": 2, "causal": False}
    only_inner = MultiHeadAttention(8, 2, init_std=0.5, dtype=F64, rng=0)
    np.testing.assert_array_equal(only_inner.params["w_o"], normal[3] * 0.5)  # w_o as the other three


@pytest.mark.parametrize("make, error, message", [
    (lambda: LinearLayer(2, 3, init_std=0.0), ValueError, r"LinearLayer: init_std: expected a positive "),
    (lambda: LinearLayer(2, 3, init_std="0.02"), TypeError, r"LinearLayer: init_std: expected a number"),
    (lambda: MultiHeadAttention(4, 2, out_init_std=-1), ValueError, r"out_init_std: expected a positive"),
    (lambda: MultiHeadAttention(4, 2, init_std=float("nan")), ValueError, r"init_std: expected a finite"),
])
def test_a_bad_init_std_is_named(make, error, message):
    with pytest.raises(error, match=message):
        make()


# ------------------------------------------------------------------ dropout masks

def keep_reference(seed, step, sample, index, p):
    """Eq. (4), (5) of DropoutLayer.forward in plain Python integers: whether value
    ``index`` of global sample ``sample`` is kept at ``step``."""
    mask64 = 2**64 - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        return z ^ (z >> 31)

    def output(state, counter):
        return mix((state + (counter + 1) * 0x9E3779B97F4A7C15) & mask64)

    word = output(output(output(seed, step), sample), index // 2)
    return (word >> (32 * (index % 2))) & 0xFFFFFFFF >= math.ceil(p * 2**32)


def test_splitmix64_gives_the_published_outputs():
    # splitmix64.c (Vigna) seeded with 1234567: its first five outputs.
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                16408922859458223821]
    assert _splitmix64(1234567, np.arange(5)).tolist() == expected


def test_dropout_masks_follow_the_documented_hash():
    layer = DropoutLayer(0.5, seed=2**63 - 5, dtype=F64)
    layer.start_batch(step=11, first_sample=40)
    kept = layer.forward(np.ones((3, 5))) != 0
    expected = [[keep_reference(2**63 - 5, 11, 40 + row, index, 0.5) for index in range(5)] for row in range(3)]
    np.testing.assert_array_equal(kept, expected)


def masks(layer, batch, step, shards):
    """The outputs of ``layer`` on ``batch`` at ``step``, run shard by shard (sizes ``shards``)."""
    outputs, first = [], 0
    for size in shards:
        layer.start_batch(step, first)
        outputs.append(layer.forward(batch[first:first + size]))
        first += size
    return np.concatenate(outputs)


@pytest.mark.parametrize("shards", [[4, 2], [1, 2, 3], [1] * 6, [3, 0, 3]])
def test_dropout_masks_do_not_depend_on_the_shards(shards):
    batch = np.random.default_rng(0).standard_normal((6, 4, 5)).astype(np.float32)
    layer = DropoutLayer(0.5, seed=3)
    whole = masks(layer, batch, step=2, shards=[6])
    shards = [size for size in shards if size]  # an empty shard runs no forward
    np.testing.assert_array_equal(masks(layer, batch, step=2, shards=shards), whole)


def test_gpt_outputs_do_not_depend_on_the_shards():
    net = gpt_net(dropout=0.3)
    ids, _ = token_batch(batch_size=6)
    net.start_batch(4, 0)
    whole = net(ids)
    parts = []
    for first, size in ((0, 4), (4, 2)):
        net.start_batch(4, first)
        parts.append(net(ids[first:first + size]))
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-13, atol=1e-13)
    net.start_batch(5, 0)
    assert not np.allclose(net(ids), whole), "another step must draw other masks"


def test_dropout_masks_differ_across_steps_samples_and_layers():
    ones = np.ones((2, 64, 32), dtype=np.float32)
    first, second = DropoutLayer(0.5, seed=1), DropoutLayer(0.5, seed=2)
    at = {}
    for step in (0, 1):
        for layer in (first, second):
            layer.start_batch(step, 0)
            at[layer.seed, step] = layer.forward(ones) != 0
    assert not np.array_equal(at[1, 0], at[1, 1])  # steps
    assert not np.array_equal(at[1, 0], at[2, 0])  # layers
    assert not np.array_equal(at[1, 0][0], at[1, 0][1])  # samples
    # Independent, not merely different: about half of the bits agree.
    assert abs(np.mean(at[1, 0] == at[2, 0]) - 0.5) < 0.02
    assert abs(np.mean(at[1, 0] == at[1, 1]) - 0.5) < 0.02


def test_dropout_keeps_about_one_minus_p_and_scales_what_it_keeps():
    p = 0.3
    layer = DropoutLayer(p, seed=5, dtype=F64)
    inputs = np.random.default_rng(0).uniform(1, 2, (64, 64, 64))
    outputs = layer.forward(inputs)
    kept = outputs != 0
    sigma = math.sqrt(p * (1 - p) / kept.size)
    assert abs(kept.mean() - (1 - p)) < 5 * sigma
    np.testing.assert_allclose(outputs[kept], inputs[kept] / (1 - p), rtol=1e-15)
    # The low and high halves of a hash word drive neighbouring values: independent.
    pairs = kept.reshape(-1, 2)
    assert abs(np.mean(pairs[:, 0] & pairs[:, 1]) - (1 - p) ** 2) < 0.01
    assert abs(np.mean(kept, axis=(1, 2)) - (1 - p)).max() < 0.05  # every sample


def test_dropout_is_the_identity_when_not_training_and_uses_no_step():
    inputs = np.random.default_rng(0).standard_normal((4, 6))
    layer, fresh = DropoutLayer(0.5, seed=8, dtype=F64), DropoutLayer(0.5, seed=8, dtype=F64)
    layer.set_training(False)
    assert not layer.training
    np.testing.assert_array_equal(layer.forward(inputs), inputs)
    with pytest.raises(ValueError, match="backward called after a forward in evaluation mode"):
        layer.backward(2 * inputs)  # evaluation keeps nothing for backward
    layer.set_training(True)
    np.testing.assert_array_equal(layer.forward(inputs), fresh.forward(inputs))  # both at step 0


def test_dropout_with_p_zero_is_the_identity():
    inputs = np.random.default_rng(0).standard_normal((4, 6))
    layer = DropoutLayer(0.0, seed=1, dtype=F64)
    np.testing.assert_array_equal(layer.forward(inputs), inputs)
    np.testing.assert_array_equal(layer.backward(inputs), inputs)


def test_dropout_with_p_next_to_one_keeps_nothing():
    layer = DropoutLayer(1 - 2**-40, seed=1, dtype=F64)  # ceil(p 2^32) = 2^32, beyond every 32-bit u
    assert not layer.forward(np.ones((4, 6))).any()


def test_forwards_without_start_batch_use_the_next_step():
    """A notebook's net(x, y) calls: a new mask per forward, reproducible from the seed."""
    inputs = np.ones((3, 10))
    unannounced = DropoutLayer(0.5, seed=4, dtype=F64)
    announced = DropoutLayer(0.5, seed=4, dtype=F64)
    for step in range(3):
        announced.start_batch(step, 0)
        np.testing.assert_array_equal(unannounced.forward(inputs), announced.forward(inputs))
    # start_batch sets the next forward only; the one after it takes the step after.
    announced.start_batch(10, 2)
    announced.forward(inputs)
    reference = DropoutLayer(0.5, seed=4, dtype=F64)
    reference.start_batch(11, 0)
    np.testing.assert_array_equal(announced.forward(inputs), reference.forward(inputs))


def test_backward_uses_the_mask_of_its_forward():
    layer = DropoutLayer(0.5, seed=6, dtype=F64)
    gradients = np.random.default_rng(1).standard_normal((5, 7))
    outputs = layer.forward(np.ones((5, 7)))
    np.testing.assert_array_equal(layer.backward(gradients), gradients * outputs)


def test_containers_pass_the_hooks_to_every_layer_inside():
    inner = DropoutLayer(0.5, seed=1)
    net = SequentialLayers([Residual([GeluLayer(), Residual([inner])]), DropoutLayer(0.5, seed=2)])
    net.set_training(False)
    assert not inner.training and not net.layers[1].training
    net.set_training(True)
    net.start_batch(3, 16)
    assert inner._next_position == (3, 16) and net.layers[1]._next_position == (3, 16)


def test_build_net_gives_each_dropout_layer_its_own_seed():
    net = build_net(gpt_description(dropout=0.1), rng=0)
    seeds = [layer.seed for layer in all_layers(net.layers) if isinstance(layer, DropoutLayer)]
    assert len(seeds) == 5 and len(set(seeds)) == 5
    assert seeds == [layer.seed for layer in all_layers(build_net(gpt_description(dropout=0.1), rng=0).layers)
                     if isinstance(layer, DropoutLayer)]


def test_a_seed_given_or_drawn_takes_one_number_from_rng():
    drawn, given = np.random.default_rng(5), np.random.default_rng(5)
    DropoutLayer(0.1, rng=drawn)
    assert DropoutLayer(0.1, seed=17, rng=given).seed == 17
    assert drawn.integers(2**63) == given.integers(2**63)
    assert DropoutLayer(0.1, rng=3).seed == DropoutLayer(0.1, rng=3).seed


# ------------------------------------------------------------------ against PyTorch

def assert_close(actual, expected, what):
    np.testing.assert_allclose(actual, expected.detach().numpy(), rtol=1e-10, atol=1e-10, err_msg=what)


def test_layer_norm_matches_torch(torch):
    rng = np.random.default_rng(0)
    layer = LayerNormLayer(16, eps=1e-5, dtype=F64)
    layer.params["g"][...] = rng.standard_normal(16)
    layer.params["b"][...] = rng.standard_normal(16)
    inputs, gradients = 5 + 3 * rng.standard_normal((4, 6, 16)), rng.standard_normal((4, 6, 16))
    reference = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(layer.params["g"]))
        reference.bias.copy_(torch.from_numpy(layer.params["b"]))
    x = torch.from_numpy(inputs).requires_grad_()
    y = reference(x)
    y.backward(torch.from_numpy(gradients))
    assert_close(layer.forward(inputs), y, "outputs")
    assert_close(layer.backward(gradients), x.grad, "input gradient")
    assert_close(layer.grads["g"], reference.weight.grad, "gain gradient")
    assert_close(layer.grads["b"], reference.bias.grad, "bias gradient")


def test_gelu_matches_torch_tanh_approximation(torch):
    rng = np.random.default_rng(1)
    inputs, gradients = 4 * rng.standard_normal((5, 3, 40)), rng.standard_normal((5, 3, 40))
    x = torch.from_numpy(inputs).requires_grad_()
    y = torch.nn.functional.gelu(x, approximate="tanh")
    y.backward(torch.from_numpy(gradients))
    layer = GeluLayer(dtype=F64)
    assert_close(layer.forward(inputs), y, "outputs")
    assert_close(layer.backward(gradients), x.grad, "input gradient")


def test_embedding_matches_torch(torch):
    rng = np.random.default_rng(2)
    layer = EmbeddingLayer(50, 12, dtype=F64, rng=rng)
    ids, gradients = rng.integers(0, 30, (6, 9)), rng.standard_normal((6, 9, 12))
    reference = torch.nn.Embedding(50, 12)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(layer.params["w"]))
    y = reference(torch.from_numpy(ids))
    y.backward(torch.from_numpy(gradients))
    assert_close(layer.forward(ids), y, "outputs")
    layer.backward(gradients)
    assert_close(layer.grads["w"], reference.weight.grad, "weight gradient")


def test_sequence_cross_entropy_matches_torch(torch):
    rng = np.random.default_rng(3)
    logits, labels = 3 * rng.standard_normal((4, 7, 11)), rng.integers(0, 11, (4, 7))
    z = torch.from_numpy(logits).requires_grad_()
    loss = torch.nn.functional.cross_entropy(z.reshape(-1, 11), torch.from_numpy(labels).reshape(-1))
    loss.backward()
    layer = CrossEntropyLossLayer(dtype=F64)
    assert layer.forward(logits, labels) == pytest.approx(loss.item(), rel=1e-12)
    assert_close(layer.backward(), z.grad, "logit gradient")


def torch_gpt_loss(torch, net, ids, targets):
    """The loss of ``net`` (gpt_description without dropout) written out in PyTorch from
    its parameters, which come back as leaf tensors with gradients."""
    F = torch.nn.functional
    params = {name: torch.from_numpy(param.copy()).requires_grad_() for name, param, _ in net.named_params()}
    batch_size, length = ids.shape

    def layer_norm(x, prefix):
        return F.layer_norm(x, (D_MODEL,), params[prefix + "g"], params[prefix + "b"], eps=1e-5)

    def linear(x, prefix):
        return F.linear(x, params[prefix + "w"], params[prefix + "b"])

    def attention(x, prefix):
        def heads(role):
            y = F.linear(x, params[f"{prefix}w_{role}"], params[f"{prefix}b_{role}"])
            return y.view(batch_size, length, HEADS, D_MODEL // HEADS).transpose(1, 2)
        scores = heads("q") @ heads("k").transpose(-1, -2) / math.sqrt(D_MODEL // HEADS)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        context = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ heads("v")
        return F.linear(context.transpose(1, 2).reshape(batch_size, length, D_MODEL),
                        params[f"{prefix}w_o"], params[f"{prefix}b_o"])

    x = params["0.EmbeddingLayer.w"][torch.from_numpy(ids)] + params["1.PositionalEmbeddingLayer.w"][:length]
    for index in (2, 4):
        block = f"{index}.Residual."
        x = x + attention(layer_norm(x, block + "0.LayerNormLayer."), block + "1.MultiHeadAttention.")
        mlp = f"{index + 1}.Residual."
        hidden = F.gelu(linear(layer_norm(x, mlp + "0.LayerNormLayer."), mlp + "1.LinearLayer."), approximate="tanh")
        x = x + linear(hidden, mlp + "3.LinearLayer.")
    logits = linear(layer_norm(x, "6.LayerNormLayer."), "7.LinearLayer.")
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    return loss, params


def test_gpt_loss_and_gradients_match_torch(torch):
    net = gpt_net()
    ids, targets = token_batch(batch_size=4, length=CONTEXT)
    loss = net(ids, targets)
    net.backward()
    reference, params = torch_gpt_loss(torch, net, ids, targets)
    assert loss == pytest.approx(reference.item(), rel=1e-12)
    for name, _, grad in net.named_params():
        assert_close(grad, params[name].grad, name)
