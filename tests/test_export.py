"""Exports (issue 5): DOT parses back with pydot, GraphML reads back with networkx, circuit-tracer JSON validates
against the documented schema.  Issue 16: every export holds any token string and reads it back (fuzzed), and
the writers neither replace a file unasked nor write through a symbolic link."""
from __future__ import annotations

import html.parser
import json
import re
import tempfile
import xml.etree.ElementTree
from pathlib import Path
from typing import Any

import networkx as nx
import pydot
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxdepass
import tiny
from fxdepass.export import (CIRCUIT_SCHEMA, escape_text, read_graphml, to_circuit_json, to_pydot, unescape_text,
                             write_circuit_json, write_dot, write_graphml)
from fxdepass.files import open_output, write_text
from fxdepass.graph import build_graph, resolve_target, seed_activations, seed_graph
from fxdepass.report import report_html, write_report


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
    write_circuit_json(graph, tmp_path, overwrite=True)                           # again: same slug, same entry
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

# -- files and text (issue 16) ----------------------------------------------------------------------------------

#: characters the exports found hard: NUL and other controls (byte-level tokenizers), lone surrogates (a token cut
#: inside a character), XML's non-characters, line breaks XML and HTML normalise, and the escape character itself
_HARD = list("\x00\x01\x08\x0b\x0c\x1f\x7f\x85\xa0\u2028\ufeff\ufffe\uffff\ud800\udbff\udc00\udfff\r\n\t \\\"'<>&;{}[]")
TEXT = st.text(st.one_of(st.sampled_from(_HARD), st.characters(exclude_categories=())), max_size=10)
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def small(graph) -> nx.DiGraph:
    """The graph's tokens, target and three strongest other nodes (parsing DOT back takes pydot long)."""
    others = sorted((n for n, d in graph.nodes(data=True) if d["kind"] not in ("token", "target")),
                    key=lambda n: -abs(graph.nodes[n]["contribution"]))
    return graph.subgraph([n for n, d in graph.nodes(data=True) if d["kind"] in ("token", "target")] + others[:3]).copy()


def _with_texts(graph: nx.DiGraph, texts: list[str], label: str) -> nx.DiGraph:
    """``graph`` with ``texts`` as its prompt's tokens (nodes, labels, prompt) and ``label`` naming every other node."""
    copy = graph.copy()
    copy.graph["prompt_tokens"] = texts
    copy.graph["prompt"] = "".join(texts)
    copy.graph["target"] = f"logit {label}"
    for node, data in copy.nodes(data=True):
        if data["kind"] == "token":
            data.update(token=texts[data["position"]], label=texts[data["position"]])
        else:
            data.update(label=f"{label}{node}", token=label)
    return copy


def _token_texts(graph: nx.DiGraph) -> Any:
    return st.lists(TEXT, min_size=len(graph.graph["prompt_tokens"]), max_size=len(graph.graph["prompt_tokens"]))


def test_escape_text_reads_back_and_is_printable() -> None:
    @FUZZ
    @given(TEXT)
    def check(text: str) -> None:
        escaped = escape_text(text)
        assert unescape_text(escaped) == text
        assert all(c.isprintable() for c in escaped)         # so XML, HTML, Graphviz and UTF-8 can all hold it

    check()
    assert escape_text("plain ' Paris'") == "plain ' Paris'"   # what needs nothing is left as it is
    assert escape_text("\\x00") == "\\\\x00" and escape_text("\x00") == "\\x00"   # the text "\x00" is not NUL


@FUZZ
@given(data=st.data())
def test_graphml_is_well_formed_and_reads_back_any_token(small, data) -> None:
    texts, label = data.draw(_token_texts(small)), data.draw(TEXT)
    original = _with_texts(small, texts, label)
    with tempfile.TemporaryDirectory() as folder:
        path = write_graphml(original, Path(folder) / "g.graphml")
        xml.etree.ElementTree.parse(path)                         # well-formed XML (expat refuses NUL, surrogates, …)
        back = read_graphml(path)
    assert dict(back.nodes(data=True)) == dict(original.nodes(data=True))
    assert {(s, t): d for s, t, d in back.edges(data=True)} == {(s, t): d for s, t, d in original.edges(data=True)}
    assert back.graph == json.loads(json.dumps(original.graph))   # lists and dicts as JSON keeps them


def _dot_label(raw: str) -> str:
    """A DOT label as pydot parses it (quoted, DOT escapes) → the text Graphviz shows."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), raw[1:-1], flags=re.S)


@settings(FUZZ, max_examples=20)                                  # pydot parses slowly
@given(data=st.data())
def test_dot_reads_back_any_token(small, data) -> None:
    texts, label = data.draw(_token_texts(small)), data.draw(TEXT)
    original = _with_texts(small, texts, label)
    text = to_pydot(original).to_string()
    text.encode("utf-8")                                          # a file can hold it
    assert "\x00" not in text                                     # Graphviz reads C strings
    (dot,) = pydot.graph_from_dot_data(text)
    shown = {name: attributes for name, attributes in _dot_nodes(dot).items()}
    for node, data_ in original.nodes(data=True):
        label_text, _, contribution = _dot_label(shown[node]["label"]).rpartition("\n")
        assert unescape_text(label_text) == data_["label"]
        assert float(contribution) == pytest.approx(data_["contribution"], rel=1e-2, abs=1e-12)
    title = _dot_label(dot.get("label")).rpartition(" = ")[0]
    assert unescape_text(title) == original.graph["target"]


@FUZZ
@given(data=st.data())
def test_circuit_json_reads_back_any_token(small, data) -> None:
    texts, label = data.draw(_token_texts(small)), data.draw(TEXT)
    original = _with_texts(small, texts, label)
    with tempfile.TemporaryDirectory() as folder:
        path = write_circuit_json(original, folder, slug="g")
        back = json.loads(path.read_bytes().decode("utf-8"))
        listing = json.loads((Path(folder) / "graph-metadata.json").read_bytes().decode("utf-8"))
    assert back["metadata"]["prompt_tokens"] == texts and back["metadata"]["prompt"] == "".join(texts)
    assert listing["graphs"][0]["prompt_tokens"] == texts
    tokens = sorted((n for n in back["nodes"] if n["fxdepass_kind"] == "token"), key=lambda n: n["ctx_idx"])
    assert [n["clerp"] for n in tokens] == texts
    assert validate(back, CIRCUIT_SCHEMA) == []


class _Page(html.parser.HTMLParser):
    """The token chips of the report's token strip and the first column of its node table."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chips: list[str] = []
        self.cells: list[str] = []
        self.where: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = dict(attrs).get("class") or ""
        if tag == "div" and classes == "tokens" and not self.chips:
            self.where.append("strip")
        elif tag == "span" and self.where[-1:] == ["strip"]:
            self.where.append("chip")
            self.chips.append("")
        elif tag == "td" and classes == "l" and self.where[-1:] == ["table"]:
            self.where.append("cell")
            self.cells.append("")
        elif tag == "table" and "heat" not in classes and not self.cells:
            self.where.append("table")

    def handle_endtag(self, tag: str) -> None:
        if self.where and {"span": "chip", "div": "strip", "td": "cell", "table": "table"}.get(tag) == self.where[-1]:
            self.where.pop()

    def handle_data(self, text: str) -> None:
        if self.where[-1:] == ["chip"]:
            self.chips[-1] += text
        elif self.where[-1:] == ["cell"]:
            self.cells[-1] += text


@FUZZ
@given(data=st.data())
def test_html_report_shows_any_token_readably(small, data) -> None:
    texts, label = data.draw(_token_texts(small)), data.draw(TEXT)
    original = _with_texts(small, texts, label)
    page = report_html(original)
    page.encode("utf-8")
    assert all(c.isprintable() or c == "\n" for c in page)       # nothing an HTML parser drops or replaces
    parsed = _Page()
    parsed.feed(page)
    assert [unescape_text(chip.replace("\xa0", "")) for chip in parsed.chips] == texts   # &nbsp;: an empty token
    strongest = sorted((d for _, d in original.nodes(data=True) if d["kind"] != "target"), key=lambda d: -abs(d["contribution"]))
    assert [unescape_text(cell) for cell in parsed.cells[0::2]][:len(strongest[:15])] == [d["label"] for d in strongest[:15]]


def test_results_lines_read_back_any_text() -> None:
    from fxdepass.dataset import _json_line

    @FUZZ
    @given(st.lists(TEXT, max_size=4))
    def check(texts: list[str]) -> None:
        line = _json_line({"tokens": texts}).encode("utf-8")          # UTF-8 can hold it: no raw lone surrogate
        assert line.count(b"\n") == 1 and json.loads(line) == {"tokens": texts}

    check()


WRITERS = {
    "dot": lambda graph, path, **options: write_dot(graph, path / "g.dot", **options),
    "graphml": lambda graph, path, **options: write_graphml(graph, path / "g.graphml", **options),
    "json": lambda graph, path, **options: write_circuit_json(graph, path, slug="g", **options),
    "html": lambda graph, path, **options: write_report(graph, path / "g.html", **options),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_writers_replace_a_file_only_when_asked(graph, fmt: str, tmp_path: Path) -> None:
    written = WRITERS[fmt](graph, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    written.write_text("a previous run's result")
    with pytest.raises(fxdepass.errors.OutputError, match="already exists"):
        WRITERS[fmt](graph, tmp_path)
    assert written.read_text() == "a previous run's result"
    assert WRITERS[fmt](graph, tmp_path, overwrite=True) == written
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("dangling", [False, True])
def test_writers_never_write_through_a_link(graph, fmt: str, dangling: bool, tmp_path: Path) -> None:
    outside, folder = tmp_path / "outside.txt", tmp_path / "out"
    folder.mkdir()
    if not dangling:
        outside.write_text("not an output")
    (tmp_path / "probe").mkdir()
    paths = WRITERS[fmt](graph, tmp_path / "probe")
    for path in [paths] + ([tmp_path / "probe" / "graph-metadata.json"] if fmt == "json" else []):
        (folder / path.name).symlink_to(outside)
        for overwrite in (False, True):
            with pytest.raises(fxdepass.errors.OutputError, match="symbolic link"):
                WRITERS[fmt](graph, folder, overwrite=overwrite)
        assert outside.exists() != dangling and (dangling or outside.read_text() == "not an output")
        assert [p.name for p in folder.iterdir()] == [path.name]    # refused before anything was written
        (folder / path.name).unlink()


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with open_output(tmp_path / "half.txt") as file:
            file.write("half")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "half.txt").exists()
    with pytest.raises(fxdepass.errors.OutputError, match="not a regular file"):
        write_text(tmp_path, "a folder is no file", overwrite=True)


def test_read_graphml_refuses_what_is_not_graphml(tmp_path: Path) -> None:
    (tmp_path / "bad.graphml").write_text("<graphml><unclosed>")
    with pytest.raises(fxdepass.errors.InvalidInputError, match="not a GraphML file"):
        read_graphml(tmp_path / "bad.graphml")
    (tmp_path / "graph-metadata.json").write_text("[1, 2]")
    with pytest.raises(fxdepass.errors.InvalidInputError, match="not a circuit-tracer listing"):
        write_circuit_json(nx.DiGraph(), tmp_path, slug="g")
