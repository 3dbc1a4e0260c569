"""The log-probability and contrastive targets (fxdepass/targets.py) are exact in float64 for every seed,
plan (dense, causal blocks, the last-position tail), a mixture-of-experts model, batches, chosen positions
and generated text: checked against ``log_softmax`` of the real logits (the model's own run, and the
pass's real logits), and against the components of every logit (targets="all"), of which a source's share
must be ``z_t − Σ_v p_v z_v`` with ``p`` frozen at the real run."""
from __future__ import annotations

import copy

import pytest
import torch

import families
import fxdepass
from conftest import relative_error

SEEDS = {"tokens": fxdepass.tokens(), "heads": fxdepass.heads(0), "neurons": fxdepass.neurons(0, group_size=8)}

#: the model's own float64 run casts to float32 inside Hugging Face norms, fxdepass's does not (SPEC §5)
MODEL_RUN = 1e-6


def _model_log_p(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax of the model's own float64 logits (a copy: the user's model stays as it is)."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)


def _check_logprob(every: fxdepass.Attribution, got: fxdepass.Attribution, token: int) -> None:
    """``got`` (targets=logprob(token)) against ``every`` (targets="all", the same positions): its total is
    the real log p_t, its sources' shares are z_t − Σ_v p_v z_v of their logit components, −H(p) is rest's."""
    p = every.total.softmax(-1)
    assert relative_error(got.total[..., 0], every.total.log_softmax(-1)[..., token]) <= 1e-12
    assert got.reconstruction_error() <= 1e-9
    linear = every.components[..., token] - (every.components * p).sum(-1)
    assert relative_error(got.components[:-1, ..., 0], linear[:-1]) <= 1e-9
    entropy = -torch.xlogy(p, p).sum(-1)
    assert relative_error(got.components[-1, ..., 0], linear[-1] - entropy) <= 1e-9


@pytest.mark.parametrize("attention", ["frozen", "routed"])
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_logprob_is_exact_for_every_seed_and_plan(family: str, attention: str) -> None:
    model = families.build(family, layers=2, seed=4)
    ids = torch.randint(0, families.VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))  # 3 blocks
    # torch's expert kernel has no float64: the MoE model's own run cannot be compared in float64
    real = None if family in families.MOE else _model_log_p(model, ids)
    dense = {}
    for blocks in (0, 3):  # dense; causal blocks (the MoE model: one block, experts in routed chunks)
        decomposed = fxdepass.compile(model, dtype=torch.float64, causal_blocks=blocks, attention=attention)
        for name, seed in SEEDS.items():
            every = decomposed.attribute(ids, positions="all", targets="all", seed=seed)
            assert real is None or relative_error(every.total.log_softmax(-1), real) <= MODEL_RUN, name
            for token in (5,) if name != "tokens" else (5, 17):
                got = decomposed.attribute(ids, positions="all", targets=fxdepass.logprob(token), seed=seed)
                assert got.components.shape == (every.components.shape[0], 1, 24, 1), name
                _check_logprob(every, got, token)
                # the default read: the last position only (a position-wise tail where the model allows it)
                last = decomposed.attribute(ids, targets=fxdepass.logprob(token), seed=seed)
                assert last.components.shape[2] == 1 and last.reconstruction_error() <= 1e-9, name
                assert relative_error(last.components, got.components[:, :, -1:]) <= 1e-12, name
                # the two plans agree (to rounding)
                reference = dense.setdefault((name, token), got.components)
                assert relative_error(got.components, reference) <= 1e-12, name


@pytest.fixture(scope="module", params=["frozen", "routed"])
def decomposed(request: pytest.FixtureRequest) -> fxdepass.DecomposedModel:
    return fxdepass.compile(families.build("llama", layers=2, seed=7), dtype=torch.float64, attention=request.param)


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, families.VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second prompt is left-padded
    return ids, mask


def test_logprob_is_exact_for_padded_batches(decomposed: fxdepass.DecomposedModel) -> None:
    ids, mask = _padded_batch()
    every = decomposed.attribute(ids, attention_mask=mask, positions="all", targets="all")  # [M+1, B, P, V]
    real = _model_log_p(decomposed.model, ids, mask)
    for token in (3, 11):
        got = decomposed.attribute(ids, attention_mask=mask, positions="all", targets=fxdepass.logprob(token))
        assert got.components.shape == (ids.shape[1] + 1, 2, ids.shape[1], 1)
        _check_logprob(every, got, token)
        kept = mask.bool()
        assert relative_error(got.total[..., 0][kept], real[..., token][kept]) <= MODEL_RUN


def test_logprob_per_prompt_and_at_chosen_positions(decomposed: fxdepass.DecomposedModel) -> None:
    ids, mask = _padded_batch()
    got = decomposed.attribute(ids, attention_mask=mask, positions=[5, 9], targets=[fxdepass.logprob(3), fxdepass.logprob(8)])
    every = decomposed.attribute(ids, attention_mask=mask, positions=[5, 9], targets="all")
    log_p = every.total.log_softmax(-1)
    assert relative_error(got.total[0, :, 0], log_p[0, :, 3]) <= 1e-12
    assert relative_error(got.total[1, :, 0], log_p[1, :, 8]) <= 1e-12
    assert got.reconstruction_error() <= 1e-9
    first = decomposed.attribute(ids[:1], attention_mask=mask[:1], positions=[5, 9], targets=fxdepass.logprob(3))
    assert relative_error(got.components[:, :1], first.components) <= 1e-12  # prompts do not mix


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
    every = decomposed.attribute(result.sequence[:, :-1], positions="all", targets="all")
    real = _model_log_p(decomposed.model, result.sequence[:, :-1])[0]
    for step in range(4):
        position = prompt.shape[1] - 1 + step
        token = int(result.sequence[0, position + 1])
        expected = float(every.total[0, position].log_softmax(-1)[token])
        assert abs(result.value(step) - expected) <= 1e-12 * max(1.0, abs(expected))
        assert abs(result.value(step) - float(real[position, token])) <= MODEL_RUN * max(1.0, abs(expected))
        assert abs(float(result.scores(step).sum()) - expected) <= 1e-9 * max(1.0, abs(expected))
        assert abs(logits.value(step) - float(every.total[0, position, token])) <= 1e-12 * max(1.0, abs(logits.value(step)))
        # the generated token's share per source: its logit components less the p-weighted mean of all
        p = every.total[0, position].softmax(-1)
        linear = every.components[:, 0, position, token] - every.components[:, 0, position] @ p
        scores = result.scores(step)
        assert relative_error(scores[:-1], linear[: position + 1]) <= 1e-9
    with pytest.raises(fxdepass.InvalidInputError, match="target="):
        decomposed.generate_attributed(prompt, max_new_tokens=1, target="probability")


def test_logprob_without_a_linear_head() -> None:
    """Gemma 2 caps its logits (``30·tanh(z/30)``): no linear head maps the hidden state to them, so the
    target contracts the components of every logit with ``c`` — still exact."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma2Config(vocab_size=families.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                       final_logit_softcapping=30.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    assert decomposed._linear_head(next(iter(decomposed._captures.values()))) is None
    ids = torch.randint(0, families.VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    every = decomposed.attribute(ids, positions="all", targets="all")
    _check_logprob(every, decomposed.attribute(ids, positions="all", targets=fxdepass.logprob(5)), 5)
    assert relative_error(every.total.log_softmax(-1), _model_log_p(model, ids)) <= MODEL_RUN
