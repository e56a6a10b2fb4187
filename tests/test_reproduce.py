"""`vlpbench reproduce` on a planted ledger (tests/conftest.py `planted_ledger`), with `api.run` replaced by a
stand-in that writes valid records of planned Dice values: the checkpoint check comes before any run, data that
is not found is listed as skipped, existing records are not run again, and each verdict is in the output with
the numbers worked out by hand in the comments."""

from __future__ import annotations

import hashlib
import json
import math

from pathlib import Path

import pytest
import torch

from vlpbench import api, results
from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import EMBED_TEXT, CapabilityError, save_checkpoint
from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.ledger import CheckpointEntry
from vlpbench.protocols import SplitIds
from vlpbench.protocols.base import protocol_named
from vlpbench.protocols.zero_shot import run_zero_shot_task
from vlpbench.registry import ADAPTERS
from vlpbench.reproduce import plan_reproduction
from vlpbench.report.verdicts import match_entries
from vlpbench.testing.weightless import BrightnessPair

# Dice per seed 0, 1, 2 and the bootstrap half-width of each record, per (task, fraction).
VALUES = {("siim_seg", 0.01): ([0.49, 0.50, 0.51], 0.02), ("siim_seg", 0.1): ([0.50, 0.52, 0.54], 0.02),
          ("siim_seg", 1.0): ([0.70, 0.71, 0.72], 0.01)}
WEIGHTS = b"MGCA weights"
SHA = hashlib.sha256(WEIGHTS).hexdigest()
TOY = "reproduce-test-text-on-option"


@pytest.fixture
def bench(tmp_path, monkeypatch, planted_ledger, ledger_record, capsys):
    """The working folder: a checkpoint file, an (empty) SIIM folder, no other data configured, and ``api.run``
    recorded: each call's arguments and what had been printed before it."""
    monkeypatch.setattr(results, "environment", lambda: {"vlpbench": "test", "git": None, "python": "3",
                                                         "torch": "2", "cuda": None, "device": "cpu"})
    for name in ("VLPBENCH_DATA", "VLPBENCH_RSNA_ROOT", "VLPBENCH_SIIM_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "resnet_50.ckpt"
    checkpoint.write_bytes(WEIGHTS)
    (tmp_path / "siim").mkdir()
    calls = []

    def run(model, task, frac, *, seed, checkpoint, results, profile, data_root, **options):
        calls.append({"task": task, "frac": frac, "seed": seed, "profile": profile, "data_root": data_root,
                      "printed": capsys.readouterr().out})
        values, half = VALUES[task, frac]
        record = ledger_record(values[seed], seed, task=task, frac=frac, half=half, sha256=SHA,
                               name="mgca:resnet_50", path=str(checkpoint))
        return record, results_module.write_record(record, results)

    results_module = results
    monkeypatch.setattr(api, "run", run)
    argv = ["reproduce", "--model", "mgca", "--checkpoint", str(checkpoint), "--reference", str(planted_ledger()),
            "--results", str(tmp_path / "results"), "--data-root", f"siim={tmp_path / 'siim'}"]
    return argv, calls, tmp_path


def _line(out: str, *starts: str) -> str:
    """The table line whose first cells are ``starts``."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:len(starts)] == list(starts):
            return line
    raise AssertionError(f"no line {starts} in\n{out}")


def test_every_verdict_comes_out_with_its_numbers(bench, capsys):
    argv, calls, tmp_path = bench
    assert main(argv) == 0
    out = capsys.readouterr().out
    # Before the first run: the file against the ledger's entry (no published hash), and the data found.
    before = calls[0]["printed"]
    assert f"'mgca_r50' (resnet_50.ckpt; MGCA README): the authors publish no hash; this file's sha256 is {SHA}" \
        in before
    assert f"siim_seg: {tmp_path / 'siim'}" in before
    assert "skipped rsna_seg (1%): no data folder for dataset 'rsna'" in before
    assert ("left out, every cell not comparable (the source's setting is one no profile reproduces): rsna_seg 10% "
            "(paper)") in before
    # siim_seg at three fractions × 3 seeds; rsna_seg 1 % has no data; rsna_seg 10 % has no comparable cell.
    assert [(c["task"], c["frac"], c["seed"]) for c in calls] == [
        ("siim_seg", f, s) for f in (0.01, 0.1, 1.0) for s in (0, 1, 2)]
    assert {c["profile"] for c in calls} == {"paper"} and {c["data_root"] for c in calls} == {tmp_path / "siim"}

    # 1 %: mean 0.50, std 0.01; CI half-widths: test 0.02, training 1.96 · 0.01 / √3 = 0.011316, together
    # √(0.02² + 0.011316²) = 0.022979 → [47.70, 52.30] overlaps 49.7 ± 0.05: reproduced.
    first = _line(out, "siim_seg", "1%", "Dice", "49.7", "[1] Table 1, row MGCA", "50.00 ± 1.00 (n=3)",
                  "47.70–52.30", "+0.30", "reproduced")
    # the thread's 0.481 (48.1 ± 0.05) lies in the same CI: reproduced, printed as 48.1 under the published cell
    third = out.splitlines()[out.splitlines().index(first) + 1]
    assert [c.strip() for c in third.strip("|").split("|")] == [
        "↳ third-party", "", "", "48.1", "[2] first comment, row a user", "50.00 ± 1.00 (n=3)", "47.70–52.30",
        "+1.90", "reproduced"]
    # 10 %: mean 0.52, std 0.02; training 1.96 · 0.02 / √3 = 0.022632, half-width √(0.02² + 0.022632²) =
    # 0.030203, CI [0.489797, 0.550203] under 0.593 by (0.593 − 0.550203) / 0.060406 = 0.71 CI widths.
    half = math.hypot(0.02, 1.96 * 0.02 / math.sqrt(3))
    assert f"{(0.593 - (0.52 + half)) / (2 * half):.2g}" == "0.71"
    assert _line(out, "siim_seg", "10%", "Dice", "59.3", "[1] Table 1, row MGCA", "52.00 ± 2.00 (n=3)",
                 "48.98–55.02", "−7.30", "below by 0.71 CI widths")
    # 100 %: mean 0.71, std 0.01; half-width √(0.01² + 0.011316²) = 0.015102, CI [0.694898, 0.725102] over 0.642
    # by (0.694898 − 0.642) / 0.030204 = 1.75 → "1.8".
    assert _line(out, "siim_seg", "100%", "Dice", "64.2", "[1] Table 1, row MGCA", "71.00 ± 1.00 (n=3)",
                 "69.49–72.51", "+6.80", "above by 1.8 CI widths")
    # Table 2 prints 70.1 under a setting no profile reproduces: measured, shown, not judged.
    assert _line(out, "siim_seg", "100%", "Dice", "70.1", "[1] Table 2, row MGCA", "71.00 ± 1.00 (n=3)",
                 "69.49–72.51", "+0.90", "not comparable (r1)")
    assert "(r1) not comparable: a 640 px UperNet" in out
    assert _line(out, "rsna_seg", "10%", "Dice", "68.0", "[1] Table 2, row MGCA", "–", "–", "–", "not comparable (r1)")
    assert _line(out, "rsna_seg", "1%", "Dice", "63.0", "[1] Table 1, row MGCA", "–", "–", "–",
                 "not run (no data)")
    assert "[1] Paper P (https://example.org/p)" in out and "[2] HKU-MedAI/MGCA issue #3" in out

    # Run again: every run is recorded, none runs, the verdicts stay.
    calls.clear()
    assert main(argv) == 0
    assert calls == [] and "0 to run, 9 recorded already" in capsys.readouterr().out


def test_a_changed_checkpoint_hash_is_reported_before_anything_runs(bench, capsys, planted_ledger):
    argv, calls, tmp_path = bench
    published = "e" * 64
    folder = planted_ledger(mgca_sha256=published)
    argv = [*argv, "--tasks", "siim_seg", "--seeds", "1"]
    argv[argv.index("--reference") + 1] = str(folder)
    assert main(argv) == 0
    warning = (f"WARNING: {tmp_path / 'resnet_50.ckpt'} has sha256 {SHA}, but {folder / 'checkpoints.json'} entry "
               f"'mgca_r50' (resnet_50.ckpt; MGCA README) publishes sha256 {published}: this is not the released file")
    assert warning in calls[0]["printed"]
    assert [c["seed"] for c in calls] == [0, 0, 0]
    # One seed: the CI is the record's bootstrap CI, 0.49 ± 0.02 → [47.00, 51.00] holds 49.7.
    assert _line(capsys.readouterr().out, "siim_seg", "1%", "Dice", "49.7", "[1] Table 1, row MGCA",
                 "49.00 (n=1)", "47.00–51.00", "−0.70", "reproduced")


def test_a_dry_run_lists_the_runs_and_runs_nothing(bench, capsys):
    argv, calls, _ = bench
    assert main([*argv, "--dry-run", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert calls == []
    assert "runs under" in out and "6 to run, 0 recorded already (--dry-run: nothing is run)" in out
    for frac in ("1%", "10%", "100%"):
        assert f"  would run: siim_seg {frac} (paper) seed 1" in out
    assert "skipped rsna_seg (1%)" in out and "| Task" not in out


def test_recorded_seeds_are_not_run_again_under_any_name(bench, capsys, ledger_record):
    argv, calls, tmp_path = bench
    # seed 0 recorded under another --name, seed 1 at the path the run would write
    for seed, name in ((0, "mine"), (1, "mgca:resnet_50")):
        results.write_record(ledger_record(0.5, seed, sha256=SHA, name=name), tmp_path / "results")
    assert main([*argv, "--tasks", "siim_seg", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "7 to run, 2 recorded already" in out
    assert "  recorded: siim_seg 1% (paper) seed 0" in out and "  recorded: siim_seg 1% (paper) seed 1" in out
    assert main([*argv, "--tasks", "siim_seg"]) == 0
    assert (0.01, 0) not in {(c["frac"], c["seed"]) for c in calls} and len(calls) == 7


def test_nothing_to_run_exits_2_and_a_failed_run_exits_1(bench, capsys, monkeypatch):
    argv, calls, _ = bench
    assert main([*argv, "--tasks", "rsna_seg"]) == 2
    assert main([*argv, "--tasks", "rsna_seg", "--dry-run"]) == 2
    assert calls == []
    capsys.readouterr()

    def failing(model, task, frac, **options):
        raise ConfigError(f"adapter {model!r} cannot provide dense_embed")

    monkeypatch.setattr(api, "run", failing)
    assert main([*argv, "--tasks", "siim_seg", "--seeds", "1"]) == 1
    out = capsys.readouterr().out
    assert "run failed: siim_seg 10% (paper) seed 0: adapter 'mgca' cannot provide dense_embed" in out
    assert _line(out, "siim_seg", "10%", "Dice", "59.3", "[1] Table 1, row MGCA", "–", "–", "–",
                 "not run (run failed)")
    # a column of dashes keeps a valid delimiter cell (a hyphen beside the colon)
    rule = next(line for line in out.splitlines() if line.startswith("| :-"))
    assert all("-" in cell for cell in rule.strip("|").split("|"))


def _g2d_dry_run(argv: list[str], tmp_path: Path) -> tuple[list[str], Path]:
    """``argv`` turned into a dry run of G2D with a file of the G2D encoder's name."""
    mine = tmp_path / "mine_encoder.pth"
    mine.write_bytes(b"G2D weights")
    argv = [*argv, "--dry-run"]
    argv[argv.index("--model") + 1] = "g2d"
    argv[argv.index("--checkpoint") + 1] = str(mine)
    return argv, mine


def test_unreleased_weights_measure_the_users_file(bench, capsys, tmp_path):
    argv, _ = _g2d_dry_run(bench[0], tmp_path)
    assert main(argv) == 0
    sha = hashlib.sha256(b"G2D weights").hexdigest()
    assert (f"'g2d' ({{name}}_encoder.pth; nobody: no weights): the paper's weights were never published, so this "
            f"measures your file (sha256 {sha})") in capsys.readouterr().out


def test_an_entrys_task_options_reach_every_run(bench, capsys, tmp_path):
    argv, calls, _ = bench
    ledger = Path(argv[argv.index("--reference") + 1])
    checkpoints = json.loads((ledger / "checkpoints.json").read_text())
    checkpoints["checkpoints"]["g2d"]["overrides"] = {"init_decoder": True}
    (ledger / "checkpoints.json").write_text(json.dumps(checkpoints))
    argv, mine = _g2d_dry_run(argv, tmp_path)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "every run takes the entry's task options: --set init_decoder=true" in out
    assert calls == []
    plan = plan_reproduction("g2d", mine, reference=ledger, results=tmp_path / "results",
                             data_roots={"siim": str(tmp_path / "siim")})
    assert plan.overrides == {"init_decoder": True}
    # the records go where `run --set init_decoder=true` writes them, not beside the plain runs'
    assert all(run.record.stem != f"frac0.01-seed{run.seed}" for run in plan.runs)


class TextOnOption(BrightnessPair):
    """A zero-shot model whose text side comes with option ``text_encoder`` (as G2D's does); its checkpoint is an
    empty state dict."""

    name = TOY
    description = "test model: zero-shot only with --model-option text_encoder"
    takes_checkpoint = True
    default_options = {"text_encoder": ""}
    capability_hints = {EMBED_TEXT: "pass --model-option text_encoder=DIR"}

    def __init__(self, checkpoint=None, **options):
        super().__init__(checkpoint, **options)
        if not self.options["text_encoder"]:
            self.capabilities = type(self).capabilities - {EMBED_TEXT}


@pytest.fixture
def toy(tmp_path, monkeypatch, ledger_record):
    """A ledger of TextOnOption's file with a zero-shot cell (cxr14_zs 100 %, AUC 76.8) and a segmentation cell
    (siim_seg 1 %, Dice 49.7), empty data folders for both, and ``api.run`` replaced by a stand-in writing a
    record of Dice 0.5 (each call's task and seed kept); returns (argv, calls, checkpoint)."""
    monkeypatch.setitem(ADAPTERS._targets, TOY, TextOnOption)  # removed again after the test
    monkeypatch.setattr(results, "environment", lambda: {"vlpbench": "test", "git": None, "python": "3",
                                                         "torch": "2", "cuda": None, "device": "cpu"})
    ledger = tmp_path / "toy_ledger"
    ledger.mkdir()
    (ledger / "checkpoints.json").write_text(json.dumps({"schema": 1, "checkpoints": {"toy": {
        "model": TOY, "file": "toy.pth", "published_by": "README", "released": True}}}))
    (ledger / "t.json").write_text(json.dumps({
        "schema": 1, "citation": "Paper Q", "table": "Table 1", "profile": "paper", "unit": "percent",
        "columns": [{"paper": "CXR14 AUC", "task": "cxr14_zs", "frac": 1.0, "metric": "auc"},
                    {"paper": "SIIM 1%", "task": "siim_seg", "frac": 0.01, "metric": "dice"}],
        "rows": [{"method": "Toy", "checkpoint": "toy", "values": [76.8, 49.7]}]}))
    checkpoint = save_checkpoint({}, tmp_path / "toy.pth")
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    for dataset in ("cxr14", "siim"):
        (tmp_path / dataset).mkdir()
    calls = []

    def run(model, task, frac, *, seed, results, **options):
        calls.append((task, seed))
        record = ledger_record(0.5, seed, task=task, frac=frac, sha256=sha, name=f"{TOY}:toy", adapter=TOY,
                               path=str(checkpoint))
        return record, results_module.write_record(record, results)

    results_module = results
    monkeypatch.setattr(api, "run", run)
    argv = ["reproduce", "--model", TOY, "--checkpoint", str(checkpoint), "--reference", str(ledger),
            "--results", str(tmp_path / "results"), "--data-root", f"cxr14={tmp_path / 'cxr14'}",
            "--data-root", f"siim={tmp_path / 'siim'}"]
    return argv, calls, checkpoint


def _run_message(checkpoint: Path) -> str:
    """What a zero-shot run of the file without a text encoder fails with, before it reads any image."""
    with pytest.raises(CapabilityError) as error:
        run_zero_shot_task(build_adapter(TOY, checkpoint), None, SplitIds([], [], []), {}, seed=0,
                           device=torch.device("cpu"))
    return str(error.value)


def test_a_cell_the_adapter_cannot_serve_is_listed_with_its_message_and_not_run(toy, capsys):
    argv, calls, checkpoint = toy
    message = _run_message(checkpoint)
    assert message == f"adapter {TOY!r} cannot provide embed_text (pass --model-option text_encoder=DIR)"
    # --dry-run: the segmentation cell's seeds would run; the zero-shot cell is listed with the run's message.
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 to run, 0 recorded already, 1 cannot run (--dry-run: nothing is run)" in out
    assert f"  cannot run: cxr14_zs 100% (paper): {message}\n" in out
    assert "would run: cxr14_zs" not in out and "  would run: siim_seg 1% (paper) seed 2" in out
    # The real call runs only the segmentation seeds; the zero-shot cell is no failed run, so the exit is 0.
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert calls == [("siim_seg", 0), ("siim_seg", 1), ("siim_seg", 2)]
    assert _line(out, "cxr14_zs", "100%", "AUC", "76.8", "[1] Table 1, row Toy", "–", "–", "–",
                 "not run (adapter cannot)")
    assert f"cannot run: cxr14_zs 100% (paper): {message}\n" in out and "run failed" not in out


def test_only_cells_the_adapter_cannot_serve_exit_2_and_the_option_makes_them_runs(toy, capsys):
    argv, calls, _ = toy
    argv = [*argv, "--tasks", "cxr14_zs"]
    assert main([*argv, "--dry-run"]) == 2
    assert "0 to run, 0 recorded already, 1 cannot run" in capsys.readouterr().out
    assert main(argv) == 2
    assert calls == [] and _line(capsys.readouterr().out, "cxr14_zs", "100%")[-len("not run (adapter cannot) |"):] \
        == "not run (adapter cannot) |"
    # With a text encoder the cell is a run, one seed: zero-shot trains nothing.
    assert main([*argv, "--seeds", "3", "--model-option", "text_encoder=bert", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 to run, 0 recorded already (--dry-run" in out and "  would run: cxr14_zs 100% (paper) seed 0\n" in out
    assert "cannot run" not in out


def test_the_file_is_loaded_only_where_a_protocol_needs_the_adapters_capabilities(toy, monkeypatch, tmp_path):
    argv, _, checkpoint = toy
    built, init = [], TextOnOption.__init__

    def counted(self, *args, **options):
        built.append(args)
        init(self, *args, **options)

    monkeypatch.setattr(TextOnOption, "__init__", counted)
    ledger = Path(argv[argv.index("--reference") + 1])
    plan = plan_reproduction(TOY, checkpoint, reference=ledger, results=tmp_path / "results", tasks=["siim_seg"],
                             data_roots={"siim": str(tmp_path / "siim")})
    assert built == [] and plan.cannot_run == {} and len(plan.runs) == 3
    plan = plan_reproduction(TOY, checkpoint, reference=ledger, results=tmp_path / "results",
                             data_roots={"siim": str(tmp_path / "siim"), "cxr14": str(tmp_path / "cxr14")})
    assert built == [(checkpoint,)] and list(plan.cannot_run) == [("cxr14_zs", 1.0, "paper")]


@pytest.mark.parametrize("protocol", ["zero_shot", "grounding", "retrieval"])
def test_a_protocols_require_is_what_its_run_checks_first(protocol, toy):
    adapter = build_adapter(TOY, toy[2])
    with pytest.raises(CapabilityError) as checked:
        protocol_named(protocol).require(adapter)
    with pytest.raises(CapabilityError) as ran:
        protocol_named(protocol).run(adapter, None, SplitIds([], [], []), {}, seed=0, device=torch.device("cpu"))
    assert str(checked.value) == str(ran.value) and "cannot provide" in str(ran.value)


def test_a_task_that_trains_nothing_runs_one_seed(toy, tmp_path):
    plan = plan_reproduction(TOY, toy[2], reference=tmp_path / "toy_ledger", results=tmp_path / "results", seeds=3,
                             tasks=["cxr14_zs"], data_roots={"cxr14": str(tmp_path / "cxr14")},
                             model_options={"text_encoder": "bert"})
    assert [(run.task, run.seed) for run in plan.runs] == [("cxr14_zs", 0)]


@pytest.mark.parametrize("extra, message", [
    (["--entry", "g2d"], "--entry g2d: not an entry of mgca's cells; its entries: mgca_r50"),
    (["--tasks", "cxr14_zs"], "--tasks cxr14_zs: no ledger cell of mgca; its tasks: siim_seg, rsna_seg"),
    (["--data-root", "sim=/data"], "--data-root sim=...: no such dataset"),
    (["--seeds", "0"], "--seeds 0: expected at least one seed"),
    (["--checkpoint", "missing.ckpt"], "--checkpoint missing.ckpt: cannot be read"),
])
def test_bad_options_are_errors_naming_them(bench, capsys, extra, message):
    argv, calls, _ = bench
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err and calls == []


def test_a_file_is_the_entry_of_its_hash_else_of_its_name():
    def entry(id, file, sha256=None):
        return CheckpointEntry(id, "g2d", file, "x", None, True, sha256, None, None)

    encoder, both = entry("enc", "{name}_encoder.pth"), entry("both", "{name}_encoder_decoder.pth", "a" * 64)
    assert match_entries([encoder, both], "g2d_50_encoder.pth", "b" * 64) == ([encoder], "file name")
    assert match_entries([encoder, both], "g2d_50_encoder_decoder.pth", "b" * 64) == ([both], "file name")
    assert match_entries([encoder, both], "renamed.pth", "a" * 64) == ([both], "sha256")
    assert match_entries([encoder, both], "renamed.pth", "b" * 64) == ([encoder, both], None)
