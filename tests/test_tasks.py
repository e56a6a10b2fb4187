import pytest

from vlpbench.errors import ConfigError
from vlpbench.tasks import load_task, task_names


def test_siim_seg_spec_matches_mgca_protocol():
    task = load_task("siim_seg")
    assert task.version == 1 and task.dataset == "siim" and task.split == "v1"
    assert task.fractions == (0.01, 0.1, 1.0)
    cfg = task.config
    assert (cfg["image_size"], cfg["batch_size"], cfg["lr"], cfg["weight_decay"]) == (224, 8, 2e-4, 0.05)
    assert (cfg["max_epochs"], cfg["patience"], cfg["focal_weight"]) == (50, 10, 10.0)
    assert cfg["freeze_bn"] is True and cfg["init_decoder"] is False


def test_every_shipped_task_loads():
    for name in task_names():
        assert load_task(name).name == name


def test_overrides_are_applied_and_validated():
    task = load_task("siim_seg")
    resolved = task.resolve({"lr": 5e-4, "max_epochs": 3, "init_decoder": True})
    assert resolved["lr"] == 5e-4 and resolved["max_epochs"] == 3 and resolved["init_decoder"] is True
    assert task.config["lr"] == 2e-4  # the spec itself is untouched
    assert isinstance(task.resolve({"lr": 1})["lr"], float)
    with pytest.raises(ConfigError, match="did you mean 'max_epochs'"):
        task.resolve({"max_epoch": 3})
    with pytest.raises(ConfigError, match="expected int"):
        task.resolve({"batch_size": "eight"})
    with pytest.raises(ConfigError, match="expected bool"):
        task.resolve({"augment": 1})


def test_unknown_task_suggests_a_name():
    with pytest.raises(ConfigError, match="Did you mean 'siim_seg'"):
        load_task("siim_segm")


@pytest.mark.parametrize("metric, message", [
    ("accuracy", "primary_metric 'accuracy' is the former name of 'acc'; write 'acc'"),
    ("top1", "primary_metric: unknown metric 'top1'"),
])
def test_primary_metric_must_be_a_current_metric_name(tmp_path, monkeypatch, metric, message):
    import yaml

    from vlpbench import tasks

    spec = yaml.safe_load(load_task("covidx_cls").path.read_text())
    (tmp_path / "covidx_cls.yaml").write_text(yaml.safe_dump({**spec, "primary_metric": metric}))
    monkeypatch.setattr(tasks, "TASKS_DIR", tmp_path)
    with pytest.raises(ConfigError, match=f"covidx_cls.yaml: {message}"):
        load_task("covidx_cls")


def test_a_task_name_never_reaches_a_file_outside_the_task_folder(tmp_path, monkeypatch):
    import vlpbench.tasks as tasks

    shipped = tmp_path / "tasks"
    shipped.mkdir()
    (shipped / "siim_seg.yaml").write_text((tasks.TASKS_DIR / "siim_seg.yaml").read_text())
    outside = tmp_path / "evil_task.yaml"
    outside.write_text((tasks.TASKS_DIR / "siim_seg.yaml").read_text().replace("name: siim_seg", "name: ../evil_task"))
    monkeypatch.setattr(tasks, "TASKS_DIR", shipped)
    with pytest.raises(ConfigError, match=r"unknown task '\.\./evil_task'\. .*Known: siim_seg"):
        tasks.load_task("../evil_task")
    assert tasks.load_task("siim_seg").name == "siim_seg"
