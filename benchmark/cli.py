"""The ``vlpbench`` command: a thin layer that parses arguments and calls ``vlpbench.api``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from typing import Callable

from vlpbench import __version__
from vlpbench.errors import VlpbenchError
from vlpbench.registry import RegistryError

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
    p.add_argument("--task", required=True, help="task name (see `vlpbench tasks`)")
    p.add_argument("--frac", required=True, type=float, help="training fraction: 0.01, 0.1 or 1.0")
    p.add_argument("--checkpoint", help="checkpoint file of the model, as its authors publish it")
    p.add_argument("--model-option", dest="model_options", action="append", metavar="KEY=VALUE",
                   help="adapter option, e.g. --model-option seed=1 for `random` (recorded; repeatable)")
    p.add_argument("--name", help="row label in tables (default: MODEL:CHECKPOINT-STEM)")
    p.add_argument("--seed", type=int, default=0, help="seed of the head's initialisation and training (default 0)")
    _data_root(p)
    _results(p)
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override a task option, e.g. --set lr=5e-4 (recorded in the result; repeatable)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing record of the same run (the old one is kept as .bak)")

    p = command("score", "Score predictions from any framework with the task's canonical metric and split.",
                "vlpbench score --task siim_seg --predictions preds/ --data-root ~/data/siim --json", _score)
    p.add_argument("--task", required=True)
    p.add_argument("--predictions", required=True,
                   help="folder of <image_id>.png masks (non-zero = positive) or .npy probabilities")
    _data_root(p)
    p.add_argument("--split", default="test", help="split part to score against (default test)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a sentence")

    p = command("table", "Print the leaderboard of the result records as a paper table (Markdown, LaTeX, CSV, HTML).",
                "vlpbench table --results results/ --group seg --format latex --reference", _table)
    _results(p)
    p.add_argument("--format", dest="fmt", choices=("md", "latex", "csv", "html"), default="md",
                   help="md (default), latex (booktabs), csv (one line per model × task × fraction) or html")
    p.add_argument("--models", type=_names, help="comma-separated model names (row order follows it)")
    p.add_argument("--tasks", type=_names, help="comma-separated task names (column order follows it)")
    p.add_argument("--fracs", type=_fractions, help="comma-separated fractions: 0.01,0.1 or 1%%,10%%")
    p.add_argument("--group", choices=("seg", "det", "cls", "zs", "ground"),
                   help="the paper's task groups, by protocol: segmentation, detection, linear/fine-tuned "
                        "classification, zero-shot classification, grounding")
    p.add_argument("--metrics", type=_names,
                   help="metrics per task as sub-columns, e.g. auc,f1,acc (default: the primary metric)")
    p.add_argument("--reference", nargs="?", const=True, default=False, metavar="DIR",
                   help="add published rows (marked as reported, never bold) from DIR "
                        "(default: RESULTS/reference, else the checkout's results/reference)")

    p = command("compare", "Compare a candidate's results with a baseline's: exit 0 no regression, 1 regression, "
                "2 not comparable.",
                "vlpbench compare --baseline results/baselines --candidate results --junit report.xml", _compare)
    p.add_argument("--baseline", required=True, help="results folder or single record file")
    p.add_argument("--candidate", required=True, help="results folder or single record file")
    p.add_argument("--tasks", type=_names, help="compare only these tasks (comma-separated)")
    p.add_argument("--fracs", type=_fractions, help="compare only these fractions (comma-separated)")
    p.add_argument("--abs-tol", type=float, help="absolute tolerance in metric units for every cell "
                   "(default: the task's compare.abs_tol, else 0.01)")
    p.add_argument("--k", type=float, help="multiple of the pooled seed std allowed (default: the task's "
                   "compare.k, else 2)")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML: one testcase per (task, fraction)")

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
    p.add_argument("--dataset", required=True, help="dataset to imitate: siim, rsna, chexpert, cxr14, object_cxr, covidx, mimic_cxr, ms_cxr")
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
                "vlpbench inspect --model g2d --checkpoint g2d_encoder_decoder.pth", _inspect)
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint")

    p = command("data", "Dataset tools: `data check` validates a dataset folder.",
                "vlpbench data check --dataset siim --root ~/data/siim", None)
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_sub.add_parser(
        "check", help="validate layout, label files and images; exit 1 on errors",
        description="Validate a dataset folder: layout, label files, split coverage and that every image "
                    "decodes. Names each missing or unreadable file; exits 1 on any error.",
        epilog="example:\n  vlpbench data check --dataset siim --root ~/data/siim",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("--dataset", required=True, help="dataset name (siim, rsna, ...)")
    check.add_argument("--root", help="dataset folder (default: as for --data-root of `run`)")
    check.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    check.set_defaults(func=_data_check)

    p = command("splits", "Split tools: `splits verify` checks split files and their agreement with your data.",
                "vlpbench splits verify --dataset siim --root ~/data/siim", None)
    splits_sub = p.add_subparsers(dest="splits_command", required=True, metavar="ACTION")
    verify = splits_sub.add_parser(
        "verify", help="check split files against the manifest and the data; exit 1 on errors",
        description="Check split files against their MANIFEST.json and, with --root, against the data "
                    "folder: every id present, no id in two of train/val/test, subsets nested.",
        epilog="example:\n  vlpbench splits verify --dataset siim --root ~/data/siim",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("--dataset", required=True)
    verify.add_argument("--root", help="dataset folder to check the split against")
    verify.set_defaults(func=_splits_verify)

    command("models", "List the model adapters.", "vlpbench models", _models)
    p = command("tasks", "List the tasks; --verbose adds each task's classes, prompts and settings.",
                "vlpbench tasks --verbose", _tasks)
    p.add_argument("--verbose", dest="details", action="store_true",
                   help="show every task's configuration (classes, prompts, hyper-parameters) and sources")
    return parser


def _data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="dataset folder as its download unpacks "
                   "(default: $VLPBENCH_<DATASET>_ROOT, $VLPBENCH_DATA/<dataset>, or vlpbench.yaml)")


def _results(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", help="results folder (default ./results)")


def _run(args: argparse.Namespace) -> int:
    from vlpbench import api
    from vlpbench.config import parse_overrides

    record, path = api.run(args.model, args.task, args.frac, seed=args.seed, checkpoint=args.checkpoint,
                           name=args.name, model_options=parse_overrides(args.model_options), data_root=args.data_root, results=args.results,
                           overrides=parse_overrides(args.overrides), device=args.device,
                           overwrite=args.overwrite, progress=not args.quiet)
    metric = record["primary_metric"]
    ci = record.get("ci", {}).get(metric, {})
    print(f"{record['task']['name']} {metric} = {record['metrics'][metric]:.4f} "
          f"(95% CI {ci.get('low', float('nan')):.4f}–{ci.get('high', float('nan')):.4f}, "
          f"n_test={record['n']['test']})\nrecord: {path}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from vlpbench import api

    result = api.score(args.task, args.predictions, data_root=args.data_root, split=args.split)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        # One line per metric (the first after the task), each with its CI where it has one.
        lines = [f"{name} = {value:.4f}" + (f" (95% CI {ci['low']:.4f}–{ci['high']:.4f})"
                                            if (ci := result["ci"].get(name)) else "")
                 for name, value in result["metrics"].items() if value is not None]
        print(f"{result['task']} ({result['split']}, n={result['n']}): " + "\n  ".join(lines))
        for note in result.get("notes", []):
            print(f"note: {note}")
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
                    group=args.group, metrics=args.metrics, reference=args.reference), end="")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from vlpbench import api

    summary, code = api.compare(args.baseline, args.candidate, tasks=args.tasks, fracs=args.fracs,
                                abs_tol=args.abs_tol, k=args.k, junit=args.junit)
    print(summary, end="")
    return code


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


def _inspect(args: argparse.Namespace) -> int:
    from vlpbench import api

    report = api.inspect(args.model, args.checkpoint)
    if args.checkpoint:
        from vlpbench.adapters.base import sha256_file

        print(f"checkpoint: {args.checkpoint}\nsha256: {sha256_file(args.checkpoint)}")
    print(report.format())
    return 0 if report.ok else 1


def _data_check(args: argparse.Namespace) -> int:
    from vlpbench import api

    report = api.data_check(args.dataset, args.root, decode=not args.no_decode, progress=not args.quiet)
    print(report.format())
    return 0 if report.ok else 1


def _splits_verify(args: argparse.Namespace) -> int:
    from vlpbench import api

    report = api.splits_verify(args.dataset, args.root)
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
        if row["package"] is not None:
            lines.append(f"{indent}plug-in from: {row['package']}")
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from vlpbench import api

    if not args.details:
        _print_rows(api.task_table())
        return 0
    import yaml

    from vlpbench.tasks import load_task, task_names

    blocks = []
    for name in task_names():
        spec = load_task(name)
        head = (f"{spec.name} (v{spec.version}): {spec.description}\n"
                f"  dataset {spec.dataset}/{spec.split}; protocol {spec.protocol}; "
                f"{spec.primary_metric} ({'higher' if spec.higher_is_better else 'lower'} is better); "
                f"fractions {', '.join(f'{f:g}' for f in spec.fractions)}")
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
    except (VlpbenchError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vlpbench table | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
