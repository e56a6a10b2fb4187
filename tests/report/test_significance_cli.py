"""`vlpbench significance` end to end: runs write evidence sidecars, the command pairs them; refusals name
what differs; `table` marks a significant lead and the leaderboard shows it.

Zero-shot runs of two weight-free test models on a synthetic RSNA (a planted difference: one model reads
brightness the right way round, the other the wrong way; and the same model under two names: the null)
and one tiny segmentation run on a synthetic SIIM, all through the CLI.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlpbench import api
from vlpbench.cli import main
from vlpbench.errors import ConfigError, DataError
from vlpbench.evidence import read_evidence, write_evidence
from vlpbench.registry import ADAPTERS
from vlpbench.report.significance import significance_report
from vlpbench.report.table import render_table
from vlpbench.results import load_records, record_path, write_record
from vlpbench.testing.weightless import WeightlessAdapter


class Brightness(WeightlessAdapter):
    """Image embeddings from mean brightness against two fixed text directions (no weights)."""

    name = "significance-test-bright"
    description = "test model: brightness embeddings"
    capabilities = frozenset({"embed_image", "embed_text"})
    flip = False

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        level = images.mean(dim=(1, 2, 3))
        return F.normalize(torch.stack([1 - level, level, 0.1 * images.std(dim=(1, 2, 3))], dim=1), dim=1)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        negative = [t.startswith("no ") != self.flip for t in texts]
        return F.normalize(torch.tensor([[1.0, 0.2, 0.0] if n else [0.2, 1.0, 0.5] for n in negative]), dim=1)


class Dim(Brightness):
    """The same model with the prompts swapped: a planted, much worse AUC."""

    name = "significance-test-dim"
    flip = True


for _cls in (Brightness, Dim):
    ADAPTERS.register(_cls.name, _cls)

ZS = ["--task", "rsna_zs", "--frac", "1", "--device", "cpu", "--set", "bootstrap_resamples=20"]


@pytest.fixture(scope="module")
def zs_results(tmp_path_factory):
    """Records of `bright`, `bright2` (the same model) and `dim` on rsna_zs, seed 0, and `bright` at seed 1."""
    root = tmp_path_factory.mktemp("data") / "rsna"
    api.synth("rsna", root, n=120, size=64, progress=False)
    results = tmp_path_factory.mktemp("results")
    for model, name, seed in ((Brightness.name, "bright", 0), (Brightness.name, "bright2", 0), (Dim.name, "dim", 0),
                              (Brightness.name, "bright", 1)):
        assert main(["-q", "run", "--model", model, "--name", name, "--seed", str(seed), "--data-root", str(root),
                     "--results", str(results), *ZS]) == 0
    return results


def _significance(capsys, results, *args) -> dict:
    assert main(["significance", "--task", "rsna_zs", "--frac", "1", "--results", str(results), "--seed", "0",
                 "--resamples", "200", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_runs_write_sidecars_that_the_records_name(zs_results):
    records = load_records(zs_results)
    assert len(records) == 4
    for record in records:
        path = record_path(zs_results, record)
        assert (path.parent / record["evidence"]["file"]).is_file()
        evidence = read_evidence(record, path)
        statistics = evidence.statistics()
        for metric, value in record["metrics"].items():  # the sidecar reproduces every metric of the record
            assert statistics[metric](np.ones(evidence.n)) == pytest.approx(value, abs=2e-6), metric


def test_significance_finds_the_planted_difference_and_not_the_null(zs_results, capsys):
    out = _significance(capsys, zs_results, "--models", "bright,bright2,dim", "--metric", "auc,f1")
    assert out["seeds"] == {"bright": 0, "bright2": 0, "dim": 0} and out["n_items"] == 24
    auc = {(t["a"], t["b"]): t for t in out["tests"]["auc"]}
    null, planted = auc["bright", "bright2"], auc["bright", "dim"]
    assert null["test"] == planted["test"] == "DeLong"  # a one-class AUC is a single ROC curve
    assert null["result"]["diff"] == null["result"]["low"] == null["result"]["high"] == 0.0
    assert null["result"]["p_value"] == 1.0 and null["p_holm"] == 1.0
    assert planted["result"]["diff"] > 0.5 and planted["p_holm"] < 0.001
    # Holm over the three pairs of the metric, each p multiplied by at most 3.
    raw = sorted(t["result"]["p_value"] for t in auc.values())
    assert sorted(t["p_holm"] for t in auc.values())[0] == pytest.approx(min(1.0, 3 * raw[0]))
    assert planted["bootstrap"]["method"] == "paired bootstrap" and planted["bootstrap"]["low"] > 0
    f1 = {(t["a"], t["b"]): t for t in out["tests"]["f1"]}
    assert f1["bright", "dim"]["test"] == "paired bootstrap" and f1["bright", "bright2"]["result"]["p_value"] == 1.0

    assert main(["significance", "--task", "rsna_zs", "--frac", "1", "--results", str(zs_results), "--seed", "0",
                 "--resamples", "200", "--models", "bright,bright2,dim"]) == 0
    text = capsys.readouterr().out
    assert "AUC (auc, higher is better): DeLong; Holm over 3 pair(s), α = 0.05" in text
    assert "+0.0000 [+0.0000, +0.0000] p=1.000 (1.000)" in text and "p=<0.001*" in text


def test_several_seeds_need_a_seed_and_unknown_models_are_named(zs_results):
    records = load_records(zs_results)
    with pytest.raises(ConfigError, match="seeds 0, 1.*pass --seed S"):
        significance_report(records, task="rsna_zs", frac=1.0, models=["bright", "dim"], results_dir=zs_results)
    with pytest.raises(DataError, match="no record of nobody.*models with records there: bright, bright2, dim"):
        significance_report(records, task="rsna_zs", frac=1.0, models=["bright", "nobody"], seed=0)


def test_mismatched_splits_and_labels_are_refused_naming_what_differs(zs_results):
    records = [r for r in load_records(zs_results) if r["seed"] == 0]
    other = copy.deepcopy(next(r for r in records if r["model"]["name"] == "dim"))
    other["split"]["sha256"] = "f" * 64
    mixed = [r for r in records if r["model"]["name"] != "dim"] + [other]
    with pytest.raises(DataError, match=r"bright and dim cannot be paired: split sha256 .* \(bright\) vs f{64} \(dim\)"):
        significance_report(mixed, task="rsna_zs", frac=1.0, models=["bright", "dim"], results_dir=zs_results)

    # The same split hash, but other labels in the evidence (written through the evidence API).
    bright = next(r for r in records if r["model"]["name"] == "bright")
    evidence = read_evidence(bright, record_path(zs_results, bright))
    evidence.arrays["labels"] = 1 - evidence.arrays["labels"]
    forged = copy.deepcopy(bright)
    forged["model"]["name"] = "forged"
    forged["evidence"] = write_evidence(evidence, forged, record_path(zs_results, forged))
    write_record(forged, zs_results)
    try:
        with pytest.raises(DataError, match="bright and forged cannot be paired: the labels of the test items differ"):
            significance_report([bright, forged], task="rsna_zs", frac=1.0, models=["bright", "forged"],
                                results_dir=zs_results)
        # A sidecar changed after its run is an error, never a silent number.
        sidecar = record_path(zs_results, forged).with_name(forged["evidence"]["file"])
        sidecar.write_bytes(sidecar.read_bytes()[:-1])
        with pytest.raises(DataError, match="sha256 .* differs from the record's evidence.sha256"):
            significance_report([bright, forged], task="rsna_zs", frac=1.0, models=["bright", "forged"],
                                results_dir=zs_results)
    finally:
        record_path(zs_results, forged).unlink()


def test_a_record_without_evidence_says_which_metrics_it_cannot_test(zs_results):
    records = [r for r in load_records(zs_results) if r["seed"] == 0 and r["model"]["name"] in ("bright", "dim")]
    legacy = [{k: v for k, v in r.items() if k != "evidence"} for r in records]
    report = significance_report(legacy, task="rsna_zs", frac=1.0, models=["bright", "dim"], results_dir=zs_results)
    (test,) = report.tests["auc"]
    assert test.result is None and test.p_holm is None
    assert "no evidence for auc in bright's record" in test.reason and "no per_image scores" in test.reason
    assert "untested bright vs dim: no evidence for auc" in report.text()


SEG_FAST = ["--set", "image_size=32", "--set", "max_epochs=1", "--set", "patience=1", "--set", "batch_size=4",
            "--set", "bootstrap_resamples=20"]


def test_segmentation_evidence_round_trip_through_the_cli(siim_root, resnet18_checkpoint, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["-q", "run", "--model", "generic", "--model-option", "arch=resnet18", "--checkpoint",
                 str(resnet18_checkpoint), "--name", "seg", "--task", "siim_seg", "--frac", "0.1", "--data-root",
                 str(siim_root), "--results", str(results), "--device", "cpu", *SEG_FAST]) == 0
    capsys.readouterr()
    (record,) = load_records(results)
    evidence = read_evidence(record, record_path(results, record))
    assert evidence.kind == "per_item" and evidence.ids == list(record["per_image"])
    # The same predictions under a second name, written through the evidence API: the null pair.
    twin = copy.deepcopy(record)
    twin["model"]["name"] = "twin"
    twin["evidence"] = write_evidence(evidence, twin, record_path(results, twin))
    write_record(twin, results)

    assert main(["significance", "--task", "siim_seg", "--frac", "0.1", "--models", "seg,twin", "--results",
                 str(results), "--metric", "dice,dice_positive,all_empty_baseline", "--resamples", "100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for metric in ("dice", "dice_positive", "all_empty_baseline"):
        (test,) = out["tests"][metric]
        assert test["test"] == "paired bootstrap" and test["result"]["p_value"] == 1.0, metric
        assert test["result"]["low"] == test["result"]["high"] == 0.0
        assert out["values"]["seg"][metric] == record["metrics"][metric]

    # Without sidecars (records written before them), Dice is still tested from per_image; the rest is not.
    for path in (record_path(results, record), record_path(results, twin)):
        old = json.loads(path.read_text())
        del old["evidence"]
        path.write_text(json.dumps(old))
    report = api.significance("siim_seg", 0.1, ["seg", "twin"], results=results,
                              metrics=["dice", "dice_positive"], n_resamples=100)
    assert report.tests["dice"][0].result["p_value"] == 1.0
    assert report.evidence["seg"] == "per_image scores (dice only)"
    assert report.tests["dice_positive"][0].result is None
    assert "holds no statistic of it" in report.tests["dice_positive"][0].reason


# --- table marks --------------------------------------------------------------------------------------------


def _per_image(values) -> dict:
    return {f"img{i}": float(v) for i, v in enumerate(values)}


def test_table_marks_a_significant_lead_only(make):
    rng = np.random.default_rng(0)
    base = rng.random(60) * 0.5
    good, close = np.clip(base + 0.3, 0, 1), np.clip(base + rng.normal(0, 0.01, 60), 0, 1)
    records = [make(name, float(np.mean(v)), per_image=_per_image(v))
               for name, v in (("good", good), ("base", base), ("close", close))]
    text = render_table(records)
    assert "**" + f"{100 * good.mean():.1f}" + "**\\*" in text
    assert "the best cell's lead over the second best is significant (paired bootstrap" in text
    assert "Holm-corrected over the 1 column(s) tested" in text

    # The best's lead over the second (`close` vs `base`, tied in distribution) is not significant: no mark.
    no_lead = render_table(records[1:])
    assert "\\*" not in no_lead and "No best cell's lead over the second best is significant" in no_lead
    html = render_table(records, "html")
    assert f"<b>{100 * good.mean():.1f}</b>*" in html


def test_leaderboard_shows_the_significance_marks(make, tmp_path):
    rng = np.random.default_rng(1)
    base = rng.random(40) * 0.5
    records = [make("good", float(np.mean(base + 0.3)), per_image=_per_image(base + 0.3)),
               make("base", float(np.mean(base)), per_image=_per_image(base))]
    for record in records:
        write_record(record, tmp_path)
    page = (api.leaderboard(tmp_path, tmp_path / "site")).read_text()
    assert "lead over the second best is significant" in page and "</b>*" in page
