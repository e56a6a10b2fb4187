"""perf/results_md.py: the sections perf/gpu_figures.py appends to perf/RESULTS.md."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("results_md", Path(__file__).parents[1] / "perf" / "results_md.py")
results_md = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("results_md", results_md)  # dataclasses look their module up there
_spec.loader.exec_module(results_md)
Figure = results_md.Figure


def test_section_format():
    text = results_md.section("2026-01-02, H100", [("torch", "2.5")], [
        Figure("encoder fp32", 1234.567, "images/s", "measured", "batch 32"),
        Figure("encoder bf16", None, "images/s", "skipped", "no bf16"),
        Figure("busy", 0.912345, "fraction", "measured")])
    assert text.splitlines() == [
        "## 2026-01-02, H100", "", "- torch: 2.5", "",
        "| figure | value | unit | how | note |", "|---|---:|---|---|---|",
        "| encoder fp32 | 1,235 | images/s | measured | batch 32 |",
        "| encoder bf16 | - | images/s | skipped | no bf16 |",
        "| busy | 0.9123 | fraction | measured |  |"]


def test_append_creates_header_then_only_appends(tmp_path):
    path = tmp_path / "RESULTS.md"
    results_md.append_section(path, "## first\n")
    assert path.read_text() == results_md.HEADER + "\n## first\n"
    results_md.append_section(path, "## second\n")
    assert path.read_text() == results_md.HEADER + "\n## first\n\n## second\n"


def test_append_keeps_existing_file(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# mine\nkept\n")
    results_md.append_section(path, "## new\n")
    assert path.read_text() == "# mine\nkept\n\n## new\n"
