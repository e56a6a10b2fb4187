"""The package layout keeps its promises: readers stand apart from the synthesizers, and the format
notes that code cites exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r'docs/datasets\.md,\s+(?:#\s+)?"([^"]+)"')


def test_readers_import_no_synthesizer():
    readers = ["siim", "rsna", "chexpert", "cxr14", "object_cxr", "covidx", "mimic_cxr", "ms_cxr", "splits",
               "check", "cache"]
    code = (f"import importlib, sys\nfor name in {readers!r}:\n    importlib.import_module('vlpbench.data.' + name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('vlpbench.synthetic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_datasets_md_citation_names_a_heading():
    headings = {line.lstrip("#").strip() for line in (ROOT / "docs" / "datasets.md").read_text().splitlines()
                if line.startswith("#")}
    cited = {}
    for folder in ("benchmark", "adapters", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for heading in CITATION.findall(path.read_text(encoding="utf-8")):
                cited.setdefault(heading, []).append(path.relative_to(ROOT).as_posix())
    assert len(cited) >= 15  # every dataset's section is cited somewhere
    assert {heading: paths for heading, paths in cited.items() if heading not in headings} == {}
