import pytest

from vlpbench.config import parse_overrides, resolve_data_root
from vlpbench.errors import ConfigError


def test_parse_overrides_reads_yaml_scalars_and_exponents():
    assert parse_overrides(["lr=1e-3", "max_epochs=2", "augment=false", "betas=[0.9, 0.99]", "x=abc"]) == {
        "lr": 0.001, "max_epochs": 2, "augment": False, "betas": [0.9, 0.99], "x": "abc"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lr"])


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
