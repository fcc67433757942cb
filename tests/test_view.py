"""`rain view` and `rain generate --trace-html`: the HTML page of a real trace, read back with
html.parser, opened in a headless Chromium, and the one-line errors for files that are not traces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rain_llm.shells.cli import main
from rain_llm.shells.view import load_trace, render_html, tree_counts

UNMARK = str.maketrans({"·": " ", "↵": "\n", "⇥": "\t", "␍": "\r"})


def rain(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "rain_llm.shells.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=3600)  # a hang guard only
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real search on the default model, its trace, and its page written both ways."""
    folder = tmp_path_factory.mktemp("view")
    rain("generate", "--preset", "fast", "--max-new-tokens", "12", "--t-max", "4", "--quiet",
         "--trace", "run.json", "--trace-html", "direct.html", "How do I pick a lock?", cwd=folder)
    viewed = rain("view", "run.json", cwd=folder)
    return {"folder": folder, "trace": json.loads((folder / "run.json").read_text()),
            "printed": viewed.stdout.strip(), "page": folder / "run.html", "direct": folder / "direct.html"}


class PageReader(HTMLParser):
    """Per step: the rendered node rows, the committed rows' text and the summary line; the answer
    path's boxes; every tag's balance and every outside reference (broken or non-self-contained markup)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict] = []
        self.segments: list[str] = []
        self.balance: dict[str, int] = {}
        self.external: list[str] = []
        self._capture: list[str] | None = None  # text of the element being read
        self._depth = 0  # its open tags
        self._want_tok = False  # a committed row started: read its token set
        self._in_summary = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        self.balance[tag] = self.balance.get(tag, 0) + 1
        self.external += [a[k] for k in ("src", "href") if a.get(k) and not a[k].startswith("#")]
        self.external += [tag] if tag in ("link", "iframe", "img", "object", "embed") else []
        if tag == "details" and "step" in classes:
            self.steps.append({"id": a["id"], "data_nodes": int(a["data-nodes"]), "nodes": 0, "committed": [],
                               "summary": ""})
            self._in_summary = True
        if "node" in classes:
            self.steps[-1]["nodes"] += 1
            self._want_tok = "cm" in classes
        if self._capture is not None:
            self._depth += 1
        elif tag == "span" and "tok" in classes and self._want_tok:
            self._capture, self._depth, self._want_tok, self._target = [], 1, False, "committed"
        elif tag == "a" and "seg" in classes:
            self._capture, self._depth, self._target = [], 1, "segment"

    def handle_endtag(self, tag: str) -> None:
        self.balance[tag] = self.balance.get(tag, 0) - 1
        if tag == "summary":
            self._in_summary = False
        if self._capture is not None:
            self._depth -= 1
            if self._depth == 0:
                text = "".join(self._capture)
                if self._target == "committed":
                    self.steps[-1]["committed"].append(text.translate(UNMARK))
                else:
                    self.segments.append(text.replace("↵", ""))  # prose keeps the newline after the mark
                self._capture = None

    def handle_data(self, data: str) -> None:
        if self._capture is not None:
            self._capture.append(data)
        if self._in_summary and self.steps:
            self.steps[-1]["summary"] += data


def read_page(text: str) -> PageReader:
    reader = PageReader()
    reader.feed(text)
    reader.close()
    return reader


@pytest.mark.slow
def test_page_shows_every_step_and_every_node(run):
    trace = run["trace"]
    assert trace["steps"], "the search committed no step"
    assert (run["folder"] / run["printed"]).resolve() == run["page"].resolve()
    text = run["page"].read_text(encoding="utf-8")
    assert run["direct"].read_text(encoding="utf-8") == text  # --trace-html and rain view agree
    assert text == render_html(load_trace(run["folder"] / "run.json"))
    page = read_page(text)
    assert page.external == []  # self-contained: nothing fetched from anywhere
    assert {tag: n for tag, n in page.balance.items() if n and tag not in ("meta", "input")} == {}  # all closed
    assert [s["id"] for s in page.steps] == [f"step-{i + 1}" for i in range(len(trace["steps"]))]
    for step, shown in zip(trace["steps"], page.steps):
        nodes = tree_counts(step["tree"])["nodes"]
        assert shown["nodes"] == nodes == shown["data_nodes"]
        assert f"{nodes} nodes" in shown["summary"]
        assert f"{step['iterations']} iterations" in shown["summary"]
        assert shown["committed"] == [step["committed_text"]]  # exactly one committed row, its text
    assert page.segments == [step["committed_text"] for step in trace["steps"]]  # the answer path


def test_page_escapes_and_marks_whitespace():
    node = {"tokens": [7], "text": "<script>alert(1)</script>\n\t x\ud800", "visits": 1, "n": 1.5, "value": -0.5,
            "prior": 0.25, "similarity_updates": 2, "dynamic": True, "children": []}
    root = {"tokens": [], "text": "", "visits": 2, "n": 2, "value": 0.0, "prior": 0.0, "children": [node]}
    trace = {"prompt": "a <b> & c", "text": "x", "steps": [{"committed": [7], "tree": root}]}
    page = render_html(trace)
    page.encode("utf-8")  # lone surrogates do not reach the file
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &lt;b&gt; &amp; c" in page
    shown = read_page(page)
    assert shown.steps[0]["nodes"] == 2
    assert shown.steps[0]["committed"] == ["<script>alert(1)</script>\n\t x\ufffd"]  # marks map back
    assert "sim 2" in page and "+dyn" in page


# ---------------------------------------------------------------------------- browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]

# Run after the page's own script: presses the buttons and searches, then reports what it saw.
SELF_TEST = """<script>
(function () {
  var r = {}, q = function (s) { return document.querySelectorAll(s).length; };
  r.details = q("ul.tree details");
  r.defaultOpen = q("ul.tree details[open]");
  document.querySelector("nav [data-act=expand]").click();
  r.closedAfterExpand = q("ul.tree details:not([open])");
  document.querySelector("nav [data-act=collapse]").click();
  r.openAfterCollapse = q("ul.tree details[open]");
  document.querySelector("nav [data-act=reset]").click();
  r.openAfterReset = q("ul.tree details[open]");
  var find = document.getElementById("find");
  find.value = QUERY;
  find.dispatchEvent(new Event("input"));
  r.hits = q(".node.hit");
  document.body.setAttribute("data-selftest", JSON.stringify(r));
})();
</script>
"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    reason = "chromium is not on PATH (apt-get install -y chromium)"
    if os.environ.get("RAIN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and RAIN_REQUIRE_BROWSER=1 requires the browser test")
    pytest.skip(f"{reason}; set RAIN_REQUIRE_BROWSER=1 to make this a failure")


def browse(exe: str, page: Path, profile: Path, *extra: str) -> tuple[str, list[str]]:
    """Open `page` in a fresh headless profile: (stdout, console messages from stderr)."""
    done = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
                          capture_output=True, text=True, timeout=300)  # a hang guard only
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
def test_page_renders_in_chromium_without_script_errors(run, tmp_path):
    exe = chromium()
    # The capture itself: a page with a deliberate error must show up, or an empty list proves nothing.
    probe = tmp_path / "probe.html"
    probe.write_text("<!doctype html><p>probe</p><script>notDefinedAnywhere();</script>")
    _, console = browse(exe, probe, tmp_path / "p0", "--dump-dom")
    assert any("notDefinedAnywhere" in line for line in console), "chromium console not captured on stderr"

    text = run["page"].read_text(encoding="utf-8")
    query = run["trace"]["steps"][0]["committed_text"].strip() or "a"
    tested = tmp_path / "selftest.html"
    tested.write_text(text.replace("</body>", SELF_TEST.replace("QUERY", json.dumps(query).replace("</", "<\\/"))
                                   + "</body>"), encoding="utf-8")
    dom, console = browse(exe, tested, tmp_path / "p1", "--dump-dom")
    assert console == []
    body = read_body_attrs(dom)
    assert body.get("data-ready") == "1"  # the page's script ran to its end
    result = json.loads(body["data-selftest"])
    assert result["details"] > 0 and result["closedAfterExpand"] == 0 and result["openAfterCollapse"] == 0
    assert result["openAfterReset"] == result["defaultOpen"] == text.count("data-d=")
    assert result["hits"] >= 1

    shot = tmp_path / "page.png"
    _, console = browse(exe, run["page"], tmp_path / "p2", f"--screenshot={shot}", "--window-size=1280,1400")
    assert console == []
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1400, 1280)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 16  # text, bars and highlights, not a blank or single-colour page


def read_body_attrs(dom: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}

    class Body(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "body":
                found.update(attrs)

    Body().feed(dom)
    return found


# ---------------------------------------------------------------------------- bad files


def view_error(path: Path, capsys) -> str:
    assert main(["view", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("rain: error: "), err
    assert not path.with_suffix(".html").exists()
    return lines[0]


SMALL = {"prompt": "p", "text": "t", "steps": [{"committed": [1], "tree": {
    "tokens": [], "text": "", "visits": 1, "value": 0.0, "prior": 0.0, "children": [
        {"tokens": [1], "text": "a", "visits": 1, "value": 0.5, "prior": 1.0, "children": []}]}}]}


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("", "empty file"),
    ("hello, world", "not JSON"),
    ('{"prompt": "p"} trailing', "not JSON"),
    (json.dumps(SMALL)[:60], "truncated JSON"),
    ("[1, 2]", "not a RAIN trace (the top level is a list, not an object)"),
    (json.dumps({"prompt": "p", "text": "t"}), "not a RAIN trace (no 'steps')"),
    (json.dumps({**SMALL, "steps": {}}), "not a RAIN trace (steps is an object, not a list)"),
    (json.dumps(SMALL).replace('"visits": 1, "value": 0.5', '"value": 0.5'),
     "not a RAIN trace (no 'visits' in steps[0].tree.children[0])"),
    (json.dumps({**SMALL, "config": []}), "not a RAIN trace (config is a list, not an object)"),
    (json.dumps(SMALL).replace('"value": 0.5', '"value": 0.5, "dynamic": "yes"'),
     "not a RAIN trace (steps[0].tree.children[0].dynamic is a string, not true/false)"),
])
def test_bad_files_give_one_line_and_exit_2(tmp_path, capsys, content, expected):
    path = tmp_path / "trace.json"
    if content is not None:
        path.write_text(content)
    line = view_error(path, capsys)
    assert str(path) in line and expected in line, line


def test_truncated_anywhere_says_truncated(tmp_path, capsys):
    path = tmp_path / "cut.json"
    text = json.dumps({**SMALL, "prompt": "Café \u2028 <b>"}, indent=1)
    for cut in range(1, len(text) - 1):  # every cut inside the document (the last byte is its closing brace)
        path.write_text(text[:cut])
        with pytest.raises(Exception, match="truncated JSON"):
            load_trace(path)
    path.write_text(text[: len(text) // 2])
    assert "truncated JSON" in view_error(path, capsys)


def test_small_trace_views_and_default_output_name(tmp_path, capsys):
    path = tmp_path / "small.trace.json"
    path.write_text(json.dumps(SMALL))
    assert main(["view", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == str(tmp_path / "small.trace.html")
    assert main(["view", str(path), "-o", str(tmp_path / "other.html")]) == 0
    assert (tmp_path / "other.html").read_text(encoding="utf-8").startswith("<!doctype html>")
