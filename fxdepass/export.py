"""Export attribution graphs (:mod:`fxdepass.graph`): DOT (pydot), GraphML (networkx) and circuit-tracer JSON.
Every file is written through :mod:`fxdepass.files` (no overwriting unless asked, no symbolic links), and every
string in it, whatever characters it holds, reads back exactly (:mod:`fxdepass.markup` Note [Text in files]).

docs/graph-format.md documents the node kinds, their attributes and how they map onto circuit-tracer's
fields (:data:`CIRCUIT_SCHEMA` is that mapping's JSON Schema).

>>> write_dot(graph, "out/graph.dot"); write_graphml(graph, "out/graph.graphml")       # doctest: +SKIP
>>> read_graphml("out/graph.graphml").nodes["target"]["label"]                          # doctest: +SKIP
"logit ' Paris'"
>>> write_circuit_json(graph, "out")      # out/<slug>.json and out/graph-metadata.json  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import xml.etree.ElementTree
from pathlib import Path
from typing import Any

import networkx as nx
import pydot

from .errors import InvalidInputError
from .files import check_output, open_output, output_directory, write_text
from .markup import escape_text, signed_colour, unescape_text

__all__ = ["to_pydot", "write_dot", "write_graphml", "read_graphml", "to_circuit_json", "write_circuit_json",
           "default_slug", "check_slug", "CIRCUIT_SCHEMA", "signed_colour", "escape_text", "unescape_text"]

#: JSON Schema of :func:`to_circuit_json`'s output (the fields circuit-tracer's front end reads)
CIRCUIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["slug", "scan", "prompt_tokens", "prompt", "node_threshold", "schema_version"],
            "properties": {
                "slug": {"type": "string"},
                "scan": {"type": "string"},
                "transcoder_list": {"type": "array", "items": {"type": "string"}},
                "prompt_tokens": {"type": "array", "items": {"type": "string"}},
                "prompt": {"type": "string"},
                "node_threshold": {"type": "number"},
                "schema_version": {"type": "integer"},
                "fxdepass": {"type": "object"},
            },
        },
        "qParams": {
            "type": "object",
            "required": ["pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"],
            "properties": {
                "pinnedIds": {"type": "array", "items": {"type": "string"}},
                "supernodes": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                "linkType": {"type": "string"},
                "clickedId": {"type": "string"},
                "sg_pos": {"type": "string"},
            },
        },
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp", "influence",
                             "activation", "token_prob", "is_target_logit"],
                "properties": {
                    "node_id": {"type": "string"},
                    "feature": {"type": "integer"},
                    "layer": {"type": "string"},
                    "ctx_idx": {"type": "integer", "minimum": 0},
                    "feature_type": {"enum": ["embedding", "cross layer transcoder", "logit"]},
                    "fxdepass_kind": {"type": "string"},
                    "jsNodeId": {"type": "string"},
                    "clerp": {"type": "string"},
                    "influence": {"type": "number"},
                    "activation": {"type": "number"},
                    "token_prob": {"type": "number"},
                    "is_target_logit": {"type": "boolean"},
                },
            },
        },
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["source", "target", "weight"],
                "properties": {"source": {"type": "string"}, "target": {"type": "string"}, "weight": {"type": "number"}},
            },
        },
    },
}

# Note [circuit-tracer node types]
# circuit-tracer's viewer knows the feature types "embedding", "logit", "cross layer transcoder" (an ordinary
# feature, drawn as a dot) and error types (any type containing "error": "mlp reconstruction error"), and it
# keys a node's hover state on "{layer}_{feature}_{ctx_idx}".  Our heads, MLP blocks and seed components are
# exact parts of the model, not errors, so they are all "cross layer transcoder"; tokens are "embedding", the
# target "logit".  A feature number must be a non-negative index unique within its layer: heads keep their
# index h, an MLP block is the number after the heads, an attention block the one after that (so no node
# id has the error nodes' -1).  Our own kind stays in ``fxdepass_kind``.

#: our node kinds → circuit-tracer ``feature_type``
_FEATURE_TYPES = {"token": "embedding", "target": "logit"}
_INTERNAL_TYPE = "cross layer transcoder"


def default_slug(graph: nx.DiGraph) -> str:
    """A slug naming the graph among others in one folder: the prompt's words and a short hash of the prompt and
    the target (the same prompt and target give the same slug, so re-running replaces its own entry).

    >>> default_slug(nx.DiGraph(prompt="The capital of France is", target="logit ' Paris'"))
    'the-capital-of-france-is-2b82fb'
    """
    prompt, target = str(graph.graph.get("prompt", "")), str(graph.graph.get("target", ""))
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-") or "graph"
    digest = hashlib.sha1(f"{prompt}\n{target}".encode()).hexdigest()[:6]
    return f"{words}-{digest}"


def _dot_text(text: str) -> str:
    """Text for a DOT label or tooltip: Graphviz shows its printable form (Note [Text in files]); the form's
    backslashes doubled again, since Graphviz reads \\n, \\N, … in a label as line breaks and names (pydot
    escapes the quotes)."""
    return escape_text(text).replace("\\", "\\\\")


def to_pydot(graph: nx.DiGraph, max_edges: int | None = None) -> pydot.Dot:
    """A layered DOT drawing: tokens at the bottom, one rank per stage, the target on top; edge width and
    colour by signed weight, node colour by signed contribution.  Invisible nodes ``rank{stage}`` chain the
    ranks.  ``max_edges`` draws only that many of the strongest edges (Graphviz slows down past a few hundred).

    >>> print(to_pydot(graph).to_string())                                              # doctest: +SKIP
    """
    drawn = sorted(graph.edges(data="weight"), key=lambda edge: -abs(edge[2]))[:max_edges]
    title = f"{graph.graph.get('target', 'target')} = {graph.graph.get('value', 0.0):.4g}"
    if len(drawn) < graph.number_of_edges():
        title += f" (the {len(drawn)} strongest of {graph.number_of_edges()} edges)"
    dot = pydot.Dot("attribution", graph_type="digraph", rankdir="BT", bgcolor="white", fontname="Helvetica",
                    label=_dot_text(title), labelloc="t")
    contributions = [abs(d["contribution"]) for n, d in graph.nodes(data=True) if d["kind"] != "target"]
    largest_node = max(contributions, default=0.0)
    largest_edge = max((abs(w) for *_, w in graph.edges(data="weight")), default=0.0)
    ranks: dict[int, pydot.Subgraph] = {}
    for node, data in sorted(graph.nodes(data=True), key=lambda item: (item[1]["stage"], item[1]["position"])):
        rank = ranks.setdefault(data["stage"], pydot.Subgraph(f"stage{data['stage']}", rank="same"))
        is_target = data["kind"] == "target"
        rank.add_node(pydot.Node(
            node, label=_dot_text(data["label"]) + f"\\n{data['contribution']:+.3g}",
            shape="doubleoctagon" if is_target else ("box" if data["kind"] == "token" else "ellipse"),
            style="filled", fillcolor="#ffe680" if is_target else signed_colour(data["contribution"], largest_node),
            tooltip=_dot_text(f"{data['label']}: contribution {data['contribution']:+.6g}, activation {data['activation']:.4g}"),
            fontname="Helvetica", fontsize=10))
    previous = None
    for stage, rank in sorted(ranks.items()):
        # An invisible chain through the ranks keeps each stage on its own level even where no edge joins them.
        rank.add_node(pydot.Node(f"rank{stage}", style="invis", shape="point", width=0, label=""))
        dot.add_subgraph(rank)
        if previous is not None:
            dot.add_edge(pydot.Edge(previous, f"rank{stage}", style="invis"))
        previous = f"rank{stage}"
    for source, target, weight in drawn:
        share = abs(weight) / largest_edge if largest_edge > 0 else 0.0
        dot.add_edge(pydot.Edge(source, target, penwidth=f"{0.5 + 5.5 * share:.2f}",
                                color=signed_colour(weight, largest_edge, floor=0.3), tooltip=f"{weight:+.6g}",
                                arrowsize=0.5))
    return dot


def write_dot(graph: nx.DiGraph, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write :func:`to_pydot`'s drawing to ``path`` (an existing file only with ``overwrite``; :mod:`fxdepass.files`)."""
    return write_text(path, to_pydot(graph).to_string(), overwrite=overwrite)


#: the graph attribute of a GraphML file naming the graph attributes stored as JSON text
_JSON_ATTRIBUTES = "fxdepass_json"


def _map_strings(graph: nx.DiGraph, convert: Any) -> nx.DiGraph:
    """A copy of ``graph`` with ``convert`` applied to its node names and to its nodes' and edges' string values."""
    copy = nx.relabel_nodes(graph, {n: convert(n) for n in graph if isinstance(n, str)}, copy=True)
    for data in [d for _, d in copy.nodes(data=True)] + [d for *_, d in copy.edges(data=True)]:
        data.update({k: convert(v) for k, v in data.items() if isinstance(v, str)})
    return copy


def write_graphml(graph: nx.DiGraph, path: str | Path, *, overwrite: bool = False) -> Path:
    """GraphML via networkx, which :func:`read_graphml` reads back exactly: strings in their printable form (Note
    [Text in files]), graph attributes that are lists or dicts as JSON text (named in the graph attribute
    ``fxdepass_json``).  An existing file is replaced only with ``overwrite`` (:mod:`fxdepass.files`).

    >>> json.loads(nx.read_graphml(write_graphml(graph, "g.graphml")).graph["stages"])     # doctest: +SKIP
    """
    copy = _map_strings(graph, escape_text)
    stored = [k for k, v in graph.graph.items() if not isinstance(v, (str, int, float, bool))]
    copy.graph = {k: json.dumps(v) if k in stored else escape_text(v) if isinstance(v, str) else v
                  for k, v in graph.graph.items()}
    copy.graph[_JSON_ATTRIBUTES] = json.dumps(stored)
    with open_output(path, "wb", overwrite=overwrite) as file:
        nx.write_graphml(copy, file)
    return Path(path)


def read_graphml(path: str | os.PathLike) -> nx.DiGraph:
    """The graph :func:`write_graphml` wrote to ``path``, every string and attribute as it was.

    >>> read_graphml(write_graphml(graph, "g.graphml")).graph["prompt_tokens"]          # doctest: +SKIP
    ['The', ' capital', ' of', ' France', ' is']
    """
    try:
        stored = nx.read_graphml(path)
        for default in ("node_default", "edge_default"):   # networkx's record of key defaults, which we never set
            stored.graph.pop(default, None)
        names = json.loads(stored.graph.pop(_JSON_ATTRIBUTES, "[]"))
        graph = _map_strings(stored, unescape_text)
        graph.graph = {k: json.loads(v) if k in names else unescape_text(v) if isinstance(v, str) else v
                       for k, v in stored.graph.items()}
    except (OSError, xml.etree.ElementTree.ParseError, nx.NetworkXError, json.JSONDecodeError, TypeError) as error:
        raise InvalidInputError(f"{path}: not a GraphML file fxdepass wrote ({error})") from None
    return graph


def _circuit_node(data: dict[str, Any], vocab_id: int, layers: int, length: int, probability: float,
                  heads: int) -> dict[str, Any]:
    """One node in circuit-tracer's fields (Note [circuit-tracer node types]; docs/graph-format.md has the table)."""
    kind, position = data["kind"], int(data["position"])
    if kind == "token":
        feature, layer, node_id, js_id = position, "E", f"E_{vocab_id}_{position}", f"E_{vocab_id}-{position}"
        clerp = data["label"]
    elif kind == "target":
        feature, layer = data["index"], str(layers + 1)
        node_id, js_id = f"{layer}_{feature}_{position}", f"L_{feature}-{position}"
        clerp = f'Output "{data["token"]}" (p={probability:.3f})'
    else:
        feature = {"mlp": heads, "attention": heads + 1}.get(kind, data["index"])
        layer = "E" if kind == "group" else str(data["layer"])
        node_id, js_id = f"{layer}_{feature}_{position}", f"{layer}_{feature}-{length - 1 - position}"
        clerp = data["label"]
    return {
        "node_id": node_id, "feature": int(feature), "layer": layer, "ctx_idx": position,
        "reverse_ctx_idx": length - 1 - position, "feature_type": _FEATURE_TYPES.get(kind, _INTERNAL_TYPE),
        "fxdepass_kind": kind, "jsNodeId": js_id, "clerp": clerp,
        "influence": float(data["influence"]), "activation": float(data["activation"]),
        "token_prob": probability if kind == "target" else 0.0, "is_target_logit": kind == "target",
    }


def to_circuit_json(graph: nx.DiGraph, *, slug: str | None = None) -> dict[str, Any]:
    """The graph in circuit-tracer's JSON schema (:data:`CIRCUIT_SCHEMA`; mapping in docs/graph-format.md);
    ``slug`` defaults to :func:`default_slug`.

    >>> sorted(to_circuit_json(graph))                                                  # doctest: +SKIP
    ['links', 'metadata', 'nodes', 'qParams']
    """
    info = graph.graph
    tokens = list(info.get("prompt_tokens", []))
    layers = max([d["layer"] for _, d in graph.nodes(data=True) if d["kind"] == "target"], default=0)
    heads = 1 + max([d["index"] for _, d in graph.nodes(data=True) if d["kind"] == "head"], default=-1)
    probability = float(info.get("probability", 1.0))
    vocab_ids = list(info.get("input_ids", []))
    ids = {n: _circuit_node(d, vocab_ids[d["position"]] if d["kind"] == "token" else -1, layers, len(tokens),
                            probability, info.get("heads", heads)) for n, d in graph.nodes(data=True)}
    extras = {k: v for k, v in info.items() if k not in ("prompt_tokens", "prompt")}
    return {
        "metadata": {"slug": slug or default_slug(graph), "scan": "fxdepass", "transcoder_list": [], "prompt_tokens": tokens,
                     "prompt": info.get("prompt", "".join(tokens)), "node_threshold": float(info.get("node_threshold", 1.0)),
                     "schema_version": 1, "fxdepass": extras},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": list(ids.values()),
        "links": [{"source": ids[s]["node_id"], "target": ids[t]["node_id"], "weight": float(w)}
                  for s, t, w in graph.edges(data="weight")],
    }


def write_circuit_json(graph: nx.DiGraph, directory: str | Path, *, slug: str | None = None,
                       overwrite: bool = False) -> Path:
    """Write :func:`to_circuit_json` to ``directory/<slug>.json`` and list it in ``directory/graph-metadata.json``
    (``{"graphs": [metadata, …]}``, where circuit-tracer's viewer finds a folder's graphs): an entry with the same
    slug is replaced, every other one kept.  ``slug`` defaults to :func:`default_slug`.  An existing
    ``<slug>.json`` is replaced only with ``overwrite``; the listing is updated in place (:mod:`fxdepass.files`).

    >>> write_circuit_json(graph, "out", slug="capital")                                # doctest: +SKIP
    PosixPath('out/capital.json')
    """
    data = to_circuit_json(graph, slug=slug)
    slug = check_slug(data["metadata"]["slug"])
    directory = output_directory(directory)
    path, listing = check_output(directory / f"{slug}.json", overwrite=overwrite), directory / METADATA_FILE
    graphs = _listed_graphs(check_output(listing, overwrite=True))
    entry = {k: v for k, v in data["metadata"].items() if k != "fxdepass"}
    graphs = [g for g in graphs if g.get("slug") != slug] + [entry]
    write_text(path, json.dumps(data, indent=1), overwrite=overwrite)
    write_text(listing, json.dumps({"graphs": graphs}, indent=1), overwrite=True)
    return path


def check_slug(slug: str) -> str:
    """``slug`` if it can name a file ``<slug>.json`` inside the output folder, else :class:`InvalidInputError`.

    >>> check_slug("capital")
    'capital'
    """
    if not re.fullmatch(r"[\w.-]+", slug) or slug.startswith("."):
        raise InvalidInputError(f"slug {slug!r}: use letters, digits, '-', '_' and '.' (it names the file {slug}.json)")
    return slug


#: the listing of a folder's graphs that circuit-tracer's viewer reads first
METADATA_FILE = "graph-metadata.json"


def _listed_graphs(listing: Path) -> list[dict[str, Any]]:
    """The entries of an existing listing (none when it is missing)."""
    if not listing.exists():
        return []
    try:
        graphs = json.loads(listing.read_text(encoding="utf-8")).get("graphs", [])
        if isinstance(graphs, list) and all(isinstance(g, dict) for g in graphs):
            return graphs
    except (ValueError, AttributeError):
        pass
    raise InvalidInputError(f'{listing} is not a circuit-tracer listing ({{"graphs": [...]}}): move it away or write '
                            "the graph to another folder")
