"""Protocol profiles in task files: resolution, validation, and a run recorded under its profile."""

import pytest
import yaml

from vlpbench import tasks
from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.tasks import load_task

PAPER = {"description": "the reference code",
         "split": {"value": "v1", "source": "ref split.py:1"},
         "primary_metric": {"value": "dice_positive", "source": "ref metric.py:2"},
         "config": {"freeze_bn": {"value": False, "source": "ref segmenter.py:93-95"},
                    "lr": {"value": 5e-4, "source": "ref run.sh:3"}}}


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """A task folder holding siim_seg with the profiles given to ``write``."""
    spec = yaml.safe_load(load_task("siim_seg").path.read_text())

    def write(profiles) -> None:
        (tmp_path / "siim_seg.yaml").write_text(yaml.safe_dump({**spec, "profiles": profiles}))

    monkeypatch.setattr(tasks, "TASKS_DIR", tmp_path)
    return write


def test_a_profile_replaces_split_metric_and_options_and_keeps_the_rest(task_dir):
    task_dir({"paper": PAPER})
    canonical, paper = load_task("siim_seg"), load_task("siim_seg", "paper")
    assert canonical.profile == "canonical" and canonical.config["freeze_bn"] is True
    assert paper.profile == "paper" and paper.primary_metric == "dice_positive"
    assert paper.config["freeze_bn"] is False and paper.config["lr"] == 5e-4
    assert {k: v for k, v in paper.config.items() if k not in ("freeze_bn", "lr")} == {
        k: v for k, v in canonical.config.items() if k not in ("freeze_bn", "lr")}
    assert [(s.key, s.value, s.source) for s in paper.profile_settings()] == [
        ("split", "v1", "ref split.py:1"), ("primary_metric", "dice_positive", "ref metric.py:2"),
        ("freeze_bn", False, "ref segmenter.py:93-95"), ("lr", 5e-4, "ref run.sh:3")]
    # overrides apply on top of the profile
    assert paper.resolve({"lr": 1e-3})["lr"] == 1e-3 and paper.resolve({"lr": 1e-3})["freeze_bn"] is False
    with pytest.raises(ConfigError, match="--profile 'legacy': expected one of canonical, paper"):
        load_task("siim_seg", "legacy")


@pytest.mark.parametrize("paper, message", [
    ({"config": {"freeze_bn": {"value": False}}}, r"profiles.paper.config.freeze_bn': expected \{value: ..., source"),
    ({"config": {"freeze_bn": {"value": False, "source": " "}}}, "cites its source"),
    ({"config": {"freez_bn": {"value": False, "source": "x"}}}, "no option 'freez_bn' \\(did you mean 'freeze_bn'"),
    ({"config": {"lr": {"value": "fast", "source": "x"}}}, "expected float like the canonical 0.0002"),
    ({"primary_metric": {"value": "top1", "source": "x"}}, "unknown metric 'top1'"),
    ({"threshold": 1}, "unknown key 'profiles.paper.threshold'"),
    ({"unavailable": 3}, "must be the reason as a string"),
])
def test_malformed_profiles_name_the_file_and_key(task_dir, paper, message):
    task_dir({"paper": paper})
    with pytest.raises(ConfigError, match=f"siim_seg.yaml: .*{message}"):
        load_task("siim_seg")


def test_canonical_is_not_a_profile_block_and_unavailable_profiles_say_why(task_dir):
    task_dir({"canonical": PAPER})
    with pytest.raises(ConfigError, match="'canonical' is the task's own split"):
        load_task("siim_seg")
    task_dir({"paper": {"unavailable": "no reference code is published"}})
    with pytest.raises(ConfigError, match="has no 'paper' profile: no reference code is published"):
        load_task("siim_seg", "paper")
    task_dir({})
    with pytest.raises(ConfigError, match="declares no 'paper' profile"):
        load_task("siim_seg", "paper")


def test_tasks_verbose_lists_the_resolved_settings_with_their_sources(task_dir, capsys):
    task_dir({"paper": PAPER})
    assert main(["tasks", "--verbose", "--profile", "paper"]) == 0
    out = capsys.readouterr().out
    assert "siim_seg (v1, paper profile)" in out and "freeze_bn: False  (ref segmenter.py:93-95)" in out
    assert "dice_positive (higher is better)" in out


def test_a_sweep_passes_its_profile_to_every_run(task_dir, tmp_path):
    from vlpbench.sweep import build_spec
    from vlpbench.sweep.plan import expand

    task_dir({"paper": PAPER})
    spec = build_spec({"models": ["random"], "tasks": ["siim_seg"], "fracs": [0.01], "seeds": [0],
                       "profile": "paper", "results": str(tmp_path / "results")})
    [run] = expand(spec).runs
    assert run.arguments(spec.results, "cpu", overwrite=False)[-2:] == ["--profile", "paper"]
    assert run.record.parent.name == "siim_seg.v1-paper" and run.log.parent.name == "siim_seg-paper"
    with pytest.raises(ConfigError, match="profile 'legacy' is not one of canonical, paper"):
        build_spec({"models": ["random"], "tasks": ["siim_seg"], "fracs": [0.01], "seeds": [0], "profile": "legacy"})


def test_a_paper_run_records_its_profile_and_settings(task_dir, siim_root, g2d_encoder_checkpoint, tmp_path):
    from vlpbench import api

    task_dir({"paper": {"config": {"freeze_bn": {"value": False, "source": "ref segmenter.py:93-95"}}}})
    tiny = {"image_size": 32, "max_epochs": 1, "patience": 1, "bootstrap_resamples": 10}
    runs = {}
    for profile in ("canonical", "paper"):
        record, path = api.run_in_process("g2d", "siim_seg", 0.1, checkpoint=g2d_encoder_checkpoint,
                                          data_root=siim_root, results=tmp_path, overrides=tiny, device="cpu",
                                          progress=False, profile=profile)
        runs[profile] = (record, path)
    (canonical, canonical_path), (paper, paper_path) = runs["canonical"], runs["paper"]
    assert canonical["task"]["profile"] == "canonical" and paper["task"]["profile"] == "paper"
    assert canonical["config"]["freeze_bn"] is True and paper["config"]["freeze_bn"] is False
    assert paper_path.parent.name == "siim_seg.v1-paper" and canonical_path != paper_path
    # BatchNorm in train mode changes the encoder's features, so the numbers differ
    assert paper["metrics"]["dice"] != canonical["metrics"]["dice"] or paper["per_image"] != canonical["per_image"]


def test_the_readme_lists_every_setting_a_paper_profile_changes():
    from pathlib import Path

    from vlpbench.tasks import task_names

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reproducing the paper's tables", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and "`" in line]
    listed = {(task, key.strip("` ")) for tasks_cell, keys, *_ in rows if len(_) == 3
              for task in tasks_cell.split(", ") for key in keys.split(",")}
    for name in task_names():
        task = load_task(name)
        if "paper" not in task.profiles or task.profiles["paper"].unavailable:
            continue
        canonical = {"split": task.split, "primary_metric": task.primary_metric, **task.config}
        for setting in task.with_profile("paper").profile_settings():
            if setting.value != canonical[setting.key]:
                assert (name, setting.key) in listed, f"README: {name} {setting.key} missing from the profile table"


def test_the_example_paper_sweep_plans_paper_runs_of_table_1():
    from pathlib import Path

    from vlpbench.sweep import build_spec, load_sweep_file
    from vlpbench.sweep.plan import expand

    path = Path(__file__).resolve().parents[1] / "examples" / "sweeps" / "g2d-table1-paper.yaml"
    spec = build_spec(load_sweep_file(path), origin=str(path))
    runs = expand(spec).runs
    assert spec.profile == "paper" and len(runs) == 2 * 4 * 3 * 3
    assert all(run.profile == "paper" and "--profile" in run.arguments(spec.results, "cpu", overwrite=False)
               for run in runs)


def test_score_takes_the_profile_and_scores_as_that_profile_does(siim_root, tmp_path):
    import numpy as np
    from PIL import Image

    from vlpbench import api
    from vlpbench.data.siim import SiimSource
    from vlpbench.data.splits import load_split

    source = SiimSource(siim_root)
    ids, _ = api.split_ids(load_split("siim"), "test", source)
    (tmp_path / "empty").mkdir()
    for image_id in ids:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty" / f"{image_id}.png")
    canonical = api.score("siim_seg", tmp_path / "empty", data_root=siim_root)
    paper = api.score("siim_seg", tmp_path / "empty", data_root=siim_root, profile="paper")
    # an empty mask scores 1 on a negative image and 0 on a positive one
    per_image = np.array([0.0 if source.label(i) else 1.0 for i in ids])
    size = load_task("siim_seg", "paper").config["batch_size"]
    assert (canonical["profile"], paper["profile"]) == ("canonical", "paper")
    assert canonical["metrics"]["dice"] == pytest.approx(per_image.mean())
    # MGCA's Dice: the mean of the test batches' means, in test order
    batches = [per_image[i:i + size].mean() for i in range(0, len(per_image), size)]
    assert paper["metrics"]["dice"] == pytest.approx(np.mean(batches))
