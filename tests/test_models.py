"""Models by name or path (fxdepass/models.py): names, directories, GGUF files, the local Hub cache, errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fxdepass
import tiny
from fxdepass.models import resolve


def test_registry_names_resolve_to_their_files() -> None:
    assert resolve("demo").directory == tiny.DEMO
    smollm2 = resolve("smollm2")
    assert smollm2.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and (smollm2.directory / smollm2.gguf_file).is_file()
    assert (resolve("minilm").directory / "config.json").is_file()


def test_a_directory_a_gguf_file_and_a_directory_holding_one(tmp_path: Path) -> None:
    assert resolve(tiny.save(tmp_path / "hf")).gguf_file is None
    gguf = resolve("smollm2")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "model.gguf").symlink_to(gguf.directory / gguf.gguf_file)
    assert resolve(tmp_path / "g").gguf_file == "model.gguf"
    assert resolve(tmp_path / "g" / "model.gguf").directory == tmp_path / "g"
    (tmp_path / "g" / "other.gguf").write_bytes(b"")
    with pytest.raises(fxdepass.ModelNotFoundError, match="exactly one .gguf file, found model.gguf, other.gguf"):
        resolve(tmp_path / "g")


@pytest.mark.parametrize("name, message", [
    ("no-such-model", "neither a model name"),
    ("owner/not-cached", r"not in the local Hugging Face cache \(.*\) and fxdepass downloads nothing"),
])
def test_unknown_names_say_what_was_looked_for(name: str, message: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(fxdepass.ModelNotFoundError, match=message):
        resolve(name)


def test_a_hub_id_in_the_local_cache_loads_offline(tmp_path: Path, monkeypatch) -> None:
    # The cache layout of huggingface_hub: models--owner--name/{refs/main, snapshots/<commit>/files}.
    commit = "0" * 40
    repo = tmp_path / "models--owner--tiny-llama"
    tiny.save(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert resolve("owner/tiny-llama").directory == repo / "snapshots" / commit
    model, tokenizer = fxdepass.load("owner/tiny-llama")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer("w5 w17").input_ids == [5, 17]


def test_a_directory_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    directory = tiny.save(tmp_path / "hf")
    for weights in directory.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(fxdepass.ModelNotFoundError, match="no weights"):
        fxdepass.load(directory)


def test_smollm2_by_name_answers_paris(smollm2) -> None:
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
