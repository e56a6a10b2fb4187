"""The ``vlpbench`` command: a thin layer that parses arguments and calls ``vlpbench.api``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

from vlpbench import __version__
from vlpbench.data.attributes import ATTRIBUTES
from vlpbench.errors import ConfigError, VlpbenchError
from vlpbench.protocols.base import TABLE_GROUPS
from vlpbench.report.comparisons import COMPARISONS

log = logging.getLogger("vlpbench")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlpbench",
        description="Benchmark chest X-ray vision-language pre-training models on standard downstream protocols.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              vlpbench demo                      # synthetic data, real pipeline, a real table
              vlpbench run --model g2d --task siim_seg --frac 0.01 --checkpoint g2d_encoder.pth --data-root ~/data/siim
              vlpbench table
              vlpbench reproduce --model mgca --checkpoint resnet_50.ckpt --tasks siim_seg --data-root siim=~/data/siim
            """),
    )
    parser.add_argument("--version", action="version", version=f"vlpbench {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, example: str, func: Callable | None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if func is not None:  # None: the command has sub-actions that set their own
            p.set_defaults(func=func)
        return p

    p = command("run", "Run one model on one task at one training fraction and write a result record.",
                "vlpbench run --model g2d --task siim_seg --frac 0.01 --checkpoint g2d_encoder.pth "
                "--data-root ~/data/siim --seed 0", _run)
    p.add_argument("--model", required=True, help="adapter name (see `vlpbench models`)")
    _task_options(p)
    p.add_argument("--frac", required=True, type=float, help="training fraction: 0.01, 0.1 or 1.0")
    p.add_argument("--checkpoint", help="checkpoint file of the model, as its authors publish it")
    p.add_argument("--model-option", dest="model_options", action="append", metavar="KEY=VALUE",
                   help="adapter option, e.g. --model-option seed=1 for `random` (recorded; repeatable)")
    p.add_argument("--name", help="row label in tables (default: MODEL:CHECKPOINT-STEM)")
    p.add_argument("--seed", type=int, default=0, help="seed of the head's initialisation and training (default 0)")
    _data_root(p)
    _results(p)
    _profile(p, "the protocol profile: canonical (default; vlpbench's sound defaults) or paper (the reference "
                "code behind the published numbers; see `vlpbench tasks --verbose --profile paper`); recorded")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override a task option, e.g. --set lr=5e-4 (recorded in the result; repeatable)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (default), or bf16 autocast for the forward passes: faster on a GPU; accepted on a "
                        "CPU, where it is usually slower (recorded as config.precision)")
    _threads(p, "torch threads (default: $OMP_NUM_THREADS, else the CPUs this process may run on; "
                "recorded as env.torch_threads)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="run without images whose files cannot be decoded, listing them in the record "
                        "(data.skipped_corrupt); by default such files stop the run with an error naming them")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing record of the same run (the old one is kept as .bak)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars, logging unchanged (for log files: `vlpbench sweep` passes it)")
    p.add_argument("--save-predictions", metavar="DIR",
                   help="new or empty folder for the test predictions, in the format `vlpbench score` reads "
                        "(segmentation: <image_id>.png masks; detection: detections.json; classification: "
                        "predictions.csv; grounding: heatmaps.npz; retrieval: similarity.npz)")
    _subgroup_options(p)

    p = command("sweep", "Run models × tasks × fractions × seeds, each run in its own process with its own log; "
                "runs whose records exist are skipped, so a killed sweep resumes where it stopped.",
                "vlpbench sweep --models random,g2d --checkpoint g2d=g2d_encoder.pth --tasks siim_seg,rsna_seg "
                "--fracs 0.01,0.1,1 --seeds 0,1,2 --data-root siim=~/data/siim --data-root rsna=~/data/rsna\n  "
                "vlpbench sweep --config examples/sweeps/segmentation.yaml --launcher slurm --slurm-partition gpu\n  "
                "vlpbench sweep --config examples/sweeps/segmentation.yaml --plan     # runs and device-hours first",
                _sweep)
    p.add_argument("--config", help="sweep YAML file (fields as the options below; options given here replace "
                   "the file's; see examples/sweeps/)")
    p.add_argument("--models", type=_names, help="comma-separated adapter names")
    p.add_argument("--checkpoint", dest="checkpoints", action="append", metavar="MODEL=PATH",
                   help="checkpoint of a model of --models (repeatable)")
    p.add_argument("--model-option", dest="model_options", action="append", metavar="MODEL:KEY=VALUE",
                   help="adapter option of a model of --models, e.g. generic:arch=resnet18 (repeatable)")
    p.add_argument("--tasks", type=_names, help="comma-separated task names; a fraction a task does not allow is "
                   "left out with a note (zero-shot tasks allow only 1)")
    p.add_argument("--fracs", type=_fractions, help="comma-separated training fractions: 0.01,0.1,1 or 1%%,10%%")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--set", dest="overrides", action="append", metavar="[TASK:]KEY=VALUE",
                   help="override a task option in every task, or with TASK: in one (repeatable)")
    _profile(p, "the protocol profile of every run: canonical (default) or paper", default=None)
    p.add_argument("--data-root", dest="data_roots", action="append", metavar="DATASET=DIR",
                   help="dataset folder, e.g. siim=~/data/siim (repeatable; default as for `run`)")
    p.add_argument("--root", dest="data_roots", action="append", help=argparse.SUPPRESS)
    p.add_argument("--results", help="results folder (default ./results); logs go to RESULTS/sweep_logs")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    _threads(p, "torch threads of each run (default: $OMP_NUM_THREADS, else the CPUs each run may use, "
                "divided among the local launcher's --workers on CPU)")
    p.add_argument("--force", action="store_true",
                   help="rerun runs whose records exist (each old record is kept as .bak)")
    p.add_argument("--dry-run", action="store_true", help="list the runs that would be launched, launch nothing")
    p.add_argument("--plan", action="store_true",
                   help="launch nothing; list the runs that would be launched with each one's images, epochs and "
                        "estimated device time, and the device-hours per task and in total, from a short "
                        "calibration of each distinct step on this machine's device (--device); with --dry-run, "
                        "each run's command too")
    p.add_argument("--calibrate-batches", type=int, metavar="N",
                   help="--plan: timed batches per distinct step, after one warm-up batch (default 3)")
    p.add_argument("--launcher", choices=("local", "slurm", "torchrun"),
                   help="local (default): --workers parallel runs on this machine; slurm: one job array through "
                        "submitit; torchrun: one run at a time over --nproc-per-node processes")
    p.add_argument("--workers", type=int, help="local: parallel runs (default: one per visible GPU, each with its "
                   "own CUDA_VISIBLE_DEVICES; 1 on CPU); more than the GPUs puts several runs on each GPU, their "
                   "automatic inference batches sized to their share of its memory (--plan says how many fit)")
    p.add_argument("--slurm-partition", help="slurm: partition")
    p.add_argument("--slurm-timeout-min", type=int, help="slurm: time limit of each run in minutes (default 1440)")
    p.add_argument("--gpus-per-node", type=int, help="slurm: GPUs per run")
    p.add_argument("--array-parallelism", type=int, help="slurm: runs of the job array at a time")
    p.add_argument("--slurm-cluster", choices=("slurm", "local"),
                   help="slurm: submitit cluster (default: detected); local runs the array on this machine")
    p.add_argument("--nproc-per-node", type=int,
                   help="torchrun: processes per run, sharing it (DistributedDataParallel, sharded data, metrics "
                        "gathered, rank 0 writing the record); protocols segmentation, detection, linear, "
                        "finetune, zero_shot and grounding support it, others refuse N > 1")

    p = command("reproduce", "Does the released checkpoint give the paper's number? Checks the file against the "
                "reproduction ledger's entry (sha256) before anything runs, runs every ledger cell of the model that "
                "your data allows (seeds 0..N-1, each cell's profile; runs already recorded are skipped, so it "
                "resumes), and prints paper vs measured with a verdict per cell. A cell whose protocol needs what the "
                "adapter, as configured, lacks (zero-shot without a text encoder) is listed as 'cannot run' with the "
                "adapter's message, not run. Exit 0 when every comparable cell whose data was found and that the "
                "adapter can serve ran (verdicts are findings, not failures), 1 when a run failed, 2 when nothing "
                "could run.",
                "vlpbench reproduce --model mgca --checkpoint resnet_50.ckpt --tasks siim_seg,rsna_seg "
                "--data-root siim=~/data/siim --data-root rsna=~/data/rsna --dry-run", _reproduce)
    p.add_argument("--model", required=True, help="adapter name with ledger cells (see `vlpbench models`)")
    p.add_argument("--checkpoint", required=True, help="the checkpoint file to measure, e.g. the released one")
    p.add_argument("--tasks", type=_names, help="comma-separated tasks (default: every task of the model's cells)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 per task and fraction (default 3; one where the protocol trains nothing: "
                        "zero-shot, grounding, retrieval)")
    p.add_argument("--data-root", dest="data_roots", action="append", metavar="DATASET=DIR",
                   help="dataset folder, e.g. siim=~/data/siim (repeatable; default as for `run`); a task whose "
                        "data is not found is skipped and listed with where it was looked for")
    p.add_argument("--root", dest="data_roots", action="append", help=argparse.SUPPRESS)
    _results(p)
    p.add_argument("--reference", metavar="DIR", help="the ledger folder: reference files and checkpoints.json "
                   "(default: RESULTS/reference, else the reference files shipped with vlpbench)")
    p.add_argument("--entry", metavar="ID", help="the checkpoints.json entry the file is (default: the entries whose "
                   "sha256, else whose file name, matches it; else every entry of the model)")
    p.add_argument("--model-option", dest="model_options", action="append", metavar="KEY=VALUE",
                   help="adapter option as for `run`, e.g. text_encoder=DIR for zero-shot cells (repeatable)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--dry-run", action="store_true",
                   help="check the checkpoint, the data and what the adapter can do, list the runs, run nothing")

    p = command("score", "Score predictions from any framework (or saved by `run --save-predictions`) with the "
                "task's evaluation: the same metrics, CIs and thresholds as `run`. Needs the label files (and, for "
                "report retrieval, the reports) only.",
                "vlpbench score --task siim_seg --predictions preds/ --data-root ~/data/siim --json", _score)
    _task_options(p)
    p.add_argument("--predictions", required=True,
                   help="the folder `run --save-predictions` wrote, or the protocol's file: segmentation: a folder "
                        "of <image_id>.png masks (non-zero = positive) or .npy probabilities in [0, 1], each at its "
                        "image's size or aspect ratio, and no other file; detection: COCO "
                        "results JSON; classification: CSV with image_id and one probability column per class "
                        "(plus the validation rows thresholds come from); grounding: .npz of heat maps; retrieval: "
                        ".npz of similarity (images x texts), image_ids and texts")
    _data_root(p)
    p.add_argument("--split", default="test", help="split part to score against (default test)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the bootstrap CIs, as `run --seed` (default 0)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override a task option as `run --set` does, e.g. --set threshold=0.4 (repeatable)")
    _profile(p, "the protocol profile whose split, metric and settings score the predictions (default canonical)")
    _subgroup_options(p)
    _threads(p, "torch threads (default: $OMP_NUM_THREADS, else the CPUs this process may run on)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a sentence")

    p = command("table", "Print the leaderboard of the result records as a paper table (Markdown, LaTeX, CSV, HTML); "
                "with --ledger, the reproduction ledger's reported / measured table.",
                "vlpbench table --results results/ --group seg --format latex --reference\n  "
                "vlpbench table --ledger --models mgca,medklip --format latex", _table)
    _results(p)
    p.add_argument("--format", dest="fmt", choices=("md", "latex", "csv", "html"), default="md",
                   help="md (default), latex (booktabs), csv (one line per model × task × fraction) or html")
    p.add_argument("--models", type=_names, help="comma-separated model names (row order follows it); with --ledger, "
                   "adapter names, shown with or without records")
    p.add_argument("--tasks", type=_names, help="comma-separated task names (column order follows it)")
    p.add_argument("--fracs", type=_fractions, help="comma-separated fractions: 0.01,0.1 or 1%%,10%%")
    p.add_argument("--ledger", action="store_true",
                   help="instead, the reproduction ledger: a row per released checkpoint whose published cells the "
                        "records measure, each cell 'reported / measured' with its verdict (✓ reproduced, ↓ below, "
                        "↑ above, ≁ not comparable, – not run) and footnotes for sources and reasons (md, latex, "
                        "html; --reference DIR: the ledger folder)")
    p.add_argument("--group", choices=(*TABLE_GROUPS, *COMPARISONS),
                   help="the paper's task groups, by protocol: segmentation, detection, linear/fine-tuned "
                        "classification, zero-shot classification, grounding, image-text retrieval; or a "
                        "comparison of 2025-26 papers: foundation (CXR foundation encoders: linear probe and "
                        "dense transfer) or zero-shot-2025 (MedKLIP / KAD and their successors), its tasks as "
                        "columns and a note naming its models that have no record")
    p.add_argument("--metrics", type=_names,
                   help="metrics per task as sub-columns, e.g. auc,f1,acc (default: the primary metric)")
    _profile(p, "only the records of this protocol profile (default: all, one table per profile)", default=None)
    p.add_argument("--by", choices=ATTRIBUTES,
                   help="instead, the primary metric per subgroup of sex, age, view or site: value [95%% CI] and n per "
                        "subgroup, and the gap between the best and the worst with its CI (Markdown)")
    p.add_argument("--reference", nargs="?", const=True, default=False, metavar="DIR",
                   help="add published rows (marked as reported, never bold) from DIR "
                        "(default: RESULTS/reference, else the reference files shipped with vlpbench); a published "
                        "column shows only beside records of the profile and metric it was computed with")

    p = command("plot", "Plot metric versus training fraction per task (log x, one line per model, CI band) and, "
                "for classification records with calibration bins, a reliability diagram per task and fraction; "
                "or with --panels image / ground truth / prediction panels of a few test images.",
                "vlpbench plot --results results --out plots --format png,svg\n  "
                "vlpbench plot --panels --task siim_seg --predictions preds/ --data-root ~/data/siim --out plots",
                _plot)
    _results(p)
    p.add_argument("--out", required=True, help="folder for the figures")
    p.add_argument("--tasks", type=_names, help="comma-separated task names (default: every task with records)")
    p.add_argument("--format", dest="formats", type=_names, default=["png", "svg"],
                   help="comma-separated: png, svg (default png,svg)")
    p.add_argument("--panels", action="store_true", help="draw qualitative panels from saved predictions instead")
    p.add_argument("--by", choices=ATTRIBUTES,
                   help="instead, the primary metric per subgroup of sex, age, view or site with 95%% CI bars, one "
                        "figure per model × task × fraction")
    p.add_argument("--task", help="with --panels: a segmentation or grounding task")
    p.add_argument("--predictions", help="with --panels: the folder `run --save-predictions` wrote, a folder of "
                   "<image_id>.png masks, or a grounding .npz")
    _data_root(p)
    p.add_argument("--n", type=int, default=4, help="with --panels: number of test images (default 4)")

    p = command("leaderboard", "Write the self-contained leaderboard page: sortable tables per task group, plots, "
                "provenance per cell.", "vlpbench leaderboard --results results --out site", _leaderboard)
    _results(p)
    p.add_argument("--out", required=True, help="folder for index.html")
    p.add_argument("--reference", nargs="?", const=True, default=False, metavar="DIR",
                   help="add published rows from DIR (default: RESULTS/reference, else the reference files "
                        "shipped with vlpbench)")

    p = command("compare", "Compare a candidate's results with a baseline's: exit 0 no regression, 1 regression, "
                "2 not comparable.",
                "vlpbench compare --baseline results/baselines --candidate results --junit report.xml", _compare)
    p.add_argument("--baseline", required=True, help="results folder or single record file")
    p.add_argument("--candidate", required=True, help="results folder or single record file")
    p.add_argument("--tasks", type=_names, help="compare only these tasks (comma-separated)")
    p.add_argument("--fracs", type=_fractions, help="compare only these fractions (comma-separated)")
    _profile(p, "compare only the records of this protocol profile on both sides (default: all; a cell whose "
                "sides ran different profiles is not comparable, exit 2)", default=None)
    p.add_argument("--abs-tol", type=float, help="absolute tolerance in metric units for every cell "
                   "(default: the task's compare.abs_tol, else 0.01)")
    p.add_argument("--k", type=float, help="multiple of the pooled seed std allowed (default: the task's "
                   "compare.k, else 2)")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML: one testcase per (task, fraction)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                   help="fail (exit 2) on any invalid record instead of skipping it with a warning (default: on "
                        "where the environment variable CI is 'true')")
    p.add_argument("--against-ledger", action="store_true",
                   help="also judge every reproduction-ledger cell either side measures on both sides: a cell that "
                        "reproduced its published value on the baseline and no longer does on the candidate is a "
                        "regression (exit 1), listed in the summary and as a JUnit testcase 'ledger: MODEL TASK "
                        "FRACTION METRIC'")
    p.add_argument("--reference", metavar="DIR", help="with --against-ledger: the ledger folder (default: the "
                   "reference files shipped with vlpbench)")

    p = command("significance", "Paired tests between models on one task and fraction: the difference of each "
                "metric over the same test images (paired bootstrap; DeLong for a single ROC curve's AUC), its CI "
                "and Holm-corrected p-values, as a matrix (row − column).",
                "vlpbench significance --task rsna_cls --frac 0.01 --models g2d,mgca,random --results results",
                _significance)
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--frac", required=True, type=float, help="training fraction of the records (0.01, 0.1 or 1)")
    p.add_argument("--models", required=True, type=_names, help="comma-separated model names (record model.name), "
                   "at least two")
    _results(p)
    p.add_argument("--metric", dest="metrics", type=_names,
                   help="comma-separated metrics to test (default: the task's primary metric)")
    p.add_argument("--seed", type=int, help="run seed whose records are paired (needed where a model has records "
                   "of several seeds: seeds are never pooled)")
    _profile(p, "the protocol profile of the records (needed where they span several)", default=None)
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise error rate of the Holm correction, and "
                   "1 − the CI level (default 0.05)")
    p.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples (default 2000; seed 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the matrices")

    p = command("baseline", "Baseline tools: `baseline update` copies result records into the CI baseline folder.",
                "vlpbench baseline update --results results --baseline-dir results/baselines", None)
    baseline_sub = p.add_subparsers(dest="baseline_command", required=True, metavar="ACTION")
    update = baseline_sub.add_parser(
        "update", help="copy result records into the baseline folder; refuses to replace any without --force",
        description="Copy the records under --results into --baseline-dir (one record per model, task, "
                    "fraction, seed and overrides). Identical records are left alone; replacing a different "
                    "one needs --force, and the old record is then kept as a .bak file.",
        epilog="example:\n  vlpbench baseline update --results results --baseline-dir results/baselines",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _results(update)
    update.add_argument("--baseline-dir", default="results/baselines",
                        help="baseline folder (default results/baselines)")
    update.add_argument("--force", action="store_true",
                        help="replace differing baseline records (each old one is kept as .bak)")
    update.set_defaults(func=_baseline_update)

    p = command("synth", "Write a synthetic dataset in the real on-disk format (real ids and masks).",
                "vlpbench synth --dataset siim --out /tmp/siim --n 300 --seed 0", _synth)
    p.add_argument("--dataset", required=True,
                   help="dataset to imitate: siim, rsna, chexpert, cxr14, object_cxr, covidx, mimic_cxr, ms_cxr, vindr, "
                        "chexlocalize, tbx11k, padchest")
    p.add_argument("--out", required=True, help="folder to create (must be new or empty)")
    p.add_argument("--n", type=int, default=200, help="number of images (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, help="image side in pixels (default: the dataset's own, e.g. 1024 for SIIM)")

    p = command("demo", "Synthesize SIIM, run siim_seg at two fractions with a G2D-layout checkpoint, print the table.",
                "vlpbench demo --out vlpbench-demo", _demo)
    p.add_argument("--out", default="vlpbench-demo", help="working folder (default ./vlpbench-demo)")
    p.add_argument("--n", type=int, default=500, help="synthetic images (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = command("inspect", "Show how a checkpoint's keys map onto an adapter; exit 1 on missing weights.",
                "vlpbench inspect --model g2d --checkpoint g2d_encoder_decoder.pth\n  "
                "vlpbench inspect --model g2d --checkpoint g2d_50_checkpoint.pth --model-option text_encoder=DIR",
                _inspect)
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--model-option", dest="model_options", action="append", metavar="KEY=VALUE",
                   help="adapter option as for `run`, e.g. text_encoder=DIR to account for G2D's text side "
                        "(repeatable)")

    p = command("data", "Dataset tools: `data check` validates a dataset folder.",
                "vlpbench data check --dataset siim --data-root ~/data/siim", None)
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_sub.add_parser(
        "check", help="validate layout, label files and images; exit 1 on errors",
        description="Validate a dataset folder: layout, label files, split coverage and that every image "
                    "decodes. Names each missing or unreadable file; exits 1 on any error.",
        epilog="example:\n  vlpbench data check --dataset siim --data-root ~/data/siim",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("--dataset", required=True, help="dataset name (siim, rsna, ...)")
    _data_root(check)
    check.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    check.set_defaults(func=_data_check)

    p = command("splits", "Split tools: `splits verify` checks split files and their agreement with your data.",
                "vlpbench splits verify --dataset siim --data-root ~/data/siim", None)
    splits_sub = p.add_subparsers(dest="splits_command", required=True, metavar="ACTION")
    verify = splits_sub.add_parser(
        "verify", help="check split files against the manifest and the data; exit 1 on errors",
        description="Check split files against their MANIFEST.json and, with --data-root, against the data "
                    "folder: every id present, no id in two of train/val/test, subsets nested.",
        epilog="example:\n  vlpbench splits verify --dataset siim --data-root ~/data/siim",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("--dataset", required=True)
    _data_root(verify, "dataset folder to check the split against (default: the manifest only)")
    verify.set_defaults(func=_splits_verify)

    p = command("pseudo-mask", "Write G2D's pseudo segmentation masks (attention-pool map, percentile threshold, "
                "body mask, bilateral filter) and overlays for your images.",
                "vlpbench pseudo-mask --checkpoint g2d_50_checkpoint.pth --out masks/ images/ "
                "--sentence 'small left pneumothorax' --model-option text_encoder=Bio_ClinicalBERT/", _pseudo_mask)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of PNG/JPEG/DICOM (.dcm) files")
    p.add_argument("--checkpoint", required=True,
                   help="G2D's full pre-training checkpoint *_checkpoint.pth (it holds proj_v and the attention pool)")
    p.add_argument("--out", required=True, help="folder for <stem>_mask.png (0/255, at the 256² input), "
                   "<stem>_attention.npy (head-aggregated 8×8 map), <stem>_overlay.png and pseudo_masks.json")
    p.add_argument("--sentence", help="a report sentence: its sentence-to-pixel similarity map is shown beside "
                   "the attention (needs --model-option text_encoder=DIR) and saved as <stem>_similarity.npy")
    p.add_argument("--model", default="g2d", help="adapter with an attention pool (default g2d)")
    p.add_argument("--model-option", dest="model_options", action="append", metavar="KEY=VALUE",
                   help="adapter option, e.g. text_encoder=DIR (a local Bio_ClinicalBERT folder; repeatable)")
    p.add_argument("--variant", choices=("paper", "released"), default="paper",
                   help="paper (default): body mask, >= threshold, bilateral filter; released: G2D's code, "
                        "no body mask, no filter, NEAREST upsampling, strict > (the top 9 of 64 cells)")
    p.add_argument("--heads", choices=("mean", "max"), help="head aggregation (default mean, the paper's Eq. 2)")
    p.add_argument("--percentile", type=float, help="threshold percentile per image (default 85, the paper's)")
    p.add_argument("--upsample", choices=("nearest", "bilinear", "bicubic"),
                   help="upsampling of the 8×8 map (default nearest; interpretation: the paper smooths the "
                        "'square-block edges' it leaves; released: nearest only)")
    paper = p.add_argument_group("paper variant only (the paper gives no values: these defaults are interpretations)")
    paper.add_argument("--percentile-scope", choices=("image", "body"),
                       help="pixels the percentile is taken over: image (default, background zeroed) or body")
    paper.add_argument("--body-threshold", type=_number_or("otsu", "'otsu' or a grey level 0-255"),
                       metavar="otsu|LEVEL",
                       help="body mask: pixels above Otsu's threshold (default) or a grey level 0-255, holes "
                            "filled, largest component kept")
    paper.add_argument("--bilateral-diameter", type=int, help="bilateral filter window in pixels (default 15)")
    paper.add_argument("--bilateral-sigma-space", type=float, help="spatial sigma in pixels (default 4)")
    paper.add_argument("--bilateral-sigma-range", type=float, help="range sigma in mask units 0-1 (default 1)")
    paper.add_argument("--binarize-at", type=float, help="level at which the filtered mask is binarised (default 0.5)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")

    p = command("finetune-clip", "Fine-tune a CLIP on chest X-ray image–report pairs with random sentence sampling "
                "and positive-pair loss relaxation (an interpretation of Jang et al.).",
                "vlpbench finetune-clip --data ~/data/mimic-cxr-jpg/2.0.0 --checkpoint best_64_5e-05_original_22000_"
                "0.864.pt --out clip-ft/\n  vlpbench run --model clip --checkpoint clip-ft/model.pt --task chexpert_zs "
                "--frac 1.0", _finetune_clip)
    p.description = (
        "Fine-tune a CLIP (any checkpoint the `clip` adapter loads) on image–report pairs. Jang et al. (Sci. Rep. "
        "2024) name random sentence sampling and positive-pair loss relaxation; their code and full method text "
        "are unavailable, so this is vlpbench's documented interpretation, each part an option: every step pairs "
        "each image with one sentence drawn from its report's findings and impression (split after . ? ! before "
        "an upper-case letter or digit, headers and list numbers removed; --no-sentence-sampling: the whole "
        "text), and the symmetric InfoNCE loss caps each positive cosine at --margin, so a positive pair above "
        "it is no longer pulled closer (--margin off: the plain CLIP loss). AdamW, warm-up + cosine, bf16 on "
        "GPU, gradient clipping. Writes OUT/model.pt (open_clip form, loads in the `clip` adapter), "
        "OUT/latest.pt (resume state), OUT/metadata.json, OUT/loss.csv and loss.png.")
    p.add_argument("--data", required=True, help="a MIMIC-CXR-JPG folder with reports (frontal images), or a CSV "
                   "with columns image_path,report (paths relative to the CSV's folder)")
    p.add_argument("--checkpoint", required=True, help="the initial CLIP: OpenAI-layout state dict (CheXzero), "
                   "open_clip checkpoint or Hugging Face CLIPModel folder")
    p.add_argument("--out", required=True, help="output folder (new, or a previous run's with --resume)")
    p.add_argument("--mimic-parts", type=_names, default=["train"],
                   help="official MIMIC-CXR split parts to train on, comma-separated (default train)")
    p.add_argument("--epochs", type=int, help="passes over the pairs (default 10)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 64); the last partial batch is dropped")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 1e-5)")
    p.add_argument("--weight-decay", type=float, help="AdamW decay of matrices (default 0.1)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay (default 500)")
    p.add_argument("--grad-clip", type=float, help="maximum gradient L2 norm, 0 = off (default 1.0)")
    p.add_argument("--margin", type=_number_or("off", "a cosine such as 0.5, or off"), metavar="M|off",
                   help="positive-pair relaxation: positives with cosine above M get no gradient (default 0.5; "
                        "off: the plain CLIP loss)")
    p.add_argument("--no-sentence-sampling", dest="sentence_sampling", action="store_false", default=None,
                   help="pair each image with its whole findings + impression text instead of one sentence")
    p.add_argument("--min-words", type=int, help="words with a letter a sentence needs to be kept (default 1)")
    p.add_argument("--normalization", choices=("openai", "chexzero"),
                   help="image normalisation of the clip adapter (default openai); evaluate with the same")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                   help="auto (default): bf16 autocast on a CUDA device that supports it, else fp32")
    p.add_argument("--save-every", type=int, help="steps between resume states (default 0: every epoch)")
    p.add_argument("--seed", type=int, help="order of the pairs and the sentence draws (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest.pt")
    p.add_argument("--stop-at-step", type=int, metavar="N",
                   help="stop after N steps in all (the schedule still spans every epoch); --resume continues")

    p = command("models", "List the model adapters; --verbose adds each model's card: paper, code, published "
                "files and where to get them, pre-training data and input contract.",
                "vlpbench models --verbose", _models)
    p.add_argument("--verbose", dest="details", action="store_true",
                   help="add each model's card (paper, repository, checkpoint files, pre-training data, input)")
    p = command("tasks", "List the tasks; --verbose adds each task's classes, prompts and settings; --task-file "
                "checks and shows your own task file instead.",
                "vlpbench tasks --verbose\n  vlpbench tasks --verbose --task-file my_siim_seg.yaml", _tasks)
    p.add_argument("--verbose", dest="details", action="store_true",
                   help="show every task's configuration (classes, prompts, hyper-parameters) and sources")
    _profile(p, "with --verbose: the settings as this profile resolves them, each changed one with its source")
    p.add_argument("--task-file", dest="task_files", action="append", metavar="PATH",
                   help="instead of the shipped tasks, the task of this YAML file, validated as a shipped task is "
                        "(repeatable)")
    return parser


TASK_FILE_HELP = ("your own task YAML, instead of --task: validated as a shipped task is (see `vlpbench tasks "
                  "--verbose --task-file PATH`), its name no shipped task's; the record keeps its protocol, path "
                  "and sha256")


def _task_options(p: argparse.ArgumentParser) -> None:
    """``--task NAME`` or ``--task-file PATH``, one of them."""
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--task", help="task name (see `vlpbench tasks`)")
    task.add_argument("--task-file", metavar="PATH", help=TASK_FILE_HELP)


def _task(args: argparse.Namespace):
    """The task ``--task`` names, or the one ``--task-file`` holds (loaded and validated)."""
    from vlpbench.tasks import load_task_file

    return load_task_file(args.task_file) if args.task_file is not None else args.task


DATA_ROOT_HELP = ("dataset folder as its download unpacks "
                  "(default: $VLPBENCH_<DATASET>_ROOT, $VLPBENCH_DATA/<dataset>, or vlpbench.yaml)")


def _subgroup_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--by", action="append", type=_names, metavar="ATTRIBUTE[,ATTRIBUTE]",
                   help="print the primary metric per subgroup of sex, age, view or site (repeatable or "
                        "comma-separated): value, 95%% bootstrap CI within the subgroup, n, and the largest gap "
                        "between subgroups with its CI. Every attribute the dataset carries is computed and kept "
                        "in the record's `subgroups` either way")
    p.add_argument("--age-bins", type=_numbers, metavar="EDGES",
                   help="age bin edges in years, e.g. 18,40,60,80 (bins <18, [18,40), ..., >=80; default: the "
                        "task's subgroups.age_bins, else 40,60,80)")


def _by(args: argparse.Namespace) -> list[str]:
    return [name for names in args.by or () for name in names]


def _numbers(text: str) -> list[float]:
    try:
        return [float(part) for part in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _data_root(p: argparse.ArgumentParser, help: str = DATA_ROOT_HELP) -> None:
    p.add_argument("--data-root", help=help)
    # `data check` and `splits verify` took --root before; every command accepts it, unlisted.
    p.add_argument("--root", dest="data_root", help=argparse.SUPPRESS)


def _profile(p: argparse.ArgumentParser, help: str, default: str | None = "canonical") -> None:
    from vlpbench.tasks import PROFILES

    p.add_argument("--profile", choices=PROFILES, default=default, help=help)


def _threads(p: argparse.ArgumentParser, help: str) -> None:
    # A value below 1 is refused by vlpbench.threads (ConfigError naming --threads), as through the API.
    p.add_argument("--threads", type=int, metavar="N", help=help)


def _results(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", help="results folder (default ./results)")


def _run(args: argparse.Namespace) -> int:
    from vlpbench import api
    from vlpbench.options import parse_options

    record, path = api.run(args.model, _task(args), args.frac, seed=args.seed, checkpoint=args.checkpoint,
                           name=args.name, model_options=parse_options(args.model_options, "--model-option"),
                           data_root=args.data_root, results=args.results,
                           overrides=parse_options(args.overrides, "--set"), device=args.device,
                           overwrite=args.overwrite, progress=not (args.quiet or args.no_progress),
                           save_predictions=args.save_predictions, precision=args.precision,
                           skip_corrupt=args.skip_corrupt, profile=args.profile, by=_by(args),
                           age_bins=args.age_bins, threads=args.threads)
    if path is None:  # a torchrun rank other than 0: rank 0 writes and prints the result
        return 0
    metric = record["primary_metric"]
    ci = (record.get("ci") or {}).get(metric) or {}
    interval = (f"95% CI {ci['low']:.4f}–{ci['high']:.4f}, " if ci.get("low") is not None and ci.get("high") is not None
                else "")
    print(f"{record['task']['name']} {metric} = {record['metrics'][metric]:.4f} ({interval}"
          f"n_test={record['n']['test']})\nrecord: {path}")
    if _by(args):
        from vlpbench.report.subgroups import subgroup_lines

        print(subgroup_lines(record.get("subgroups") or {}, _by(args)))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from vlpbench import api
    from vlpbench.sweep import cli_values

    slurm = {key: value for key, value in (
        ("partition", args.slurm_partition), ("timeout_min", args.slurm_timeout_min),
        ("gpus_per_node", args.gpus_per_node), ("array_parallelism", args.array_parallelism),
        ("cluster", args.slurm_cluster)) if value is not None}
    values = cli_values(models=args.models, checkpoints=args.checkpoints, model_options=args.model_options,
                        tasks=args.tasks, fracs=args.fracs, seeds=args.seeds, overrides=args.overrides,
                        data_roots=args.data_roots, profile=args.profile, results=args.results, device=args.device,
                        threads=args.threads, launcher=args.launcher, workers=args.workers,
                        nproc_per_node=args.nproc_per_node)
    if slurm:
        values["slurm"] = slurm
    if args.plan:
        plan = api.sweep_plan(args.config, force=args.force, calibrate_batches=args.calibrate_batches, **values)
        print(plan.format(commands=args.dry_run))
        return 0
    if args.calibrate_batches is not None:
        raise ConfigError("--calibrate-batches sets the calibration of --plan; add --plan")
    report = api.sweep(args.config, force=args.force, dry_run=args.dry_run, progress=not args.quiet, **values)
    print(report.format())
    return report.exit_code


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _score(args: argparse.Namespace) -> int:
    from vlpbench import api

    from vlpbench.options import parse_options

    result = api.score(_task(args), args.predictions, data_root=args.data_root, split=args.split, seed=args.seed,
                       overrides=parse_options(args.overrides, "--set"), profile=args.profile, by=_by(args),
                       age_bins=args.age_bins, threads=args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        # One line per metric (the first after the task), each with its CI where it has one.
        lines = [f"{name} = {value:.4f}" + (f" (95% CI {ci['low']:.4f}–{ci['high']:.4f})"
                                            if (ci := result["ci"].get(name)) else "")
                 for name, value in result["metrics"].items() if value is not None]
        profile = "" if result["profile"] == "canonical" else f", {result['profile']} profile"
        print(f"{result['task']} ({result['split']}{profile}, n={result['n']['test']}): " + "\n  ".join(lines))
        for note in result["scoring"].get("notes", []):
            print(f"note: {note}")
        if left_out := (result.get("calibration") or {}).get("left_out"):
            print(f"note: calibration (ECE, Brier) left out: {left_out}")
        if _by(args):
            from vlpbench.report.subgroups import subgroup_lines

            print(subgroup_lines(result.get("subgroups") or {}, _by(args)))
    return 0


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _fractions(text: str) -> list[float]:
    from vlpbench.report.table import parse_fraction

    try:
        return [parse_fraction(part) for part in _names(text)]
    except VlpbenchError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _table(args: argparse.Namespace) -> int:
    from vlpbench import api

    print(api.table(args.results, fmt=args.fmt, models=args.models, tasks=args.tasks, fracs=args.fracs,
                    group=args.group, metrics=args.metrics, reference=args.reference, profile=args.profile,
                    by=args.by, ledger=args.ledger), end="")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from vlpbench import api
    from vlpbench.options import parse_options

    roots = {}
    for item in args.data_roots or ():
        dataset, sep, folder = item.partition("=")
        if not sep or not dataset.strip() or not folder.strip():
            raise ConfigError(f"--data-root {item!r}: expected DATASET=DIR, e.g. siim=~/data/siim")
        roots[dataset.strip()] = os.path.expanduser(folder.strip())
    plan = api.reproduction_plan(args.model, args.checkpoint, tasks=args.tasks, seeds=args.seeds, data_roots=roots,
                                 results=args.results, reference=args.reference, entry=args.entry,
                                 model_options=parse_options(args.model_options, "--model-option"),
                                 device=args.device)
    # The checkpoint check and the data found are printed before anything runs.
    print(plan.format(dry_run=args.dry_run), flush=True)
    if args.dry_run:
        return 0 if plan.runs else 2
    report = api.reproduce(plan, progress=not args.quiet)
    print(report.format(), end="")
    return report.exit_code


def _plot(args: argparse.Namespace) -> int:
    from vlpbench import api

    formats = tuple(args.formats)
    if args.panels:
        if not args.task or not args.predictions:
            raise ConfigError("plot --panels needs --task and --predictions")
        paths = api.plot_panels(args.task, args.predictions, args.out, data_root=args.data_root, n=args.n,
                                formats=formats)
    elif args.by:
        paths = api.plot_subgroups(args.results, args.out, args.by, tasks=args.tasks, formats=formats)
    else:
        paths = api.plot(args.results, args.out, tasks=args.tasks, formats=formats)
    print("\n".join(map(str, paths)))
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from vlpbench import api

    print(api.leaderboard(args.results, args.out, reference=args.reference))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from vlpbench import api

    # CI systems (GitHub Actions, GitLab, ...) set CI=true: there a broken record must fail the check.
    strict = args.strict if args.strict is not None else os.environ.get("CI", "").lower() == "true"
    if args.reference is not None and not args.against_ledger:
        raise ConfigError("compare --reference names the ledger folder of --against-ledger; add --against-ledger")
    summary, code = api.compare(args.baseline, args.candidate, tasks=args.tasks, fracs=args.fracs,
                                abs_tol=args.abs_tol, k=args.k, junit=args.junit, profile=args.profile, strict=strict,
                                against_ledger=args.against_ledger, reference=args.reference)
    print(summary, end="")
    return code


def _significance(args: argparse.Namespace) -> int:
    from vlpbench import api

    report = api.significance(args.task, args.frac, args.models, results=args.results, metrics=args.metrics,
                              seed=args.seed, profile=args.profile, alpha=args.alpha, n_resamples=args.resamples)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text(), end="\n" if args.json else "")
    return 0


def _baseline_update(args: argparse.Namespace) -> int:
    from vlpbench import api

    print(api.baseline_update(args.results, args.baseline_dir, force=args.force).format())
    return 0


def _synth(args: argparse.Namespace) -> int:
    from vlpbench import api

    summary = api.synth(args.dataset, args.out, n=args.n, seed=args.seed, size=args.size, progress=not args.quiet)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vlpbench import api

    started = time.perf_counter()
    print(api.demo(args.out, n=args.n, seed=args.seed, device=args.device, progress=not args.quiet))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; records in {args.out}/results/runs")
    return 0


def _number_or(word: str, expected: str) -> Callable[[str], float | str]:
    """An argparse type: ``word`` itself, or a number; otherwise an error saying ``expected``."""
    def parse(text: str) -> float | str:
        if text == word:
            return text
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return parse


def _pseudo_mask(args: argparse.Namespace) -> int:
    from vlpbench import api
    from vlpbench.options import parse_options

    options = {name: getattr(args, name) for name in (
        "heads", "percentile", "upsample", "percentile_scope", "body_threshold", "bilateral_diameter",
        "bilateral_sigma_space", "bilateral_sigma_range", "binarize_at")}
    record = api.pseudo_mask(args.checkpoint, args.images, args.out, sentence=args.sentence, model=args.model,
                             model_options=parse_options(args.model_options, "--model-option"), variant=args.variant,
                             options=options, batch_size=args.batch_size, device=args.device,
                             progress=not args.quiet)
    for entry in record["images"]:
        print(f"{entry['image']}: mask {entry['mask_fraction']:.1%} of the image (threshold {entry['threshold']:.4g})")
    print(f"{len(record['images'])} masks and overlays in {args.out} ({record['options']['variant']} variant)")
    return 0




def _finetune_clip(args: argparse.Namespace) -> int:
    import dataclasses

    from vlpbench import api
    from vlpbench.tools.clip_finetune import FinetuneConfig

    given = {name: getattr(args, name) for name in (
        "epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "margin", "sentence_sampling",
        "min_words", "normalization", "precision", "save_every", "seed") if getattr(args, name) is not None}
    if given.get("margin") == "off":
        given["margin"] = None
    config = dataclasses.replace(FinetuneConfig(), **given)
    metadata = api.finetune_clip(args.data, args.checkpoint, args.out, config=config,
                                 mimic_parts=tuple(args.mimic_parts), device=args.device, resume=args.resume,
                                 stop_at_step=args.stop_at_step, progress=not args.quiet)
    steps, loss = metadata["steps"], metadata["loss"]
    print(f"{steps['done']} of {steps['total']} steps on {metadata['data']['pairs']} pairs; "
          f"loss {loss['first']:.4f} -> {loss['last']:.4f}" if steps["done"] else "no step trained")
    if metadata["files"]["model"]:
        print(f"model: {metadata['files']['model']['path']}\nevaluate: vlpbench run --model clip --checkpoint "
              f"{metadata['files']['model']['path']} --task chexpert_zs --frac 1.0"
              + (f" --model-option normalization={config.normalization}" if config.normalization != "openai" else ""))
    else:
        print(f"stopped early; continue with --resume (state in {args.out})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from vlpbench import api
    from vlpbench.options import parse_options

    report = api.inspect(args.model, args.checkpoint, **parse_options(args.model_options, "--model-option"))
    if args.checkpoint:
        from vlpbench.adapters.base import sha256_file

        # A Hugging Face folder is read file by file; a run's record names each file it read with its sha256.
        digest = sha256_file(args.checkpoint) if Path(args.checkpoint).is_file() else "(a folder: see a run's record)"
        print(f"checkpoint: {args.checkpoint}\nsha256: {digest}")
    print(report.format())
    return 0 if report.ok else 1


def _data_check(args: argparse.Namespace) -> int:
    from vlpbench import api

    report = api.data_check(args.dataset, args.data_root, decode=not args.no_decode, progress=not args.quiet)
    print(report.format())
    return 0 if report.ok else 1


def _splits_verify(args: argparse.Namespace) -> int:
    from vlpbench import api

    report = api.splits_verify(args.dataset, args.data_root)
    print(report.format())
    return 0 if report.ok else 1


def _models(args: argparse.Namespace) -> int:
    from vlpbench import api

    # One block per model: descriptions and checkpoint forms are too long for the columns of one table.
    rows = api.model_table()
    indent = " " * (max(len(r["model"]) for r in rows) + 2)
    blocks = []
    for row in rows:
        head = row["model"].ljust(len(indent))
        if row["error"] is not None:
            lines = [f"{head}cannot be used: {row['error']}"]
        else:
            forms = row["checkpoint_forms"] or ["–"]
            lines = [head + row["description"],
                     f"{indent}capabilities: {', '.join(row['capabilities']) or '–'}",
                     f"{indent}checkpoints:  {forms[0]}"]
            lines += [f"{indent}              {form}" for form in forms[1:]]
            if args.details:
                lines += _card_lines(row, indent)
        if row["package"] is not None:
            lines.append(f"{indent}plug-in from: {row['package']}")
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0


def _card_lines(row: dict, indent: str) -> list[str]:
    """The model card and input contract of one ``api.model_table`` row, as indented lines."""
    shape = row["input"]
    if shape["mean"] is None:
        normalisation = "mean and std from the checkpoint folder's preprocessor_config.json"
    else:
        normalisation = (f"mean ({', '.join(f'{v:.4g}' for v in shape['mean'])}), "
                         f"std ({', '.join(f'{v:.4g}' for v in shape['std'])})")
    lines = [f"{indent}input:        {shape['image_size']}² px, {shape['channels']} channel(s), {normalisation}"]
    card = row["card"]
    if card is None:
        return lines
    lines += [f"{indent}paper:        {card['paper']}", f"{indent}code:         {card['repository']}"]
    for label, items in (("files:", card["checkpoints"]), ("pre-trained:", card["pretraining_data"] or ["–"]),
                         ("notes:", card["notes"])):
        for i, item in enumerate(items):
            lines.append(f"{indent}{(label if i == 0 else '').ljust(14)}{item}")
    return lines


def _tasks(args: argparse.Namespace) -> int:
    from vlpbench import api

    from vlpbench.tasks import load_task, load_task_file, task_names

    specs = ([load_task_file(path) for path in args.task_files] if args.task_files
             else [load_task(name) for name in task_names()])
    if not args.details:
        _print_rows(api.task_table(specs))
        return 0
    import yaml

    blocks = []
    for spec in specs:
        if args.profile != spec.profile:
            declared = spec.profiles.get(args.profile)
            if declared is None or declared.unavailable:
                why = declared.unavailable if declared else "the task file declares none"
                blocks.append(f"{spec.name} (v{spec.version}): no {args.profile!r} profile: {why}")
                continue
            spec = spec.with_profile(args.profile)
        head = (f"{spec.name} (v{spec.version}, {spec.profile} profile): {spec.description}\n"
                + (f"  file {spec.path} (sha256 {spec.file_sha256})\n" if spec.file_sha256 else "") +
                f"  dataset {spec.dataset}/{spec.split}; protocol {spec.protocol}; "
                f"{spec.primary_metric} ({'higher' if spec.higher_is_better else 'lower'} is better); "
                f"fractions {', '.join(f'{f:g}' for f in spec.fractions)}")
        changed = [f"    {s.key}: {s.value!r}  ({s.source})" for s in spec.profile_settings()]
        if changed:
            described = spec.profiles[spec.profile].description
            head += (f"\n  {spec.profile} profile{': ' + described if described else ''}; "
                     f"changed from canonical:\n" + "\n".join(changed))
        body = yaml.safe_dump({"config": spec.config, "sources": spec.sources}, sort_keys=False, width=100,
                              default_flow_style=None)
        blocks.append(head + "\n" + "\n".join("  " + line for line in body.rstrip().splitlines()))
    print("\n\n".join(blocks))
    return 0


def _print_rows(rows: list[dict]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlpbench`` console script."""
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except VlpbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vlpbench table | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
