"""The attribution graph drawn by Python alone: a layered layout as inline SVG with a small inline script.

No Graphviz, no network.  :func:`graph_figure` places the prompt's tokens along the bottom in prompt order
(x is the token position), one row per stage that has a drawn node (a layer's attention heads, then its
MLP block, so rows rise with depth), and the target on top above the last position.  It draws the
``max_nodes`` most influential nodes of the (already pruned) graph; the page's control shows the
``shown`` strongest of them by default and reveals the rest on request.  Hover shows a node's label,
contribution and share of the target; a click highlights every path through it (its ancestors and
descendants among the drawn nodes).

>>> html_fragment = graph_figure(build_graph(decomposed, ids))                  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

import networkx as nx

from .markup import _e, signed_colour

__all__ = ["graph_layout", "graph_figure"]

#: pixels: a node box, the gap between boxes of one cell, between rows, and the margin for row labels
_BOX_WIDTH, _BOX_HEIGHT, _GAP, _ROW, _LEFT = 44, 20, 4, 46, 110


def _drawn_nodes(graph: nx.DiGraph, max_nodes: int) -> list[str]:
    """Tokens, the target and the ``max_nodes`` internal nodes of largest |contribution|, strongest first."""
    internal = [n for n, d in graph.nodes(data=True) if d["kind"] not in ("token", "target")]
    internal.sort(key=lambda n: -abs(graph.nodes[n]["contribution"]))
    fixed = [n for n, d in graph.nodes(data=True) if d["kind"] in ("token", "target")]
    return fixed + internal[:max_nodes]


def _short(data: dict[str, Any]) -> str:
    """The text inside a node's box."""
    if data["kind"] == "token":
        return data["token"].strip() or repr(data["token"])
    if data["kind"] == "head":
        return f"H{data['index']}"
    if data["kind"] == "target":
        return data["token"].strip() or data["token"] or "target"
    return {"mlp": "MLP", "attention": "attn", "neuron": f"n{data['index']}"}.get(data["kind"], str(data["index"]))


def _row_label(data: dict[str, Any]) -> str:
    if data["kind"] == "token":
        return "tokens"
    if data["kind"] == "target":
        return "target"
    kind = {"head": "attention", "mlp": "MLP"}.get(data["kind"], data["kind"])
    return f"layer {data['layer']} {kind}"


def graph_layout(graph: nx.DiGraph, nodes: list[str]) -> dict[str, Any]:
    """Coordinates of ``nodes``: ``{"x": {node: px}, "y": {node: px}, "rows": [(label, y)], "width", "height"}``.

    Columns are token positions (left to right in prompt order), as wide as their most crowded cell; rows
    are stages with a node (bottom: tokens, top: the target), so depth increases upwards.

    >>> layout = graph_layout(graph, list(graph))                                   # doctest: +SKIP
    >>> layout["y"]["target"] < layout["y"]["tok0"]                                 # doctest: +SKIP
    True
    """
    length = len(graph.graph.get("prompt_tokens", [])) or 1 + max(graph.nodes[n]["position"] for n in nodes)
    cells: dict[tuple[int, int], list[str]] = {}
    for node in nodes:
        data = graph.nodes[node]
        cells.setdefault((data["stage"], data["position"]), []).append(node)
    for members in cells.values():                                   # heads in index order inside a cell
        members.sort(key=lambda n: (graph.nodes[n]["index"], n))
    slots = [max([len(m) for (_, p), m in cells.items() if p == position] or [1]) for position in range(length)]
    token_width = [max(_BOX_WIDTH, 8 * len(_short(graph.nodes[n])) + 10) for n in nodes if graph.nodes[n]["kind"] == "token"]
    widths = [max(count * (_BOX_WIDTH + _GAP), max(token_width, default=_BOX_WIDTH) + _GAP) for count in slots]
    starts = [_LEFT + sum(widths[:p]) for p in range(length)]
    stages = sorted({stage for stage, _ in cells})
    height = _ROW * len(stages) + _ROW
    row_y = {stage: height - _ROW * (i + 1) for i, stage in enumerate(stages)}
    x, y = {}, {}
    for (stage, position), members in cells.items():
        used = len(members) * (_BOX_WIDTH + _GAP) - _GAP
        left = starts[position] + (widths[position] - used) / 2
        for i, node in enumerate(members):
            x[node] = left + i * (_BOX_WIDTH + _GAP) + _BOX_WIDTH / 2
            y[node] = row_y[stage]
    rows = []
    for stage in stages:
        member = next(n for (s, _), m in cells.items() if s == stage for n in m)
        rows.append((_row_label(graph.nodes[member]), row_y[stage]))
    return {"x": x, "y": y, "rows": rows, "width": starts[-1] + widths[-1] + _GAP, "height": height,
            "columns": [(starts[p] + widths[p] / 2) for p in range(length)]}


def graph_figure(graph: nx.DiGraph, *, max_nodes: int = 150, shown: int = 30, max_edges: int = 600) -> str:
    """An HTML fragment: the control, the SVG drawing and its note (the script is :data:`FIGURE_SCRIPT`).

    ``max_nodes`` internal nodes are drawn, ``shown`` of them visible at first (the control shows more);
    at most ``max_edges`` of the strongest edges among drawn nodes are drawn.

    >>> "<svg" in graph_figure(graph, shown=10)                                    # doctest: +SKIP
    True
    """
    nodes = _drawn_nodes(graph, max_nodes)
    layout = graph_layout(graph, nodes)
    value = float(graph.graph.get("value", 0.0))
    internal = [n for n in nodes if graph.nodes[n]["kind"] not in ("token", "target")]
    rank = {n: 0 for n in nodes}
    rank.update({n: i + 1 for i, n in enumerate(internal)})
    drawn = set(nodes)
    edges = [(s, t, w) for s, t, w in graph.edges(data="weight") if s in drawn and t in drawn]
    edges.sort(key=lambda edge: -abs(edge[2]))
    edges = edges[:max_edges]
    largest_edge = max((abs(w) for *_, w in edges), default=0.0)
    largest_node = max((abs(graph.nodes[n]["contribution"]) for n in internal + [n for n in nodes
                        if graph.nodes[n]["kind"] == "token"]), default=0.0)
    x, y = layout["x"], layout["y"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="fxgraph" width="{layout["width"]:.0f}" '
             f'height="{layout["height"]:.0f}" viewBox="0 0 {layout["width"]:.0f} {layout["height"]:.0f}" role="img" '
             f'aria-label="attribution graph of {_e(graph.graph.get("target", "the target"))}">']
    for label, row in layout["rows"]:
        parts.append(f'<text class="row" x="4" y="{row + 4:.0f}">{_e(label)}</text>')
    parts.append('<g class="edges">')
    for source, target, weight in sorted(edges, key=lambda edge: abs(edge[2])):   # strongest drawn last, on top
        share = abs(weight) / largest_edge if largest_edge > 0 else 0.0
        x0, y0, x1, y1 = x[source], y[source] - _BOX_HEIGHT / 2, x[target], y[target] + _BOX_HEIGHT / 2
        middle = (y0 + y1) / 2
        parts.append(
            f'<path class="edge" data-source="{_e(source)}" data-target="{_e(target)}" '
            f'data-rank="{max(rank[source], rank[target])}" data-weight="{weight:.6g}" '
            f'd="M{x0:.1f},{y0:.1f} C{x0:.1f},{middle:.1f} {x1:.1f},{middle:.1f} {x1:.1f},{y1:.1f}" '
            f'stroke="{signed_colour(weight, largest_edge, floor=0.3)}" stroke-width="{0.6 + 4.4 * share:.2f}" fill="none"/>')
    parts.append('</g><g class="nodes">')
    for node in nodes:
        data = graph.nodes[node]
        is_target = data["kind"] == "target"
        contribution = float(data["contribution"])
        width = _BOX_WIDTH if data["kind"] != "token" else max(_BOX_WIDTH, 8 * len(_short(data)) + 10)
        fill = "#ffe680" if is_target else signed_colour(contribution, largest_node)
        share = f"{100 * contribution / value:+.1f}%" if value and not is_target else ("100%" if is_target else "")
        parts.append(
            f'<g class="node" data-id="{_e(node)}" data-kind="{data["kind"]}" data-rank="{rank[node]}" '
            f'data-position="{data["position"]}" data-label="{_e(data["label"])}" data-contribution="{contribution:+.6g}" '
            f'data-share="{share}" transform="translate({x[node]:.1f},{y[node]:.1f})">'
            f'<rect x="{-width / 2:.0f}" y="{-_BOX_HEIGHT / 2}" width="{width:.0f}" height="{_BOX_HEIGHT}" rx="4" '
            f'fill="{fill}" stroke="#555"/><text y="4">{_e(_short(data)[:14])}</text></g>')
    parts.append("</g></svg>")
    total = sum(1 for _, d in graph.nodes(data=True) if d["kind"] not in ("token", "target"))
    shown = min(shown, len(internal))
    control = (f'<div class="fxcontrol"><label>nodes shown (most influential first): '
               f'<input type="range" id="fxshown" min="0" max="{len(internal)}" value="{shown}" step="1"> '
               f'<output id="fxcount">{shown}</output> of {len(internal)}</label> '
               f'<span id="fxhidden" data-total="{total}"></span></div>')
    note = (f"The pruned graph has {total} nodes besides the tokens and the target; the {len(internal)} most influential "
            f"(by |contribution|) are drawn, {shown} visible at first. Move the slider to show more (or fewer); the "
            "exports (.dot, .graphml, .json) hold every node. Hover a node for its values, click it to highlight its "
            "paths (click the background to clear). Tokens sit at the bottom in prompt order, layers rise upwards, the "
            "target is on top; blue pushes the target up, red down, edge width is |weight|.")
    return (f'{control}<div class="graph" id="fxgraph">{"".join(parts)}<div class="fxtip" id="fxtip" hidden></div></div>'
            f'<p class="note">{_e(note)}</p>')


#: the figure's style, added to the page's
FIGURE_STYLE = """
.fxdepass .fxgraph text{font-size:10px;text-anchor:middle;font-family:ui-monospace,Menlo,Consolas,monospace;pointer-events:none}
.fxdepass .fxgraph text.row{text-anchor:start;fill:#666}
.fxdepass .fxgraph .node{cursor:pointer}.fxdepass .fxgraph .edge{opacity:.75}
.fxdepass .fxgraph .off{display:none}.fxdepass .fxgraph.picked .dim{opacity:.08}
.fxdepass .fxgraph .hi rect{stroke:#000;stroke-width:2.5}.fxdepass .fxgraph path.hi{opacity:1}
.fxdepass .graph{position:relative}.fxdepass .fxcontrol{margin:.3em 0}
.fxdepass .fxtip{position:absolute;background:#fff;border:1px solid #999;padding:3px 6px;font-size:.8em;pointer-events:none;
white-space:pre;box-shadow:0 1px 4px rgba(0,0,0,.2)}
"""

#: hover details, click to highlight paths, the slider; the page is readable (all shown) without it
FIGURE_SCRIPT = """
(function () {
  "use strict";
  var svg = document.querySelector("svg.fxgraph");
  if (!svg) { return; }
  var nodes = Array.prototype.slice.call(svg.querySelectorAll(".node"));
  var edges = Array.prototype.slice.call(svg.querySelectorAll(".edge"));
  var up = {}, down = {};
  edges.forEach(function (e) {
    (down[e.dataset.source] = down[e.dataset.source] || []).push(e);
    (up[e.dataset.target] = up[e.dataset.target] || []).push(e);
  });
  var slider = document.getElementById("fxshown"), count = document.getElementById("fxcount");
  var hidden = document.getElementById("fxhidden"), tip = document.getElementById("fxtip");
  function visible(el) { return !el.classList.contains("off"); }
  function show() {
    var limit = +slider.value;
    nodes.forEach(function (n) { n.classList.toggle("off", +n.dataset.rank > limit); });
    edges.forEach(function (e) { e.classList.toggle("off", +e.dataset.rank > limit); });
    count.textContent = limit;
    var total = +hidden.dataset.total;
    hidden.textContent = "(" + (total - limit) + " of the pruned graph's " + total + " nodes hidden)";
  }
  function walk(start, links, end, seen) {
    var stack = [start];
    while (stack.length) {
      var id = stack.pop();
      (links[id] || []).forEach(function (e) {
        if (!visible(e)) { return; }
        e.classList.add("hi");
        var next = e.dataset[end];
        if (!seen[next]) { seen[next] = true; stack.push(next); }
      });
    }
  }
  function pick(node) {
    nodes.concat(edges).forEach(function (el) { el.classList.remove("hi"); el.classList.add("dim"); });
    var seen = {};
    seen[node.dataset.id] = true;
    walk(node.dataset.id, up, "source", seen);
    walk(node.dataset.id, down, "target", seen);
    nodes.forEach(function (n) { if (seen[n.dataset.id]) { n.classList.add("hi"); } });
    svg.querySelectorAll(".hi").forEach(function (el) { el.classList.remove("dim"); });
    svg.classList.add("picked");
    svg.dataset.picked = node.dataset.id;
  }
  function clear() {
    nodes.concat(edges).forEach(function (el) { el.classList.remove("hi", "dim"); });
    svg.classList.remove("picked");
    delete svg.dataset.picked;
  }
  nodes.forEach(function (n) {
    n.addEventListener("click", function (event) { event.stopPropagation(); pick(n); });
    n.addEventListener("mouseenter", function () {
      var box = svg.parentNode.getBoundingClientRect(), at = n.getBoundingClientRect();
      tip.textContent = n.dataset.label + "\\ncontribution " + n.dataset.contribution +
        (n.dataset.share ? "\\nshare of the target " + n.dataset.share : "");
      tip.style.left = (at.right - box.left + svg.parentNode.scrollLeft + 6) + "px";
      tip.style.top = (at.top - box.top + svg.parentNode.scrollTop) + "px";
      tip.hidden = false;
    });
    n.addEventListener("mouseleave", function () { tip.hidden = true; });
  });
  svg.addEventListener("click", clear);
  slider.addEventListener("input", show);
  show();
  svg.dataset.ready = "1";
})();
"""
