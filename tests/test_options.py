"""KEY=VALUE options: one set of value rules for --set and --model-option, from the command line, a sweep
file and the Python API, down to the adapter's typed options and the task's config."""

import math

import pytest
import yaml

from vlpbench import api
from vlpbench.adapters.base import Adapter, LoadReport, Weights
from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.options import load_yaml, parse_options, parse_value, typed_value
from vlpbench.registry import ADAPTERS
from vlpbench.results import load_record
from vlpbench.sweep import build_spec, expand, load_sweep_file


@pytest.mark.parametrize("text, value", [
    ("2", 2), ("-3", -3), ("1_000", 1000), ("007", 7),
    ("0.5", 0.5), (".5", 0.5), ("5.", 5.0), ("1e-3", 0.001), ("2E4", 20000.0), ("-.inf", -math.inf),
    ("true", True), ("True", True), ("FALSE", False), ("false", False),
    ("null", None), ("~", None), ("", None),
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"),
    ("resnet18", "resnet18"), ("1.2.3", "1.2.3"), ("2024-01-01", "2024-01-01"), ("1:30", "1:30"),
    ("0x1F", "0x1F"), ("a: b", "a: b"), ("#1", "#1"), ("C:/data/siim", "C:/data/siim"), ("  tu-resnet18 ", "tu-resnet18"),
    ('"1e-3"', "1e-3"), ("'false'", "false"),
    ("[0.9, 0.999]", [0.9, 0.999]), ("[1e-3, yes, true, null, '2']", [0.001, "yes", True, None, "2"]),
    ("{Atelectasis: atelectasis, n: 2}", {"Atelectasis": "atelectasis", "n": 2}),
])
def test_values_follow_one_set_of_rules(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_nan_is_a_float():
    assert math.isnan(parse_value("nan")) and math.isnan(parse_value(".nan"))


def test_parse_options_reads_pairs_and_names_the_option_and_text_at_fault():
    assert parse_options(["lr=1e-3", "max_epochs=2", "augment=false", "betas=[0.9, 0.99]", "x=abc", "y=a=b"]) == {
        "lr": 0.001, "max_epochs": 2, "augment": False, "betas": [0.9, 0.99], "x": "abc", "y": "a=b"}
    assert parse_options(None) == {} and parse_options(["seed=1", " seed = 2 "], "--model-option") == {"seed": 2}
    with pytest.raises(ConfigError, match=r"^--set 'lr': expected KEY=VALUE$"):
        parse_options(["lr"])
    with pytest.raises(ConfigError, match=r"^--model-option '=3': expected KEY=VALUE$"):
        parse_options(["=3"], "--model-option")
    with pytest.raises(ConfigError, match=r"^--model-option 'betas=\[0\.9': the value is not a valid list, mapping or "
                                          r"quoted string: .*expected ',' or ']'"):
        parse_options(["betas=[0.9"], "--model-option")


def test_a_sweep_files_unquoted_values_read_like_the_command_lines():
    text = "set:\n  lr: 1e-3\n  augment: false\n  name: 'false'\n  mode: yes\n  betas: [0.9, 1E-3]\n  none:\nseeds: [0, 1]\n"
    assert load_yaml(text) == {"set": {"lr": 0.001, "augment": False, "name": "false", "mode": "yes",
                                       "betas": [0.9, 0.001], "none": None}, "seeds": [0, 1]}


@pytest.mark.parametrize("value, default, typed", [
    ("false", True, False), ("true", False, True), (False, True, False), ("FALSE", True, False),
    ("3", 0, 3), (3, 0, 3), ("1e-3", 0.5, 0.001), (2, 0.5, 2.0), ("2", 0.5, 2.0),
    ("resnet18", "resnet50", "resnet18"), ("", "x", ""), ("[1, 2]", [0], [1, 2]),
])
def test_typed_values_take_the_type_of_their_default(value, default, typed):
    result = typed_value(value, default, "option x")
    assert result == typed and type(result) is type(typed)


@pytest.mark.parametrize("value, default, message", [
    ("yes", True, "option x='yes': expected true or false, like the default True"),
    ("1", True, "option x='1': expected true or false"),
    (1, False, "option x=1: expected true or false"),
    ("0.5", 0, "option x='0.5': expected an integer, like the default 0"),
    (True, 0, "option x=True: expected an integer"),
    ("fast", 0.5, "option x='fast': expected a number"),
    (2024, "", "option x=2024: expected text \\(in quotes"),
])
def test_typed_values_of_the_wrong_type_are_refused(value, default, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        typed_value(value, default, "option x")


class FlagAdapter(Adapter):
    """A checkpoint-free adapter with a boolean option whose default is True."""

    name = "flag-option-test"
    description = "test adapter with a boolean option"
    takes_checkpoint = False
    default_options = {"flag": True, "seed": 0}

    @classmethod
    def map_weights(cls, checkpoint, options) -> Weights:
        return Weights(LoadReport("flag"), {})


@pytest.fixture
def flag_adapter(monkeypatch):
    monkeypatch.setattr(ADAPTERS, "_targets", {**ADAPTERS._targets, FlagAdapter.name: FlagAdapter})
    return FlagAdapter.name


def test_a_boolean_adapter_option_given_as_text_is_parsed_not_truth_tested(flag_adapter):
    assert FlagAdapter(flag="false").options == {"flag": False, "seed": 0}
    assert FlagAdapter(flag="true", seed="2").options == {"flag": True, "seed": 2}
    with pytest.raises(ConfigError, match="adapter 'flag-option-test': option flag='no': expected true or false"):
        FlagAdapter(flag="no")


@pytest.fixture
def captured_runs(monkeypatch):
    """Replace the protocol of every run with one that records what it was given and scores 0.5."""
    seen = []

    def protocol(protocol, adapter, source, parts, frac, config, **kwargs):
        seen.append({"options": dict(adapter.options), "config": dict(config)})
        outcome = {"metrics": {"dice": 0.5}, "n": {name: len(ids) for name, ids in parts.items()},
                   "timing": {}, "training": {}, "ci": {"dice": {"low": 0.4, "high": 0.6}}, "per_image": None}
        return outcome, []

    monkeypatch.setattr(api, "_run_protocol", protocol)
    return seen


def _record(results):
    (path,) = (results / "runs").rglob("*.json")
    return load_record(path)


def test_false_stays_false_from_the_command_line_to_the_record(flag_adapter, captured_runs, siim_root, tmp_path):
    assert main(["-q", "run", "--model", flag_adapter, "--task", "siim_seg", "--frac", "1.0", "--data-root",
                 str(siim_root), "--results", str(tmp_path), "--device", "cpu",
                 "--model-option", "flag=false", "--set", "freeze_bn=false"]) == 0
    assert captured_runs[0]["options"]["flag"] is False and captured_runs[0]["config"]["freeze_bn"] is False
    record = _record(tmp_path)
    assert record["model"]["options"] == {"flag": False, "seed": 0}
    assert record["config"]["freeze_bn"] is False and record["config"]["overrides"] == {"freeze_bn": False}


def test_false_stays_false_through_a_sweep_file(flag_adapter, captured_runs, siim_root, tmp_path):
    # A quoted "false" in the file is text until the adapter reads it as its boolean option.
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "models": [{"adapter": flag_adapter, "options": {"flag": "false"}}], "tasks": ["siim_seg"], "fracs": [1.0],
        "seeds": [0], "set": {"freeze_bn": False}, "data_roots": {"siim": str(siim_root)},
        "results": str(tmp_path / "results")}))
    spec = build_spec(load_sweep_file(sweep_file))
    [run] = expand(spec).runs
    argv = run.arguments(spec.results, "cpu", overwrite=False)
    assert parse_options([argv[i + 1] for i, a in enumerate(argv) if a == "--model-option"]) == {"flag": "false"}
    assert main(["-q", *argv]) == 0
    assert captured_runs[0]["options"]["flag"] is False and captured_runs[0]["config"]["freeze_bn"] is False
    record = load_record(run.record)
    assert record["model"]["options"]["flag"] is False and record["config"]["overrides"] == {"freeze_bn": False}


def test_a_task_option_refuses_text_for_a_boolean(siim_root, tmp_path, capsys):
    assert main(["-q", "run", "--model", "random", "--task", "siim_seg", "--frac", "1.0", "--data-root",
                 str(siim_root), "--results", str(tmp_path), "--set", "freeze_bn=no"]) == 2
    assert "--set freeze_bn='no': expected bool like the default True" in capsys.readouterr().err
