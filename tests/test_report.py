"""The HTML report (issue 5): self-contained, loads in a real headless Chromium with no console messages and shows
the prompt's tokens; without Graphviz it says so and still writes the DOT file."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import networkx as nx
import pytest

import fxdepass
import fxdepass.report
import tiny
from fxdepass.graph import build_graph
from fxdepass.report import attribution_html, report_html, write_report

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium to check the report in a real browser (Debian: apt-get install chromium)")
#: a reference to anything outside the page: the report must need no network
EXTERNAL = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?\s*|url\(\s*["']?|@import\s+["']?)(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    _, decomposed = tiny.compiled()
    return build_graph(decomposed, tiny.IDS)


def load_in_chromium(page: Path, profile: Path) -> tuple[str, list[str]]:
    """(the DOM after scripts ran, the console messages) of ``page`` in headless Chromium."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_console_check_sees_script_errors(tmp_path: Path) -> None:
    """The harness itself: a page with an uncaught error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    _, console = load_in_chromium(page, tmp_path / "profile")
    assert any("undefinedFunction" in line for line in console)


@needs_chromium
def test_report_loads_in_chromium_without_console_messages(graph, tmp_path: Path) -> None:
    page = write_report(graph, tmp_path / "report.html")
    text = page.read_text()
    assert not EXTERNAL.search(text), EXTERNAL.search(text)
    dom, console = load_in_chromium(page, tmp_path / "profile")
    assert console == []
    assert 'data-ready="1"' in dom                                   # the inline script ran to the end
    strip = dom[dom.index('class="tokens"'):dom.index("</div>", dom.index('class="tokens"'))]
    shown = re.findall(r'data-position="(\d+)"[^>]*>([^<]*)</span>', strip)
    assert [(int(p), html.unescape(t)) for p, t in shown] == list(enumerate(tiny.PROMPT.split()))
    if shutil.which("dot"):
        assert "<svg" in dom and "target" in dom


def test_report_contents(graph) -> None:
    page = report_html(graph, (None, "Graphviz (<code>dot</code>) is not installed"), dot_name="report.dot")
    assert page.startswith("<!DOCTYPE html>") and not EXTERNAL.search(page)
    for word in tiny.PROMPT.split():
        assert f">{word}</span>" in page
    value = graph.graph["value"]
    for position, data in ((d["position"], d) for _, d in graph.nodes(data=True) if d["kind"] == "token"):
        assert f"contributes {data['contribution']:+.6g} ({100 * data['contribution'] / value:+.1f}% of the target)" in page
    heatmap = page[page.index('<table class="heat">'):page.index("</table>", page.index('<table class="heat">'))]
    assert heatmap.count("<tr>") == len(graph.graph["layer_scores"]) + 1 == 2 + 2       # header, embeddings, 2 layers
    assert "Graphviz (<code>dot</code>) is not installed" in page and "report.dot" in page


def test_without_graphviz_the_page_says_so_and_the_dot_file_is_written(graph, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fxdepass.report.shutil, "which", lambda name: None)
    page = write_report(graph, tmp_path / "report.html")
    assert "is not installed" in page.read_text() and "<svg" not in page.read_text()
    assert (tmp_path / "report.dot").read_text().startswith("digraph")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz (dot) is not installed: apt-get install graphviz")
def test_with_graphviz_the_graph_is_inline_svg(graph, tmp_path: Path) -> None:
    text = write_report(graph, tmp_path / "report.html").read_text()
    assert text.count("<svg") == 1 and "<?xml" not in text and "<!DOCTYPE svg" not in text
    svg, note = fxdepass.report.render_svg(graph, max_edges=5)
    assert svg.count('class="edge"') == 5                      # invisible edges are not drawn
    assert note == f"The 5 strongest of {graph.number_of_edges()} edges are drawn."


def test_attribution_html_for_jupyter() -> None:
    _, decomposed = tiny.compiled()
    attribution = decomposed.attribute(tiny.IDS, positions="all", targets="all")
    fragment = attribution_html(attribution)
    assert fragment.startswith('<div class="fxdepass">') and not EXTERNAL.search(fragment)
    for label, score in zip(attribution.labels, attribution.scores().tolist()):
        assert f'title="{html.escape(f"{label}: {score:+.6g}")}"' in fragment
    layers = attribution_html(decomposed.attribute(tiny.IDS, positions="all", targets="all", seed=fxdepass.heads(0), readout="layers"))
    assert "projection on the layers value" in layers and "L0H3" in layers
