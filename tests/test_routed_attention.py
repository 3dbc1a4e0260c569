"""attention="routed" (rules/attention.py Note [Attention routing credit]): exact in float64 for every seed,
plan and architecture, equal between the dense and the causal-block runners, and it credits a token that
only steers attention, which frozen attention cannot."""
from __future__ import annotations

import pytest
import torch
import transformers

import families
import fxdepass
from conftest import relative_error
from fxdepass.rules.attention import routed_attention

SEEDS = {"tokens": fxdepass.tokens(), "heads": fxdepass.heads(0), "neurons": fxdepass.neurons(0, group_size=8)}


#: the model's own float64 run casts to float32 inside Hugging Face norms, fxdepass's does not (SPEC §5)
MODEL_RUN = 1e-6


def _real_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's own float64 logits (a copy: the user's model stays as it is)."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_routed_is_exact_dense_and_blocked(family: str) -> None:
    model = families.build(family, layers=2, seed=4)
    ids = torch.randint(0, families.VOCAB, (1, 41), generator=torch.Generator().manual_seed(3))
    dense = fxdepass.compile(model, dtype=torch.float64, causal_blocks=0, attention="routed")
    blocked = fxdepass.compile(model, dtype=torch.float64, causal_blocks=3, attention="routed")
    frozen = fxdepass.compile(model, dtype=torch.float64, causal_blocks=0)
    # torch's expert kernel has no float64: the MoE model's own run cannot be compared in float64
    real = None if family in families.MOE else _real_logits(model, ids)
    for name, seed in SEEDS.items():
        expected = dense.attribute(ids, positions="all", targets="all", seed=seed)
        got = blocked.attribute(ids, positions="all", targets="all", seed=seed)
        paper = frozen.attribute(ids, positions="all", targets="all", seed=seed)
        assert relative_error(expected.total, paper.total) <= 1e-12, name  # the same real pass
        assert real is None or relative_error(expected.total, real) <= MODEL_RUN, name
        assert expected.reconstruction_error() <= 1e-9 and got.reconstruction_error() <= 1e-9, name
        assert relative_error(got.components, expected.components) <= 1e-12, name
        if name == "tokens":  # the routed rule really ran: it moves credit between tokens
            assert relative_error(expected.components, paper.components) > 1e-6, name
    module = blocked._module(next(iter(blocked._captures.values())), fxdepass.tokens(), ("logits",))[0]
    assert any(n.target is routed_attention for n in module.graph.nodes)
    if family in families.MOE:  # the interpreter ran it in one block, experts in chunks of routed rows
        assert ("value_sizes", True, True) in module.meta
    else:  # causal blocks ran
        assert module.meta["position_wise"] is True and blocked.causal


def test_routed_is_exact_for_padded_batches_and_the_last_position() -> None:
    model = families.build("llama", layers=2, seed=5)
    decomposed = fxdepass.compile(model, dtype=torch.float64, attention="routed")
    ids = torch.randint(0, families.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    for seed in SEEDS.values():
        batch = decomposed.attribute(ids, attention_mask=mask, positions="all", targets="all", seed=seed)
        assert batch.reconstruction_error() <= 1e-9
        last = decomposed.attribute(ids[:1], targets=3, seed=seed)  # one prompt: last-position tail
        assert last.reconstruction_error() <= 1e-9
        assert relative_error(last.components[:, 0, -1], batch.components[:, 0, -1, 3:4]) <= 1e-12
    real = _real_logits(model, ids, mask)
    assert relative_error(batch.total[mask.bool()], real[mask.bool()]) <= MODEL_RUN


def _steering_model() -> torch.nn.Module:
    """One attention layer whose last query, made by the *steer* token alone, picks the *fact* token's key.

    Hidden size 8, one head of width 8, MLP and norms neutral.  The fact token (id 1) writes a key
    feature (dim 3) and a value feature (dim 5); the steer token (id 2) writes only a query feature
    (dim 7) and has no value, and the unembedding of the target (id 3) reads only the attention
    output (dim 6).  Rotary angles are ~0 on dims 3 and 7 (a huge base), so scores do not depend on
    position.  The steer token, read at its own (last) position, changes the logit only by steering
    attention onto the fact: frozen attention must give it exactly nothing.
    """
    config = transformers.LlamaConfig(vocab_size=5, hidden_size=8, intermediate_size=4, num_hidden_layers=1,
                                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=16,
                                      rope_theta=1e12, tie_word_embeddings=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        embed[0, 1] = 1.0  # filler
        embed[1, 3], embed[1, 5] = 1.0, 1.0  # fact: key and value features
        embed[2, 7] = 1.0  # steer: query feature only
        attention = model.model.layers[0].self_attn
        attention.q_proj.weight[3, 7] = 6.0
        attention.k_proj.weight[3, 3] = 6.0
        attention.v_proj.weight[0, 5] = 1.0
        attention.o_proj.weight[6, 0] = 1.0
        model.lm_head.weight[3, 6] = 1.0
    return model


def test_routed_credits_a_token_that_only_steers_attention() -> None:
    model = _steering_model()
    ids = torch.tensor([[0, 1, 0, 2]])  # filler, fact, filler, steer
    results = {}
    for attention in ("frozen", "routed"):
        decomposed = fxdepass.compile(model, dtype=torch.float64, attention=attention)
        attribution = decomposed.attribute(ids, targets=3, seed=fxdepass.tokens(sink=False))
        assert attribution.reconstruction_error() <= 1e-12
        results[attention] = attribution.components[:, 0, -1, 0]
    logit = float(results["frozen"].sum())
    assert logit > 0.5  # the last query really attends to the fact
    assert abs(float(results["frozen"][3])) <= 1e-12 * logit  # frozen: the steer token gets nothing
    assert float(results["routed"][3]) >= 0.2 * logit  # routed: it gets a share of the routing term
    assert float(results["routed"][1]) >= 0.2 * logit  # and the fact keeps its value credit and its key's share
    assert torch.allclose(results["routed"].sum(), results["frozen"].sum(), rtol=1e-12, atol=0)


def test_routed_refuses_eager_attention() -> None:
    with pytest.raises(fxdepass.FxDePassError, match="attn_implementation='sdpa'"):
        fxdepass.compile(families.build("llama", attention="eager"), dtype=torch.float64, attention="routed")
    with pytest.raises(fxdepass.InvalidInputError, match="attention="):
        fxdepass.compile(families.build("llama"), attention="rooted")
