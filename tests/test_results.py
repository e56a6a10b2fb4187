"""Result records: layout, atomic and non-destructive writes, validation on load."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

import vlpbench
from vlpbench import results
from vlpbench.errors import ConfigError, DataError, VlpbenchError
from vlpbench.results import (SCHEMA_VERSION, existing_record, load_record, load_records, make_record,
                              record_path, write_record)

SHA = "0123abcd" + "e" * 56


def _record(**changes) -> dict:
    fields = dict(
        model={"name": "g2d", "adapter": "g2d", "checkpoint": {"path": "/ckpt/g2d.pth", "sha256": SHA},
               "layout": "encoder"},
        task={"name": "siim_seg", "version": 1, "higher_is_better": True},
        frac=0.01, seed=0,
        split={"dataset": "siim", "version": "v1", "sha256": "f" * 64},
        metrics={"dice": np.float32(0.123456789), "dice_positive": None},
        primary_metric="dice",
        n={"train": np.int64(93), "val": 1806, "test": 1807},
        config={"lr": 2e-4, "overrides": {}},
        timing={"total_s": 12.3456789},
        ci={"dice": {"low": 0.1, "high": float("nan")}},
        per_image=None,
        data={"synthetic": True},
    )
    fields.update(changes)
    return make_record(**fields)


def test_make_record_fills_provenance():
    record = _record()
    assert record["schema"] == SCHEMA_VERSION == 1
    env = record["env"]
    assert set(env) == {"vlpbench", "git", "python", "torch", "cuda", "device", "torch_threads"}
    assert env["vlpbench"] == vlpbench.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["git"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", env["git"])
    created = datetime.fromisoformat(record["created"])
    assert created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 60


@pytest.mark.parametrize("change, key", [
    ({"primary_metric": "auc"}, "primary_metric"),
    ({"frac": 0.0}, "frac"),
    ({"seed": 1.5}, "seed"),
    ({"task": {"name": "siim_seg"}}, "task.version"),
])
def test_make_record_rejects_invalid_fields(change, key):
    with pytest.raises(ConfigError, match=re.escape(repr(key))):
        _record(**change)


def test_path_layout(tmp_path):
    record = _record()
    assert record_path(tmp_path, record) == tmp_path / "runs/g2d/0123abcd/siim_seg.v1/frac0.01-seed0.json"
    assert record_path(tmp_path, {**record, "frac": 0.1, "seed": 2}).name == "frac0.1-seed2.json"
    assert record_path(tmp_path, {**record, "frac": 1}).name == "frac1.0-seed0.json"
    no_ckpt = {**record, "model": {**record["model"], "checkpoint": None}}
    assert record_path(tmp_path, no_ckpt).parent.parent.name == "nockpt"
    hostile = {**record, "model": {**record["model"], "name": "../../etc/pass wd"},
               "task": {"name": "a/b", "version": "2 beta"}}
    path = record_path(tmp_path, hostile)
    assert path.relative_to(tmp_path / "runs").parts[:3] == ("_.._etc_pass_wd", "0123abcd", "a_b.v2_beta")


def test_runs_with_task_overrides_never_replace_the_canonical_run(tmp_path):
    canonical = _record()
    tuned = _record(config={"lr": 5e-4, "overrides": {"lr": 5e-4}})
    retuned = _record(config={"lr": 1e-3, "overrides": {"lr": 1e-3}})
    paths = {record_path(tmp_path, r) for r in (canonical, tuned, retuned)}
    assert len(paths) == 3
    assert re.fullmatch(r"frac0\.01-seed0-[0-9a-f]{8}\.json", record_path(tmp_path, tuned).name)
    assert record_path(tmp_path, tuned) == record_path(tmp_path, _record(config={"overrides": {"lr": 5e-4}}))


def test_write_round_trip_rounds_and_converts(tmp_path):
    # per_image scores whose mean is the dice, as a record read back must hold (vlpbench.record_values).
    record = _record(per_image={"img1": 0.123456789, "img2": np.array(0.123456789)})
    path = write_record(record, tmp_path)
    assert path == record_path(tmp_path, record)
    loaded = load_record(path)
    assert loaded["metrics"] == {"dice": 0.123457, "dice_positive": None}
    assert loaded["n"] == {"train": 93, "val": 1806, "test": 1807}
    assert loaded["timing"] == {"total_s": 12.345679}
    assert loaded["ci"] == {"dice": {"low": 0.1, "high": None}}  # NaN is not JSON: written as null
    assert loaded["per_image"] == {"img1": 0.123457, "img2": 0.123457}
    assert {k: loaded[k] for k in ("model", "task", "split", "env", "created", "frac", "seed")} == {
        k: record[k] for k in ("model", "task", "split", "env", "created", "frac", "seed")}
    assert load_records(tmp_path) == [loaded]


def test_write_leaves_no_temp_files_and_honours_umask(tmp_path):
    path = write_record(_record(), tmp_path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_crash_during_write_keeps_the_old_record(tmp_path, monkeypatch):
    path = write_record(_record(), tmp_path)
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "fsync", crash)
    with pytest.raises(VlpbenchError, match="disk full"):
        write_record(_record(seed=0, metrics={"dice": 0.9}), tmp_path, overwrite=True)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file, no .bak
    assert path.read_bytes() == before


def test_refuses_to_overwrite(tmp_path):
    path = write_record(_record(), tmp_path)
    before = path.read_bytes()
    with pytest.raises(VlpbenchError, match=re.escape(str(path)) + ".*--overwrite"):
        write_record(_record(metrics={"dice": 0.9}), tmp_path)
    assert path.read_bytes() == before


def test_overwrite_keeps_a_backup(tmp_path):
    path = write_record(_record(), tmp_path)
    before = path.read_bytes()
    write_record(_record(metrics={"dice": 0.9}), tmp_path, overwrite=True)
    write_record(_record(metrics={"dice": 0.8}), tmp_path, overwrite=True)
    backups = sorted(path.parent.glob("*.bak"))
    assert len(backups) == 2
    name = re.compile(r"frac0\.01-seed0\.replaced-\d{8}T\d{6}\.\d{6}Z\.json\.bak")
    assert all(name.fullmatch(b.name) for b in backups)
    assert before in {b.read_bytes() for b in backups}
    assert load_record(path)["metrics"]["dice"] == 0.8
    assert [r["metrics"]["dice"] for r in load_records(tmp_path)] == [0.8]  # backups are not records


def test_existing_record_checks_before_training(tmp_path):
    stub = {"model": {"name": "g2d", "checkpoint": {"path": "x", "sha256": SHA}},
            "task": {"name": "siim_seg", "version": 1}, "frac": 0.01, "seed": 0}
    assert existing_record(tmp_path, stub) is None
    path = write_record(_record(), tmp_path)
    assert existing_record(tmp_path, stub) == path
    assert existing_record(tmp_path, {**stub, "seed": 1}) is None


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["task"].pop("version"), "missing key 'task.version'"),
    (lambda r: r.pop("split"), "missing key 'split'"),
    (lambda r: r.update(frac="1%"), "invalid key 'frac'"),
    (lambda r: r.update(schema=99), "invalid key 'schema': version 99"),
    (lambda r: r.update(primary_metric="auc"), "invalid key 'primary_metric': 'auc' is not among"),
])
def test_malformed_record_names_file_and_key(tmp_path, edit, message):
    good = write_record(_record(), tmp_path)
    record = json.loads(good.read_text())
    edit(record)
    bad = good.with_name("frac0.1-seed0.json")
    bad.write_text(json.dumps(record))
    with pytest.raises(DataError, match=re.escape(f"{bad}: {message}")):
        load_records(tmp_path)


def test_unreadable_files(tmp_path):
    (tmp_path / "runs" / "m").mkdir(parents=True)
    broken = tmp_path / "runs" / "m" / "x.json"
    broken.write_text('{"schema": 1,')
    with pytest.raises(DataError, match=re.escape(str(broken)) + ": not a JSON result record"):
        load_records(tmp_path)
    broken.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object, got list"):
        load_record(broken)
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_records(empty) == []


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args],
                   check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")
def test_git_commit_of_source_tree(tmp_path):
    assert results._git_commit(tmp_path) is None  # not a checkout
    package = tmp_path / "benchmark"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _git(tmp_path, "init", "-q")
    assert results._git_commit(package) is None  # a repository that does not track our files
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "x")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert results._git_commit(package) == head
    (package / "__init__.py").write_text("x = 1\n")
    assert results._git_commit(package) == head + "-dirty"
