"""The HTML report (issues 5, 19): self-contained, loads in a real headless Chromium with no console messages, shows
the prompt's tokens and draws the graph itself (inline SVG laid out in Python: no Graphviz); Graphviz's DOT (and
SVG when ``dot`` exists) are exports beside the page."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import networkx as nx
import pytest
import torch

import fxdepass
import fxdepass.report
import tiny
from fxdepass.graph import build_graph
from fxdepass.report import report_html, write_report
from fxdepass.results import attribution_html

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium to check the report in a real browser (Debian: apt-get install chromium)")
#: a reference to anything outside the page: the report must need no network
EXTERNAL = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?\s*|url\(\s*["']?|@import\s+["']?)(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    _, decomposed = tiny.compiled()
    return build_graph(decomposed, tiny.IDS)


def load_in_chromium(page: Path, profile: Path, *, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """(the DOM after scripts ran, the console messages) of ``page`` in headless Chromium; or, with
    ``screenshot``, ("", console) after writing a 1400 × 2400 PNG of the page there."""
    action = [f"--screenshot={screenshot}", "--window-size=1400,2400"] if screenshot else ["--dump-dom"]
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", *action, page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return ("" if screenshot else result.stdout), [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_console_check_sees_script_errors(tmp_path: Path) -> None:
    """The harness itself: a page with an uncaught error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    _, console = load_in_chromium(page, tmp_path / "profile")
    assert any("undefinedFunction" in line for line in console)


@pytest.fixture()
def no_graphviz(tmp_path: Path, monkeypatch) -> None:
    """A PATH on which there is no ``dot`` (nor anything else)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("dot") is None


def test_report_contents(graph) -> None:
    page = report_html(graph, exports=["report.dot"])
    assert page.startswith("<!DOCTYPE html>") and not EXTERNAL.search(page)
    for word in tiny.PROMPT.split():
        assert f">{word}</span>" in page
    value = graph.graph["value"]
    for position, data in ((d["position"], d) for _, d in graph.nodes(data=True) if d["kind"] == "token"):
        assert f"contributes {data['contribution']:+.6g} ({100 * data['contribution'] / value:+.1f}% of the target)" in page
    heatmap = page[page.index('<table class="heat">'):page.index("</table>", page.index('<table class="heat">'))]
    assert heatmap.count("<tr>") == len(graph.graph["layer_scores"]) + 1 == 2 + 2       # header, embeddings, 2 layers
    assert "<code>report.dot</code>" in page


def drawn_nodes(svg: str) -> dict[str, dict[str, object]]:
    """Each drawn node's id → kind, position, x, y, classes, from the SVG's ``<g class="node …">`` elements."""
    found = {}
    for match in re.finditer(r'<g class="(node[^"]*)" data-id="([^"]+)" data-kind="(\w+)"[^>]*data-position="(-?\d+)"'
                             r'[^>]*transform="translate\(([-\d.]+),([-\d.]+)\)"', svg):
        classes, node, kind, position, x, y = match.groups()
        found[html.unescape(node)] = {"kind": kind, "position": int(position), "x": float(x), "y": float(y),
                                      "classes": set(classes.split())}
    return found


def check_drawing(page: str, graph: nx.DiGraph) -> dict[str, dict[str, object]]:
    """The page's SVG drawing has every token and the target and the strongest internal nodes, tokens along x in
    prompt order, the target above every other node."""
    start = re.search(r'<svg [^>]*class="fxgraph', page).start()
    svg = page[start:page.index("</svg>", start) + 6]
    nodes = drawn_nodes(svg)
    internal = [n for n, d in graph.nodes(data=True) if d["kind"] not in ("token", "target")]
    tokens = [n for n, d in graph.nodes(data=True) if d["kind"] == "token"]
    assert len(re.findall(r'<g class="node[ "]', svg)) == len(nodes) == len(tokens) + 1 + min(len(internal), 150)
    by_x = sorted((d["x"], d["position"]) for d in nodes.values() if d["kind"] == "token")
    assert [p for _, p in by_x] == sorted(graph.nodes[n]["position"] for n in tokens)
    assert nodes["target"]["y"] < min(d["y"] for n, d in nodes.items() if n != "target")
    for node, data in nodes.items():
        assert data["kind"] == graph.nodes[node]["kind"] and data["position"] == graph.nodes[node]["position"]
    return nodes


def test_without_graphviz_the_page_draws_the_graph_and_the_dot_file_is_written(graph, tmp_path: Path, no_graphviz) -> None:
    page = write_report(graph, tmp_path / "report.html").read_text()
    check_drawing(page, graph)
    assert (tmp_path / "report.dot").read_text().startswith("digraph") and not (tmp_path / "report.svg").exists()
    assert "<code>report.dot</code>" in page and "report.svg" not in page and "Graphviz (<code>dot</code>) is not" not in page


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz (dot) is not installed: apt-get install graphviz")
def test_with_graphviz_its_svg_is_an_export(graph, tmp_path: Path) -> None:
    text = write_report(graph, tmp_path / "report.html").read_text()
    assert text.count("<svg") == 1 and "<code>report.svg</code>" in text             # the page's own drawing only
    assert (tmp_path / "report.svg").read_text().startswith("<svg")
    svg, note = fxdepass.report.render_svg(graph, max_edges=5)
    assert svg.count('class="edge"') == 5                      # invisible edges are not drawn
    assert note == f"The 5 strongest of {graph.number_of_edges()} edges are drawn."


def demo_graph() -> nx.DiGraph:
    model, tokenizer = fxdepass.load("demo")
    decomposed = fxdepass.compile(model, dtype=torch.float64, tokenizer=tokenizer)
    return build_graph(decomposed, decomposed.encode(tiny.DEMO_PROMPT).input_ids)


@needs_chromium
@pytest.mark.parametrize("which", ["tiny", pytest.param("demo", marks=pytest.mark.skipif(
    not tiny.demo_exists(), reason="the demo model is not trained (python tools/train_tiny.py)"))])
def test_report_in_chromium_without_graphviz(which, graph, tmp_path: Path, no_graphviz) -> None:
    """Headless Chromium, no ``dot`` on the PATH: no console message, the graph drawn (nodes, token order, target on
    top), a screenshot that is not blank, and a scripted click on a node highlights exactly its paths."""
    from PIL import Image, ImageStat

    graph = graph if which == "tiny" else demo_graph()
    page = write_report(graph, tmp_path / "report.html")
    text = page.read_text()
    assert not EXTERNAL.search(text), EXTERNAL.search(text)
    dom, console = load_in_chromium(page, tmp_path / "profile")
    assert console == []
    assert 'data-ready="1"' in dom                                   # the inline scripts ran to the end
    strip = dom[dom.index('class="tokens"'):dom.index("</div>", dom.index('class="tokens"'))]
    shown = re.findall(r'data-position="(\d+)"[^>]*>([^<]*)</span>', strip)
    assert [(int(p), html.unescape(t)) for p, t in shown] == list(enumerate(graph.graph["prompt_tokens"]))
    check_drawing(dom, graph)

    _, console = load_in_chromium(page, tmp_path / "profile", screenshot=tmp_path / "shot.png")
    assert console == []
    with Image.open(tmp_path / "shot.png") as shot:
        stat = ImageStat.Stat(shot.convert("L"))
        assert shot.size == (1400, 2400) and stat.stddev[0] > 10      # not one flat colour
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50                                      # text, tokens, heatmap, boxes

    # Click the strongest head (it has ancestors: tokens, and a descendant: the target).
    picked = max((n for n, d in graph.nodes(data=True) if d["kind"] == "head"), key=lambda n: abs(graph.nodes[n]["contribution"]))
    clicked = tmp_path / "clicked.html"
    click = f'document.querySelector(\'.node[data-id="{picked}"]\').dispatchEvent(new MouseEvent("click", {{bubbles: true}}));'
    clicked.write_text(text.replace("</body>", f"<script>{click}</script></body>"))
    dom, console = load_in_chromium(clicked, tmp_path / "profile")
    assert console == [] and f'data-picked="{picked}"' in dom
    drawn = check_drawing(dom, graph)
    visible = graph.subgraph(n for n, d in drawn.items() if "off" not in d["classes"])
    assert len(re.findall(r'<path class="edge[ "]', dom)) == min(visible.number_of_edges(), 600)         # every edge among them is drawn
    highlighted = {n for n, d in drawn.items() if "hi" in d["classes"]}
    assert highlighted == {picked} | nx.ancestors(visible, picked) | nx.descendants(visible, picked)
    assert "target" in highlighted and len(highlighted) < graph.number_of_nodes()


def test_attribution_html_for_jupyter() -> None:
    _, decomposed = tiny.compiled()
    attribution = decomposed.attribute(tiny.IDS, positions="all", targets="all")
    fragment = attribution_html(attribution)
    assert fragment.startswith('<div class="fxdepass">') and not EXTERNAL.search(fragment)
    for label, score in zip(attribution.labels, attribution.scores().tolist()):
        assert f'title="{html.escape(f"{label}: {score:+.6g}")}"' in fragment
    layers = attribution_html(decomposed.attribute(tiny.IDS, positions="all", targets="all", seed=fxdepass.heads(0), readout="layers"))
    assert "projection on the layers value" in layers and "L0H3" in layers


def heatmap_cells(page: str) -> list[list[float]]:
    """The heatmap's values as the page states them in its cell tooltips, bottom row first (as the API's rows)."""
    table = page[page.index('<table class="heat">'):page.index("</table>", page.index('<table class="heat">'))]
    rows = [[float(v) for v in re.findall(r"title=\"[^\"]*: ([-+][^\"]+)\">", row)] for row in table.split("<tr>")[2:]]
    return rows[::-1]


def test_the_pages_numbers_are_the_apis(graph) -> None:
    """Issue 19: the tokens × layers view reads each layer through the final norm's frozen scale, so its last row equals
    the contributions; the token chips, the heatmap and the stage rows are the numbers fxdepass.attribute and
    fxdepass.layer_lens give, to the printed digits."""
    _, decomposed = tiny.compiled()
    attribution = decomposed.attribute(tiny.IDS)
    scores = attribution.scores()[:-1].tolist()
    lens = fxdepass.layer_lens(decomposed, tiny.IDS)
    assert graph.graph["layer_scores"][-1] == pytest.approx(scores, rel=1e-9, abs=1e-12)
    assert [graph.nodes[f"tok{p}"]["contribution"] for p in range(len(scores))] == pytest.approx(scores, rel=1e-9, abs=1e-12)
    page = report_html(graph)
    assert heatmap_cells(page) == [[float(f"{v:+.6g}") for v in row] for row in lens.table()[:, :-1].tolist()]
    chips = [float(v) for v in re.findall(r"contributes ([-+][\d.e+-]+)", page)]
    assert chips == [float(f"{v:+.6g}") for v in scores]
    assert "last row is exactly the tokens&#x27; contributions" in page


def test_every_metric_is_explained_and_long_stage_tables_fold(graph) -> None:
    page = report_html(graph)
    for metric in ("explained fraction", "influence kept", "p"):
        assert f"<li><b>{metric}</b>: " in page
    assert "<details open><summary>5 stages, each adding up to" in page           # tokens + 2 × 2 layer stages
    long = graph.copy()
    long.graph["stages"] = graph.graph["stages"] * 13
    assert "<details><summary>65 stages" in report_html(long)


def test_a_seed_report_lists_rest_and_the_sum_and_true_activations(tmp_path: Path) -> None:
    """The heads report shows rest and that the heads plus rest add up to the target; a token's activation is its
    embedding's norm (docs/graph-format.md), not the norm of its whole logits component."""
    from fxdepass.graph import resolve_target, seed_activations, seed_graph

    model, decomposed = tiny.compiled()
    seed = fxdepass.heads(1)
    attribution = decomposed.attribute(tiny.IDS, seed=seed, positions="all", targets="all")
    target = resolve_target(decomposed, attribution.total[0], None)
    graph = seed_graph(attribution, seed, target, layers=2, activations=seed_activations(decomposed, tiny.IDS, seed))
    page = report_html(graph)
    scores = decomposed.attribute(tiny.IDS, seed=seed).scores()
    assert f'<td class="l">rest</td><td class="l">biases, …</td><td>{float(scores[-1]):+.5g}</td>' in page
    assert f"<th>{float(scores.sum()):+.6g}</th>" in page and f"{float(scores.sum()):+.6g}" == f"{graph.graph['value']:+.6g}"
    assert "components plus rest add up to the target" in page

    embeddings = model.get_input_embeddings()(tiny.IDS)[0].norm(dim=-1)
    tokens = seed_activations(decomposed, tiny.IDS, fxdepass.tokens())
    assert tokens.tolist() == pytest.approx(embeddings.tolist(), rel=1e-12)
