"""vlpbench sweep --plan: the runs, their counts from the split files, the estimate's arithmetic with a fixed timer,
shared features counted once, and a real calibration of a tiny model on a tiny synthetic set."""

import math
import time

import pytest
import torch

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.splits import load_split
from vlpbench.errors import ConfigError
from vlpbench.protocols.linear import FEATURE_BATCH
from vlpbench.registry import ADAPTERS
from vlpbench.sweep import build_spec, expand
from vlpbench.sweep import estimate as estimate_module
from vlpbench.sweep.calibrate import Adapters, Calibrator
from vlpbench.sweep.estimate import plan_sweep
from vlpbench.sweep.spec import ModelSpec
from vlpbench.sweep.workload import Step, StepTiming, Unknown
from vlpbench.tasks import TASKS_DIR, load_task
from vlpbench.testing.weightless import BrightnessClip

# What each calibrated step "takes" per batch: encoder features and the linear head's training step.
FEATURES_S, HEAD_S = 2.0, 0.5


def fixed_timer(step):
    return StepTiming({"features": FEATURES_S, "head": HEAD_S}[step.kind])


def _linear_sweep(tmp_path, **extra):
    """rsna_cls at 1 % and 100 %, seeds 0 and 1, for two models, with no RSNA folder: counts from the split files."""
    return build_spec({"models": ["random", {"adapter": "random", "name": "random-b", "options": {"seed": 1}}],
                       "tasks": ["rsna_cls"], "fracs": [0.01, 1.0], "seeds": [0, 1],
                       "data_roots": {"rsna": str(tmp_path / "no-rsna-here")}, "results": str(tmp_path / "results"),
                       "device": "cpu", **extra})


def test_plan_totals_are_the_protocols_counts_times_the_step_times_with_features_counted_once(tmp_path):
    plan = plan_sweep(_linear_sweep(tmp_path), measure=fixed_timer)
    split = load_split("rsna")
    n = {part: len(split.ids(part)) for part in ("train_1pct", "train", "val", "test")}
    batch, epochs = 8, 50  # rsna_cls: batch_size, max_epochs
    features = {part: math.ceil(count / FEATURE_BATCH) * FEATURES_S for part, count in n.items()}
    head = {part: epochs * (n[part] // batch) * HEAD_S for part in ("train_1pct", "train")}

    by_run = {(e.run.model.label, e.run.frac, e.run.seed): e for e in plan.runs}
    assert len(by_run) == 8
    for model in ("random", "random-b"):  # features are per checkpoint: each model pays for its own
        first = by_run[model, 0.01, 0]
        assert first.seconds == pytest.approx(features["val"] + features["test"] + features["train_1pct"]
                                              + head["train_1pct"])
        assert first.reused == []
        # Seeds share the train part's features, fractions the val and test parts': later runs pay the head.
        assert by_run[model, 0.01, 1].seconds == pytest.approx(head["train_1pct"])
        assert by_run[model, 0.01, 1].reused == ["val features", "test features", "train features"]
        assert by_run[model, 1.0, 0].seconds == pytest.approx(features["train"] + head["train"])
        assert by_run[model, 1.0, 0].reused == ["val features", "test features"]
        assert by_run[model, 1.0, 1].seconds == pytest.approx(head["train"])
        assert first.images == {"train": n["train_1pct"], "val": n["val"], "test": n["test"]}
        assert by_run[model, 1.0, 1].images["train"] == n["train"] and first.epochs == epochs

    per_model = sum(features.values()) + 2 * sum(head.values())
    assert plan.seconds == pytest.approx(2 * per_model)
    assert plan.by_task() == {"rsna_cls": (8, pytest.approx(2 * per_model))}
    assert [(step.kind, step.batch_size) for step, _ in plan.measured] == [("features", FEATURE_BATCH), ("head", 8)] * 2

    text = plan.format()
    assert f"total: {2 * per_model / 3600:.1f} device-hours" in text
    assert "random rsna_cls 1% seed 1" in text and "≤50" in text
    assert "upper bounds: training is counted at max_epochs" in text and "early stopping" in text
    assert "image decoding of rsna is excluded: no data folder" in text
    assert "later runs of the sweep pay only for the head (6 run(s) reuse features)" in text


def test_plan_lists_skipped_runs_and_runs_it_cannot_count(tmp_path):
    # COVIDx's split is derived from the user's files and has no declared release sizes (they depend on the
    # COVIDx release the user holds).
    spec = _linear_sweep(tmp_path, tasks=["rsna_cls", "covidx_cls"], fracs=[1.0], seeds=[0],
                         models=["random"], data_roots={})
    done = next(run for run in expand(spec).runs if run.task == "rsna_cls")
    done.record.parent.mkdir(parents=True)
    done.record.write_text("{}")
    plan = plan_sweep(spec, measure=fixed_timer)
    assert [e.run.task for e in plan.runs] == ["covidx_cls"]  # the recorded run is skipped, as a sweep skips it
    assert plan.runs[0].seconds is None and "covidx train images come from the data folder" in plan.runs[0].unknown
    text = plan.format()
    assert "skipped: 1 run(s) whose records exist" in text
    assert "not estimated (left out of the totals):\n  random covidx_cls (1 run(s)): the covidx train images" in text
    assert plan_sweep(spec, measure=fixed_timer, force=True).runs[0].run == done  # --force plans it again


def test_a_run_without_one_training_batch_is_not_estimated_since_it_stops_before_training(tmp_path):
    spec = _linear_sweep(tmp_path, models=["random"], fracs=[0.01], seeds=[0], set={"batch_size": 161})
    [estimate] = plan_sweep(spec, measure=fixed_timer).runs
    assert estimate.seconds is None
    assert estimate.unknown == "only 160 training images for batch size 161: the run stops before training"


def test_sweep_plan_command_launches_nothing_and_with_dry_run_lists_the_commands(tmp_path, monkeypatch, capsys):
    class FixedCalibrator:  # the device timer, each step taking a fixed time
        seconds = 0.0

        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, step):
            return fixed_timer(step)

    monkeypatch.setattr(estimate_module, "Calibrator", FixedCalibrator)
    argv = ["sweep", "--models", "random", "--tasks", "rsna_cls", "--fracs", "1", "--seeds", "0",
            "--data-root", f"rsna={tmp_path / 'absent'}", "--results", str(tmp_path / "results"), "--device", "cpu"]
    assert main([*argv, "--plan", "--calibrate-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "plan: 1 run(s) to launch, 0 skipped" in out and "est. time" in out and "total:" in out
    assert "vlpbench run --model" not in out and not (tmp_path / "results").exists()
    assert main([*argv, "--plan", "--dry-run"]) == 0
    assert "1 run(s) to launch:\n  vlpbench run --model random --task rsna_cls" in capsys.readouterr().out
    assert main([*argv, "--calibrate-batches", "2"]) == 2
    assert "add --plan" in capsys.readouterr().err
    assert main([*argv, "--plan", "--calibrate-batches", "0"]) == 2
    assert "--calibrate-batches 0: expected a positive integer" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="calibrate-batches"):
        api.sweep_plan(models=["random"], tasks=["rsna_cls"], fracs=[1.0], seeds=[0], calibrate_batches=-1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic SIIM folder at 32 px and a tiny timm network's state dict."""
    import timm

    root = tmp_path_factory.mktemp("plan")
    api.synth("siim", root / "siim", n=20, size=32, progress=False)
    torch.manual_seed(0)
    torch.save(timm.create_model("lcnet_035").state_dict(), root / "lcnet.pth")
    return root


def test_a_real_calibration_of_a_tiny_model_on_cpu_is_quick_and_adds_up(tiny, tmp_path):
    spec = build_spec({
        "models": [{"adapter": "generic", "name": "lcnet", "checkpoint": str(tiny / "lcnet.pth"),
                    "options": {"arch": "tu-lcnet_035"}}],
        "tasks": ["siim_seg"], "fracs": [1.0], "seeds": [0, 1],
        "set": {"image_size": 32, "batch_size": 2, "max_epochs": 1},
        "data_roots": {"siim": str(tiny / "siim")}, "results": str(tmp_path), "device": "cpu", "threads": 1})
    started = time.perf_counter()
    plan = plan_sweep(spec, calibrate_batches=1)
    assert time.perf_counter() - started < 3
    assert plan.device.startswith("cpu (") and plan.device.endswith(", 1 thread)")
    timings = {step.kind: timing.seconds for step, timing in plan.measured}
    assert sorted(timings) == ["eval", "train"] and all(t > 0 for t in timings.values())
    decoding = plan.decoding["siim"]
    assert decoding.sample == 3 and decoding.seconds > 0 and not decoding.excluded
    first, second = plan.runs
    n = first.images
    assert n == second.images and n["train"] > 0 and first.epochs == 1
    batches = (n["train"] // 2 * timings["train"]
               + (math.ceil(n["val"] / 2) + math.ceil(n["test"] / 2)) * timings["eval"])
    # The first run decodes its images into the cache; the second, whose seed balances the training set with
    # other negatives, decodes only those: its val and test images are in the cache already.
    assert first.decode_seconds + second.decode_seconds == pytest.approx(
        decoding.images * decoding.seconds / plan.decode_processes)
    assert first.decode_seconds == pytest.approx(sum(n.values()) * decoding.seconds / plan.decode_processes)
    assert 0 < second.decode_seconds < first.decode_seconds
    assert first.seconds == pytest.approx(batches + first.decode_seconds)
    assert second.seconds == pytest.approx(batches + second.decode_seconds)
    assert "measured on cpu" in plan.format() and "1 timed batch(es) after 1 warm-up batch" in plan.format()


class DenseClip(BrightnessClip):
    """An aligned image-text model with dense embeddings, for the inference protocols' steps."""

    name = "plan-test-clip"
    description = "test model: brightness embeddings, dense ones at stride 4"
    capabilities = frozenset({"embed_image", "embed_text", "dense_embed"})

    def dense_embed(self, images):
        return torch.nn.functional.normalize(images[:, :, ::4, ::4], dim=1)


@pytest.mark.parametrize("task, kinds", [
    ("rsna_det", ("features", "train", "eval")), ("cxr14_ft", ("train", "eval")), ("rsna_zs", ("score",)),
    ("ms_cxr_ground", ("maps",)), ("chexpert5x200_ret", ("embed_image", "embed_text"))])
def test_every_protocols_steps_run_under_the_calibrator(tiny, monkeypatch, task, kinds):
    monkeypatch.setitem(ADAPTERS._targets, DenseClip.name, DenseClip)
    spec = load_task(task)
    trains = spec.protocol in ("detection", "finetune")
    model = (ModelSpec("generic", str(tiny / "lcnet.pth"), {"arch": "tu-lcnet_035"}, "lcnet") if trains
             else ModelSpec(DenseClip.name))
    config = spec.resolve({"image_size": 32, **({"neck_width": 8} if task == "rsna_det" else {})} if trains else {})
    calibrator = Calibrator(torch.device("cpu"), batches=1, threads=1, adapters=Adapters())
    timings = {kind: calibrator(Step(model, spec.protocol, kind, 2, 32 if kind != "embed_text" else 0, "fp32",
                                     config=config)) for kind in kinds}
    assert all(timing.seconds > 0 for timing in timings.values())
    if spec.protocol == "detection":  # the frozen part's three maps, what keeping a part's features costs
        assert len(timings["features"].shapes) == 3 and all(len(shape) == 3 for shape in timings["features"].shapes)
    if not trains:  # an image-only encoder cannot score prompts: the run would fail, and the plan says so
        with pytest.raises(Unknown, match="cannot provide"):
            calibrator(Step(ModelSpec("generic", str(tiny / "lcnet.pth"), {"arch": "tu-lcnet_035"}, "lcnet"),
                            spec.protocol, kinds[0], 2, 32, "fp32", config=config))


def detection_timer(step):
    """A fixed time per detection step; the frozen part's output of one image for ``feature_storage``."""
    return StepTiming({"features": FEATURES_S, "train": 1.0, "eval": HEAD_S}[step.kind],
                      shapes=((8, 28, 28), (16, 14, 14), (32, 7, 7)))


@pytest.fixture(scope="module")
def release_shaped_object_cxr(tmp_path_factory):
    """An Object-CXR folder with the release's label files' row counts (train.csv 00001-08000, dev.csv
    08001-09000, every other image with a box) and empty zip members for images: what the derived splits are
    drawn from, and what a run counts, without decodable pixels."""
    import zipfile

    root = tmp_path_factory.mktemp("object-cxr")
    for name, first, count in (("train", 1, 8000), ("dev", 8001, 1000)):
        ids = [f"{i:05d}.jpg" for i in range(first, first + count)]
        rows = [f"{image_id},{'0 10 10 40 40' if i % 2 else ''}" for i, image_id in enumerate(ids)]
        (root / f"{name}.csv").write_text("\n".join(["image_name,annotation", *rows]) + "\n")
        with zipfile.ZipFile(root / f"{name}.zip", "w") as archive:
            for image_id in ids:
                archive.writestr(f"{name}/{image_id}", b"")
    return root


@pytest.mark.parametrize("profile, sizes", [("canonical", (64, 640, 6400, 1600)), ("paper", (72, 720, 7200, 800))])
def test_object_cxr_without_its_folder_is_counted_by_the_release_sizes_as_the_split_rule_draws_them(
        release_shaped_object_cxr, tmp_path, profile, sizes):
    def plan(data_root, tasks=("object_cxr_det",)):
        return plan_sweep(build_spec({
            "models": ["random"], "tasks": list(tasks), "fracs": [0.01, 0.1, 1.0], "seeds": [0], "profile": profile,
            "data_roots": {"object_cxr": str(data_root), "covidx": str(tmp_path / "absent")},
            "results": str(tmp_path / "results"), "device": "cpu"}), measure=detection_timer)

    counted = plan(release_shaped_object_cxr)
    declared = plan(tmp_path / "absent")
    *train, val = sizes
    assert [e.images for e in declared.runs] == [{"train": n, "val": val, "test": 1000} for n in train]
    # The split derived from label files of the release's counts gives the same images and so the same time.
    assert [(e.images, e.epochs) for e in counted.runs] == [(e.images, e.epochs) for e in declared.runs]
    assert [e.seconds for e in counted.runs] == pytest.approx([e.seconds for e in declared.runs])
    assert all(e.seconds > 0 and e.decode_seconds == 0 for e in declared.runs)
    split = "object_cxr split " + ("v1" if profile == "canonical" else "mgca")
    assert [e.release_sizes for e in declared.runs] == [split] * 3
    assert [e.release_sizes for e in counted.runs] == [""] * 3
    text = declared.format()
    [row] = [line.split("100% seed 0")[1].split() for line in text.splitlines() if "object_cxr_det" in line
             and "100% seed 0" in line]
    assert row[:4] == [str(train[-1]), str(val), "1000", "≤50"]
    assert " ".join(row[-8:]) == "(sizes of the official release; no data folder)"
    assert text.count("(sizes of the official release; no data folder)") == 3
    assert f'runs marked "sizes of the official release; no data folder" count the images of {split}' in text
    assert "sizes of the official release" not in counted.format()

    # A derived split without declared sizes (COVIDx: its files differ by release) still cannot be counted.
    [covidx] = [e for e in plan(tmp_path / "absent", ("covidx_cls",)).runs if e.run.frac == 1.0]
    assert covidx.seconds is None and "covidx train images come from the data folder" in covidx.unknown


@pytest.mark.parametrize("balance", [True, False])
def test_the_release_sizes_carry_no_labels_so_a_selection_by_label_stays_unknown(tmp_path, balance):
    # siim_seg's protocol on Object-CXR: balance_negatives picks by which images have an object.
    text = (TASKS_DIR / "siim_seg.yaml").read_text().split("\nprofiles:")[0]
    task = tmp_path / "object_cxr_seg.yaml"
    task.write_text(text.replace("siim_seg", "object_cxr_seg").replace("dataset: siim", "dataset: object_cxr"))
    [estimate] = plan_sweep(build_spec({
        "models": ["random"], "tasks": [{"task_file": str(task)}], "fracs": [1.0], "seeds": [0],
        "set": {"balance_negatives": balance}, "data_roots": {"object_cxr": str(tmp_path / "absent")},
        "results": str(tmp_path / "results"), "device": "cpu"}), measure=lambda step: StepTiming(1.0)).runs
    if balance:
        assert estimate.seconds is None and estimate.unknown.startswith("balance_negatives needs the object_cxr labels")
    else:
        assert estimate.images == {"train": 6400, "val": 1600, "test": 1000}
        assert estimate.seconds == 50 * (6400 // 8 + 1600 // 8) + 1000 // 8  # batch 8: train, val each epoch; test


def test_inference_passes_are_planned_at_the_eval_batch_set_or_at_what_auto_gives_on_a_cpu(tmp_path):
    def plan(**extra):
        spec = build_spec({"models": ["random"], "tasks": ["siim_seg"], "fracs": [1.0], "seeds": [0],
                           "data_roots": {"siim": str(tmp_path / "no-siim-here")},
                           "results": str(tmp_path / "results"), "device": "cpu", **extra})
        return plan_sweep(spec, measure=lambda step: StepTiming(1.0))

    automatic, set_64 = plan(), plan(set={"eval_batch_size": 64})
    assert [(s.kind, s.batch_size) for s, _ in automatic.measured] == [("train", 8), ("eval", 8)]
    assert [(s.kind, s.batch_size) for s, _ in set_64.measured] == [("train", 8), ("eval", 64)]
    split, epochs = load_split("siim"), 50  # siim_seg: max_epochs; validation every epoch, test once
    val, test = len(split.ids("val")), len(split.ids("test"))
    fewer = epochs * (math.ceil(val / 8) - math.ceil(val / 64)) + math.ceil(test / 8) - math.ceil(test / 64)
    assert automatic.seconds - set_64.seconds == pytest.approx(fewer)


def test_a_gpu_plan_states_each_runs_peak_memory_and_how_many_runs_one_device_holds(tmp_path):
    gib = 2**30
    peaks = {"train": 3 * gib, "eval": gib, "features": 2 * gib}
    shapes = ((16, 2, 2),)  # 64 values per image: detection keeps its train and val features on the device

    def measure(step):
        return StepTiming(1.0, shapes if step.kind == "features" else (), peaks[step.kind])

    spec = build_spec({"models": ["random"], "tasks": ["siim_seg", "rsna_det"], "fracs": [1.0], "seeds": [0],
                       "data_roots": {"siim": str(tmp_path / "none"), "rsna": str(tmp_path / "none")},
                       "results": str(tmp_path / "results"), "device": "cpu"})
    plan = plan_sweep(spec, measure=measure)
    assert plan.device_bytes is None and plan.memory_lines() == []  # a CPU has no device memory to share
    split = load_split("rsna")
    kept = 4 * 64 * (len(split.ids("train")) + len(split.ids("val")))
    by_task = {estimate.run.task: estimate.peak_bytes for estimate in plan.runs}
    assert by_task == {"siim_seg": 3 * gib, "rsna_det": 3 * gib + kept}
    plan.device_bytes = 80 * gib
    text = "\n".join(plan.memory_lines())
    largest = (3 * gib + kept) / gib
    assert f"random rsna_det  {largest:.2f} GiB" in text and "random siim_seg  3.00 GiB" in text
    fit = int(estimate_module.SHARED_DEVICE_SHARE * 80 // (largest + 0.5))
    assert fit == 20 and f"one 80 GiB device holds about {fit} run(s) of the largest at once" in text
    assert "`sweep --workers N`" in text and "not measured here" in text
    assert text in plan.format()
    assert any("timed at the batch auto gives on a CPU" in line for line in plan.assumptions())
