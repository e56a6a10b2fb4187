"""vlpbench sweep: expansion, skipping, a kill -9 in the middle and the resume, slurm through submitit's
local executor, and the failure table."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vlpbench import api, threads
from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.options import parse_options
from vlpbench.results import load_record, record_path
from vlpbench.sweep import build_spec, cli_values, expand, load_sweep_file, pending
from vlpbench.sweep.local import cpu_share, start_server, worker_slots
from vlpbench.sweep.report import failure_reason
from vlpbench.sweep.runlock import remove_stale_temporaries
from vlpbench.sweep.torchrun import torchrun_command

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sweeps"
# Tiny linear-probe runs: 32 px images, one epoch, batch 1 so that a 1 % subset of one image trains.
TINY = {"image_size": 32, "resize_size": 32, "max_epochs": 1, "bootstrap_resamples": 20, "batch_size": 1}


# Three models of the ``generic`` adapter: tiny timm networks (a fraction of ResNet-18's cost at the
# adapters' 224 px input), so that 36 runs fit in seconds on a CPU.
MODELS = (("lcnet-a", "lcnet_035", 0), ("lcnet-b", "lcnet_035", 1), ("mobilenet", "mobilenetv3_small_050", 0))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic RSNA and COVIDx folders whose 1 % training subsets hold at least one image, and a
    random-init timm state dict per model of MODELS."""
    import timm

    root = tmp_path_factory.mktemp("sweep-data")
    api.synth("rsna", root / "rsna", n=80, size=32, progress=False)
    api.synth("covidx", root / "covidx", n=80, size=64, progress=False)
    models = []
    for name, arch, seed in MODELS:
        torch.manual_seed(seed)
        path = root / f"{name}.pth"
        torch.save(timm.create_model(arch).state_dict(), path)
        models.append({"adapter": "generic", "name": name, "checkpoint": str(path), "options": {"arch": f"tu-{arch}"}})
    return {"rsna": root / "rsna", "covidx": root / "covidx", "models": models}


def _sweep_values(data, results, **extra):
    return {
        "models": data["models"],
        "tasks": ["rsna_cls", "covidx_cls"], "fracs": [0.01, 0.1, 1.0], "seeds": [0, 1], "set": dict(TINY),
        "data_roots": {"rsna": str(data["rsna"]), "covidx": str(data["covidx"])}, "results": str(results),
        "device": "cpu", **extra}


def _records(results):
    return {path: path.stat().st_mtime_ns for path in (Path(results) / "runs").rglob("*.json")}


# --- planning: pure and fast -------------------------------------------------------------------------------


def test_expand_covers_each_allowed_fraction_and_predicts_the_record_path(tmp_path):
    checkpoint = tmp_path / "r18.pth"
    checkpoint.write_bytes(b"weights")  # planning only hashes the file
    spec = build_spec(cli_values(models=["random", "generic"], checkpoints=[f"generic={checkpoint}"],
                                 model_options=["generic:arch=resnet18"], tasks=["rsna_cls", "rsna_zs"],
                                 fracs=[0.01, 1.0], seeds=[0, 1], overrides=["bootstrap_resamples=20"],
                                 data_roots=["rsna=/data/rsna"], results=str(tmp_path)), "command line")
    plan = expand(spec)
    # rsna_cls: 2 models × 2 fractions × 2 seeds; rsna_zs allows only 1.0: 2 × 1 × 2.
    assert len(plan.runs) == 12
    assert plan.notes == ["rsna_zs allows fractions 1: 0.01 left out"]
    assert sorted({(r.task, r.frac) for r in plan.runs}) == [("rsna_cls", 0.01), ("rsna_cls", 1.0), ("rsna_zs", 1.0)]
    run = next(r for r in plan.runs if r.model.adapter == "generic" and r.task == "rsna_cls" and r.frac == 0.01)
    sha = hashlib.sha256(b"weights").hexdigest()
    assert run.record == (tmp_path / "runs" / "generic_r18" / sha[:8] / "rsna_cls.v1" /
                          f"frac0.01-seed{run.seed}-{_overrides_hash({'bootstrap_resamples': 20})}.json")
    assert run.log == tmp_path / "sweep_logs" / "generic_r18" / "rsna_cls" / f"{run.record.stem}.log"
    assert run.data_root == "/data/rsna" and run.model.options == {"arch": "resnet18"}


def _overrides_hash(overrides):
    return hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def test_run_arguments_give_back_the_planned_overrides_and_record_path(tmp_path):
    # Plain YAML reads 1e-3 as a string; a sweep file's 1e-3 is the number `vlpbench run --set lr=1e-3`
    # gives, or the record's overrides hash (its path) would differ from the predicted one.
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "models": [{"adapter": "random", "options": {"seed": 3}}], "tasks": ["siim_seg"], "fracs": ["10%"],
        "seeds": [0], "set": {"lr": "1e-3", "siim_seg:dice_resolution": "input", "augment": False},
        "results": str(tmp_path / "results")}))
    spec = build_spec(load_sweep_file(sweep_file))
    [run] = expand(spec).runs
    assert run.frac == 0.1 and run.overrides == {"lr": 0.001, "augment": False, "dice_resolution": "input"}
    argv = run.arguments(spec.results, "cpu", overwrite=False)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sorted(sets) == ["augment=false", "dice_resolution=input", "lr=0.001"]
    assert parse_options(sets) == run.overrides
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--model-option"] == ["seed=3"]
    stub = {"model": {"name": "random", "checkpoint": None}, "task": {"name": "siim_seg", "version": 1},
            "frac": 0.1, "seed": 0, "config": {"overrides": parse_options(sets)}}
    assert run.record == record_path(spec.results, stub)


def test_repeated_values_plan_each_run_once():
    spec = build_spec({"models": ["random"], "tasks": ["rsna_cls", "rsna_cls"], "fracs": [0.1, "10%", 1.0],
                       "seeds": [1, 0, 1]})
    assert spec.tasks == ["rsna_cls"] and spec.fracs == [0.1, 1.0] and spec.seeds == [1, 0]
    assert len(expand(spec).runs) == 4


def test_pending_skips_existing_records_unless_forced(tmp_path):
    spec = build_spec({"models": ["random"], "tasks": ["rsna_cls"], "fracs": [0.01, 0.1, 1.0], "seeds": [0],
                       "results": str(tmp_path)})
    runs = expand(spec).runs
    runs[1].record.parent.mkdir(parents=True)
    runs[1].record.write_text("{}")
    to_run, skipped = pending(runs)
    assert skipped == [runs[1]] and to_run == [runs[0], runs[2]]
    assert pending(runs, force=True) == (runs, [])


def test_sweep_file_merges_with_command_line_values(tmp_path):
    values = load_sweep_file(EXAMPLES / "segmentation.yaml")
    spec = build_spec(values, "example")
    assert [m.label for m in spec.models] == ["g2d", "mgca", "imagenet", "random"]
    assert spec.tasks == ["siim_seg", "rsna_seg"] and spec.fracs == [0.01, 0.1, 1.0] and spec.seeds == [0, 1, 2]
    assert spec.launcher == "slurm" and spec.slurm["partition"] == "gpu"
    from vlpbench.sweep.spec import merge

    given = cli_values(models=None, checkpoints=None, model_options=None, tasks=["siim_seg"], fracs=None,
                       seeds=[5], overrides=None, data_roots=None, launcher="local", workers=None, slurm={"mem_gb": 32})
    merged = build_spec(merge(values, given))
    assert merged.tasks == ["siim_seg"] and merged.seeds == [5] and merged.launcher == "local"
    assert merged.slurm == {**values["slurm"], "mem_gb": 32} and merged.fracs == spec.fracs


@pytest.mark.parametrize("values, message", [
    ({"modelz": ["random"]}, "unknown key(s) modelz"),
    ({"models": [{"adapter": "random", "ckpt": "x"}]}, "models[0]: unknown key(s) ckpt"),
    ({"models": ["random", {"adapter": "random"}]}, "more than one model is labelled random"),
    ({"set": {"covidx_cls:lr": 0.1}}, "'set' names task 'covidx_cls', which the sweep does not run"),
    ({"fracs": [0.5, 2]}, "a training fraction lies in (0, 1]"),
    ({"launcher": "kubernetes"}, "launcher 'kubernetes' is not one of local, slurm, torchrun"),
    ({"workers": 0}, "'workers': expected a positive integer"),
    ({"seeds": []}, "no seeds given"),
])
def test_malformed_sweeps_name_the_key(values, message, tmp_path):
    base = {"models": ["random"], "tasks": ["rsna_cls"], "fracs": [1.0], "seeds": [0]}
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({**base, **values}))
    with pytest.raises(ConfigError) as error:
        build_spec(load_sweep_file(sweep_file), f"sweep file {sweep_file}")
    assert message in str(error.value)


def test_command_line_pairs_and_task_options_are_checked():
    with pytest.raises(ConfigError, match="--checkpoint 'g2d': expected MODEL=PATH"):
        cli_values(models=["g2d"], checkpoints=["g2d"], model_options=None, tasks=None, fracs=None, seeds=None,
                   overrides=None, data_roots=None)
    with pytest.raises(ConfigError, match=r"--model-option: model 'mgca' is not in --models \(g2d\)"):
        cli_values(models=["g2d"], checkpoints=None, model_options=["mgca:text_encoder=x"], tasks=None, fracs=None,
                   seeds=None, overrides=None, data_roots=None)
    spec = build_spec({"models": ["random"], "tasks": ["rsna_cls", "rsna_zs"], "fracs": [1.0], "seeds": [0],
                       "set": {"max_epochs": 1}})
    with pytest.raises(ConfigError, match="task rsna_zs has no option 'max_epochs'.*TASK:KEY=VALUE"):
        expand(spec)


def test_local_worker_slots_own_a_gpu_each_or_share_the_cores(monkeypatch):
    assert worker_slots(None, ["0", "1"]) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in worker_slots(3, ["4", "7"])] == ["4", "7", "4"]
    # Runs that share a GPU are told how many do (automatic inference batches plan within their share).
    assert [env.get("VLPBENCH_RUNS_PER_DEVICE") for env in worker_slots(3, ["4", "7"])] == ["2", None, "2"]
    assert worker_slots(3, ["0"]) == [{"CUDA_VISIBLE_DEVICES": "0", "VLPBENCH_RUNS_PER_DEVICE": "3"}] * 3
    assert worker_slots(2, []) == [{}, {}]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 64)  # the affinity mask, not torch's default, is the bound
    assert (cpu_share(None, []), cpu_share(2, []), cpu_share(4, []), cpu_share(8, [])) == (6, 3, 1, 1)
    assert cpu_share(2, ["0"]) is None  # a GPU run sizes its own threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_share(2, []) is None  # each run follows OMP_NUM_THREADS


def test_sweep_threads_reach_every_run_command(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 64)  # the affinity mask, not torch's default, is the bound
    values = {"models": ["random"], "tasks": ["rsna_cls"], "fracs": [1.0], "seeds": [0],
              "results": str(tmp_path), "device": "cpu"}

    def threads_of(**more):
        [outcome] = api.sweep(dry_run=True, progress=False, **values, **more).outcomes
        argv = outcome.command
        return argv[argv.index("--threads") + 1] if "--threads" in argv else None

    assert threads_of() == "8" and threads_of(workers=4) == "2" and threads_of(threads=3, workers=4) == "3"
    assert threads_of(launcher="slurm") is None  # a slurm task sizes its threads to the CPUs it is given
    with pytest.raises(ConfigError, match="'threads': expected a positive integer, got 0"):
        build_spec({**values, "threads": 0})


def test_torchrun_launcher_builds_one_command_per_run(tmp_path, capsys):
    command = torchrun_command(["run", "--model", "g2d"], 4)
    assert command[-7:] == ["--standalone", "--nproc-per-node=4", "-m", "vlpbench.sweep.torchrun_rank", "run",
                            "--model", "g2d"]
    assert Path(command[0]).name == "torchrun" or command[1:3] == ["-m", "torch.distributed.run"]
    code = main(["sweep", "--models", "random", "--tasks", "rsna_cls,rsna_zs", "--fracs", "1%,100%", "--seeds", "0",
                 "--set", "rsna_cls:max_epochs=2", "--results", str(tmp_path), "--launcher", "torchrun",
                 "--nproc-per-node", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line.strip() for line in out.splitlines()
             if "--nproc-per-node=2 -m vlpbench.sweep.torchrun_rank run" in line]
    assert len(lines) == 3 and "note: rsna_zs allows fractions 1: 0.01 left out" in out
    assert "--task rsna_cls --frac 0.01 --seed 0" in lines[0] and "--set max_epochs=2" in lines[0]
    assert "3 planned" in out and not (tmp_path / "runs").exists()


def test_failure_reason_names_the_signal_or_the_last_error_of_the_log(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("=== 2026-01-01T00:00:00+00:00 pid 1: vlpbench run\n10:00:00 INFO run x\nTraceback (most recent "
                   "call last):\n  File \"a.py\", line 1\nRuntimeError: boom\n=== exit code 1 after 0.1 s\n")
    assert failure_reason(1, log) == "RuntimeError: boom"
    assert failure_reason(-9, log) == "killed by SIGKILL"
    assert failure_reason(2, tmp_path / "absent.log") == "exit code 2"


def test_stale_temporary_files_of_a_record_are_removed(tmp_path):
    record = tmp_path / "frac0.1-seed0.json"
    stale = [tmp_path / ".frac0.1-seed0.json.0a1b.tmp", tmp_path / ".frac0.1-seed0.json.ffee.tmp"]
    other = tmp_path / ".frac1.0-seed0.json.0a1b.tmp"
    for path in stale + [other]:
        path.write_text("{")
    assert remove_stale_temporaries(record) == stale
    assert not any(p.exists() for p in stale) and other.exists()


# --- launching: tiny real runs ---------------------------------------------------------------------------


def test_killed_sweep_resumes_without_repeating_finished_runs(data, tmp_path):
    results = tmp_path / "results"
    sweep_file = tmp_path / "sweep.yaml"
    # One seed: 18 runs are enough to kill the sweep with some finished and some not.
    sweep_file.write_text(yaml.safe_dump(_sweep_values(data, results, workers=2, seeds=[0])))
    with open(tmp_path / "killed.out", "wb") as out:
        sweep = subprocess.Popen([sys.executable, "-m", "vlpbench.cli", "-q", "sweep", "--config", str(sweep_file)],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    start_server()  # this process's run server, for the resume, starts while the other sweep works
    deadline = time.monotonic() + 120
    while len(_records(results)) < 3 and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep, its forkserver and every run in flight
    sweep.wait()
    before = _records(results)
    total = len(expand(build_spec(load_sweep_file(sweep_file))).runs)
    assert 3 <= len(before) < total, (tmp_path / "killed.out").read_text()
    for path in before:
        load_record(path)  # complete and valid: a killed write leaves no partial record

    plan = expand(build_spec(load_sweep_file(sweep_file)))
    missing = [run for run in plan.runs if run.record not in before]
    stale = missing[0].record.with_name(f".{missing[0].record.name}.0123abcd.tmp")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('{"schema": 1, "tru')  # what a run killed inside write_record could leave

    report = api.sweep(sweep_file, progress=False)
    assert report.exit_code == 0 and not report.runs("failed")
    assert {o.run.record for o in report.runs("skipped")} == set(before)
    assert {o.run.record for o in report.runs("done")} == {run.record for run in missing}
    after = _records(results)
    assert len(after) == total and set(after) == {run.record for run in plan.runs}
    assert all(after[path] == mtime for path, mtime in before.items())  # finished runs were not repeated
    assert not list(results.rglob(".frac*.json.*.tmp")) and not list(results.rglob("*.bak"))
    for run in plan.runs:
        log = run.log.read_text()
        # A run killed between writing its record and logging its exit has no exit line; none has two.
        expected = {1} if run in missing else {0, 1}
        assert log.count("exit code 0") in expected, log
    assert f"{total} run(s): {total - len(before)} done, 0 failed, {len(before)} skipped" in report.format()


def test_failed_run_is_listed_with_its_log_while_the_others_finish(data, tmp_path, capsys):
    results = tmp_path / "results"
    values = _sweep_values(data, results, tasks=["covidx_cls"], fracs=[1.0], seeds=[0])
    values["models"] = [values["models"][0], {**values["models"][0], "name": "broken",
                                              "checkpoint": str(tmp_path / "missing.pth")}]
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(values))
    assert main(["-q", "sweep", "--config", str(sweep_file)]) == 1
    out = capsys.readouterr().out
    good, broken = expand(build_spec(values)).runs
    assert good.record.is_file() and broken.record is None
    assert "2 run(s): 1 done, 1 failed, 0 skipped" in out
    [row] = [line for line in out.splitlines() if line.strip().startswith("broken")]
    assert row.split()[:4] == ["broken", "covidx_cls", "1", "0"]
    assert str(broken.log) in row and "checkpoint file not found" in row
    assert f"checkpoint file not found: {tmp_path / 'missing.pth'}" in broken.log.read_text()

    # --force reruns the finished run too; the record it replaces is kept as .bak, as `run --overwrite` does.
    first = good.record.read_text()
    assert main(["-q", "sweep", "--config", str(sweep_file), "--force"]) == 1
    assert "2 run(s): 1 done, 1 failed, 0 skipped" in capsys.readouterr().out
    [backup] = good.record.parent.glob(f"{good.record.stem}.replaced-*.json.bak")
    assert backup.read_text() == first and load_record(good.record)["seed"] == 0
    assert good.log.read_text().count("exit code 0") == 2 and "--overwrite" in good.log.read_text()


def test_sweep_help_gives_an_example_and_says_what_torchrun_needs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    assert "example:" in out and "vlpbench sweep --models random,g2d" in out
    assert ("protocols segmentation, detection, linear, finetune, zero_shot and grounding support it, "
            "others refuse N > 1") in out


def test_slurm_launcher_runs_a_job_array_through_submitit_local_executor(data, tmp_path):
    pytest.importorskip("submitit")
    results = tmp_path / "results"
    values = _sweep_values(data, results, tasks=["rsna_cls"], fracs=[1.0], seeds=[0], launcher="slurm",
                           slurm={"cluster": "local", "timeout_min": 5, "partition": "ignored-locally"})
    values["models"] = values["models"][:1]
    report = api.sweep(progress=False, **values)
    assert report.exit_code == 0 and len(report.runs("done")) == 1
    for outcome in report.runs("done"):
        record = load_record(outcome.run.record)
        assert record["seed"] == outcome.run.seed and record["config"]["overrides"] == TINY
        assert "exit code 0" in outcome.run.log.read_text()
    assert list((results / "sweep_logs" / "submitit").glob("*_log.out"))
    again = api.sweep(progress=False, **values)
    assert len(again.runs("skipped")) == 1 and not again.runs("done")


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="this machine has SLURM")
def test_slurm_launcher_without_slurm_says_how_to_run_the_array_here(tmp_path):
    with pytest.raises(ConfigError, match="no SLURM here.*--slurm-cluster local"):
        api.sweep(models=["random"], tasks=["rsna_cls"], fracs=[1.0], seeds=[0], results=str(tmp_path),
                  launcher="slurm", progress=False)
    assert not (tmp_path / "runs").exists()
