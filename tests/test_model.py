"""Model descriptions (mnn.model), nested layers (Residual) and the reshape layer."""
import sys

import numpy as np
import pytest
import tomli_w

from mnn import (
    LinearLayer,
    MultiHeadAttention,
    ReluLayer,
    ReshapeLayer,
    Residual,
    SequentialLayers,
    SGD,
)
from mnn.model import LAYER_TYPES, MAX_NESTING, build_net, check_fits, mlp_description, model_size

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

F64 = np.float64

ATTENTION_CLASSIFIER = {"layers": [
    {"type": "ReshapeLayer", "shape": [8, 8]},
    {"type": "Residual", "layers": [{"type": "MultiHeadAttention", "d_model": 8, "n_heads": 2, "causal": False}]},
    {"type": "ReshapeLayer", "shape": [64]},
    {"type": "LinearLayer", "shape": [64, 16], "bias": True},
    {"type": "ReluLayer"},
    {"type": "LinearLayer", "shape": [16, 10], "bias": False},
    {"type": "CrossEntropyLossLayer"},
]}


def test_description_round_trips_through_get_config_and_toml():
    net = build_net(ATTENTION_CLASSIFIER, dtype=F64, rng=0)
    assert net.get_config() == ATTENTION_CLASSIFIER
    text = tomli_w.dumps({"model": net.get_config()})
    assert "[[model.layers]]" in text
    again = build_net(tomllib.loads(text)["model"], dtype=F64, rng=0)
    for (name, param, _), (other_name, other, _) in zip(net.named_params(), again.named_params()):
        assert name == other_name
        np.testing.assert_array_equal(param, other)


def test_defaults_are_filled_in_and_the_same_seed_builds_the_same_net():
    short = {"layers": [{"type": "LinearLayer", "shape": [3, 2]}, {"type": "MSELossLayer"}]}
    net = build_net(short, rng=4)
    assert net.get_config()["layers"][0] == {"type": "LinearLayer", "shape": [3, 2], "bias": True}
    np.testing.assert_array_equal(net.layers[0].params["w"], build_net(short, rng=4).layers[0].params["w"])
    assert net.dtype == np.float32 and build_net(short, dtype="float64").dtype == F64


def test_mlp_shorthand_is_linear_layers_with_relu_between_then_the_loss():
    assert [entry["type"] for entry in mlp_description([64, 32, 16, 10], "nll")["layers"]] == [
        "LinearLayer", "ReluLayer", "LinearLayer", "ReluLayer", "LinearLayer", "LogSoftmaxLayer", "NllLossLayer"]


def test_every_library_layer_can_be_described():
    from mnn.layer import __all__ as layer_names
    assert {name for name in layer_names if name not in ("Layer", "LossLayer")} | {"Residual"} == set(LAYER_TYPES)


@pytest.mark.parametrize("layers, message", [
    ([{"type": "Linear", "shape": [2, 3]}], r"model.layers\[0\]: unknown layer type 'Linear' \(did you mean "
                                            r"'LinearLayer'\?\); expected one of LinearLayer, "),
    ([{"shape": [2, 3]}], r"model.layers\[0\]: expected a table with a 'type' key"),
    ([{"type": "LinearLayer", "shape": [2, 3], "widht": 4}],
     r"model.layers\[0\] \(LinearLayer\): unknown argument 'widht'; LinearLayer takes shape, bias"),
    ([{"type": "ReluLayer", "dtype": "float64"}], r"unknown argument 'dtype'; ReluLayer takes no arguments"),
    ([{"type": "MultiHeadAttention", "d_model": 8}], r"\(MultiHeadAttention\): missing argument 'n_heads'"),
    ([{"type": "LinearLayer", "shape": [2, 0]}],
     r"model.layers\[0\] \(LinearLayer\): expected shape \(n_in, n_out\) of two positive ints, got \(2, 0\)"),
    ([{"type": "LinearLayer", "shape": 64}], r"expected shape as a list, got 64"),
    ([{"type": "LinearLayer", "shape": [2, 3]}, {"type": "CrossEntropyLossLayer"}, {"type": "ReluLayer"}],
     r"model.layers\[1\] \(CrossEntropyLossLayer\): a loss layer must come last, but 1 more layer\(s\) follow it"),
    ([{"type": "Residual", "layers": [{"type": "MSELossLayer"}]}],
     r"model.layers\[0\] \(Residual\).layers\[0\] \(MSELossLayer\): a loss layer cannot be inside a Residual"),
    ([{"type": "Residual"}], r"model.layers\[0\] \(Residual\).layers: expected a non-empty list of layers"),
    ([], r"model.layers: expected a non-empty list of layers"),
])
def test_each_mistake_in_a_description_is_named(layers, message):
    with pytest.raises(ValueError, match=message):
        build_net({"layers": layers})


def test_description_must_be_a_table_of_layers():
    with pytest.raises(ValueError, match="expected a table with one key, 'layers'"):
        build_net({"layers": [], "width": 3})


def test_check_fits_names_the_layer_whose_width_does_not_chain():
    net = build_net({"layers": [{"type": "LinearLayer", "shape": [4, 8]}, {"type": "ReluLayer"},
                                {"type": "LinearLayer", "shape": [6, 3]}, {"type": "CrossEntropyLossLayer"}]})
    with pytest.raises(ValueError, match=r"layer 2 \(LinearLayer\) does not fit its input of shape \(8,\) per "
                                         r"sample: LinearLayer: expected 6 features per sample, got 8"):
        check_fits(net, np.zeros((2, 4)))


def test_check_fits_runs_the_loss_only_with_targets():
    net = build_net(mlp_description([4, 3], "cross_entropy"))
    assert check_fits(net, np.zeros((2, 4))).shape == (2, 3)
    with pytest.raises(ValueError, match=r"layer 1 \(CrossEntropyLossLayer\).*class indices in \[0, 3\)"):
        check_fits(net, np.zeros((2, 4)), np.array([0, 3]))


# --- nested layers ------------------------------------------------------------------

def residual_net(input_grad=False):
    rng = np.random.default_rng(0)
    return SequentialLayers([
        LinearLayer(4, 6, dtype=F64, rng=rng),
        Residual([LinearLayer(6, 6, dtype=F64, rng=rng), ReluLayer(dtype=F64),
                  Residual([LinearLayer(6, 6, dtype=F64, rng=rng)])]),
        LinearLayer(6, 3, dtype=F64, rng=rng),
        build_net({"layers": [{"type": "CrossEntropyLossLayer"}]}, dtype=F64).layers[0],
    ], input_grad=input_grad)


def test_nested_parameters_are_named_below_their_container():
    names = [name for name, _, _ in residual_net().named_params()]
    assert names == ["0.LinearLayer.w", "0.LinearLayer.b",
                     "1.Residual.0.LinearLayer.w", "1.Residual.0.LinearLayer.b",
                     "1.Residual.2.Residual.0.LinearLayer.w", "1.Residual.2.Residual.0.LinearLayer.b",
                     "2.LinearLayer.w", "2.LinearLayer.b"]
    assert list(residual_net().state_dict()) == names


def test_residual_net_gradients_match_finite_differences(numerical_gradient):
    net = residual_net(input_grad=True)
    rng = np.random.default_rng(1)
    inputs, labels = rng.standard_normal((5, 4)), rng.integers(0, 3, 5)
    net(inputs, labels)
    input_gradients = net.backward()[0]
    loss = lambda: net(inputs, labels)  # noqa: E731
    np.testing.assert_allclose(input_gradients, numerical_gradient(loss, inputs), rtol=1e-6, atol=1e-8)
    for name, param, grad in net.named_params():
        np.testing.assert_allclose(grad, numerical_gradient(loss, param), rtol=1e-6, atol=1e-8, err_msg=name)


def test_state_dict_loads_and_grads_rebind_into_nested_layers():
    source, target = residual_net(), residual_net()
    for _, param, _ in source.named_params():
        param += 1.0
    target.load_state_dict(source.state_dict())
    for (name, expected, _), (_, got, _) in zip(source.named_params(), target.named_params()):
        np.testing.assert_array_equal(got, expected, err_msg=name)
    name = "1.Residual.2.Residual.0.LinearLayer.w"
    buffer = np.zeros((6, 6))
    target.rebind_grads({name: buffer})
    inputs, labels = np.ones((2, 4)), np.array([0, 1])
    target(inputs, labels)
    target.backward()
    inner = target.layers[1].layers[2].layers[0]
    assert inner.grads["w"] is buffer and np.any(buffer != 0)


def test_step_zero_grads_and_astype_reach_nested_layers():
    net = residual_net()
    net(np.ones((2, 4)), np.array([0, 1]))
    net.backward()
    before = {name: param.copy() for name, param, _ in net.named_params()}
    SGD(net, lr=0.1).step()
    net.step(0.1)
    for name, param, grad in net.named_params():
        np.testing.assert_allclose(param, before[name] - 0.2 * grad, err_msg=name)
    net.zero_grads()
    assert all(not grad.any() for _, _, grad in net.named_params())
    net.astype(np.float32)
    assert {param.dtype for _, param, _ in net.named_params()} == {np.dtype(np.float32)}


def test_residual_refuses_layers_that_change_the_shape():
    residual = Residual([LinearLayer(4, 3)])
    with pytest.raises(ValueError, match=r"Residual: the layers inside must keep the shape of their input, "
                                         r"but \(2, 4\) became \(2, 3\)"):
        residual.forward(np.zeros((2, 4)))


def test_residual_over_attention_gradients_match_finite_differences(numerical_gradient):
    residual = Residual([MultiHeadAttention(4, 2, causal=True, dtype=F64, rng=3)])
    rng = np.random.default_rng(2)
    inputs, projection = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    loss = lambda: np.sum(projection * residual.forward(inputs))  # noqa: E731
    loss()
    input_gradients = residual.backward(projection)
    np.testing.assert_allclose(input_gradients, numerical_gradient(loss, inputs), rtol=1e-6, atol=1e-8)
    for name, param, grad in residual.named_params():
        np.testing.assert_allclose(grad, numerical_gradient(loss, param), rtol=1e-6, atol=1e-8, err_msg=name)


def test_reshape_layer_round_trips_and_checks_the_size(assert_layer_gradients):
    inputs = np.random.default_rng(0).standard_normal((3, 12))
    assert_layer_gradients(ReshapeLayer(3, 4, dtype=F64), inputs)
    assert ReshapeLayer(2, 6).forward(inputs).shape == (3, 2, 6)
    with pytest.raises(ValueError, match=r"ReshapeLayer: expected 10 values per sample to make shape \(2, 5\), "
                                         r"got 12"):
        ReshapeLayer(2, 5).forward(inputs)
    with pytest.raises(ValueError, match="ReshapeLayer: expected a per-sample shape of positive ints"):
        ReshapeLayer(0, 4)


# --- the layers of a GPT --------------------------------------------------------------

GPT_LAYER_ENTRIES = [
    {"type": "EmbeddingLayer", "vocab": 11, "d": 8},
    {"type": "PositionalEmbeddingLayer", "context": 16, "d": 8},
    {"type": "LayerNormLayer", "d": 8, "eps": 1e-6},
    {"type": "GeluLayer", "approximate": "tanh"},
    {"type": "DropoutLayer", "p": 0.25, "seed": 12345},
]


@pytest.mark.parametrize("entry", GPT_LAYER_ENTRIES, ids=lambda entry: entry["type"])
def test_each_gpt_layer_round_trips_through_its_description(entry):
    net = build_net({"layers": [entry]}, dtype=F64, rng=0)
    assert net.get_config() == {"layers": [entry]}
    again = build_net(net.get_config(), dtype=F64, rng=1)
    for (_, param, _), (_, other, _) in zip(net.named_params(), again.named_params()):
        assert param.shape == other.shape
    assert repr(net.layers[0]).startswith(entry["type"] + "(")


def test_gpt_defaults_are_filled_in():
    short = {"layers": [{"type": "LayerNormLayer", "d": 4}, {"type": "GeluLayer"}, {"type": "DropoutLayer", "p": 0.1}]}
    layers = build_net(short, rng=0).get_config()["layers"]
    assert layers[0] == {"type": "LayerNormLayer", "d": 4, "eps": 1e-5}
    assert layers[1] == {"type": "GeluLayer", "approximate": "tanh"}
    assert layers[2]["p"] == 0.1 and isinstance(layers[2]["seed"], int)  # drawn from the builder's rng


def test_a_gpt_description_round_trips_through_toml_with_its_dropout_seeds():
    """Seeds drawn by the builder are part of get_config(); rebuilt from it (or its TOML),
    the net has the same parameters and the same masks."""
    description = {"layers": [
        {"type": "EmbeddingLayer", "vocab": 11, "d": 8},
        {"type": "PositionalEmbeddingLayer", "context": 6, "d": 8},
        {"type": "DropoutLayer", "p": 0.2},
        {"type": "Residual", "layers": [{"type": "LayerNormLayer", "d": 8},
                                        {"type": "MultiHeadAttention", "d_model": 8, "n_heads": 2, "causal": True},
                                        {"type": "DropoutLayer", "p": 0.2}]},
        {"type": "Residual", "layers": [{"type": "LayerNormLayer", "d": 8}, {"type": "LinearLayer", "shape": [8, 32]},
                                        {"type": "GeluLayer"}, {"type": "LinearLayer", "shape": [32, 8]}]},
        {"type": "LayerNormLayer", "d": 8},
        {"type": "LinearLayer", "shape": [8, 11]},
        {"type": "CrossEntropyLossLayer"},
    ]}
    net = build_net(description, dtype=F64, rng=0)
    config = net.get_config()
    seeds = [config["layers"][2]["seed"], config["layers"][3]["layers"][2]["seed"]]
    assert len(set(seeds)) == 2
    again = build_net(tomllib.loads(tomli_w.dumps({"model": config}))["model"], dtype=F64, rng=0)
    assert again.get_config() == config
    for (name, param, _), (_, other, _) in zip(net.named_params(), again.named_params()):
        np.testing.assert_array_equal(param, other, err_msg=name)
    ids, targets = np.arange(12).reshape(2, 6) % 11, np.ones((2, 6), dtype=int)
    net.start_batch(3, 0)
    again.start_batch(3, 0)
    assert net(ids, targets) == again(ids, targets)
    net.set_training(False)  # the same loss from every forward
    assert check_fits(net, ids.astype(np.float64), targets) == net(ids, targets)  # ids in the training dtype


def test_gpt_short_form_spells_out_the_blocks():
    net = build_net({"gpt": {"vocab": 30, "n_layers": 3, "d_model": 16, "n_heads": 2, "context": 8, "dropout": 0.1}},
                    rng=0)
    types = [layer["type"] for layer in net.get_config()["layers"]]
    assert types[:3] == ["EmbeddingLayer", "PositionalEmbeddingLayer", "DropoutLayer"]
    assert types[3:9] == ["Residual"] * 6 and types[9:] == ["LayerNormLayer", "LinearLayer", "CrossEntropyLossLayer"]
    attention = net.get_config()["layers"][3]["layers"]
    assert [layer["type"] for layer in attention] == ["LayerNormLayer", "MultiHeadAttention", "DropoutLayer"]
    assert attention[1]["causal"] is True
    tokens = np.random.default_rng(0).integers(0, 30, (2, 8))
    net.set_training(False)
    assert net(tokens).shape == (2, 8, 30)
    rebuilt = build_net(net.get_config(), rng=0)
    assert [name for name, _, _ in rebuilt.named_params()] == [name for name, _, _ in net.named_params()]


@pytest.mark.parametrize("sizes, message", [
    ({}, "missing vocab"),
    ({"vocab": 10, "blocks": 2}, "unknown key\\(s\\) 'blocks'"),
    ({"vocab": 10, "d_model": 0}, "expected d_model a positive integer"),
    ({"vocab": 10, "dropout": 1.0}, "expected dropout a number in \\[0, 1\\)"),
    ({"vocab": 10, "d_model": 10, "n_heads": 4}, "d_model divisible by n_heads"),
])
def test_gpt_short_form_mistakes_are_named(sizes, message):
    with pytest.raises(ValueError, match=message):
        build_net({"gpt": sizes})


def test_evaluating_turns_dropout_off_inside_and_back_on_after_an_error():
    net = build_net({"layers": [{"type": "DropoutLayer", "p": 0.5}, {"type": "MSELossLayer"}]}, dtype=F64, rng=0)
    ones = np.ones((4, 6))
    with net.evaluating():
        np.testing.assert_array_equal(net(ones), ones)
    with pytest.raises(RuntimeError), net.evaluating():
        raise RuntimeError("inside")
    assert not np.array_equal(net(ones), ones)  # training again: dropout draws a mask


# --- sizes without building, and nesting ------------------------------------------------------

def _parameter_count(net):
    return sum(param.size for _, param, _ in net.named_params())


SIZED_DESCRIPTIONS = [
    ATTENTION_CLASSIFIER,
    mlp_description([64, 128, 10]),
    {"gpt": {"vocab": 37, "n_layers": 2, "d_model": 16, "n_heads": 4, "context": 8, "dropout": 0.1}},
    {"layers": [{"type": "LayerNormLayer", "d": 8}, {"type": "LinearLayer", "shape": [8, 3], "bias": False},
                {"type": "MSELossLayer"}]},
]


@pytest.mark.parametrize("description", SIZED_DESCRIPTIONS)
def test_model_size_counts_the_parameters_the_built_net_has(description):
    assert model_size(description).parameters == _parameter_count(build_net(description, rng=0))


def test_every_layer_type_with_parameters_is_counted_without_building():
    # A new layer that allocates parameters must be taught to model_size (mnn.model._layer_size).
    arguments = {"LinearLayer": {"shape": [3, 5]}, "EmbeddingLayer": {"vocab": 7, "d": 4},
                 "PositionalEmbeddingLayer": {"context": 6, "d": 4}, "LayerNormLayer": {"d": 4},
                 "MultiHeadAttention": {"d_model": 4, "n_heads": 2}, "DropoutLayer": {"p": 0.5},
                 "ReshapeLayer": {"shape": [4]}, "BatchNormLayer": {"channels": 4},
                 "Conv2DLayer": {"in_channels": 2, "out_channels": 3, "kernel": [3, 2]},
                 "MaxPool2DLayer": {"kernel": 2}, "AvgPool2DLayer": {"kernel": 2}}
    for name, cls in LAYER_TYPES.items():
        if cls is Residual:
            continue
        entry = {"type": name, **arguments.get(name, {})}
        description = {"layers": [entry]}
        try:
            net = build_net(description, rng=0)
        except ValueError as error:
            pytest.fail(f"{name} needs arguments in this test: {error}")
        assert model_size(description).parameters == _parameter_count(net), name


def test_model_size_does_not_allocate_a_net_far_larger_than_memory():
    huge = {"gpt": {"vocab": 100, "n_layers": 48, "d_model": 5120, "n_heads": 40, "context": 64}}
    size = model_size(huge, sample_numbers=64)
    assert 15e9 < size.parameters < 16e9
    assert size.activations > 64 * 5120
    assert model_size({"layers": [{"type": "LinearLayer", "shape": [64, 4 * 10**11]}]}).parameters == 65 * 4 * 10**11


def test_model_size_checks_the_description_as_build_net_does():
    for description, words in [({"layers": []}, "model.layers: expected a non-empty list"),
                               ({"layers": [{"type": "Nope"}]}, "unknown layer type 'Nope'"),
                               ({"layers": [{"type": "LinearLayer", "shape": [2, 2], "colour": 1}]},
                                "unknown argument 'colour'"),
                               ({"gpt": {"n_layers": 2}}, "missing vocab"),
                               ({"layers": [{"type": "MSELossLayer"}, {"type": "LinearLayer", "shape": [2, 3]}]},
                                r"model.layers\[0\] \(MSELossLayer\): a loss layer must come last"),
                               ({"layers": [{"type": "Residual", "layers": [{"type": "MSELossLayer"}]}]},
                                r"\(Residual\).layers\[0\] \(MSELossLayer\): a loss layer cannot be inside")]:
        with pytest.raises(ValueError, match=words):
            model_size(description)
        with pytest.raises(ValueError, match=words):
            build_net(description)


def _nested_residuals(depth):
    entry = {"type": "LinearLayer", "shape": [4, 4]}
    for _ in range(depth):
        entry = {"type": "Residual", "layers": [entry]}
    return {"layers": [entry, {"type": "MSELossLayer"}]}


def test_residuals_nest_up_to_the_limit():
    net = build_net(_nested_residuals(MAX_NESTING), dtype=F64, rng=0)
    assert _parameter_count(net) == model_size(_nested_residuals(MAX_NESTING)).parameters == 20


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 200, 400, 5000])
def test_residuals_nested_deeper_than_the_limit_are_one_short_error(depth):
    for check in (build_net, model_size):
        with pytest.raises(ValueError) as error:
            check(_nested_residuals(depth))
        message = str(error.value)
        assert message.startswith("model.layers[0] (Residual): Residuals nested more than 32 deep"), message
        assert len(message) < 300


def test_a_deeply_nested_value_is_shown_cut_short():
    value = []
    for _ in range(100_000):
        value = [value]
    for description in ({"layers": value}, {"layers": [value]}, value):
        with pytest.raises(ValueError) as error:
            build_net(description)
        assert len(str(error.value)) < 400, str(error.value)[:400]


def test_a_gpt_whose_heads_do_not_divide_d_model_is_named_as_written():
    with pytest.raises(ValueError, match=r"^model.gpt: expected d_model divisible by n_heads \(each head gets "
                                         r"d_model / n_heads features\), got d_model=4, n_heads=3$"):
        build_net({"gpt": {"vocab": 5, "d_model": 4, "n_heads": 3}})


def test_a_gpt_of_absurdly_many_blocks_is_refused_before_its_layers_are_listed():
    # Found by tests/test_fuzz.py: n_layers = 28248975686 listed blocks until memory ran out.
    with pytest.raises(ValueError, match=r"^model.gpt: expected n_layers at most 1000, got 28248975686$"):
        model_size({"gpt": {"vocab": 5, "n_layers": 28248975686}})
    assert model_size({"gpt": {"vocab": 5, "n_layers": 1000, "d_model": 4, "n_heads": 1}}).parameters > 1000


def test_a_list_of_more_layers_than_any_net_is_refused_before_it_is_built():
    with pytest.raises(ValueError, match=r"^model.layers: expected at most 100,000 layers, got 100,001$"):
        model_size({"layers": [{"type": "ReluLayer"}] * 100_001})
