"""The capture cache (fxdepass/cache.py): a cached compile computes exactly what a fresh one does, a fresh
process reuses the entry, what the graph depends on misses, a damaged entry falls back, nothing is a pickle."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import families
import fxdepass
from probes import assert_same_state, model_state

IDS = torch.tensor([[5, 17, 3, 42, 8, 23, 11]])


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache on, in a temporary directory (conftest.py turns it off for every other test)."""
    monkeypatch.delenv("FXDEPASS_NO_CACHE", raising=False)
    monkeypatch.setenv("FXDEPASS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_export(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``torch.export.export`` counting its calls: a compile that made none was served by the cache."""
    calls, export = [], torch.export.export

    def counted(*args, **kwargs):
        calls.append(1)
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    return calls


def entries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".")) if directory.is_dir() else []


def attribute(model: torch.nn.Module, **options) -> tuple[torch.Tensor, torch.Tensor, str]:
    decomposed = fxdepass.compile(model, dtype=torch.float64, **options)
    result = decomposed.attribute(IDS)
    return result.components, result.total, decomposed.code


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_cached_compile_computes_the_same(family: str, cache_dir: Path, no_export: list[int]) -> None:
    model = families.build(family, layers=2, seed=3)
    before = model_state(model)
    fresh = attribute(model, cache=False)
    assert not entries(cache_dir) and len(no_export) == 1
    stored = attribute(model)
    assert len(entries(cache_dir)) == 1 and len(no_export) == 2
    cached = attribute(model)
    assert len(no_export) == 2  # the third compile exported nothing
    for one in (stored, cached):
        assert torch.equal(one[0], fresh[0]) and torch.equal(one[1], fresh[1]) and one[2] == fresh[2]
    assert_same_state(before, model_state(model))


HIT = """
import sys, torch
sys.path.insert(0, {tests!r})
import families, fxdepass
def refuse(*args, **kwargs):
    raise AssertionError("torch.export.export was called: the cache missed")
torch.export.export = refuse
model = families.build("llama", layers=2, seed=3)
result = fxdepass.compile(model, dtype=torch.float64).attribute(torch.tensor({ids}))
from safetensors.torch import save_file
save_file({{"components": result.components.contiguous()}}, sys.argv[1])
"""


def test_a_fresh_process_reuses_the_entry(cache_dir: Path, tmp_path: Path) -> None:
    """The subprocess replaces ``torch.export.export`` by a function that raises: it compiles only on a hit."""
    model = families.build("llama", layers=2, seed=3)
    components = attribute(model)[0]
    out = tmp_path / "components.safetensors"
    script = HIT.format(tests=str(Path(__file__).parent), ids=IDS.tolist())
    run = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "fxdepass:" not in run.stderr  # no progress lines when stderr is not a terminal
    from safetensors.torch import load_file
    assert torch.equal(load_file(out)["components"], components)


def test_an_edited_weight_is_bound_live(cache_dir: Path, no_export: list[int]) -> None:
    """Weight values are not part of the key (they are bound from the live model on every load): an edited
    weight still hits and computes with the edited value, exactly as a fresh compile of the edited model."""
    model = families.build("llama", layers=2, seed=3)
    attribute(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-2)
    cached = attribute(model)
    assert len(no_export) == 1
    fresh = attribute(model, cache=False)
    assert torch.equal(cached[0], fresh[0]) and torch.equal(cached[1], fresh[1])


def test_what_the_graph_depends_on_misses(cache_dir: Path, no_export: list[int]) -> None:
    model = families.build("llama", layers=2, seed=3)
    attribute(model)
    model.config.rms_norm_eps = 1e-3  # a config value
    attribute(model)
    model.model.layers[0].self_attn.scaling = 0.5  # a module's plain attribute, baked into the graph
    edited = attribute(model)
    assert len(no_export) == 3 and len(entries(cache_dir)) == 3
    assert torch.equal(edited[0], attribute(model, cache=False)[0])
    other = families.build("llama", layers=3, seed=3)  # other shapes
    attribute(other)
    assert len(no_export) == 5


@pytest.mark.parametrize("damage", ["program", "key", "truncate"])
def test_a_damaged_entry_falls_back(damage: str, cache_dir: Path, no_export: list[int]) -> None:
    model = families.build("llama", layers=2, seed=3)
    fresh = attribute(model)
    entry, = entries(cache_dir)
    if damage == "program":  # valid JSON, another graph: the recorded hash no longer matches
        program = json.loads((entry / "program.json").read_text())
        program["graph_module"]["graph"]["nodes"] = program["graph_module"]["graph"]["nodes"][:-3]
        (entry / "program.json").write_text(json.dumps(program))
    elif damage == "key":
        (entry / "key.json").write_text("{not json")
    else:
        (entry / "constants.safetensors").write_bytes(b"")
    again = attribute(model)
    assert len(no_export) == 2  # exported afresh
    assert torch.equal(again[0], fresh[0])
    attribute(model)
    assert len(no_export) == 2  # the entry was written again and is whole


def test_no_file_is_a_pickle(cache_dir: Path) -> None:
    """Every file is JSON or safetensors (an 8-byte header length, then a JSON header)."""
    from safetensors import safe_open

    attribute(families.build("mixtral", layers=2, seed=3))
    files = [p for entry in entries(cache_dir) for p in entry.iterdir()]
    assert {p.name for p in files} == {"key.json", "program.json", "constants.safetensors"}
    for path in files:
        data = path.read_bytes()
        assert not data.startswith(b"\x80") and not data.startswith(b"PK")  # pickle protocol 2+, torch.save's zip
        if path.suffix == ".json":
            json.loads(data)
        else:
            with safe_open(str(path), "pt"):
                pass


def test_hooks_are_not_cached(cache_dir: Path) -> None:
    model = families.build("llama", layers=2, seed=3)
    handle = model.model.layers[0].register_forward_hook(lambda module, args, out: None)
    try:
        fxdepass.compile(model, dtype=torch.float64)
    finally:
        handle.remove()
    assert not entries(cache_dir)


def test_cache_off(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = families.build("llama", layers=2, seed=3)
    fxdepass.compile(model, cache=False)
    monkeypatch.setenv("FXDEPASS_NO_CACHE", "1")
    fxdepass.compile(model)
    assert not entries(cache_dir)
