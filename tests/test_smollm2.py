"""The real model, SmolLM2-135M-Instruct (30-layer Llama, 49k vocabulary), in float64: every kind of seed sums
exactly to the real value, that value is the model's own, and the cheap default read-out (the target row at
the last position) equals the same entries of the full one.  The model and its float64 compile are session
fixtures (tests/conftest.py), shared with the other real-model tests."""

from __future__ import annotations

import pytest
import torch

import fxdepass

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def prompt_ids(smollm2) -> torch.Tensor:
    return smollm2[1](PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def model_logits(smollm2, prompt_ids) -> torch.Tensor:
    """The unmodified float32 model's logits, the reference the float64 totals must agree with."""
    with torch.no_grad():
        return smollm2[0](prompt_ids).logits.double()


def _projectors(width: int) -> list[torch.Tensor]:
    """Two orthogonal projectors onto random 8- and 24-dimensional subspaces of the residual stream."""
    basis = torch.randn(width, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return [fxdepass.orthogonal_projector(basis[:, :8]), fxdepass.orthogonal_projector(basis[:, 8:])]


SEEDS = {
    "tokens": lambda width: fxdepass.tokens(),
    "heads": lambda width: fxdepass.heads(21),
    "neurons": lambda width: fxdepass.neurons(17, group_size=128),
    "modules": lambda width: fxdepass.modules(12),
    "subspace": lambda width: fxdepass.subspace(9, _projectors(width)),
}


@pytest.mark.parametrize("seed", SEEDS)
def test_every_seed_is_exact_on_the_real_model(smollm2_float64, prompt_ids, model_logits, seed: str) -> None:
    """float64: components sum to the real logits within 1e-9 relative, at every position and for every logit,
    and the real value is the model's (float32 model against float64 pass: within float32 rounding)."""
    width = smollm2_float64.model.config.hidden_size
    attribution = smollm2_float64.attribute(prompt_ids, seed=SEEDS[seed](width), positions="all", targets="all")
    assert attribution.reconstruction_error() <= 1e-9
    assert attribution.components.shape[0] == len(attribution.labels)
    assert torch.allclose(attribution.total, model_logits, rtol=0, atol=2e-3 * model_logits.abs().max())


def test_the_demo_prompt_credits_capital_and_france(smollm2_float64, smollm2, prompt_ids) -> None:
    """The default read-out explains the predicted token, " Paris"; its two largest token contributions are
    the relation and the subject."""
    attribution = smollm2_float64.attribute(prompt_ids)
    assert attribution.target_labels == ["' Paris'"]
    (first, _), (second, _) = attribution.top(2)
    assert "capital" in first and "France" in second, attribution.top(5)


@pytest.mark.parametrize("seed", ["tokens", "heads"])
def test_the_default_read_out_equals_the_full_one(smollm2_float64, prompt_ids, seed: str) -> None:
    """Reading only the predicted token at the last position (the last block's tail and the head run there only)
    gives the same numbers as the whole vocabulary at every position, picked at that entry."""
    width = smollm2_float64.model.config.hidden_size
    cheap = smollm2_float64.attribute(prompt_ids, seed=SEEDS[seed](width))
    full = smollm2_float64.attribute(prompt_ids, seed=SEEDS[seed](width), positions="all", targets="all")
    predicted = int(full.total[0, -1].argmax())
    picked = full.components[:, 0, -1, predicted]
    assert cheap.components.shape == (full.components.shape[0], 1, 1, 1)
    assert torch.allclose(cheap.components[:, 0, 0, 0], picked, rtol=0, atol=1e-10 * picked.abs().max())
    vocabulary = smollm2_float64.attribute(prompt_ids, seed=SEEDS[seed](width), targets="all")
    assert torch.allclose(vocabulary.components[:, 0, 0], full.components[:, 0, -1], rtol=0,
                          atol=1e-10 * full.components.abs().max())


def test_string_and_contrastive_targets_on_the_real_model(smollm2_float64, smollm2, prompt_ids) -> None:
    """targets=" Paris" and fxdepass.diff(" Paris", " London") equal the entries (and the difference of the
    entries) of the whole vocabulary's components, and sum to the real value, in float64."""
    tokenizer = smollm2[1]
    paris, london = (tokenizer(text, add_special_tokens=False).input_ids[0] for text in (" Paris", " London"))
    every = smollm2_float64.attribute(prompt_ids, targets="all").components[:, 0, 0]
    string = smollm2_float64.attribute(prompt_ids, targets=" Paris")
    contrast = smollm2_float64.attribute(prompt_ids, targets=fxdepass.diff(" Paris", " London"))
    scale = every.abs().max()
    assert torch.allclose(string.components[:, 0, 0, 0], every[:, paris], rtol=0, atol=1e-10 * scale)
    assert torch.allclose(contrast.components[:, 0, 0, 0], every[:, paris] - every[:, london], rtol=0, atol=1e-10 * scale)
    assert string.reconstruction_error() <= 1e-9 and contrast.reconstruction_error() <= 1e-9


def test_log_probability_target_on_the_real_model(smollm2_float64, prompt_ids) -> None:
    """targets=fxdepass.logprob(" Paris"): the total is the real log-probability, the components sum to it
    (float64, 1e-9) and each source's share is its part of z_t − Σ_v p_v z_v (p frozen at the real run)."""
    every = smollm2_float64.attribute(prompt_ids, targets="all")
    paris = smollm2_float64.attribute(prompt_ids, targets=fxdepass.logprob(" Paris"))
    p = every.total[0, 0].softmax(-1)
    token = int(every.total[0, 0].argmax())                             # the model predicts " Paris"
    assert abs(float(paris.total[0, 0, 0] - every.total[0, 0].log_softmax(-1)[token])) <= 1e-12 * abs(float(paris.total))
    assert paris.reconstruction_error() <= 1e-9
    shares = every.components[:-1, 0, 0, token] - every.components[:-1, 0, 0] @ p
    assert torch.allclose(paris.components[:-1, 0, 0, 0], shares, rtol=0, atol=1e-9 * shares.abs().max())
