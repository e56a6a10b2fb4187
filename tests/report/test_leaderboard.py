"""The leaderboard page: escaping, sortable tables, provenance per cell, no network, and a real click on a
sort header in headless Chromium (driven over the DevTools protocol on a pipe; skipped without Chromium)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser

import pytest

from vlpbench import results
from vlpbench.cli import main
from vlpbench.report.leaderboard import leaderboard_html, write_leaderboard
from vlpbench.report.reference import ReferenceRow

HOSTILE = "<script>alert(1)</script>"
SHA = {"alpha": "1" * 64, "beta": "2" * 64, HOSTILE: "3" * 64}


@pytest.fixture
def records(make):
    """Segmentation at 1 % for three models (alpha has two seeds), beta lacks 100 %, plus one zero-shot task."""
    values = {"alpha": {0.01: (0.50, 0.52), 1.0: (0.70,)}, "beta": {0.01: (0.70,)},
              HOSTILE: {0.01: (0.60,), 1.0: (0.80,)}}
    built = [make(model, value, frac=frac, seed=seed, sha=SHA[model], ci=0.02)
             for model, by_frac in values.items() for frac, seeds in by_frac.items()
             for seed, value in enumerate(seeds)]
    return built + [make("alpha", 0.9, task="rsna_zs", frac=1.0, sha=SHA["alpha"])]


class _Tables(HTMLParser):
    """Row headers (first cell text) of every table body, and the title attribute of every body cell."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.titles: list[str] = []
        self.scripts = 0
        self._table = None
        self._in_body = self._in_row_header = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "table" and "leaderboard" in (attrs.get("class") or ""):
            self._table = attrs["id"]
            self.rows[self._table] = []
        self._in_body = self._in_body or (tag == "tbody" and self._table is not None)
        if self._in_body and tag == "th":
            self._in_row_header = True
            self.rows[self._table].append("")
        if self._in_body and tag == "td" and "title" in attrs:
            self.titles.append(attrs["title"])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        if tag == "th":
            self._in_row_header = False

    def handle_data(self, data):
        if self._in_row_header:
            self.rows[self._table][-1] += data


def _parse(html: str) -> _Tables:
    parser = _Tables()
    parser.feed(html)
    return parser


def test_record_strings_are_escaped(records):
    html = leaderboard_html(records, plots=False)
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    parsed = _parse(html)
    assert parsed.scripts == 1  # the page's own sorting script only
    assert HOSTILE in parsed.rows["table-seg"]  # the name reads as text


def test_tables_per_group_with_sortable_headers_and_paper_order(records):
    html = leaderboard_html(records, plots=False)
    parsed = _parse(html)
    assert list(parsed.rows) == ["table-seg", "table-zs"]
    assert parsed.rows["table-seg"] == [HOSTILE, "alpha", "beta"]  # as the paper table orders them
    assert 'data-sort="number" data-column="1" data-higher="1" tabindex="0">1%</th>' in html
    assert 'data-column="2" data-higher="1" tabindex="0">100%</th>' in html
    assert "<b>70.0</b>" in html and "51.0 ± 1.4" in html  # best bold; alpha's two seeds: mean ± sample std


def test_every_measured_cell_carries_its_provenance(records):
    parsed = _parse(leaderboard_html(records, plots=False))
    alpha_1pct = next(t for t in parsed.titles if t.startswith("alpha · siim_seg 1%"))
    assert "2 seed(s): 0, 1" in alpha_1pct
    assert "95% bootstrap CI (mean over seeds): 0.4900–0.5300" in alpha_1pct
    for seed in (0, 1):
        assert f"seed {seed}: checkpoint sha256 {SHA['alpha']}" in alpha_1pct
    assert alpha_1pct.count("; vlpbench test") == 2  # version from each record's env
    assert sum("seed 0: checkpoint sha256" in t for t in parsed.titles) == 6  # every measured cell
    hostile = next(t for t in parsed.titles if t.startswith(HOSTILE))
    assert SHA[HOSTILE] in hostile


def test_page_is_self_contained_and_reproducible(records):
    reference = ReferenceRow("MGCA", "Wang et al., NeurIPS 2022 (http://example.org/mgca)",
                             {("siim_seg", 0.01, "dice"): 0.497}, {("siim_seg", 0.01, "dice"): "Table 1"},
                             profile="canonical")
    html = leaderboard_html(records, references=[reference])
    assert html == leaderboard_html(records, references=[reference])
    assert "<link" not in html and "@import" not in html
    assert html.count('src="data:image/png;base64,') == 2  # one plot per task
    # The inline images are base64, which could hold any letters; the rest must name no URL.
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html).replace("http://example.org/mgca", "")
    assert "http" not in text and "url(" not in text
    parsed = _parse(html)
    assert parsed.rows["table-seg"][0] == "MGCA†"  # the reported row, first
    assert "reported in Wang et al." in html


def test_cli_writes_index_html(records, tmp_path, capsys):
    for record in records:
        results.write_record(record, tmp_path / "results")
    assert main(["leaderboard", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "site")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "site" / "index.html")
    page = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and 'id="table-seg"' in page
    (tmp_path / "empty").mkdir()
    assert main(["leaderboard", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no result records" in capsys.readouterr().err


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


class DevTools:
    """A minimal Chrome DevTools protocol client over ``--remote-debugging-pipe`` (fd 3: commands in,
    fd 4: replies out; NUL-terminated JSON), so no websocket package is needed."""

    def __init__(self, binary: str, profile):
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def wire_fds():  # in the child: our pipe ends become fds 3 and 4, whatever their numbers were
            high_read = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 10)
            high_write = fcntl.fcntl(replies_write, fcntl.F_DUPFD, 10)
            os.dup2(high_read, 3)
            os.dup2(high_write, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(replies_write)
        self._buffer = b""
        self._id = 0
        self.session = None

    def call(self, method: str, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._replies, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the element."""
        box = self.evaluate(f"(function () {{ var r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        finally:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            os.close(self._commands)
            os.close(self._replies)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on PATH (Debian: apt-get install chromium; "
                                                 ".ci/run installs it where it can)")
def test_clicking_a_sort_header_in_chromium_orders_the_rows(records, tmp_path):
    page = write_leaderboard(records, tmp_path / "site", plots=False)
    browser = DevTools(_chromium(), tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        browser.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.call("Page.enable")
        browser.call("Page.navigate", url=page.as_uri())
        for _ in range(200):  # wait (at most 10 s) for the load, after which the page's script has run
            if browser.evaluate("document.readyState") == "complete":
                break
            time.sleep(0.05)
        assert browser.evaluate("document.readyState") == "complete"
        names = ("Array.prototype.map.call(document.querySelectorAll('#table-seg tbody tr'),"
                 " function (row) { return row.cells[0].textContent; })")
        assert browser.evaluate(names) == [HOSTILE, "alpha", "beta"]
        browser.click('#table-seg th[data-column="1"]')  # 1 %: best first
        assert browser.evaluate(names) == ["beta", HOSTILE, "alpha"]
        browser.click('#table-seg th[data-column="0"]')  # model names, alphabetical
        assert browser.evaluate(names) == [HOSTILE, "alpha", "beta"]
        browser.click('#table-seg th[data-column="0"]')  # again: reversed
        assert browser.evaluate(names) == ["beta", "alpha", HOSTILE]
        browser.click('#table-seg th[data-column="1"]')
        browser.click('#table-seg th[data-column="1"]')  # 1 % again: worst first
        assert browser.evaluate(names) == ["alpha", HOSTILE, "beta"]
        browser.click('#table-seg th[data-column="2"]')  # 100 %: beta has no cell and goes last
        assert browser.evaluate(names) == [HOSTILE, "alpha", "beta"]
        assert browser.evaluate("document.querySelector('#table-seg th[data-column=\"2\"]')"
                                ".getAttribute('aria-sort')") == "descending"
        assert browser.evaluate("document.querySelectorAll('script').length") == 1
    finally:
        browser.close()
