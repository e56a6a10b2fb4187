"""What happened to each run of a sweep: a live summary while it goes, a report with failures at the end."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from vlpbench.sweep.plan import Run
from vlpbench.sweep.runlock import HELD, HELD_EXIT

STATUSES = ("done", "failed", "skipped", "planned")
# How a run process that did not start because its run is held says so in its log.
SKIPPED_PREFIX = "skipped: "
# How much of a log's last line a failure table shows.
_REASON_CHARS = 100


@dataclass
class RunOutcome:
    """The end of one run: ``done``, ``failed``, ``skipped`` (its record exists, or another live process holds
    the run) or ``planned`` (dry run)."""

    run: Run
    status: str
    seconds: float = 0.0
    exit_code: int | None = None
    reason: str = ""
    command: list[str] = field(default_factory=list)


def log_time() -> str:
    """The time in the ``===`` lines a run process writes into its log (UTC, ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def exit_outcome(run: Run, exit_code: int | None, seconds: float) -> RunOutcome:
    """The outcome of a run process that exited with ``exit_code``: done (0), skipped (another live process
    holds the run: ``vlpbench.sweep.runlock.HELD_EXIT``, the reason is the log's last line, which names it)
    or failed (``failure_reason``)."""
    if exit_code == 0:
        return RunOutcome(run=run, status="done", seconds=seconds, exit_code=0)
    if exit_code == HELD_EXIT:
        last = (_log_lines(run.log) or [f"{HELD} another process"])[-1]
        return RunOutcome(run=run, status="skipped", seconds=seconds, exit_code=exit_code,
                          reason=last.removeprefix(SKIPPED_PREFIX))
    return RunOutcome(run=run, status="failed", seconds=seconds, exit_code=exit_code,
                      reason=failure_reason(exit_code, run.log))


def failure_reason(exit_code: int | None, log: Path) -> str:
    """Why a run failed, in one line: the signal that killed it, else the last error line of its log."""
    if exit_code is not None and exit_code < 0:
        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    lines = _log_lines(log)
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    last = (errors or lines or [f"exit code {exit_code}"])[-1]
    return last if len(last) <= _REASON_CHARS else last[:_REASON_CHARS - 1] + "…"


def _log_lines(log: Path) -> list[str]:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("===")]


@dataclass
class SweepReport:
    """Every run's outcome, in plan order, the notes of the plan and the sweep's wall time."""

    outcomes: list[RunOutcome]
    notes: list[str]
    seconds: float = 0.0

    def runs(self, status: str) -> list[RunOutcome]:
        """The outcomes with ``status``."""
        return [o for o in self.outcomes if o.status == status]

    @property
    def exit_code(self) -> int:
        """0 when every run is done or skipped (or planned), 1 when any failed."""
        return 1 if self.runs("failed") else 0

    def format(self) -> str:
        """The plan's notes, planned commands (dry run), a count line, the runs held by another process and
        a table of failures with logs."""
        lines = [f"note: {note}" for note in self.notes]
        planned = self.runs("planned")
        if planned:
            lines.append(f"{len(planned)} run(s) to launch:")
            lines += [f"  {_shell(o.command)}" for o in planned]
        counts = ", ".join(f"{len(self.runs(s))} {s}" for s in STATUSES if self.runs(s) or s != "planned")
        lines.append(f"sweep: {len(self.outcomes)} run(s): {counts} ({self.seconds:.0f} s)")
        held = [o for o in self.runs("skipped") if o.reason.startswith(HELD)]
        if held:
            lines.append("runs another live process holds (not started):")
            lines += _table([("model", "task", "frac", "seed", "reason")] + [_row(o) for o in held])
        failed = self.runs("failed")
        if failed:
            lines.append("failed runs:")
            lines += _table([("model", "task", "frac", "seed", "reason", "log")] +
                            [(*_row(o), str(o.run.log)) for o in failed])
        return "\n".join(lines)


class LiveSummary:
    """A progress bar (on a terminal) whose label counts done / running / failed / skipped runs, and a
    line per run that ends. Silent when ``progress`` is False."""

    def __init__(self, total: int, skipped: int, *, progress: bool) -> None:
        from tqdm import tqdm

        self.counts = {"done": 0, "running": 0, "failed": 0, "skipped": skipped}
        self.progress = progress
        # A bar only on a terminal: in a log file its redraws are noise; the per-run lines stay.
        self.bar = tqdm(total=total, initial=skipped, desc="sweep", unit="run",
                        disable=not (progress and sys.stderr.isatty()), file=sys.stderr, dynamic_ncols=True)
        self._show()

    def started(self, run: Run) -> None:
        """A run's process has started."""
        self.counts["running"] += 1
        self._show()

    def finished(self, outcome: RunOutcome) -> None:
        """A run has ended; its line names the log when it failed, the holder when another process holds it."""
        self.counts["running"] -= 1
        self.counts[outcome.status] += 1
        if self.progress:
            detail = {"failed": f"{outcome.reason} (log: {outcome.run.log})",
                      "skipped": outcome.reason}.get(outcome.status, f"{outcome.seconds:.1f} s")
            self.bar.write(f"{outcome.status:6s} {outcome.run.describe()}: {detail}", file=sys.stderr)
        self.bar.update(1)
        self._show()

    def close(self) -> None:
        """End the progress bar."""
        self.bar.close()

    def _show(self) -> None:
        self.bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in self.counts.items()), refresh=True)


def _row(outcome: RunOutcome) -> tuple[str, ...]:
    run = outcome.run
    return run.model.label, run.task, f"{run.frac:g}", str(run.seed), outcome.reason


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """``rows`` (the first a header) as lines of left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _shell(argv: list[str]) -> str:
    import shlex

    return shlex.join(argv)
