"""Robustness: every public call either returns an exact result or raises an FxDePassError subclass
with a message naming what and where; the model is never harmed; results are deterministic."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import families
import fxdepass
import fxdepass.rules.attention as attention_rules

MODEL = families.build("llama", layers=2, seed=21)
DECOMPOSED = fxdepass.compile(MODEL, dtype=torch.float64)
LAYERS, HEADS, WIDTH = 2, MODEL.config.num_attention_heads, MODEL.config.hidden_size

seeds = st.one_of(
    st.builds(fxdepass.tokens, sink=st.booleans()),
    st.builds(lambda p: fxdepass.tokens(positions=p), st.lists(st.integers(-12, 12), min_size=1, max_size=3, unique=True)),
    st.builds(fxdepass.heads, st.integers(-4, 4)),
    st.builds(lambda l, i, g: fxdepass.neurons(l, indices=i, group_size=g), st.integers(-3, 3),
              st.one_of(st.none(), st.lists(st.integers(-60, 60), min_size=1, max_size=4, unique=True)), st.integers(1, 3)),  # group_size 0 is refused when the seed is made
    st.builds(fxdepass.modules, st.integers(-3, 3)),
    st.builds(lambda l, d: fxdepass.subspace(l, [torch.eye(d, dtype=torch.float64)]), st.integers(-3, 3), st.sampled_from([WIDTH, 5])),
    st.just("not a seed"),
)
readouts = st.one_of(st.sampled_from(["logits", "hidden", "layers", "model.layers.0.mlp", "nowhere", ""]),
                     st.lists(st.sampled_from(["logits", "hidden", "layers"]), min_size=1, max_size=2, unique=True))


@st.composite
def prompts(draw: st.DrawFn) -> tuple:
    batch, length = draw(st.integers(0, 3)), draw(st.integers(0, 9))
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(-2, families.VOCAB + 2), min_size=length, max_size=length),
                                     min_size=batch, max_size=batch)), dtype=draw(st.sampled_from([torch.long, torch.int32, torch.float32])))
    mask = draw(st.one_of(st.none(), st.builds(lambda: "ones"), st.builds(lambda: "left"), st.builds(lambda: "bad")))
    if mask == "ones":
        mask = torch.ones(ids.shape, dtype=torch.long)
    elif mask == "left" and ids.ndim == 2 and ids.shape[1] > 1:
        mask = torch.ones(ids.shape, dtype=torch.long)
        mask[:, 0] = 0
    elif mask == "bad":
        mask = torch.full((1, 3), 2)
    else:
        mask = None
    return ids, mask


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(prompts(), seeds, readouts, st.one_of(st.none(), st.integers(-5, families.VOCAB + 5)), st.booleans())
def test_every_call_is_exact_or_a_clear_error(prompt, seed, readout, target, last) -> None:
    ids, mask = prompt
    try:
        result = DECOMPOSED.attribute(ids, attention_mask=mask, seed=seed, readout=readout,
                                      targets=target, positions="last" if last else "all", strict=True)
    except fxdepass.FxDePassError as error:
        assert str(error)
        return
    for attribution in (result.values() if isinstance(result, dict) else [result]):
        assert attribution.reconstruction_error() <= 1e-9
        if attribution.readout == "logits":
            try:
                attribution.scores()
            except fxdepass.FxDePassError:
                pass


def test_results_are_deterministic() -> None:
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    first = DECOMPOSED.attribute(ids, positions="all", targets="all", readout=["logits", "layers"])
    second = DECOMPOSED.attribute(ids, positions="all", targets="all", readout=["logits", "layers"])
    for name in first:
        assert torch.equal(first[name].components, second[name].components)


def test_model_unchanged_by_compile_attribute_and_ablate() -> None:
    model = copy.deepcopy(MODEL)
    model.config._attn_implementation = "sdpa"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    decomposed.attribute(torch.tensor([[1, 2, 3, 4]]), positions="all", targets="all", seed=fxdepass.heads(1), readout=["logits", "layers"])
    with fxdepass.ablate(decomposed, heads={0: [1]}, neurons={1: [2]}):
        pass
    decomposed.generate_attributed(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    assert model.config.to_dict() == config and not model.training
    for key, value in model.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key


def test_divergence_is_reported_at_its_first_node(monkeypatch) -> None:
    real = attention_rules.attention_probabilities
    monkeypatch.setattr(attention_rules, "attention_probabilities", lambda *a, **k: real(*a, **k) * 1.01)
    decomposed = fxdepass.compile(families.build("llama", layers=2, seed=3), dtype=torch.float64, causal_blocks=0)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with pytest.warns(UserWarning, match=r"first diverges at layers_0_self_attn_scaled_dot_product_attention_c at model\.layers\.0\.self_attn"):
        decomposed.attribute(ids, positions="all", targets="all")
    with pytest.raises(fxdepass.ReconstructionError, match="do not sum to the real value"):
        decomposed.attribute(ids, positions="all", targets="all", strict=True)


def test_non_finite_values_name_their_first_node() -> None:
    model = families.build("llama", layers=2, seed=3)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(fxdepass.InvalidInputError, match=r"NaN or inf, first at .*model\.layers\.1\.mlp\.up_proj\.weight"):
        fxdepass.compile(model, dtype=torch.float64).attribute(torch.tensor([[1, 2, 3]]), positions="all", targets="all")


@pytest.mark.parametrize("call,error,words", [
    (lambda: DECOMPOSED.attribute(torch.tensor([[1, 2, 999]]), positions="all", targets="all"), fxdepass.InvalidInputError, "input_ids must lie in [0, 61)"),
    (lambda: DECOMPOSED.attribute(torch.ones(1, 70, dtype=torch.long), positions="all", targets="all"), fxdepass.InvalidInputError, "at most 64"),
    (lambda: DECOMPOSED.attribute(torch.tensor([[1, 2]]), positions="all", targets="all", attention_mask=torch.tensor([[0, 0]])), fxdepass.InvalidInputError, "at least one token"),
    (lambda: DECOMPOSED.attribute(torch.tensor([[1, 2]]), positions="all", targets="all", attention_mask=torch.tensor([[1, 3]])), fxdepass.InvalidInputError, "0 (padding) and 1"),
    (lambda: DECOMPOSED.attribute(torch.tensor([[1, 2]]), positions="all", targets="all", seed=fxdepass.heads(5)), fxdepass.InvalidSeedError, "layer 5 is out of range"),
    (lambda: DECOMPOSED.attribute(torch.tensor([[1, 2]]), positions="all", targets="all", seed=fxdepass.neurons(0, indices=[500])), fxdepass.InvalidSeedError, "neuron 500"),
    (lambda: fxdepass.subspace(0, [torch.ones(3, 4)]), fxdepass.InvalidSeedError, "square [d, d]"),
    (lambda: fxdepass.subspace(0, [torch.eye(WIDTH) * 2], check=True), fxdepass.InvalidSeedError, "not a projection"),
    (lambda: DECOMPOSED.attribute(torch.tensor([[1, 2]]), positions="all", targets="all", readout="model.nowhere"), fxdepass.InvalidReadoutError, "model.nowhere"),
    (lambda: DECOMPOSED.attribute(torch.tensor([[1, 2]]), targets=[100]), fxdepass.InvalidInputError, "target 100 is outside the vocabulary"),
    (lambda: DECOMPOSED.attribute(torch.tensor([[1, 2]]), positions="all", targets="all", memory_limit=10), fxdepass.OutOfMemoryEstimateError, "would fit"),
    (lambda: fxdepass.tokens(positions=[1], groups=[[1]]), fxdepass.InvalidSeedError, "not both"),
    (lambda: fxdepass.neurons(0, group_size=0), fxdepass.InvalidSeedError, "group_size"),
])
def test_error_messages_name_what_and_where(call, error, words) -> None:
    with pytest.raises(error) as raised:
        call()
    assert words in str(raised.value)
