"""Fidelity to the paper: the compiled module equals an independent per-layer implementation of the
paper's equations (tests/oracle_llama.py) and the paper's own code's outputs (../shared fixtures)."""
from __future__ import annotations

import pytest
import torch
import transformers

import families
import fxdepass
from conftest import relative_error
from oracle_llama import depass_tokens_llama


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sink", [True, False])
def test_token_level_equals_oracle(sink: bool, bias: bool) -> None:
    model = families.build("llama", layers=3, bias=bias, seed=4)
    ids = torch.randint(0, families.VOCAB, (11,), generator=torch.Generator().manual_seed(2))
    attribution = fxdepass.compile(model, dtype=torch.float64).attribute(ids, positions="all", targets="all", seed=fxdepass.tokens(sink=sink))
    oracle = depass_tokens_llama(model, ids, sink=sink)
    assert relative_error(attribution.components[:, 0], oracle["logits_components"]) <= 1e-9
    assert relative_error(attribution.scores(), oracle["scores"]) <= 1e-9


def test_oracle_comparison_can_fail() -> None:
    """Guard: the comparison above distinguishes the two sink settings."""
    model = families.build("llama", layers=3, seed=4)
    ids = torch.randint(0, families.VOCAB, (11,), generator=torch.Generator().manual_seed(2))
    attribution = fxdepass.compile(model, dtype=torch.float64).attribute(ids, positions="all", targets="all", seed=fxdepass.tokens(sink=False))
    oracle = depass_tokens_llama(model, ids, sink=True)
    assert relative_error(attribution.components[:, 0], oracle["logits_components"]) > 1e-6


@pytest.mark.parametrize("name", ["llama_init0.02_fp64_exact64.pt", "llama_init0.2_fp64_exact64.pt"])
@pytest.mark.parametrize("sink", [True, False])
def test_token_scores_equal_paper_code(paper_reference, name: str, sink: bool) -> None:
    data = torch.load(paper_reference / name, weights_only=True)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**data["config"])).double().eval()
    model.load_state_dict(data["state_dict"])
    result = data["results"][f"ignore_special_token={sink}"]
    ids = torch.as_tensor(data["input_ids"]).reshape(1, -1)
    attribution = fxdepass.compile(model, dtype=torch.float64).attribute(ids, positions="all", targets="all", seed=fxdepass.tokens(sink=sink))
    target = int(result["target_token_id"])
    assert int(attribution.total[0, -1].argmax()) == target
    scores = attribution.scores(target)
    assert relative_error(scores[:-1], result["score_fp64_convenience"]) <= 1e-6
    assert abs(float(scores[-1])) <= 1e-12  # bias-free model: nothing reaches rest
