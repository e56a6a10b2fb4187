"""Fault injection: task options outside their type and domain, and a malformed vlpbench.yaml, stop `vlpbench`
with a ConfigError naming the option (or the file, key and line) before anything is read, cached or written."""

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlpbench import tasks
from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.options import parse_options
from vlpbench.tasks import load_task, task_names
from vlpbench.tasks.domains import DOMAINS, PROTOCOL_DOMAINS, Choice, ListOf, domain_of


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder, home and image cache, so that a run finds no config file but the one a test
    writes, and anything it caches or writes shows."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    for name in ("VLPBENCH_DATA", "VLPBENCH_SIIM_ROOT", "VLPBENCH_RSNA_ROOT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "data").mkdir()
    return tmp_path


def _run(workdir, task, *options, data_root=True):
    argv = ["-q", "run", "--model", "random", "--task", task, "--frac", "1.0", "--results", str(workdir / "results")]
    argv += ["--data-root", str(workdir / "data")] if data_root else []
    for option in options:
        argv += ["--set", option]
    return main(argv)


def _nothing_written(workdir):
    assert not (workdir / "results").exists() or not any((workdir / "results").rglob("*.json"))
    assert not (workdir / "cache").exists() or not any((workdir / "cache").rglob("*"))


@pytest.mark.parametrize("task, option, message", [
    # the cases: a Dice of 1.0 from NaN thresholds, tracebacks after image caching
    ("siim_seg", "threshold=nan", r"--set threshold=nan: expected a number in [0, 1] (task siim_seg, default 0.5)"),
    ("siim_seg", "max_epochs=-3", "--set max_epochs=-3: expected an integer >= 1 (task siim_seg, default 50)"),
    ("siim_seg", "batch_size=0", "--set batch_size=0: expected an integer >= 1 (task siim_seg, default 8)"),
    ("siim_seg", "betas=[0.9]", "--set betas=[0.9]: expected a list of exactly 2 items, each a number in [0, 1)"),
    # their neighbours
    ("siim_seg", "threshold=inf", "--set threshold=inf: expected a number in [0, 1]"),
    ("siim_seg", "threshold=1.5", "--set threshold=1.5: expected a number in [0, 1]"),
    ("siim_seg", "lr=-1e-3", "--set lr=-0.001: expected a finite number >= 0"),
    ("siim_seg", "weight_decay=-nan", "--set weight_decay=nan: expected a finite number >= 0"),
    ("siim_seg", "patience=0", "--set patience=0: expected an integer >= 1"),
    ("siim_seg", "betas=[0.9, 1.0]", "--set betas=[0.9, 1.0]: expected a list of exactly 2 items"),
    ("siim_seg", "bootstrap_resamples=0", "--set bootstrap_resamples=0: expected an integer >= 1"),
    ("siim_seg", "pipeline=mcga", "--set pipeline='mcga': expected one of cached, mgca (did you mean 'mgca'?)"),
    ("rsna_cls", "head_solver=lbgfs", "--set head_solver='lbgfs': expected one of sgd, lbfgs (did you mean 'lbfgs'?)"),
    ("rsna_det", "neck_width=6", "--set neck_width=6: expected an integer >= 4, a multiple of 4"),
    ("rsna_det", "conf_threshold=-0.1", "--set conf_threshold=-0.1: expected a number in [0, 1]"),
    ("rsna_zs", "metrics=[auc, auc]", "--set metrics=['auc', 'auc']: expected a non-empty list of distinct items"),
    ("rsna_zs", "templates=['{}']", "--set templates=['{}']: expected a list of exactly 2 items"),
    # unchanged: unknown keys and type changes
    ("siim_seg", "treshold=0.3", "--set treshold: task siim_seg has no option 'treshold' (did you mean 'threshold'?)"),
    ("siim_seg", "batch_size=8.0", "--set batch_size=8.0: expected int like the default 8"),
])
def test_an_option_outside_its_domain_stops_the_run_before_any_work(workdir, capsys, task, option, message):
    assert _run(workdir, task, option) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    _nothing_written(workdir)


def test_a_score_and_a_sweep_check_options_the_same_way(workdir, capsys):
    assert main(["-q", "score", "--task", "siim_seg", "--predictions", str(workdir / "data"), "--data-root",
                 str(workdir / "data"), "--set", "threshold=nan"]) == 2
    assert "--set threshold=nan: expected a number in [0, 1]" in capsys.readouterr().err
    sweep = workdir / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"models": [{"adapter": "random"}], "tasks": ["siim_seg"], "fracs": [1.0],
                                     "seeds": [0], "set": {"batch_size": 0}, "data_roots": {"siim": "data"},
                                     "results": "results"}))
    assert main(["-q", "sweep", "--config", str(sweep), "--dry-run"]) == 2
    assert "--set batch_size=0: expected an integer >= 1" in capsys.readouterr().err
    _nothing_written(workdir)


@pytest.mark.parametrize("content, message", [
    (b"- siim\n", "vlpbench.yaml: expected a mapping such as 'data: {siim: /data/siim}', got list ['siim']"),
    (b"siim\n", "vlpbench.yaml: expected a mapping such as 'data: {siim: /data/siim}', got str 'siim'"),
    (b"data:\n  siim: \xff\n", "vlpbench.yaml, line 2: not UTF-8 text (byte 0xff at offset 14); save it as UTF-8"),
    (b"data: [siim]\n", "vlpbench.yaml, line 1: key 'data' must map dataset names to folders, got list ['siim']"),
    (b"dta:\n  siim: x\n", "vlpbench.yaml, line 1: unknown key 'dta' (did you mean 'data'?); known: data"),
    (b"data:\n  rsna: r\n  siim:\n", "vlpbench.yaml, line 3: key 'data.siim': expected a folder path (text), got None"),
    (b"data:\n  siim: [1]\n", "vlpbench.yaml, line 2: key 'data.siim': expected a folder path (text), got [1]"),
    (b"data: {siim: [}\n", "vlpbench.yaml: not valid YAML"),
])
def test_a_malformed_config_file_names_the_file_key_and_line(workdir, capsys, content, message):
    (workdir / "vlpbench.yaml").write_bytes(content)
    # score reads the file as run does (run: tests below), without building a model first
    assert main(["-q", "score", "--task", "siim_seg", "--predictions", str(workdir / "data")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    _nothing_written(workdir)


def test_run_reads_the_config_file_checked_and_an_empty_one_names_no_folder(workdir, capsys):
    (workdir / "vlpbench.yaml").write_bytes(b"- siim\n")
    assert _run(workdir, "siim_seg", data_root=False) == 2
    assert "vlpbench.yaml: expected a mapping" in capsys.readouterr().err
    for content in ("", "data:\n"):
        (workdir / "vlpbench.yaml").write_text(content)
        assert _run(workdir, "siim_seg", data_root=False) == 2
        assert "no data folder for dataset 'siim'" in capsys.readouterr().err
    _nothing_written(workdir)


@pytest.fixture
def task_copy(tmp_path, monkeypatch):
    """Write a changed copy of a shipped task file into a task folder of its own."""
    def write(name, change):
        spec = yaml.safe_load(load_task(name).path.read_text())
        change(spec)
        folder = tmp_path / "tasks"
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        monkeypatch.setattr(tasks, "TASKS_DIR", folder)
    return write


@pytest.mark.parametrize("change, message", [
    (lambda s: s["config"].update(threshold=float("nan")),
     "key 'config.threshold': expected a number in [0, 1], got nan"),
    (lambda s: s["config"].update(batch_size=0), "key 'config.batch_size': expected an integer >= 1, got 0"),
    (lambda s: s["config"].update(colour="red"), "key 'config.colour': option 'colour' of protocol segmentation "
                                                 "declares no type and domain"),
    (lambda s: s["profiles"]["paper"]["config"]["lr"].update(value=-1.0),
     "key 'profiles.paper.config.lr.value': expected a finite number >= 0, got -1.0"),
])
def test_a_task_file_value_outside_its_domain_names_the_file_and_key(task_copy, change, message):
    task_copy("siim_seg", change)
    with pytest.raises(ConfigError) as error:
        load_task("siim_seg")
    assert "siim_seg.yaml: " in str(error.value) and message in str(error.value)


def _shipped():
    for name in task_names():
        for profile in ("canonical", "paper"):
            try:
                yield load_task(name, profile)
            except ConfigError as error:
                assert "profile" in str(error)  # a task without a paper profile


def test_every_shipped_option_declares_a_domain_its_values_lie_in():
    for task in _shipped():
        for key, value in task.config.items():
            domain = domain_of(task.protocol, key)
            assert domain is not None, f"{task.name}: option {key} has no domain"
            assert domain.check(value) == value, (task.name, key, value)
    used = {(task.protocol, key) for task in _shipped() for key in task.config}
    assert set(DOMAINS) <= {key for _, key in used}, "a domain no shipped task uses"
    assert all((protocol, key) in used for protocol, keys in PROTOCOL_DOMAINS.items() for key in keys)


def _values(domain):
    if isinstance(domain, ListOf):
        domain = domain.item
    return set(domain.values)


def test_the_choices_are_the_protocols_own():
    from vlpbench.data.chexpert import POLICIES
    from vlpbench.data.object_cxr import POLYGON_RULES
    from vlpbench.metrics import classification, retrieval as rm
    from vlpbench.protocols import detection, features, finetune, grounding, labels, linear, retrieval_sets
    from vlpbench.protocols import segmentation, zero_shot

    expected = {
        **{("segmentation", k): v for k, v in segmentation.CHOICES.items()},
        **{("grounding", k): v for k, v in grounding.CHOICES.items()},
        **{("detection", k): v for k, v in detection.CHOICES.items()},
        ("detection", "val_metric"): ("map", "map_mgca"), ("detection", "polygon_rule"): POLYGON_RULES,
        ("linear", "linear_mode"): linear.MODES, ("linear", "head_solver"): linear.HEAD_SOLVERS,
        ("linear", "train_transform"): linear.TRAIN_TRANSFORMS,
        ("linear", "resize"): tuple(features.RESIZES), ("finetune", "select_on"): finetune.SELECT_ON,
        ("linear", "label_kind"): labels.LABEL_KINDS, ("linear", "label_policy"): POLICIES,
        ("zero_shot", "threshold_source"): zero_shot.THRESHOLD_SOURCES,
        ("zero_shot", "class_prompts"): zero_shot.CLASS_PROMPTS, ("zero_shot", "metrics"): zero_shot.METRICS,
        ("zero_shot", "threshold_images"): tuple(zero_shot.THRESHOLD_IMAGES),
        ("zero_shot", "threshold_criterion"): classification.CRITERIA,
        ("zero_shot", "threshold_ties"): classification.TIE_RULES, ("zero_shot", "acc_rule"): classification.ACC_RULES,
        ("retrieval", "candidates"): retrieval_sets.CANDIDATES,
        ("retrieval", "text_section"): retrieval_sets.TEXT_SECTIONS,
        ("retrieval", "images_per_study"): retrieval_sets.IMAGES_PER_STUDY,
        ("retrieval", "directions"): rm.DIRECTIONS, ("retrieval", "recall_at"): rm.RECALL_AT,
        ("retrieval", "precision_at"): rm.PRECISION_AT,
    }
    for (protocol, key), choices in expected.items():
        domain = domain_of(protocol, key)
        assert isinstance(domain, (Choice, ListOf)) and _values(domain) == set(choices), (protocol, key)


# --- property: a random --set value is accepted within its domain, or refused with a named error ---------------

PROPERTY_TASKS = ("siim_seg", "rsna_det", "rsna_zs", "rsna_ground", "chexpert_cls", "mimic_cxr_ret")
_TEXTS = st.one_of(
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "0", "-0", "-3", "1", "0.5", "1.0", "2", "1e-3", "true",
                     "null", "[]", "[0.9]", "[0.9, 0.999]", "[0.9, 1]", "[nan, 0.9]", "[1, 1]", "[auc]", "[1, 5]",
                     "{a: b}", "mgca", "none", "plain", "fixed", "'0.5'", "[", "abc"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**6, 10**6).map(str),
    st.lists(st.floats(-2, 2), max_size=3).map(lambda v: "[" + ", ".join(map(repr, v)) + "]"),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task_name=st.sampled_from(PROPERTY_TASKS), data=st.data(), text=_TEXTS)
def test_a_random_set_value_is_either_in_its_domain_or_refused_by_name(task_name, data, text):
    task = load_task(task_name)
    key = data.draw(st.sampled_from(sorted(task.config)))
    item = f"{key}={text}"
    try:
        config = task.resolve(parse_options([item]))
    except ConfigError as error:
        assert str(error).startswith("--set ") and key in str(error)
        assert "expected" in str(error) or "not a valid list, mapping or quoted string" in str(error)
        return
    value = config[key]
    assert domain_of(task.protocol, key).check(value) == value
    for number in (value if isinstance(value, list) else [value]):
        if isinstance(number, float):
            assert math.isfinite(number)  # never NaN or infinite, whatever the option
    if key in ("threshold", "conf_threshold", "nms_threshold", "ignore_threshold") and task.protocol != "grounding":
        assert 0.0 <= value <= 1.0
    if key in ("batch_size", "max_epochs", "patience", "bootstrap_resamples", "image_size"):
        assert isinstance(value, int) and value >= 1
    if key == "betas":
        assert len(value) == 2 and all(0.0 <= b < 1.0 for b in value)
