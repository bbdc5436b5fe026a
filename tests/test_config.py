"""TrainConfig: validation, TOML job files, command-line precedence."""
import argparse
import json

import numpy as np
import pytest

from mnn.distributed.training.config import (
    TrainConfig,
    add_config_arguments,
    config_overrides,
    load_toml,
    resolve_config,
)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_overrides(parser.parse_args(argv))


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    config = TrainConfig()
    path = write(tmp_path / "job.toml", config.to_toml())
    assert resolve_config(path) == config


def test_resolved_job_with_output_and_resume_round_trips(tmp_path):
    config = TrainConfig(layers=[4, 3], output="runs/x", resume=True, max_steps=7, lr=1)
    assert isinstance(config.lr, float)  # ints given for floats are converted once
    path = write(tmp_path / "job.toml", config.to_toml())
    assert resolve_config(path) == config


def test_command_line_overrides_file_which_overrides_defaults(tmp_path):
    path = write(tmp_path / "job.toml", 'epochs = 3\nlr = 0.5\noptimizer = "adam"\n')
    config = resolve_config(path, parse(["--lr", "0.01", "--layers", "64,32,10"]))
    assert config.lr == 0.01                 # command line wins
    assert config.epochs == 3                # file wins over the default
    assert config.optimizer == "adam"
    assert config.layers == [64, 32, 10]
    assert config.batch_size == TrainConfig().batch_size   # default


def test_options_not_given_do_not_override_the_file(tmp_path):
    path = write(tmp_path / "job.toml", "seed = 5\nresume = false\n")
    assert parse([]) == {}
    assert resolve_config(path, parse([])).seed == 5


def test_resume_option_takes_a_flag_or_a_path():
    assert parse(["--resume"])["resume"] is True
    assert parse(["--resume", "false"])["resume"] is False
    assert parse(["--resume", "runs/a/checkpoint.npz"])["resume"] == "runs/a/checkpoint.npz"


def test_unknown_key_in_file_names_it_and_lists_valid_keys(tmp_path):
    path = write(tmp_path / "job.toml", "epochs = 2\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError) as error:
        resolve_config(path)
    message = str(error.value)
    assert "'learning_rate'" in message and "job.toml" in message
    assert "valid keys are:" in message and "lr" in message


def test_a_mistyped_key_gets_the_closest_one_and_still_the_list(tmp_path):
    path = write(tmp_path / "job.toml", "batchsize = 32\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError) as error:
        resolve_config(path)
    message = str(error.value)
    # Each unknown key with its suggestion, where one is close; 'learning_rate' is like no field.
    assert "unknown key(s) 'batchsize' (did you mean 'batch_size'?), 'learning_rate'; valid keys are: " in message
    assert "'learning_rate' (did you mean" not in message and "lr" in message.split("valid keys are: ")[1]


def test_missing_and_malformed_files_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_toml(write(tmp_path / "bad.toml", "epochs = = 3"))


@pytest.mark.parametrize("changes, message", [
    ({"layers": [10]}, "layers: expected a list of at least 2"),
    ({"layers": [10, 0]}, "layers: expected positive integers"),
    ({"loss": "hinge"}, "loss: expected one of cross_entropy, nll, mse, got 'hinge'"),
    ({"epochs": 0}, "epochs: expected an integer >= 1, got 0"),
    ({"batch_size": 2.5}, "batch_size: expected an integer"),
    ({"epochs": True}, "epochs: expected an integer"),
    ({"lr": -1.0}, "lr: expected a positive number"),
    ({"lr": "0.1"}, "lr: expected a number"),
    ({"optimizer": "rmsprop"}, "optimizer: expected one of sgd, momentum, adam"),
    ({"momentum": 1.0}, "momentum: expected 0 <= momentum < 1"),
    ({"warmup_epochs": 20.0}, "warmup_epochs: expected a number between 0 and epochs"),
    ({"dtype": "float16"}, "dtype: expected one of float32, float64"),
    ({"resume": True}, "resume: true means"),
    ({"log_every": 0}, "log_every: expected an integer >= 1"),
    ({"drop_last": 1}, "drop_last: expected true or false"),
    ({"lr": float("nan")}, "lr: expected a finite number, got nan"),
    ({"lr": float("inf")}, "lr: expected a finite number, got inf"),
    ({"weight_decay": float("nan")}, "weight_decay: expected a finite number, got nan"),
    ({"weight_decay": float("inf")}, "weight_decay: expected a finite number, got inf"),
    ({"momentum": float("nan")}, "momentum: expected a finite number, got nan"),
    ({"warmup_epochs": float("nan")}, "warmup_epochs: expected a finite number, got nan"),
])
def test_invalid_values_say_expected_and_got(changes, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")):
        TrainConfig(**changes)


def test_bad_layers_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--layers", "64,x,10"])
    assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--lr", "--weight-decay", "--momentum", "--warmup-epochs"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_options_are_rejected(option, value):
    with pytest.raises(ValueError, match="expected a finite number"):
        resolve_config(None, parse([f"{option}={value}"]))


def test_dict_round_trip_through_json_as_checkpoints_store_it():
    config = TrainConfig(layers=[3, 5, 2], dataset="digits", output="o", resume="c.npz")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_numpy_integers_are_stored_as_python_ints():
    config = TrainConfig(epochs=np.int64(3), layers=[np.int32(64), 10], max_steps=np.int64(5))
    assert (config.epochs, config.layers, config.max_steps) == (3, [64, 10], 5)
    assert type(config.epochs) is int and type(config.max_steps) is int


def test_paths_are_stored_as_text(tmp_path):
    config = TrainConfig(output=tmp_path / "run", resume=tmp_path / "c.npz")
    assert config.output == str(tmp_path / "run") and config.resume == str(tmp_path / "c.npz")


MODEL_TOML = '''
epochs = 2

[[model.layers]]
type = "ReshapeLayer"
shape = [8, 8]

[[model.layers]]
type = "Residual"

[[model.layers.layers]]
type = "MultiHeadAttention"
d_model = 8
n_heads = 2

[[model.layers]]
type = "ReshapeLayer"
shape = [64]

[[model.layers]]
type = "LinearLayer"
shape = [64, 10]

[[model.layers]]
type = "CrossEntropyLossLayer"
'''


def test_model_description_in_a_job_file_round_trips(tmp_path):
    config = resolve_config(write(tmp_path / "job.toml", MODEL_TOML))
    assert [layer["type"] for layer in config.model["layers"]] == [
        "ReshapeLayer", "Residual", "ReshapeLayer", "LinearLayer", "CrossEntropyLossLayer"]
    assert config.model["layers"][1]["layers"] == [{"type": "MultiHeadAttention", "d_model": 8, "n_heads": 2}]
    assert config.model_description() is config.model and config.layers is None and config.loss is None
    assert resolve_config(write(tmp_path / "again.toml", config.to_toml())) == config
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_without_a_model_the_mlp_shorthand_and_its_defaults_describe_the_net():
    assert [layer["type"] for layer in TrainConfig().model_description()["layers"]] == [
        "LinearLayer", "ReluLayer", "LinearLayer", "CrossEntropyLossLayer"]
    assert TrainConfig().model_description()["layers"][0]["shape"] == [64, 128]
    assert TrainConfig(layers=[4, 3], loss="nll").model_description()["layers"][-2:] == [
        {"type": "LogSoftmaxLayer"}, {"type": "NllLossLayer"}]


def test_model_and_the_mlp_shorthand_exclude_each_other(tmp_path):
    path = write(tmp_path / "job.toml", MODEL_TOML)
    with pytest.raises(ValueError, match=r"layers: belongs to the MLP shorthand, but the job describes its "
                                         r"model in \[model\]"):
        resolve_config(path, parse(["--layers", "64,10"]))
    with pytest.raises(ValueError, match="loss: belongs to the MLP shorthand"):
        resolve_config(path, parse(["--loss", "mse"]))


def test_mistakes_in_a_job_files_model_are_named(tmp_path):
    bad = MODEL_TOML.replace('type = "MultiHeadAttention"', 'type = "Attention"')
    with pytest.raises(ValueError, match=r"model.layers\[1\] \(Residual\).layers\[0\]: unknown layer type "
                                         r"'Attention'"):
        resolve_config(write(tmp_path / "job.toml", bad))
    late_loss = MODEL_TOML + '\n[[model.layers]]\ntype = "ReluLayer"\n'
    with pytest.raises(ValueError, match=r"model.layers\[4\] \(CrossEntropyLossLayer\): a loss layer must "
                                         r"come last"):
        resolve_config(write(tmp_path / "late.toml", late_loss))


def test_a_mistyped_layer_type_gets_the_closest_one_and_still_the_list(tmp_path):
    typo = write(tmp_path / "typo.toml", MODEL_TOML.replace('type = "LinearLayer"', 'type = "LinearLayr"'))
    with pytest.raises(ValueError, match=r"model.layers\[3\]: unknown layer type 'LinearLayr' \(did you mean "
                                         r"'LinearLayer'\?\); expected one of .*ReluLayer"):
        resolve_config(typo)
    unlike = write(tmp_path / "unlike.toml", MODEL_TOML.replace('type = "LinearLayer"', 'type = "Conv2d"'))
    with pytest.raises(ValueError, match=r"unknown layer type 'Conv2d'; expected one of ") as error:
        resolve_config(unlike)
    assert "did you mean" not in str(error.value)


# --- job files that cannot be read ------------------------------------------------------------

def test_a_config_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"config file '{tmp_path}' is a directory, not a TOML job file"):
        load_toml(tmp_path)


def test_a_config_that_is_not_utf8_names_the_file_the_byte_and_the_line(tmp_path):
    path = tmp_path / "job.toml"
    path.write_bytes("epochs = 1\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"config file '.*job.toml' is not UTF-8 text \(as TOML must be\): "
                                         r"byte 0xe9 on line 2 \(invalid continuation byte\)"):
        load_toml(path)


@pytest.mark.parametrize("nested", ["[" * 100_000 + "]" * 100_000, "{a=" * 2000 + "1" + "}" * 2000])
def test_toml_nested_too_deeply_to_parse_names_the_file(tmp_path, nested):
    path = write(tmp_path / "deep.toml", f"x = {nested}\n")
    with pytest.raises(ValueError, match="config file '.*deep.toml' nests arrays or inline tables too deeply"):
        load_toml(path)


def test_a_config_larger_than_any_job_file_is_refused_without_reading_it_all(tmp_path):
    path = write(tmp_path / "huge.toml", "# " + "x" * (16 << 20) + "\n")
    with pytest.raises(ValueError, match="config file '.*huge.toml' is larger than 16 MiB"):
        load_toml(path)


def test_a_model_too_large_to_build_is_checked_without_allocating():
    # 26 trillion parameters: validate counts them and leaves the net to preflight's memory check.
    config = TrainConfig(model={"layers": [{"type": "LinearLayer", "shape": [64, 4 * 10**11]},
                                           {"type": "CrossEntropyLossLayer"}]})
    assert config.model["layers"][0]["shape"] == [64, 4 * 10**11]
    with pytest.raises(ValueError, match=r"model.layers\[0\] \(LinearLayer\): expected shape \(n_in, n_out\) of two "
                                         r"positive ints, got \(64, 400000000000.0\)"):
        TrainConfig(model={"layers": [{"type": "LinearLayer", "shape": [64, 4e11]}]})


def test_a_mistake_in_the_job_file_names_the_file_and_one_on_the_command_line_does_not(tmp_path):
    path = write(tmp_path / "job.toml", "epochs = 0\nlr = 0.1\n")
    with pytest.raises(ValueError, match=r"^config file '.*job.toml': epochs: expected an integer >= 1, got 0$"):
        resolve_config(path)
    with pytest.raises(ValueError, match=r"^lr: expected a positive number, got -1.0$"):
        resolve_config(path, {"epochs": 1, "lr": -1.0})


def test_a_model_with_gpt_and_layers_is_shown_as_written():
    with pytest.raises(ValueError, match=r"^model: expected a table with one key, .*, got \{'gpt': \{'n_layers': 1\}, "
                                         r"'layers': \[\]\}$"):
        TrainConfig(model={"gpt": {"n_layers": 1}, "layers": []})


def test_an_mlp_of_more_widths_than_any_net_is_refused_and_shown_short():
    with pytest.raises(ValueError, match=r"^layers: expected at most 100,000 widths, got 200,000$"):
        TrainConfig(layers=[1] * 200_000)
    with pytest.raises(ValueError, match=r"^layers: expected positive integers, got \[1, 'x', 1, 'x', 1, 'x', \.\.\.\]$"):
        TrainConfig(layers=[1, "x"] * 3000)
