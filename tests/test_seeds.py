"""Every granularity (issue: seeds, readouts, generation, ablation): exact sums for every seed kind and
family, and each seed's components checked against a direct computation."""
from __future__ import annotations

import functools

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import families
import fxdepass
from conftest import relative_error
from probes import module_io
from oracle_moe import mixtral_expert_terms

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SEED_KINDS = ("tokens", "positions", "groups", "heads", "neurons", "neuron_groups", "modules", "subspace", "custom")


@functools.lru_cache(maxsize=6)
def _compiled(family: str, layers: int, head_dim: int, seed: int) -> tuple[torch.nn.Module, fxdepass.DecomposedModel]:
    model = families.build(family, layers=layers, head_dim=head_dim, seed=seed)
    return model, fxdepass.compile(model, dtype=torch.float64)


def _make_seed(kind: str, layer: int, width: int, length: int, data: st.DataObject, moe: bool = False) -> fxdepass.Seed:
    if kind == "tokens":
        return fxdepass.tokens(sink=data.draw(st.booleans()))
    if kind == "positions":
        return fxdepass.tokens(positions=data.draw(st.lists(st.integers(-length, length - 1), min_size=1, max_size=3, unique=True)))
    if kind == "groups":
        cut = data.draw(st.integers(1, length - 1))
        return fxdepass.tokens(groups={"first": range(cut), "second": range(cut, length)})
    if kind == "heads":
        return fxdepass.heads(layer)
    if kind == "neurons":
        return fxdepass.neurons(layer)
    if kind == "neuron_groups":
        indices = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=5, unique=True))
        return fxdepass.neurons(layer, indices=indices, group_size=2, expert=data.draw(st.integers(-4, 3)) if moe else None)
    if kind == "modules":
        return fxdepass.modules(layer)
    if kind == "subspace":
        basis = torch.randn(width, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
        projector = fxdepass.orthogonal_projector(basis)
        return fxdepass.subspace(layer, [projector, torch.eye(width, dtype=torch.float64) - projector])
    return fxdepass.custom("placeholder: the test puts the block path in", split=lambda v: torch.stack((0.25 * v, 0.75 * v)),
                           names=("quarter", "three quarters"))


@SETTINGS
@given(st.sampled_from(families.FAMILIES), st.sampled_from(SEED_KINDS), st.integers(1, 3), st.integers(-3, 2),
       st.sampled_from([4, 8]), st.integers(3, 8), st.data())
def test_every_seed_is_exact(family: str, kind: str, layers: int, layer: int, head_dim: int, length: int,
                             data: st.DataObject) -> None:
    layer = layer % layers
    model, decomposed = _compiled(family, layers, head_dim, 0)
    seed = _make_seed(kind, layer, 4 * head_dim, length, data, moe=family in families.MOE)
    if isinstance(seed, fxdepass.Custom):
        block = decomposed.locations_of(next(iter(decomposed._captures.values()))).blocks[layer]
        seed = fxdepass.custom(block, where=data.draw(st.sampled_from(["input", "output"])), split=seed.split, names=seed.names)
    ids = torch.randint(0, families.VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    final = "hidden" if family in families.ENCODERS else "logits"
    results = decomposed.attribute(ids, positions="all", targets="all", seed=seed, readout=[final, "layers"])
    for attribution in results.values():
        assert attribution.reconstruction_error() <= 1e-9
        assert len(attribution.labels) == attribution.components.shape[attribution.component_axis]


# -- each seed against a direct computation --------------------------------------------------------


@pytest.fixture(scope="module")
def llama64() -> tuple[torch.nn.Module, fxdepass.DecomposedModel]:
    model = families.build("llama", layers=2, bias=True, seed=11).double()
    return model, fxdepass.compile(model, dtype=torch.float64)


IDS = torch.tensor([[5, 17, 3, 42, 8, 23, 11]])
#: Hugging Face's own float64 forward still rounds inside RMSNorm through float32 (SPEC §5); direct
#: computations from its intermediate values therefore agree with the float64 policy to about 1e-7.
HF_FORWARD = 1e-6


def test_head_components_are_each_heads_term_of_the_output_projection(llama64) -> None:
    model, decomposed = llama64
    projection = model.model.layers[1].self_attn.o_proj
    attribution = decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.heads(-1), readout="model.layers.1.self_attn.o_proj")
    x, y = module_io(projection, lambda: model(IDS))
    size = x.shape[-1] // model.config.num_attention_heads
    for h in range(model.config.num_attention_heads):
        cols = slice(h * size, (h + 1) * size)
        direct = x[..., cols] @ projection.weight[:, cols].T
        assert relative_error(attribution.components[h], direct) <= HF_FORWARD
    torch.testing.assert_close(attribution.components[-1], projection.bias.expand_as(y), rtol=0, atol=1e-14)
    assert attribution.labels[:2] == ["L1H0", "L1H1"]


def test_neuron_components_are_act_times_up_times_down_column(llama64) -> None:
    model, decomposed = llama64
    mlp = model.model.layers[0].mlp
    attribution = decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.neurons(0), readout="model.layers.0.mlp.down_proj")
    x, _ = module_io(mlp, lambda: model(IDS))
    with torch.no_grad():
        hidden = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    for i in (0, 7, 47):
        direct = hidden[..., i : i + 1] * mlp.down_proj.weight[:, i]
        assert relative_error(attribution.components[i], direct) <= HF_FORWARD


#: The MoE models run in float32 (their grouped expert kernel has no float64 CPU version) and are
#: decomposed in float64; direct computations start from the float32 eager activations.
MOE_FORWARD = 1e-5


@pytest.fixture(scope="module")
def mixtral() -> tuple[torch.nn.Module, fxdepass.DecomposedModel]:
    model = families.build("mixtral", layers=2, seed=4)
    return model, fxdepass.compile(model, dtype=torch.float64)


def test_moe_neuron_seeds_are_per_expert_and_per_expert_neuron(mixtral) -> None:
    model, decomposed = mixtral
    moe = model.model.layers[1].mlp
    x, y = module_io(moe, lambda: model(IDS))
    terms, routed = mixtral_expert_terms(moe, x)
    down = moe.experts.down_proj.double()                                   # [experts, d, neurons]
    per_expert = decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.neurons(1), readout="model.layers.1.mlp")
    assert per_expert.labels == ["L1E0", "L1E1", "L1E2", "L1E3", "rest"]
    assert routed.gt(0).any(0).sum() >= 2                                    # several experts really used
    for e in range(4):
        direct = torch.einsum("ti,di->td", terms[:, e], down[e]).reshape(y.shape)
        torch.testing.assert_close(per_expert.components[e], direct, rtol=0, atol=MOE_FORWARD * float(y.abs().max()))
    per_neuron = decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.neurons(1, expert=2, indices=[0, 5, 9]), readout="model.layers.1.mlp")
    assert per_neuron.labels == ["L1E2N0", "L1E2N5", "L1E2N9", "rest"]
    for k, i in enumerate((0, 5, 9)):
        direct = (terms[:, 2, i, None] * down[2][:, i]).reshape(y.shape)
        torch.testing.assert_close(per_neuron.components[k], direct, rtol=0, atol=MOE_FORWARD * float(y.abs().max()))
    assert relative_error(per_neuron.total, y.double()) <= MOE_FORWARD


def test_moe_shared_expert_is_its_own_component_and_seeds_check_the_layer_kind() -> None:
    model = families.build("qwen2_moe", layers=2, seed=4)
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    attribution = decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.neurons(-1), readout="model.layers.1.mlp")
    assert attribution.labels[-2:] == ["L1 shared expert", "rest"]
    x, _ = module_io(model.model.layers[1].mlp.shared_expert, lambda: model(IDS))
    _, shared = module_io(model.model.layers[1].mlp.shared_expert.down_proj, lambda: model(IDS))
    gate = torch.sigmoid(model.model.layers[1].mlp.shared_expert_gate(x)).double()
    torch.testing.assert_close(attribution.components[-2], (gate * shared.double()).reshape(1, 7, -1), rtol=0, atol=MOE_FORWARD * float(shared.abs().max()))
    assert attribution.reconstruction_error() <= 1e-9
    with pytest.raises(fxdepass.InvalidSeedError, match="expert=e"):
        decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.neurons(1, indices=[0]))
    with pytest.raises(fxdepass.InvalidSeedError, match="mixture of experts"):
        with fxdepass.ablate(decomposed, neurons={1: [0]}):
            pass
    with pytest.raises(fxdepass.InvalidSeedError, match="expert 4 is out of range"):
        decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.neurons(1, expert=4))
    with pytest.raises(fxdepass.InvalidSeedError, match="no routed experts"):
        fxdepass.compile(families.build("llama", layers=1)).attribute(IDS, positions="all", targets="all", seed=fxdepass.neurons(0, expert=0))


def test_moe_modules_seed_puts_the_whole_moe_block_in_the_mlp_component(mixtral) -> None:
    model, decomposed = mixtral
    attribution = decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.modules(1), readout="model.layers.1.mlp")
    _, y = module_io(model.model.layers[1].mlp, lambda: model(IDS))
    assert relative_error(attribution.components[1], y.double()) <= MOE_FORWARD
    assert attribution.reconstruction_error() <= 1e-9


def test_modules_of_a_one_layer_model_are_direct_effects() -> None:
    model = families.build("llama", layers=1, seed=3).double()
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    attribution = decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.modules(0))
    attention_out = module_io(model.model.layers[0].self_attn.o_proj, lambda: model(IDS))[1]
    mlp_out = module_io(model.model.layers[0].mlp.down_proj, lambda: model(IDS))[1]
    final, _ = module_io(model.model.norm, lambda: model(IDS))
    norm = model.model.norm
    scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    for index, value in ((0, attention_out), (1, mlp_out)):
        direct = (value * scale) @ model.lm_head.weight.T
        assert relative_error(attribution.components[index], direct) <= HF_FORWARD
    assert attribution.labels == ["L0 attention", "L0 mlp", "rest"]


def test_subspace_split_matches_a_hand_computation() -> None:
    model = families.build("llama", layers=1, seed=5, attention="eager", bias=False).double()
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    width = model.config.hidden_size
    projector = fxdepass.orthogonal_projector(torch.randn(width, 4, dtype=torch.float64))
    complement = torch.eye(width, dtype=torch.float64) - projector
    attribution = decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.subspace(0, [projector, complement]),
                                       readout="model.layers.0.self_attn.o_proj")
    assert attribution.reconstruction_error() <= 1e-12
    assert attribution.components[-1].abs().max() <= 1e-12  # P + (I − P) = I leaves nothing to rest
    # By hand: frozen RMS scale, value projection, frozen attention probabilities, output projection.
    layer = model.model.layers[0]
    with torch.no_grad():
        out = model(IDS, output_attentions=True)
    probabilities = out.attentions[0][0]                                # [heads, query, key]
    embedded = model.model.embed_tokens(IDS)[0]
    norm = layer.input_layernorm
    scale = torch.rsqrt(embedded.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    size = width // heads
    for index, p in enumerate((projector, complement)):
        values = ((embedded @ p.T) * scale) @ layer.self_attn.v_proj.weight.T   # [positions, kv·size]
        values = values.view(-1, kv, size).transpose(0, 1).repeat_interleave(heads // kv, 0)
        mixed = (probabilities @ values).transpose(0, 1).reshape(len(embedded), width)
        direct = mixed @ layer.self_attn.o_proj.weight.T
        assert relative_error(attribution.components[index, 0], direct) <= HF_FORWARD


def test_custom_split_is_checked(llama64) -> None:
    _, decomposed = llama64
    bad = fxdepass.custom("model.layers.0.mlp", split=lambda v: torch.stack((v, v)), names=("a", "b"))
    with pytest.raises(fxdepass.InvalidSeedError, match="do not sum to the value"):
        decomposed.attribute(IDS, positions="all", targets="all", seed=bad)
    wrong_shape = fxdepass.custom("model.layers.0.mlp", split=lambda v: v.sum(-1, keepdim=True).unsqueeze(0))
    with pytest.raises(fxdepass.InvalidSeedError, match="split returned shape"):
        decomposed.attribute(IDS, positions="all", targets="all", seed=wrong_shape)


def test_layers_readout_shape_and_paper_all_layer(paper_reference) -> None:
    data = torch.load(paper_reference / "llama_init0.2_fp64_exact64.pt", weights_only=True)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**data["config"])).double().eval()
    model.load_state_dict(data["state_dict"])
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    ids = torch.as_tensor(data["input_ids"]).reshape(1, -1)
    for sink in (True, False):
        layers = decomposed.attribute(ids, positions="all", targets="all", seed=fxdepass.tokens(sink=sink), readout="layers")
        reference = data["results"][f"ignore_special_token={sink}"]["all_layer"]      # [L+1, position, source, D]
        ours = layers.components[:, :-1, 0].permute(0, 2, 1, 3)                      # [L+1, position, source, D]
        assert ours.shape == reference.shape
        assert relative_error(ours, reference) <= 1e-6


def test_layers_readout_equals_per_layer_oracle(llama64) -> None:
    from oracle_llama import depass_tokens_llama

    model, decomposed = llama64
    layers = decomposed.attribute(IDS, positions="all", targets="all", readout="layers")
    oracle = depass_tokens_llama(model, IDS, sink=True)
    assert layers.components.shape == (3, IDS.shape[1] + 1, 1, IDS.shape[1], model.config.hidden_size)
    assert relative_error(layers.components[:, :, 0], oracle["layers"]) <= 1e-9


def test_negative_layers_locations_and_errors(llama64) -> None:
    _, decomposed = llama64
    first = decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.heads(-2)).components
    torch.testing.assert_close(first, decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.heads(0)).components)
    paths = decomposed.locations()
    assert "model.layers.1.mlp.down_proj" in paths and "lm_head" in paths
    with pytest.raises(fxdepass.InvalidSeedError, match="layer 2 is out of range"):
        decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.heads(2))
    with pytest.raises(fxdepass.InvalidSeedError, match="neuron 999 is out of range"):
        decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.neurons(0, indices=[999]))
    with pytest.raises(fxdepass.InvalidSeedError, match="width"):
        decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.subspace(0, [torch.eye(5)]))
    with pytest.raises(fxdepass.InvalidReadoutError, match="locations"):
        decomposed.attribute(IDS, positions="all", targets="all", readout="model.nowhere")
    with pytest.raises(fxdepass.InvalidSeedError, match="position 12 is out of range"):
        decomposed.attribute(IDS, seed=fxdepass.tokens(positions=[12]))


def test_generated_tokens_scores_sum_to_their_logits(llama64) -> None:
    model, decomposed = llama64
    result = decomposed.generate_attributed(IDS[:, :4], max_new_tokens=4)
    assert result.sequence.shape == (1, 8)
    with torch.no_grad():
        greedy = model.generate(IDS[:, :4], attention_mask=torch.ones_like(IDS[:, :4]), max_new_tokens=4, do_sample=False,
                                pad_token_id=0)
    assert torch.equal(result.sequence, greedy)
    for step in range(4):
        scores = result.scores(step)
        assert scores.shape == (4 + step + 1,)
        assert len(result.labels(step)) == len(scores)
        assert abs(float(scores.sum()) - result.value(step)) <= 1e-9 * max(1.0, abs(result.value(step)))


def test_ablate_zeroes_contributions_and_restores_exactly(llama64) -> None:
    model, decomposed = llama64
    with torch.no_grad():
        before = model(IDS).logits
    parameters = {k: v.clone() for k, v in model.state_dict().items()}
    heads = model.config.num_attention_heads
    with fxdepass.ablate(decomposed, heads={1: list(range(heads))}, neurons={-1: [0, 3]}):
        out = module_io(model.model.layers[1].self_attn.o_proj, lambda: model(IDS))[1]
        torch.testing.assert_close(out, model.model.layers[1].self_attn.o_proj.bias.expand_as(out), rtol=0, atol=0)
        x, _ = module_io(model.model.layers[1].mlp.down_proj, lambda: model(IDS))
        assert (x[..., [0, 3]] == 0).all() and (x[..., 1] != 0).any()
    with torch.no_grad():
        after = model(IDS).logits
    assert torch.equal(before, after)
    for key, value in model.state_dict().items():
        assert torch.equal(value, parameters[key])
    with fxdepass.ablate(model, heads={0: [1]}):      # a plain model works too
        with torch.no_grad():
            assert not torch.equal(model(IDS).logits, before)
    with pytest.raises(fxdepass.InvalidSeedError, match="head 9 is out of range"):
        with fxdepass.ablate(model, heads={0: [9]}):
            pass


def test_ablation_agrees_with_head_attribution() -> None:
    """Removing a head in a one-layer model changes the logits by its direct effect (frozen final norm aside)."""
    model = families.build("llama", layers=1, seed=8).double()
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    attribution = decomposed.attribute(IDS, positions="all", targets="all", seed=fxdepass.heads(0), readout="model.layers.0.self_attn.o_proj")
    with torch.no_grad(), fxdepass.ablate(decomposed, heads={0: [2]}):
        _, ablated = module_io(model.model.layers[0].self_attn.o_proj, lambda: model(IDS))
    assert relative_error(ablated, attribution.total - attribution.components[2]) <= HF_FORWARD
