"""One planning module (fxdepass/planning.py, issue 17): every pass — ``attribute`` and the graph builder's
``decompose_nodes`` — is planned, guarded and checked the same way."""
from __future__ import annotations

import warnings

import pytest
import torch

import families
import fxdepass
from conftest import relative_error
from fxdepass import blocked, planning
from fxdepass.errors import OutOfMemoryEstimateError
from fxdepass.planning import PassPlan, plan_pass

IDS = torch.randint(0, families.VOCAB, (1, 40), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def llama() -> fxdepass.DecomposedModel:
    return fxdepass.compile(families.build("llama", layers=2, seed=4), dtype=torch.float64)


def _points(decomposed: fxdepass.DecomposedModel, seed: fxdepass.Seed) -> list:
    where = decomposed.locations_for(decomposed.prompt_inputs(IDS))
    return [p.node for p in seed.points(where)]


def test_a_long_prompt_is_planned_in_blocks_and_slices(llama) -> None:
    captured = next(iter(llama._captures.values()))
    module = llama._module(captured, fxdepass.tokens(), ("logits",))[0]
    plan = llama._plan(module, captured, fxdepass.tokens(), IDS, last_position_read=True)
    # 40 positions: 40 // 16 = 2 blocks, raised to MIN_BLOCKS = 3; both MLPs in neuron slices
    assert (plan.blocked, plan.blocks, plan.sliced, plan.last_position_only) == (True, 3, True, True)
    assert plan.interpreted and not plan.routed
    assert plan.slice_width == planning.BLOCKED_SLICE_WIDTH  # blocks leave room for wider slices
    # one block (a seed other than tokens): every component at every position, the narrow slices
    heads = llama._plan(module, captured, fxdepass.heads(1), IDS, last_position_read=True)
    assert (heads.blocked, heads.sliced, heads.slice_width) == (False, True, blocked.SLICE_WIDTH)
    # a batch of two prompts: no blocks, slices or tail, the dense module runs
    two = plan_pass(module, captured, IDS.repeat(2, 1), fxdepass.tokens(), causal=lambda: True, causal_blocks=8,
                    last_position_read=True)
    assert not two.interpreted and two == PassPlan(symbol=plan.symbol, batch=plan.batch)
    # causality is asked only where it matters (it runs the model)
    asked = []
    plan_pass(module, captured, IDS[:, :8], fxdepass.tokens(), causal=lambda: asked.append(1) or True, causal_blocks=8)
    assert asked == []


@pytest.mark.parametrize("seed", [fxdepass.tokens(), fxdepass.neurons(0, group_size=16), fxdepass.heads(1)],
                         ids=["tokens", "neurons", "heads"])
def test_decompose_nodes_runs_the_planned_pass_exactly(llama, seed) -> None:
    """The graph builder's passes (seed activations) run as planned — for tokens in causal blocks with neuron
    slices — and give the dense module's values, summing to the real ones."""
    nodes = _points(llama, seed)
    got = llama.decompose_nodes(IDS, seed, nodes)
    module = llama._modules[(id(next(iter(llama._captures.values()))), seed, tuple(nodes))][0]
    inputs = llama.prompt_inputs(IDS)
    with torch.no_grad():
        dense = module(*[inputs[name] for name in next(iter(llama._captures.values())).inputs])
    assert len(got) == len(nodes) == len(dense)
    for (real, parts), (dense_real, dense_parts) in zip(got, dense):
        assert torch.equal(real, dense_real)
        assert relative_error(parts, dense_parts) <= 1e-12
        assert relative_error(parts.sum(0), real) <= 1e-12
    if isinstance(seed, fxdepass.Tokens):
        captured = next(iter(llama._captures.values()))
        assert llama._plan(module, captured, seed, IDS).blocked


def test_decompose_nodes_is_guarded_and_checked(llama, monkeypatch) -> None:
    nodes = _points(llama, fxdepass.tokens())
    with pytest.raises(OutOfMemoryEstimateError, match="positions"):
        llama.decompose_nodes(IDS, fxdepass.tokens(), nodes, memory_limit=1024)
    # a pass whose sums are off is reported (the check is the one attribute runs)
    monkeypatch.setitem(fxdepass.planning.TOLERANCE, torch.float64, -1.0)
    with pytest.warns(UserWarning, match="do not sum to the real value"):
        llama.decompose_nodes(IDS, fxdepass.tokens(), nodes)
    with warnings.catch_warnings(), pytest.raises(fxdepass.ReconstructionError):
        warnings.simplefilter("ignore")
        llama.decompose_nodes(IDS, fxdepass.tokens(), nodes, strict=True)


def test_seed_activations_go_through_the_memory_guard(llama, monkeypatch) -> None:
    from fxdepass.graph import seed_activations

    heads = len(llama.attribute(IDS, seed=fxdepass.heads(1)).labels) - 1  # rest has no activation
    activations = seed_activations(llama, IDS, fxdepass.heads(1))
    assert activations.shape == (heads,) and bool((activations > 0).all())
    monkeypatch.setattr(fxdepass.planning, "available_memory", lambda device: 1024)
    with pytest.raises(OutOfMemoryEstimateError):
        seed_activations(llama, IDS, fxdepass.heads(1))


def test_blocks_in_narrow_neuron_slices_equal_the_dense_module(llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """The small models' hidden layers fit one slice of the blocked width, so this runs the blocked pass in
    three slices per MLP: the slice loop over blocks gives the dense module's components (float64)."""
    dense = llama.attribute(IDS.repeat(2, 1), positions="all", targets="all").components[:, :1]
    monkeypatch.setattr(planning, "BLOCKED_SLICE_WIDTH", 0.5)
    captured = next(iter(llama._captures.values()))
    module = llama._module(captured, fxdepass.tokens(), ("logits",))[0]
    plan = llama._plan(module, captured, fxdepass.tokens(), IDS)
    region = next(iter(blocked.neuron_regions(module).values()))
    assert plan.blocked and region.width // blocked.slice_columns(region.width, 32, plan.slice_width) == 3
    got = llama.attribute(IDS, positions="all", targets="all")
    assert relative_error(got.components, dense) <= 1e-12
