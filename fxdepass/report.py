"""Self-contained HTML reports of attribution graphs and attributions (no network: inline CSS, JS and SVG).

:func:`report_html` shows the prompt's tokens coloured by their signed contribution to the target
(tooltips with the values), a heatmap of tokens × layers (from the ``"layers"`` readout; docs/graph-format.md),
the strongest nodes, the stage budget and the graph itself, laid out and drawn by :mod:`fxdepass.drawing`
(inline SVG and script: no Graphviz needed).  Graphviz is an export: :func:`write_report` writes the DOT file
beside the page, and the SVG that ``dot`` draws of it when ``dot`` is installed.  The compact fragment Jupyter
shows for one attribution is :func:`fxdepass.results.attribution_html`; both share :mod:`fxdepass.markup`.

>>> write_report(build_graph(decomposed, ids), "out/report.html")                       # doctest: +SKIP
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import networkx as nx

from .drawing import FIGURE_SCRIPT, FIGURE_STYLE, graph_figure
from .export import signed_colour, to_pydot, write_dot
from .markup import _STYLE, _chip, _e, _ink
from .files import check_output, write_text

__all__ = ["report_html", "write_report", "report_paths", "render_svg"]

# Hovering a token marks its heatmap column and vice versa; the page is complete without it.
_SCRIPT = """
(function () {
  "use strict";
  function mark(position, on) {
    document.querySelectorAll('[data-position="' + position + '"]').forEach(function (el) {
      el.classList.toggle("on", on);
    });
  }
  document.querySelectorAll("[data-position]").forEach(function (el) {
    el.addEventListener("mouseenter", function () { mark(el.dataset.position, true); });
    el.addEventListener("mouseleave", function () { mark(el.dataset.position, false); });
  });
  document.body.dataset.ready = "1";
})();
"""


def _token_strip(graph: nx.DiGraph) -> str:
    tokens = graph.graph["prompt_tokens"]
    by_position = {d["position"]: d["contribution"] for _, d in graph.nodes(data=True) if d["kind"] == "token"}
    largest = max((abs(v) for v in by_position.values()), default=0.0)
    value = graph.graph["value"]
    chips = []
    for position, text in enumerate(tokens):
        score = by_position.get(position)
        if score is None:
            tip = f"position {position}: {text!r}"
        else:
            share = f" ({100 * score / value:+.1f}% of the target)" if value else ""
            tip = f"position {position}: {text!r} contributes {score:+.6g}{share}"
        chips.append(_chip(text, score, largest, tip, position))
    rest = graph.graph["stages"][0]["rest"] if "stages" in graph.graph else graph.graph["rest"]
    note = ("Blue tokens push the target up, red ones push it down; hover for values. The token contributions "
            f"plus rest ({rest:+.4g}) add up to the target's value.")
    if not by_position:
        note = "This attribution's components are not tokens: the prompt is shown uncoloured."
    return f'<div class="tokens">{"".join(chips)}</div><p class="note">{_e(note)}</p>'


def _heatmap(graph: nx.DiGraph) -> str:
    scores: list[list[float]] = graph.graph["layer_scores"]
    labels: list[str] = graph.graph["layer_labels"]
    tokens: list[str] = graph.graph["prompt_tokens"]
    largest = max((abs(v) for row in scores for v in row), default=0.0)
    digits = min(max(2 - math.floor(math.log10(largest)), 0), 4) if largest > 0 else 2   # about 3 significant digits
    head = "".join(f'<th data-position="{p}" title="{_e(t)}">{_e(t)}</th>' for p, t in enumerate(tokens))
    rows = []
    for label, row in reversed(list(zip(labels, scores))):                   # last layer on top, like the graph
        cells = "".join(
            f'<td data-position="{p}" style="background:{signed_colour(v, largest)};color:{_ink(signed_colour(v, largest))}" '
            f'title="{_e(f"{label}, position {p} {tokens[p]!r}: {v:+.6g}")}">{v:+.{digits}f}</td>' for p, v in enumerate(row))
        rows.append(f'<tr><th class="l">{_e(label)}</th>{cells}</tr>')
    return (f'<table class="heat"><tr><th class="l">layer \\ token</th>{head}</tr>{"".join(rows)}</table>'
            "<p class=\"note\">Each cell: that token's DePass component of the residual stream after the layer, "
            f"{_e(_heatmap_meaning(graph))}.</p>")


def _heatmap_meaning(graph: nx.DiGraph) -> str:
    if graph.graph.get("layer_meaning") == "lens":
        return ("read as the last layer's output is read: through the final norm with its real (frozen) scale and the "
                "target's unembedding row (fxdepass.layer_lens). Every row is in logit units, and the last row is "
                "exactly the tokens' contributions above")
    return "averaged over positions and projected on the direction of the target embedding"


def _node_table(graph: nx.DiGraph, count: int = 15) -> str:
    nodes = [d for _, d in graph.nodes(data=True) if d["kind"] != "target"]
    nodes.sort(key=lambda d: -abs(d["contribution"]))
    rows = "".join(
        f'<tr><td class="l">{_e(d["label"])}</td><td class="l">{_e(d["kind"])}</td><td>{d["contribution"]:+.5g}</td>'
        f'<td>{d["activation"]:.4g}</td></tr>' for d in nodes[:count])
    value = graph.graph["value"]
    if "rest" in graph.graph:                 # one pass: its components and rest add up to the target
        others = sum(d["contribution"] for d in nodes[count:])
        if len(nodes) > count:
            rows += f'<tr><td class="l">{len(nodes) - count} more</td><td></td><td>{others:+.5g}</td><td></td></tr>'
        rows += (f'<tr><td class="l">rest</td><td class="l">biases, …</td><td>{graph.graph["rest"]:+.5g}</td><td></td></tr>'
                 f'<tr><th class="l">sum</th><th></th><th>{value:+.6g}</th><th></th></tr>')
        note = (f"The {len(nodes)} components plus rest add up to the target's value, {value:+.6g}. ")
    else:
        note = ("Nodes of different stages are not meant to be added: each stage's nodes plus its rest add up to the target "
                "(the table below). ")
    note += ("Contribution: the node's exact DePass share of the target. Activation: the norm of the node's output at "
             "its position (a token's: its embedding).")
    return ('<table><tr><th class="l">node</th><th class="l">kind</th><th>contribution</th><th>activation</th></tr>'
            f'{rows}</table><p class="note">{_e(note)}</p>')


def _stage_table(graph: nx.DiGraph) -> str:
    stages = graph.graph["stages"]
    rows = "".join(
        f'<tr><td class="l">{_e(s["stage"])}</td><td>{s["kept"]:+.5g}</td><td>{s["pruned"]:+.5g}</td><td>{s["rest"]:+.5g}</td>'
        f'<td>{s["kept"] + s["pruned"] + s["rest"]:+.6g}</td></tr>' for s in stages)
    largest = max(stages, key=lambda s: abs(s["pruned"]))
    summary = (f"{len(stages)} stages, each adding up to {graph.graph['value']:+.6g}; the most pruned: "
               f"{largest['stage']} ({largest['pruned']:+.4g})")
    return (f'<details{" open" if len(stages) <= 8 else ""}><summary>{_e(summary)}</summary>'
            '<table><tr><th class="l">stage</th><th>kept nodes</th><th>pruned nodes</th><th>rest</th><th>sum</th></tr>'
            f'{rows}</table></details><p class="note">Every stage splits the same target value: its kept nodes\' edges into '
            "the target, what pruning removed, and rest (biases, and for a layer the residual stream entering it).</p>")


def render_svg(graph: nx.DiGraph, *, max_edges: int = 400, timeout: float = 60.0) -> tuple[str | None, str]:
    """(the graph drawn by Graphviz as SVG text, a note for the reader): no SVG when ``dot`` is missing or
    fails; at most ``max_edges`` of the strongest edges are drawn.

    >>> svg, note = render_svg(graph)                                                   # doctest: +SKIP
    """
    dot = shutil.which("dot")
    if dot is None:
        return None, ("Graphviz (<code>dot</code>) is not installed, so the graph is not drawn here: install it "
                      "(<code>apt-get install graphviz</code>, <code>brew install graphviz</code>).")
    drawing = to_pydot(graph, max_edges=max_edges).to_string().encode()
    try:
        result = subprocess.run([dot, "-Tsvg"], input=drawing, capture_output=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None, f"Graphviz (<code>dot</code>) did not finish drawing within {timeout:.0f} s."
    except subprocess.CalledProcessError as error:
        return None, f"Graphviz (<code>dot</code>) failed: {_e(error.stderr.decode(errors='replace').strip()[:300])}"
    svg = result.stdout.decode("utf-8")
    svg = re.sub(r"<!--.*?-->", "", svg[svg.index("<svg"):], flags=re.S)      # no XML prolog, DOCTYPE or comments
    shown = min(max_edges, graph.number_of_edges())
    note = f"The {shown} strongest of {graph.number_of_edges()} edges are drawn." if shown < graph.number_of_edges() else ""
    return svg, note


def _graph_section(graph: nx.DiGraph, exports: list[str]) -> str:
    files = ", ".join(f"<code>{_e(name)}</code>" for name in exports)
    where = f'<p class="note">Beside this page: {files} (Graphviz\'s drawing of the graph: <code>dot -Tsvg</code>).</p>' if files else ""
    return graph_figure(graph) + where


#: one line per metric of the summary, shown under it
_METRICS = {
    "explained fraction": "on average over the stages, the share of the target that the kept graph accounts for "
                          "(1 − pruned / target per stage; above 1 when pruned nodes pull against the target)",
    "influence kept": "the kept heads' and MLP blocks' share of Σ|contribution| over all of them",
    "p": "the target token's softmax probability at the last position",
}


def _summary(graph: nx.DiGraph) -> str:
    info = graph.graph
    parts = [f"model {_e(info.get('model', ''))}", f"target {_e(info['target'])} = {info['value']:+.6g}"]
    shown = []
    if info.get("readout") == "logits":
        parts.append(f"p = {info.get('probability', 0.0):.3f}")
        shown.append("p")
    if "stages" in info:
        parts.append(f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges after pruning "
                     f"(node threshold {info['node_threshold']}, edge threshold {info['edge_threshold']})")
        parts.append(f"explained fraction {info['explained_fraction']:.3f}, influence kept {info['influence_fraction']:.3f}")
        shown += ["explained fraction", "influence kept"]
    lines = "".join(f"<li><b>{_e(name)}</b>: {_e(_METRICS[name])}</li>" for name in shown)
    return f'<p class="meta">{" · ".join(parts)}</p>' + (f'<ul class="note">{lines}</ul>' if lines else "")


def report_html(graph: nx.DiGraph, *, exports: list[str] | None = None, title: str = "fxdepass attribution") -> str:
    """The full report page for a graph from :func:`fxdepass.graph.build_graph` or :func:`~fxdepass.graph.seed_graph`.

    ``exports`` names the files written beside the page (the DOT file, Graphviz's SVG) for the reader.

    >>> page = report_html(graph, exports=["report.dot"])                               # doctest: +SKIP
    """
    sections = [f"<h1>{_e(title)}</h1>", _summary(graph),
                f"<p class=\"meta\">prompt: <code>{_e(graph.graph.get('prompt', ''))}</code></p>",
                f"<h2>Tokens, coloured by contribution to {_e(graph.graph['target'])}</h2>", _token_strip(graph)]
    if graph.graph.get("layer_scores"):
        sections += ["<h2>Tokens × layers</h2>", _heatmap(graph)]
    sections += ["<h2>Strongest nodes</h2>", _node_table(graph)]
    if "stages" in graph.graph:
        sections += ["<h2>Where the target's value goes, stage by stage</h2>", _stage_table(graph)]
    sections += ["<h2>Attribution graph</h2>", _graph_section(graph, list(exports or [])),
                 '<p class="note">Every number is an exact DePass component (docs/graph-format.md).</p>']
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}: {_e(graph.graph['target'])}</title><style>{_STYLE}{FIGURE_STYLE}</style></head>"
            f'<body class="fxdepass">{"".join(sections)}<script>{_SCRIPT}</script><script>{FIGURE_SCRIPT}</script></body></html>\n')


def report_paths(path: str | Path) -> list[Path]:
    """The files :func:`write_report` may write for ``path``: the page, its DOT file and Graphviz's drawing.

    >>> report_paths("out/report.html")                                                 # doctest: +SKIP
    [PosixPath('out/report.html'), PosixPath('out/report.dot'), PosixPath('out/report.svg')]
    """
    path = Path(path)
    return [path, path.with_suffix(".dot"), path.with_suffix(".svg")]


def write_report(graph: nx.DiGraph, path: str | Path, *, title: str = "fxdepass attribution",
                 overwrite: bool = False) -> Path:
    """Write the report to ``path``, the graph's DOT file beside it (``path`` with suffix ``.dot``) and, when
    Graphviz's ``dot`` is installed and finishes, its drawing (suffix ``.svg``).  The page needs neither.
    Existing files are replaced only with ``overwrite`` (:mod:`fxdepass.files`), and all three are checked
    before the first is written.

    >>> write_report(graph, "out/report.html")                                          # doctest: +SKIP
    PosixPath('out/report.html')
    """
    path, dot_path, svg_path = (check_output(p, overwrite=overwrite) for p in report_paths(path))
    exports = [write_dot(graph, dot_path, overwrite=overwrite).name]
    svg, _ = render_svg(graph)
    if svg is not None:
        exports.append(write_text(svg_path, svg, overwrite=overwrite).name)
    write_text(path, report_html(graph, exports=exports, title=title), overwrite=overwrite)
    return path
