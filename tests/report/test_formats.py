"""Table writers: Markdown and LaTeX golden files, LaTeX escaping (and compilation where pdflatex
exists), HTML escaping, CSV values against numpy."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from vlpbench.report.latex import latex_escape
from vlpbench.report.reference import load_references
from vlpbench.report.table import render_table

GOLDEN = Path(__file__).parent / "golden"
HOSTILE = "a_b & 50% $x$ #1 {y} ~z ^w \\cmd <b> |p| [s] é"

# siim_seg Dice per seed at 1 % / 10 % / 100 %, rsna_det mAP per seed at 1 % / 100 %.
SEG = {"g2d": [(0.61, 0.63, 0.65), (0.64, 0.66, 0.65), (0.70, 0.69, 0.71)],
       "mgca": [(0.50, 0.55, 0.57), (0.60, 0.61, 0.59), (0.66, 0.66, 0.67)],
       "random": [(0.08, 0.10, 0.09), (0.28, 0.30, 0.29), (0.55, 0.53, 0.54)]}
DET = {"g2d": [(0.15, 0.16), (0.27, 0.28)], "mgca": [(0.13, 0.12), (0.25, 0.24)]}


@pytest.fixture
def records(make):
    out = []
    for model, per_frac in SEG.items():
        for frac, values in zip((0.01, 0.1, 1.0), per_frac):
            out += [make(model, v, frac=frac, seed=s, ci=0.02) for s, v in enumerate(values)]
    for model, per_frac in DET.items():
        for frac, values in zip((0.01, 1.0), per_frac):
            out += [make(model, v, task="rsna_det", frac=frac, seed=s, ci=0.01) for s, v in enumerate(values)]
    return out


@pytest.fixture
def references(tmp_path):
    folder = tmp_path / "reference"
    folder.mkdir()
    (folder / "paper_table1.json").write_text(json.dumps({
        "schema": 1, "citation": "Someone et al., A Paper, 2024", "table": "Table 1", "unit": "percent",
        "profile": "canonical", "columns": [{"paper": "SIIM 1%", "task": "siim_seg", "frac": 0.01, "metric": "dice"},
                    {"paper": "RSNA 100%", "task": "rsna_det", "frac": 1.0, "metric": "map"}],
        "rows": [{"method": "MGCA", "values": [49.7, None]}, {"method": "G2D (encoder)", "values": [62.6, 27.2]}]}))
    return load_references(folder)


def _golden(name: str, text: str) -> str:
    path = GOLDEN / name
    if os.environ.get("VLPBENCH_UPDATE_GOLDEN"):  # regenerate after a deliberate format change
        path.write_text(text, encoding="utf-8")
    return path.read_text(encoding="utf-8")


def test_markdown_matches_the_golden_file(records, references):
    text = render_table(records, "md", references=references)
    assert text == _golden("paper_table.md", text)


def test_latex_matches_the_golden_file(records, references):
    text = render_table(records, "latex", references=references)
    assert text == _golden("paper_table.tex", text)


def test_latex_escapes_every_special_character():
    assert latex_escape(HOSTILE) == (r"a\_b \& 50\% \$x\$ \#1 \{y\} \textasciitilde{}z \textasciicircum{}w "
                                     r"\textbackslash{}cmd \textless{}b\textgreater{} \textbar{}p\textbar{} "
                                     r"{[}s{]} é")
    assert latex_escape("± × ↑ – †\n") == r"$\pm$ $\times$ $\uparrow$ -- \dag{} "


def test_latex_with_hostile_names_and_reported_rows_compiles(make, records, references, tmp_path):
    hostile = [make("[lead] " + HOSTILE, 0.6), make("second", 0.5, overrides={"lr": 0.001}), make("x", 0.4)]
    text = render_table(hostile, "latex")
    assert r"\textbf{60.0} \\" in text and "{[}lead{]} a\\_b" in text and "\\textbackslash{}cmd" in text
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed; the escaping itself is checked above")
    golden = render_table(records, "latex", references=references)
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                      + text + golden + "\\end{document}\n", encoding="utf-8")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]


class _Cells(HTMLParser):
    """Text of every th/td, and every tag opened."""

    def __init__(self):
        super().__init__()
        self.cells, self.tags, self._text = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("th", "td"):
            self._text = ""

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.cells.append(self._text)
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text += data


def test_html_escapes_record_strings_so_a_script_stays_text(make, references):
    name = "<script>alert('x')</script> & co"
    text = render_table([make(name, 0.6), make("mgca", 0.5)], "html", references=references)
    assert "<script>" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in text
    parser = _Cells()
    parser.feed(text)
    assert "script" not in parser.tags and parser.tags[0] == "table"
    assert name in parser.cells
    assert parser.cells[:4] == ["Model", "siim_seg: Dice ↑", "1%", "MGCA†"]
    assert "<b>60.0</b>" in text and '<tr class="reported"><th scope="row"><i>MGCA</i><sup>†</sup></th><td>49.7</td>' in text


def test_csv_rows_hold_mean_std_seeds_and_ci_per_model_task_fraction(records, references):
    rows = list(csv.DictReader(io.StringIO(render_table(records, "csv", references=references))))
    assert len(rows) == 3 * 3 + 2 * 2 + 3  # measured cells + reported cells in shown columns
    g2d = next(r for r in rows if (r["model"], r["task"], r["frac"]) == ("g2d", "siim_seg", "0.01"))
    values = np.array(SEG["g2d"][0])
    assert float(g2d["mean"]) == pytest.approx(values.mean(), abs=1e-6)
    assert float(g2d["std"]) == pytest.approx(values.std(ddof=1), abs=1e-6)
    assert (g2d["n_seeds"], g2d["seeds"], g2d["metric"], g2d["reported"]) == ("3", "0;1;2", "dice", "false")
    # CI bounds: the mean over seeds of each seed's bounds (value ± 0.02 here).
    assert float(g2d["ci_low"]) == pytest.approx(values.mean() - 0.02, abs=1e-6)
    assert float(g2d["ci_high"]) == pytest.approx(values.mean() + 0.02, abs=1e-6)
    assert (g2d["task_version"], g2d["split_sha256"][:8], g2d["higher_is_better"]) == ("1", "aaaaaaaa", "true")
    reported = next(r for r in rows if r["model"] == "G2D (encoder)" and r["task"] == "rsna_det")
    assert (reported["reported"], reported["mean"], reported["frac"]) == ("true", "0.272", "1.0")
    assert reported["citation"] == "Someone et al., A Paper, 2024, Table 1" and reported["std"] == ""
