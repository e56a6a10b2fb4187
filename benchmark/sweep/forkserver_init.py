"""Imported by the sweep's forkserver only, first of its preloads: ties the forkserver to the sweep process
(``vlpbench.sweep.lifeline``), so that a ``kill -9`` of the sweep ends the forkserver, and through it the runs."""

from vlpbench.sweep.lifeline import die_with_parent

die_with_parent()
