"""A task file of the user's own (``--task-file PATH``): loaded from that path, validated as a shipped task is,
never a shipped task's name; its records carry the protocol and the file's path and sha256, so table, compare,
plot and the leaderboard read them with the file gone.

The task under test is a copy of ``rsna_cls`` named ``my_rsna_cls``; each broken copy is refused with exit 2 and a
message naming the file and the key, and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from vlpbench import results, tasks
from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.results import load_record, read_record
from vlpbench.sweep import build_spec, expand

SHIPPED = tasks.TASKS_DIR / "rsna_cls.yaml"
# A run of seconds on 12 synthetic images of 32² pixels: one epoch, 20 bootstrap resamples.
TINY = ["--set", "image_size=32", "--set", "resize_size=32", "--set", "max_epochs=1", "--set", "batch_size=2",
        "--set", "bootstrap_resamples=20"]


def write_task(folder: Path, name: str = "my_rsna_cls", change=None, text: str | None = None) -> Path:
    """``<folder>/<name>.yaml``: rsna_cls renamed ``name``, with ``change`` applied to its mapping (or ``text``)."""
    spec = yaml.safe_load(SHIPPED.read_text())
    spec["name"] = name
    if change is not None:
        change(spec)
    path = folder / f"{name}.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(spec, sort_keys=False))
    return path


def record_of(task: tasks.Task, model: str, auc: float) -> dict:
    """A consistent record of ``task`` as ``run`` writes it (its ``task`` from :meth:`Task.record_fields`)."""
    return results.make_record(
        model={"name": model, "adapter": "random", "checkpoint": None}, task=task.record_fields(), frac=1.0, seed=0,
        split={"dataset": "rsna", "version": "v1", "sha256": "a" * 64}, metrics={"auc": auc}, primary_metric="auc",
        n={"train": 8, "val": 2, "test": 4}, config={"overrides": {}}, timing={},
        ci={"auc": {"low": auc - 0.1, "high": auc + 0.1}}, data={"synthetic": True})


@pytest.fixture(autouse=True)
def fixed_environment(monkeypatch):
    monkeypatch.setattr(results, "environment", lambda: {"vlpbench": "test", "git": None, "python": "3"})


def test_records_of_a_task_file_carry_it_and_are_read_without_it(tmp_path, capsys):
    path = write_task(tmp_path)
    task = tasks.load_task_file(path)
    record = record_of(task, "alpha", 0.75)
    assert record["task"] == {"name": "my_rsna_cls", "version": 1, "protocol": "linear", "profile": "canonical",
                              "higher_is_better": True,
                              "file": {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}
    base, cand = tmp_path / "base", tmp_path / "cand"
    written = results.write_record(record, base)
    assert written.parent.name == "my_rsna_cls.v1" and load_record(written)["task"] == record["task"]
    results.write_record(record_of(task, "alpha", 0.70), cand)

    path.unlink()  # readers need the records only
    assert main(["table", "--results", str(base), "--group", "cls"]) == 0  # the group comes from the protocol
    table = capsys.readouterr().out
    assert "my_rsna_cls 100%" in table and "| alpha [synthetic] |" in table and "75.0 |" in table
    # compare: the task's own tolerances are unknown without a shipped task, so the defaults (abs_tol 0.01) apply.
    assert main(["compare", "--baseline", str(base), "--candidate", str(cand)]) == 1
    out = capsys.readouterr().out
    assert "| my_rsna_cls | 100% | AUC ↑ | 0.7500 (n=1) | 0.7000 (n=1) | −0.0500 | 0.0100 | **regression** |" in out
    assert main(["plot", "--results", str(base), "--out", str(tmp_path / "plots"), "--format", "svg"]) == 0
    assert (tmp_path / "plots" / "my_rsna_cls.svg").is_file()
    assert main(["leaderboard", "--results", str(base), "--out", str(tmp_path / "site")]) == 0
    assert "my_rsna_cls" in (tmp_path / "site" / "index.html").read_text()


def test_score_and_tasks_take_a_task_file(tmp_path, capsys):
    path = write_task(tmp_path)
    assert main(["tasks", "--task-file", str(path)]) == 0
    assert re.search(r"^my_rsna_cls +1 +rsna/v1 +linear +auc ", capsys.readouterr().out, re.M)
    assert main(["tasks", "--verbose", "--profile", "paper", "--task-file", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("my_rsna_cls (v1, paper profile)")
    assert f"file {path} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()})" in out
    assert "dataset rsna/mgca_cls; protocol linear" in out and "\nrsna_cls (" not in out
    task = tasks.load_task_file(path, "paper")
    assert (task.name, task.split, task.path, task.profile) == ("my_rsna_cls", "mgca_cls", path, "paper")


def edit(change):
    return {"change": change}


# (how the copy is broken, the message after "<file>: ")
BROKEN = {
    "shipped_name": ({"name": "rsna_cls"}, "key 'name': 'rsna_cls' is the name of a shipped task"),
    "name_not_file": (edit(lambda s: s.update(name="other")), "name 'other' does not match the file name"),
    "option_out_of_domain": (edit(lambda s: s["config"].update(batch_size=0)),
                             "key 'config.batch_size': expected an integer >= 1, got 0"),
    "unknown_option": (edit(lambda s: s["config"].update(batchsize=8)),
                       "key 'config.batchsize': option 'batchsize' of protocol linear declares no type and domain"),
    "unknown_key": (edit(lambda s: s.update(metric="auc")), "unknown key 'metric'"),
    "missing_key": (edit(lambda s: s.pop("split")), "missing key(s) split"),
    "unknown_protocol": (edit(lambda s: s.update(protocol="linearr")), "key 'protocol': unknown protocol 'linearr'"),
    "unknown_dataset": (edit(lambda s: s.update(dataset="rnsa")), "key 'dataset': unknown dataset 'rnsa'"),
    "unknown_metric": (edit(lambda s: s.update(primary_metric="aucc")), "primary_metric: unknown metric 'aucc'"),
    "former_metric": (edit(lambda s: s.update(primary_metric="accuracy")),
                      "primary_metric 'accuracy' is the former name of 'acc'"),
    "fraction_text": (edit(lambda s: s.update(fractions=[0.1, "1.0"])),
                      "key 'fractions': expected a list of training fractions in (0, 1]"),
    "fraction_above_1": (edit(lambda s: s.update(fractions=[1.5])), "key 'fractions': expected a list"),
    "version_bool": (edit(lambda s: s.update(version=True)), "key 'version': expected a positive integer"),
    "profile_without_source": (edit(lambda s: s["profiles"]["paper"]["config"].update(lr={"value": 0.1})),
                               "key 'profiles.paper.config.lr': expected {value: ..., source: ...}"),
    "compare_tolerances": (edit(lambda s: s.update(compare={"abs_tol": 0.02})),
                           "key 'compare': `vlpbench compare` reads the records, never a task file"),
    "not_yaml": ({"text": "name: [unclosed\n"}, "not valid YAML"),
    "not_a_mapping": ({"text": "- my_rsna_cls\n"}, "expected a mapping with the keys name, version"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_task_file_is_refused_naming_the_file_and_key(case, tmp_path, capsys):
    how, expected = BROKEN[case]
    path = write_task(tmp_path, **how)
    before = sorted(tmp_path.iterdir())
    assert main(["tasks", "--verbose", "--task-file", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: {expected}")
    assert main(["run", "--model", "random", "--task-file", str(path), "--frac", "1.0",
                 "--results", str(tmp_path / "results")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: {expected}")
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_a_task_file_is_the_path_given_never_a_name_joined_onto_the_task_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # rsna_cls.yaml exists in the task folder, not here
    assert main(["tasks", "--task-file", "rsna_cls.yaml"]) == 2
    assert f"error: task file {tmp_path / 'rsna_cls.yaml'}: cannot be read (No such file or directory)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", "--task", "rsna_cls", "--task-file", "x.yaml", "--predictions", "p"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_sweep_runs_a_task_file_entry_with_task_file(tmp_path, capsys):
    path = write_task(tmp_path)
    values = {"models": ["random"], "tasks": ["rsna_cls", {"task_file": str(path)}], "fracs": [0.01], "seeds": [0],
              "set": {"my_rsna_cls:max_epochs": 1}, "results": str(tmp_path / "results")}
    spec = build_spec(values)
    assert spec.tasks == ["rsna_cls", "my_rsna_cls"] and spec.task_files == {"my_rsna_cls": str(path)}
    shipped, mine = expand(spec).runs
    assert mine.record.parent.name == "my_rsna_cls.v1" and mine.log.parent.name == "my_rsna_cls"
    argv = mine.arguments(tmp_path / "results", "cpu", overwrite=False)
    assert argv[3:5] == ["--task-file", str(path)] and "--task" not in argv and ["--set", "max_epochs=1"] == argv[-2:]
    assert shipped.arguments(tmp_path / "results", "cpu", overwrite=False)[3:5] == ["--task", "rsna_cls"]
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(values))
    assert main(["sweep", "--config", str(sweep_file), "--dry-run"]) == 0
    assert f"--task-file {path} --frac 0.01" in capsys.readouterr().out

    other = tmp_path / "other"
    other.mkdir()
    twin = write_task(other)
    for entry, expected in (({"task_file": str(path), "name": "x"}, "tasks[1]: expected a task name or {task_file"),
                            ({"task_file": str(twin)}, f"tasks[1]: task files {path} and {twin} both name"),
                            ({"task_file": str(tmp_path / "none.yaml")}, "cannot be read")):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            build_spec({**values, "tasks": [{"task_file": str(path)}, entry]})


def test_a_record_of_a_task_file_must_carry_its_protocol_and_a_sha256(tmp_path):
    made = results.make_record(
        model={"name": "m", "checkpoint": None}, task=tasks.load_task_file(write_task(tmp_path)).record_fields(),
        frac=1.0, seed=0, split={"dataset": "rsna", "version": "v1", "sha256": "a" * 64}, metrics={"auc": 0.7},
        primary_metric="auc", n={"test": 3}, config={}, timing={})
    for i, (change, expected) in enumerate((
            (lambda t: t.pop("protocol"), "invalid key 'task.protocol': a record of task file"),
            (lambda t: t["file"].update(sha256="abc"), "invalid key 'task.file': expected an object"))):
        broken = json.loads(json.dumps(made))
        change(broken["task"])
        with pytest.raises(ConfigError, match=re.escape(f"result record: {expected}")):
            results.write_record(broken, tmp_path / "results")
        path = tmp_path / f"edited{i}.json"
        path.write_text(json.dumps(broken))
        assert str(read_record(path)).startswith(f"{path}: {expected}")
