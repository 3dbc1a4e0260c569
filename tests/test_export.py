"""Exports (issue 5): DOT parses back with pydot, GraphML reads back with networkx, circuit-tracer JSON validates
against the documented schema."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import networkx as nx
import pydot
import pytest

import fxdepass
import tiny
from fxdepass.export import CIRCUIT_SCHEMA, to_circuit_json, write_circuit_json, write_dot, write_graphml
from fxdepass.graph import build_graph, resolve_target, seed_activations, seed_graph


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    _, decomposed = tiny.compiled()
    return build_graph(decomposed, tiny.IDS)


@pytest.fixture(scope="module")
def neuron_graph() -> nx.DiGraph:
    _, decomposed = tiny.compiled()
    seed = fxdepass.neurons(0, group_size=8)
    attribution = decomposed.attribute(tiny.IDS, positions="all", targets="all", seed=seed)
    target = resolve_target(decomposed, attribution.total[0], None)
    return seed_graph(attribution, seed, target, layers=2, tokenizer=decomposed.tokenizer,
                      activations=seed_activations(decomposed, tiny.IDS, seed))


_TYPES = {"object": dict, "array": list, "string": str, "number": (int, float), "integer": int, "boolean": bool}


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """The JSON Schema subset :data:`CIRCUIT_SCHEMA` uses (type, enum, required, properties, items, minimum)."""
    kind = schema.get("type")
    if kind is not None and (not isinstance(value, _TYPES[kind]) or (kind in ("number", "integer") and isinstance(value, bool))):
        return [f"{where}: expected {kind}, got {type(value).__name__}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} < {schema['minimum']}")
    errors += [f"{where}: missing {key!r}" for key in schema.get("required", []) if key not in value]
    for key, sub in schema.get("properties", {}).items():
        if isinstance(value, dict) and key in value:
            errors += validate(value[key], sub, f"{where}.{key}")
    if "items" in schema:
        for index, item in enumerate(value):
            errors += validate(item, schema["items"], f"{where}[{index}]")
    return errors


def test_validator_catches_schema_violations(graph) -> None:
    data = to_circuit_json(graph)
    assert validate(data, CIRCUIT_SCHEMA) == []
    broken = json.loads(json.dumps(data))
    del broken["links"]
    broken["nodes"][0]["ctx_idx"] = "0"
    broken["nodes"][1]["feature_type"] = "transcoder"
    assert len(validate(broken, CIRCUIT_SCHEMA)) == 3


def _dot_nodes(dot: pydot.Dot) -> dict[str, dict[str, str]]:
    nodes = {}
    for holder in [dot, *dot.get_subgraphs()]:
        for node in holder.get_nodes():
            name = node.get_name().strip('"')
            if name not in ("node", "edge", "graph") and node.get_attributes().get("style") != "invis":
                nodes[name] = node.get_attributes()
    return nodes


@pytest.mark.parametrize("which", ["graph", "neuron_graph"])
def test_dot_parses_back_with_pydot(which: str, request, tmp_path: Path) -> None:
    graph = request.getfixturevalue(which)
    (dot,) = pydot.graph_from_dot_file(str(write_dot(graph, tmp_path / "g.dot")))
    assert dot.get_graph_type() == "digraph" and dot.get("rankdir") == "BT"
    nodes = _dot_nodes(dot)
    assert set(nodes) == set(graph.nodes)
    edges = {(e.get_source().strip('"'), e.get_destination().strip('"')): e for e in dot.get_edges()
             if e.get("style") != "invis"}
    assert set(edges) == set(graph.edges)
    for (source, target), edge in edges.items():
        assert float(edge.get("tooltip").strip('"')) == pytest.approx(graph.edges[source, target]["weight"], rel=1e-5)
    ranks = [sub for sub in dot.get_subgraphs() if sub.get("rank") == "same"]
    assert {n.get_name().strip('"') for n in ranks[-1].get_nodes()} >= {"target"}      # the target on top
    assert all(graph.nodes[n.get_name().strip('"')]["stage"] == 0 for n in ranks[0].get_nodes()   # tokens at the bottom
               if n.get("style") != "invis")


@pytest.mark.parametrize("which", ["graph", "neuron_graph"])
def test_graphml_reads_back_with_networkx(which: str, request, tmp_path: Path) -> None:
    graph = request.getfixturevalue(which)
    back = nx.read_graphml(write_graphml(graph, tmp_path / "g.graphml"))
    assert set(back.nodes) == set(graph.nodes) and set(back.edges) == set(graph.edges)
    for node, data in graph.nodes(data=True):
        assert back.nodes[node] == data
    for source, target, weight in graph.edges(data="weight"):
        assert back.edges[source, target]["weight"] == weight
    assert back.graph["value"] == graph.graph["value"]
    assert json.loads(back.graph["prompt_tokens"]) == graph.graph["prompt_tokens"]


@pytest.mark.parametrize("which", ["graph", "neuron_graph"])
def test_circuit_json_validates_against_the_schema(which: str, request, tmp_path: Path) -> None:
    graph = request.getfixturevalue(which)
    data = json.loads(write_circuit_json(graph, tmp_path, slug="g").read_text())
    assert validate(data, CIRCUIT_SCHEMA) == []
    assert data["metadata"]["slug"] == "g" and data["metadata"]["prompt_tokens"] == graph.graph["prompt_tokens"]
    ids = [node["node_id"] for node in data["nodes"]]
    assert len(ids) == len(set(ids)) == graph.number_of_nodes()
    assert len(data["links"]) == graph.number_of_edges()
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    (target,) = [node for node in data["nodes"] if node["is_target_logit"]]
    assert target["feature_type"] == "logit" and target["layer"] == "3" and "(p=" in target["clerp"]
    assert sum(link["weight"] for link in data["links"] if link["target"] == target["node_id"]) == pytest.approx(
        sum(w for *_, w in graph.in_edges("target", data="weight")))


def test_circuit_json_node_ids_follow_circuit_tracer(graph) -> None:
    """Issue 19: ids and types circuit-tracer's viewer understands (Note [circuit-tracer node types])."""
    data = to_circuit_json(graph)
    by_kind = {}
    for node in data["nodes"]:
        by_kind.setdefault(node["fxdepass_kind"], []).append(node)
    assert {n["node_id"] for n in by_kind["token"]} == {f"E_{t}_{p}" for p, t in enumerate(tiny.IDS[0].tolist())}
    assert {n["feature_type"] for n in by_kind["token"]} == {"embedding"}
    assert {n["feature_type"] for n in data["nodes"] if n["fxdepass_kind"] in ("head", "mlp")} <= {"cross layer transcoder"}
    assert not any("error" in n["feature_type"] for n in data["nodes"])        # the viewer would draw them as errors
    for node in (n for n in data["nodes"] if n["fxdepass_kind"] != "token"):       # tokens: E_{token id}_{position}
        layer, feature, position = node["node_id"].split("_")
        assert node["feature"] >= 0 and (layer, int(feature), int(position)) == (node["layer"], node["feature"], node["ctx_idx"])
    heads = graph.graph["heads"]
    for node in by_kind.get("head", []):
        assert 0 <= node["feature"] < heads
    for node in by_kind.get("mlp", []):
        assert node["node_id"] == f"{node['layer']}_{heads}_{node['ctx_idx']}"
    # the viewer keys hover state on layer_feature_ctx: no two nodes share it
    keys = [(n["layer"], n["feature"], n["ctx_idx"]) for n in data["nodes"]]
    assert len(keys) == len(set(keys))


def test_output_folder_opens_in_the_viewer(graph, neuron_graph, tmp_path: Path) -> None:
    """circuit-tracer's viewer first reads graph-metadata.json ({"graphs": [metadata, …]}), then <slug>.json for each
    entry: two graphs get two slugs and two entries, writing one again replaces its entry, and every entry names a file
    whose metadata it is."""
    first = write_circuit_json(graph, tmp_path)
    second = write_circuit_json(neuron_graph, tmp_path, slug="neurons-0")
    write_circuit_json(graph, tmp_path)                                           # again: same slug, same entry
    listing = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert list(listing) == ["graphs"]
    slugs = [entry["slug"] for entry in listing["graphs"]]
    assert sorted(slugs) == sorted([first.stem, "neurons-0"]) and second.name == "neurons-0.json"
    assert first.stem.startswith("w5-w17-w3-w42-w8-w23-w11-")
    for entry in listing["graphs"]:
        data = json.loads((tmp_path / f"{entry['slug']}.json").read_text())
        assert validate(data, CIRCUIT_SCHEMA) == []
        assert entry == {k: v for k, v in data["metadata"].items() if k != "fxdepass"}
        for key in ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold"):
            assert key in entry
    other = graph.copy()
    other.graph["target"] = "logit 'w9'"
    assert write_circuit_json(other, tmp_path).stem != first.stem                  # another target, another slug
    with pytest.raises(fxdepass.errors.InvalidInputError, match="slug"):
        write_circuit_json(graph, tmp_path, slug="../elsewhere")