"""The log-probability and contrastive targets (fxdepass/targets.py) are exact in float64 for batches,
every position and generated text, checked against ``log_softmax`` of the real logits and against the
components of every logit (targets="all"), which they must be linear functionals of."""
from __future__ import annotations

import pytest
import torch

import families
import fxdepass
from conftest import relative_error


@pytest.fixture(scope="module", params=["frozen", "routed"])
def decomposed(request: pytest.FixtureRequest) -> fxdepass.DecomposedModel:
    return fxdepass.compile(families.build("llama", layers=2, seed=7), dtype=torch.float64, attention=request.param)


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, families.VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second prompt is left-padded
    return ids, mask


def test_logprob_is_exact_for_batches_at_every_position(decomposed: fxdepass.DecomposedModel) -> None:
    ids, mask = _padded_batch()
    every = decomposed.attribute(ids, attention_mask=mask, positions="all", targets="all")  # [M+1, B, P, V]
    p = every.total.softmax(-1)
    for token in (3, 11):
        got = decomposed.attribute(ids, attention_mask=mask, positions="all", targets=fxdepass.logprob(token))
        assert got.components.shape == (ids.shape[1] + 1, 2, ids.shape[1], 1)
        expected = every.total.log_softmax(-1)[..., token]
        assert relative_error(got.total[..., 0], expected) <= 1e-12
        assert got.reconstruction_error() <= 1e-9
        # each source's share is its part of z_t − Σ_v p_v z_v (p frozen); −H(p) is rest's
        linear = every.components[..., token] - (every.components * p).sum(-1)
        assert relative_error(got.components[:-1, ..., 0], linear[:-1]) <= 1e-9
        entropy = -torch.xlogy(p, p).sum(-1)
        assert relative_error(got.components[-1, ..., 0], linear[-1] - entropy) <= 1e-9


def test_logprob_per_prompt_and_at_chosen_positions(decomposed: fxdepass.DecomposedModel) -> None:
    ids, mask = _padded_batch()
    got = decomposed.attribute(ids, attention_mask=mask, positions=[5, 9], targets=[fxdepass.logprob(3), fxdepass.logprob(8)])
    every = decomposed.attribute(ids, attention_mask=mask, positions=[5, 9], targets="all")
    log_p = every.total.log_softmax(-1)
    assert relative_error(got.total[0, :, 0], log_p[0, :, 3]) <= 1e-12
    assert relative_error(got.total[1, :, 0], log_p[1, :, 8]) <= 1e-12
    assert got.reconstruction_error() <= 1e-9


def test_contrastive_targets_are_exact(decomposed: fxdepass.DecomposedModel) -> None:
    ids, mask = _padded_batch()
    every = decomposed.attribute(ids, attention_mask=mask, positions="all", targets="all")
    logits = decomposed.attribute(ids, attention_mask=mask, positions="all", targets=fxdepass.diff(3, 7))
    assert relative_error(logits.components[..., 0], every.components[..., 3] - every.components[..., 7]) <= 1e-9
    assert logits.reconstruction_error() <= 1e-9
    # a log-probability difference: the frozen normaliser and entropy cancel, leaving z_3 − z_7 per source
    probabilities = decomposed.attribute(ids, attention_mask=mask, positions="all",
                                         targets=fxdepass.diff(fxdepass.logprob(3), fxdepass.logprob(7)))
    log_p = every.total.log_softmax(-1)
    assert relative_error(probabilities.total[..., 0], log_p[..., 3] - log_p[..., 7]) <= 1e-12
    assert relative_error(probabilities.components[..., 0], logits.components[..., 0]) <= 1e-9


def test_generated_tokens_logprob(decomposed: fxdepass.DecomposedModel) -> None:
    prompt = torch.randint(0, families.VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    result = decomposed.generate_attributed(prompt, max_new_tokens=4, target="logprob")
    logits = decomposed.generate_attributed(prompt, max_new_tokens=4)
    assert torch.equal(result.sequence, logits.sequence)
    every = decomposed.attribute(result.sequence[:, :-1], positions="all", targets="all").total[0]
    for step in range(4):
        position = prompt.shape[1] - 1 + step
        token = int(result.sequence[0, position + 1])
        expected = float(every[position].log_softmax(-1)[token])
        assert abs(result.value(step) - expected) <= 1e-12 * max(1.0, abs(expected))
        assert abs(float(result.scores(step).sum()) - expected) <= 1e-9 * max(1.0, abs(expected))
        assert abs(logits.value(step) - float(every[position, token])) <= 1e-12 * max(1.0, abs(logits.value(step)))
    with pytest.raises(fxdepass.InvalidInputError, match="target="):
        decomposed.generate_attributed(prompt, max_new_tokens=1, target="probability")
