import pytest

from vlpbench.config import resolve_data_root
from vlpbench.errors import ConfigError


def test_data_root_precedence(tmp_path, monkeypatch):
    flag, env, parent, cfg = (tmp_path / n for n in ("flag", "env", "parent", "cfg"))
    for folder in (flag, env, parent / "siim", cfg):
        folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLPBENCH_SIIM_ROOT", raising=False)
    monkeypatch.delenv("VLPBENCH_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="--data-root"):
        resolve_data_root("siim")
    (tmp_path / "vlpbench.yaml").write_text(f"data:\n  siim: {cfg}\n")
    assert resolve_data_root("siim") == cfg
    monkeypatch.setenv("VLPBENCH_DATA", str(parent))
    assert resolve_data_root("siim") == parent / "siim"
    monkeypatch.setenv("VLPBENCH_SIIM_ROOT", str(env))
    assert resolve_data_root("siim") == env
    assert resolve_data_root("siim", flag) == flag
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_data_root("siim", tmp_path / "nope")


def test_one_chexpert_folder_serves_every_chexpert_split_set(tmp_path, monkeypatch):
    from vlpbench import api
    from vlpbench.data.chexpert import ChexpertSource, ChexpertTestSet
    from vlpbench.tasks import load_task

    root = tmp_path / "chexpert"
    api.synth("chexpert", root, n=20, size=32, progress=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("VLPBENCH_DATA", "VLPBENCH_CHEXPERT_TEST_ROOT", "VLPBENCH_CHEXPERT5X200_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLPBENCH_CHEXPERT_ROOT", str(root))
    assert isinstance(api.open_dataset(load_task("chexpert_zs")), ChexpertTestSet)
    assert isinstance(api.open_dataset(load_task("chexpert5x200_zs")), ChexpertSource)
    assert api.dataset_folder("chexpert_test") == root == api.dataset_folder("chexpert5x200")
    # A folder configured for the split set itself still wins.
    own = tmp_path / "own"
    own.mkdir()
    monkeypatch.setenv("VLPBENCH_CHEXPERT_TEST_ROOT", str(own))
    assert api.dataset_folder("chexpert_test") == own
    monkeypatch.delenv("VLPBENCH_CHEXPERT_ROOT")
    with pytest.raises(ConfigError, match="VLPBENCH_CHEXPERT_ROOT"):
        api.dataset_folder("chexpert5x200")
