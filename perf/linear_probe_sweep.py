"""A whole linear-probe sweep, measured: the task's fractions x seeds run end to end in cached mode (one feature
extraction shared by every run) and in MGCA's per-epoch mode (the encoder on every augmented training image of
every epoch), on synthetic data whose positives carry a planted lesion, and the test AUC of each pair of runs
compared by a paired bootstrap of the difference.

Both modes run the same runs through ``vlpbench.api.run`` (random-init torchvision ResNet of the generic adapter,
the task's batch size, ``--epochs`` epochs with early stopping off so that both train as long), each mode from an
empty feature cache and a filled image cache (decoding is not what differs). Prints each run's wall time and AUC,
the sweep's wall-time ratio beside its arithmetic bound in encoder passes, and per run the AUC difference
(MGCA minus cached) with its paired-bootstrap 95 % interval over the same test images
(``vlpbench.metrics.significance.paired_bootstrap`` on the records' evidence). ``--out`` appends the figures as a
section of ``perf/RESULTS.md``.

    python perf/linear_probe_sweep.py [--n 2000] [--size 64] [--epochs 10] [--arch resnet18] [--device cpu]
                                      [--out perf/RESULTS.md] [--label "..."]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from linear_probe import add_arguments, encoder_passes, prepare  # perf/ is this script's folder, first on sys.path
from results_md import Figure, append_section, section

SEEDS = (0, 1, 2)
RESAMPLES = 1000


def run_sweep(args, data: Path, checkpoint: Path, work: Path, overrides: dict) -> tuple[float, dict]:
    """Every fraction x seed of ``args.task`` with ``overrides`` from an empty feature cache: the sweep's wall
    seconds and ``{(fraction, seed): (record, record file)}``."""
    from vlpbench import api
    from vlpbench.protocols.features import cache_root

    shutil.rmtree(cache_root(), ignore_errors=True)
    mode = overrides["linear_mode"]
    runs, started = {}, time.perf_counter()
    for fraction in api.load_task(args.task).fractions:
        for seed in SEEDS:
            runs[fraction, seed] = api.run("generic", args.task, fraction, checkpoint=checkpoint, seed=seed,
                                           model_options={"arch": args.arch}, data_root=data,
                                           results=work / f"results-{mode}", overrides=overrides,
                                           device=args.device, overwrite=True, progress=False)
            record = runs[fraction, seed][0]
            print(f"{mode:>6} {fraction:>5g} seed {seed}: {record['timing']['wall_s']:7.2f} s   "
                  f"AUC {record['metrics']['auc']:.3f}   train {record['n']['train']}")
    return time.perf_counter() - started, runs


def auc_difference(cached: tuple, mgca: tuple) -> dict:
    """Paired bootstrap of AUC(mgca) − AUC(cached) over the test images both runs scored."""
    from vlpbench.evidence import read_evidence
    from vlpbench.metrics.significance import paired_bootstrap

    (record_a, file_a), (record_b, file_b) = mgca, cached
    evidence_a, evidence_b = read_evidence(record_a, file_a), read_evidence(record_b, file_b)
    if evidence_a.images != evidence_b.images:
        raise SystemExit("the two runs scored different test images")
    return paired_bootstrap(evidence_a.statistics()["auc"], evidence_b.statistics()["auc"], evidence_a.n,
                            n_resamples=RESAMPLES, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, n=2000, size=64)
    parser.add_argument("--out", type=Path, default=None, help="append a section to this Markdown file")
    parser.add_argument("--label", default="", help="added to the section's title (e.g. the machine's sharing)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vlpbench-linear-sweep-"))
    os.environ["VLPBENCH_CACHE"] = str(work / "cache")  # never the user's own caches
    from vlpbench.sweep.calibrate import device_name

    try:
        data, checkpoint, _, _, _, overrides = prepare(args, work)
        started = time.perf_counter()
        cached_s, cached = run_sweep(args, data, checkpoint, work, {**overrides, "linear_mode": "cached"})
        mgca_s, mgca = run_sweep(args, data, checkpoint, work, {**overrides, "linear_mode": "mgca"})

        first = next(iter(cached.values()))[0]
        n_eval, batch = first["n"]["val"] + first["n"]["test"], int(first["config"]["batch_size"])
        trains = {fraction: record["n"]["train"] for (fraction, seed), (record, _) in cached.items() if seed == 0}
        passes_cached = encoder_passes(max(trains.values()), n_eval, args.epochs, batch, False)
        passes_mgca = len(trains) * len(SEEDS) * n_eval + len(SEEDS) * sum(
            encoder_passes(n, 0, args.epochs, batch, True) for n in trains.values())
        runs = f"{len(trains)} fractions x {len(SEEDS)} seeds, {args.epochs} epochs at batch {batch}"
        figures = [
            Figure("linear probe sweep, cached mode", cached_s, "s", "measured", f"{runs}; one extraction"),
            Figure("linear probe sweep, mgca mode", mgca_s, "s", "measured", runs),
            Figure("linear probe sweep, mgca / cached", mgca_s / cached_s, "x", "measured",
                   f"arithmetic bound in encoder passes {passes_mgca / passes_cached:.1f}x "
                   f"({passes_mgca:,} / {passes_cached:,})")]
        print(f"sweep ({runs}, {args.arch} at {args.size * 7 // 8} px, {args.n} synthetic images): cached "
              f"{cached_s:.1f} s, mgca {mgca_s:.1f} s: {mgca_s / cached_s:.1f}x measured, "
              f"{passes_mgca / passes_cached:.1f}x in encoder passes")
        inside = 0
        for key in cached:
            diff = auc_difference(cached[key], mgca[key])
            inside += diff["low"] <= 0.0 <= diff["high"]
            fraction, seed = key
            print(f"AUC mgca - cached, {fraction:g} seed {seed}: {diff['diff']:+.4f} "
                  f"[{diff['low']:+.4f}, {diff['high']:+.4f}]")
            figures.append(Figure(f"AUC mgca - cached, {fraction:g} seed {seed}", diff["diff"], "AUC", "measured",
                                  f"paired bootstrap 95 % [{diff['low']:+.4f}, {diff['high']:+.4f}], "
                                  f"{diff['n']} test images, {RESAMPLES} resamples; cached AUC "
                                  f"{cached[key][0]['metrics']['auc']:.3f}"))
        print(f"{inside} of {len(cached)} intervals contain 0")
        figures.append(Figure("AUC intervals containing 0", inside, f"of {len(cached)}", "measured",
                              "no difference between the modes beyond resampling noise where they do"))
        device = torch.device(first["config"]["device"])
        name = device_name(device)
        facts = [("date", datetime.datetime.now().isoformat(timespec="seconds")), ("device", name),
                 ("torch threads", str(torch.get_num_threads())), ("torch", torch.__version__),
                 ("script", "perf/linear_probe_sweep.py "
                            f"--n {args.n} --size {args.size} --epochs {args.epochs} --arch {args.arch}"),
                 ("wall time of this run", f"{time.perf_counter() - started:.0f} s")]
        title = f"{datetime.date.today().isoformat()}, {name}, linear probe sweep" + (
            f" ({args.label})" if args.label else "")
        text = section(title, facts, figures)
        if args.out is not None:
            append_section(args.out, text)
            print(f"appended to {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
