"""Causal blocks (fxdepass/blocked.py Note [Causal blocks]) give the dense path's result, in float64."""
from __future__ import annotations

import pytest
import torch

import families
import fxdepass
from conftest import relative_error
from fxdepass.blocked import BlockedInterpreter, neuron_regions
from fxdepass.routed import routed_regions


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "phi", "mistral"])
def test_blocks_equal_dense(family: str) -> None:
    model = families.build(family, layers=2, seed=4)
    dense = fxdepass.compile(model, dtype=torch.float64, causal_blocks=0)
    blocked = fxdepass.compile(model, dtype=torch.float64, causal_blocks=3)
    ids = torch.randint(0, families.VOCAB, (1, 41), generator=torch.Generator().manual_seed(3))
    for seed in (fxdepass.tokens(), fxdepass.tokens(sink=False)):
        expected = dense.attribute(ids, positions="all", targets="all", seed=seed, readout=["logits", "layers"])
        got = blocked.attribute(ids, positions="all", targets="all", seed=seed, readout=["logits", "layers"])
        for name in expected:
            assert relative_error(got[name].components, expected[name].components) <= 1e-12
    module = blocked._module(next(iter(blocked._captures.values())), fxdepass.tokens(), ("logits", "layers"))[0]
    assert module.meta["position_wise"] is True and blocked.causal  # the blocked path really ran
    assert len(module.meta["neuron_regions"]) == 2  # and each layer's MLP in neuron slices (Note [Neuron chunks])


def test_blocks_with_the_sink_at_a_block_boundary() -> None:
    """Left padding moves the sink to position 20, the first component of the second block (41 tokens
    make 2 blocks, starting at 0 and 20): the
    per-block softmax must exclude it there, and never mistake block 0's rest for it."""
    model = families.build("llama", layers=2, seed=4)
    ids = torch.randint(0, families.VOCAB, (1, 41), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :20] = 0
    dense = fxdepass.compile(model, dtype=torch.float64, causal_blocks=0).attribute(ids, positions="all", targets="all", attention_mask=mask)
    blocked = fxdepass.compile(model, dtype=torch.float64, causal_blocks=3).attribute(ids, positions="all", targets="all", attention_mask=mask)
    assert relative_error(blocked.components, dense.components) <= 1e-12


def test_blocks_give_rest_the_neurons_no_component_reaches() -> None:
    """A neuron whose input weights and bias are zero has every component exactly zero: the blocked
    softmax allocation must hand its activation to rest, as the dense rule does (never 0/0)."""
    model = families.build("gpt2", layers=2, seed=4)
    with torch.no_grad():
        fc = model.transformer.h[0].mlp.c_fc
        fc.weight[:, 5], fc.bias[5] = 0.0, 0.0
    ids = torch.randint(0, families.VOCAB, (1, 41), generator=torch.Generator().manual_seed(3))
    expected = fxdepass.compile(model, dtype=torch.float64, causal_blocks=0).attribute(ids, positions="all", targets="all", readout="layers")
    got = fxdepass.compile(model, dtype=torch.float64, causal_blocks=3).attribute(ids, positions="all", targets="all", readout="layers")
    assert torch.isfinite(got.components).all()
    assert relative_error(got.components, expected.components) <= 1e-12


def test_blocks_are_not_used_where_they_would_be_wrong() -> None:
    encoder = fxdepass.compile(families.build("bert"), dtype=torch.float64, causal_blocks=4)
    ids = torch.randint(0, families.VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    assert encoder.attribute(ids, positions="all", targets="all", readout="hidden").reconstruction_error() <= 1e-9
    assert not encoder.causal
    decoder = fxdepass.compile(families.build("llama"), dtype=torch.float64, causal_blocks=4)
    grouped = fxdepass.tokens(groups=[[0, 5], [3, 19]])
    assert decoder.attribute(ids, positions="all", targets="all", seed=grouped).reconstruction_error() <= 1e-9
    module = decoder._module(next(iter(decoder._captures.values())), grouped, ("logits",))[0]
    assert "position_wise" not in module.meta  # groups are not position-aligned: dense path
    moe = fxdepass.compile(families.build("mixtral"), dtype=torch.float64, causal_blocks=4)
    for last in (False, True):  # routing gathers tokens across positions: neither blocks nor a last-position tail
        assert moe.attribute(ids, positions="last" if last else "all", targets="all").reconstruction_error() <= 1e-9
    assert moe._module(next(iter(moe._captures.values())), fxdepass.tokens(), ("logits",))[0].meta["position_wise"] is False


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"),
                                              ("gpt_neox", "sdpa"), ("bert", "eager")])
def test_last_position_and_target_rows_equal_full_readout(family: str, attention: str) -> None:
    decomposed = fxdepass.compile(families.build(family, layers=2, seed=6, attention=attention), dtype=torch.float64)
    ids = torch.randint(0, families.VOCAB, (1, 21), generator=torch.Generator().manual_seed(5))
    readout = "hidden" if family == "bert" else "logits"
    for seed in (fxdepass.tokens(), fxdepass.heads(1), fxdepass.neurons(0, group_size=8)):
        full = decomposed.attribute(ids, positions="all", targets="all", readout=readout, seed=seed)
        last = decomposed.attribute(ids, positions="last", targets="all", readout=readout, seed=seed)
        assert last.components.shape[2] == 1 and last.positions == [20]
        assert relative_error(last.components, full.components[:, :, -1:]) <= 1e-12
    full = decomposed.attribute(ids, positions="all", targets="all", readout=readout)
    if readout == "logits":
        # the default: the predicted token's head row at the last position only; given targets: theirs
        default = decomposed.attribute(ids)
        assert default.components.shape[2:] == (1, 1) and default.reconstruction_error() <= 1e-9
        assert relative_error(default.scores(), full.scores()) <= 1e-12
        for target in (3, 7, fxdepass.diff(3, 7), fxdepass.logprob(7)):
            rows = decomposed.attribute(ids, targets=target)
            assert rows.components.shape[-1] == 1 and rows.reconstruction_error() <= 1e-9
            assert relative_error(rows.scores(), full.scores(target)) <= 1e-12
        with pytest.raises(fxdepass.InvalidInputError, match="was not read out"):
            rows.scores(5)
        with pytest.raises(fxdepass.InvalidInputError, match="was not read out"):
            rows.scores(position=4)
        some = decomposed.attribute(ids, targets=3, positions=[4, -1])
        assert relative_error(some.scores(position=4), full.scores(3, position=4)) <= 1e-12


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_last_position_equals_full_readout_through_experts(family: str) -> None:
    # the rows sorted by expert mix positions: a pass read at the last position keeps every position
    # until they are unsorted (a seed inside the last layer's experts once failed on a narrowed view)
    decomposed = fxdepass.compile(families.build(family, layers=2, seed=6), dtype=torch.float64)
    ids = torch.randint(0, families.VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    for seed in (fxdepass.tokens(), fxdepass.neurons(1), fxdepass.neurons(1, expert=0, group_size=8)):
        full = decomposed.attribute(ids, positions="all", targets="all", seed=seed)
        last = decomposed.attribute(ids, positions="last", targets="all", seed=seed)
        assert last.reconstruction_error() <= 1e-9
        assert relative_error(last.components, full.components[:, :, -1:]) <= 1e-12


def test_memory_guard_says_what_would_fit() -> None:
    decomposed = fxdepass.compile(families.build("llama", layers=1), causal_blocks=0)
    ids = torch.randint(0, families.VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    with pytest.raises(fxdepass.OutOfMemoryEstimateError, match=r"about \d+ positions .* would fit"):
        decomposed.attribute(ids, positions="all", targets="all", memory_limit=100_000)
    assert decomposed.attribute(ids, positions="all", targets="all", memory_limit=10**9).reconstruction_error() <= 1e-4


@pytest.mark.parametrize("family", families.MOE)
def test_expert_neuron_slices_equal_the_plain_module(family: str) -> None:
    """Mixture-of-experts layers run their experts in neuron slices too (one block: routing gathers
    across positions).  A batch of two runs the plain generated module; the grouped expert kernel has
    no float64 CPU version, so the comparison is in float32."""
    model = families.build(family, layers=2, seed=4)
    decomposed = fxdepass.compile(model)
    ids = torch.randint(0, families.VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    for seed in (fxdepass.tokens(), fxdepass.heads(1)):
        sliced = decomposed.attribute(ids, positions="all", targets="all", seed=seed)
        plain = decomposed.attribute(ids.repeat(2, 1), positions="all", targets="all", seed=seed)
        assert relative_error(sliced.components, plain.components[:, :1]) <= 1e-5
    module = decomposed._module(next(iter(decomposed._captures.values())), fxdepass.tokens(), ("logits",))[0]
    experts = [n for n in neuron_regions(module) if "experts" in n.name]
    assert len(experts) == 2  # each layer's experts can run in neuron slices
    assert len(routed_regions(module)) == 2  # and each layer's routed rows in chunks (Note [Routed rows])
    # gathered from the residual, the norm applied to each chunk's rows (Note [Norm on gathered rows]);
    # not where a shared expert reads the norm's output too (Qwen2-MoE)
    preludes = [len(r.prelude) >= 2 for r in routed_regions(module).values()]
    assert preludes == [family != "qwen2_moe"] * 2


@pytest.mark.parametrize("family", families.MOE)
def test_routed_rows_in_chunks_equal_one_chunk(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Routed rows]: chunks of routed rows, added into their tokens, give what one chunk of every
    row gives (float32: the expert kernel has no float64 CPU version), and the chunks really ran."""
    import fxdepass.blocked

    model = families.build(family, layers=2, seed=4)
    decomposed = fxdepass.compile(model)
    ids = torch.randint(0, families.VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    chunks = []
    run = fxdepass.blocked.BlockedInterpreter.call_function

    def counting(self: BlockedInterpreter, target: object, args: tuple, kwargs: dict) -> object:
        if self.node in self.routed and self.node is self.routed[self.node].body[1]:  # the first expert kernel
            chunks.append(self.node)
        return run(self, target, args, kwargs)

    monkeypatch.setattr(fxdepass.blocked.BlockedInterpreter, "call_function", counting)
    got = decomposed.attribute(ids, positions="all", targets="all")
    assert len(chunks) > 2  # more than one chunk a layer
    monkeypatch.setattr(fxdepass.blocked, "CHUNK_SHARE", 10**6)  # one chunk of all rows
    chunks.clear()
    whole = decomposed.attribute(ids, positions="all", targets="all")
    assert len(chunks) == 2
    assert relative_error(got.components, whole.components) <= 1e-6
    # rows not gathered from their own tokens: the output is summed apart from the residual they read
    monkeypatch.setattr(fxdepass.blocked.BlockedInterpreter, "_rows_from_own_tokens", lambda *args: False)
    assert relative_error(decomposed.attribute(ids, positions="all", targets="all").components, whole.components) <= 1e-6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_projections_summed_into_the_residual_equal_the_plain_module(family: str) -> None:
    """Note [Residual accumulation]: every attention and MLP output projection is summed straight into
    the residual, and the result is the plain generated module's (a batch of two runs it), in float64."""
    model = families.build(family, layers=2, seed=4)
    decomposed = fxdepass.compile(model, dtype=torch.float64, causal_blocks=3)
    ids = torch.randint(0, families.VOCAB, (1, 41), generator=torch.Generator().manual_seed(3))
    for seed in (fxdepass.tokens(), fxdepass.heads(1)):
        got = decomposed.attribute(ids, positions="all", targets="all", seed=seed, readout=["logits", "layers"])
        plain = decomposed.attribute(ids.repeat(2, 1), positions="all", targets="all", seed=seed, readout=["logits", "layers"])
        for name in got:  # the batch axis follows the component axis
            first = plain[name].components.narrow(plain[name].component_axis + 1, 0, 1)
            assert relative_error(got[name].components, first) <= 1e-12
    captured = next(iter(decomposed._captures.values()))
    for readouts, summed in ((("logits",), 4), (("logits", "layers"), 2)):  # read-out residuals stay whole
        module = decomposed._module(captured, fxdepass.tokens(), readouts)[0]
        runner = BlockedInterpreter(module, captured.sequence_length.node.expr, captured.batch_symbol, blocks=3)
        assert len(runner.accumulate) == summed


@pytest.mark.parametrize("family", ["llama", "mixtral"])  # a product by the real up projection inside
def test_neuron_slices_and_routed_rows_take_elementwise_ops_from_the_registry(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which component ops keep each element is the rules' ``elementwise`` declaration (registry.is_elementwise),
    not a list of the runner's own: every elementwise op inside a region is there because its rule says so, and
    declared otherwise it ends the region (a hand-kept list once missed ops declared later)."""
    import dataclasses

    from fxdepass.narrowing import component_op
    from fxdepass.registry import RULES, is_elementwise

    model = families.build(family, layers=1, seed=0)
    decomposed = fxdepass.compile(model, dtype=torch.float64 if family not in families.MOE else None)
    decomposed.attribute(torch.randint(0, families.VOCAB, (1, 5), generator=torch.Generator().manual_seed(0)))
    module = decomposed._module(next(iter(decomposed._captures.values())), fxdepass.tokens(), ("logits",))[0]

    def regions() -> list[list[str]]:
        module.meta.pop("neuron_regions", None)
        module.meta.pop("routed_regions", None)
        return ([[m.name for m in r.members] for r in neuron_regions(module).values()]
                + [[m.name for m in r.body] for r in routed_regions(module).values()])

    found = regions()
    assert found
    inside = {component_op(n) for n in module.graph.nodes if any(n.name in members for members in found)}
    elementwise = {op for op in inside if is_elementwise(op)}
    assert elementwise
    for op in elementwise:
        with monkeypatch.context() as patch:
            patch.setitem(RULES, op, dataclasses.replace(RULES[op], elementwise=False))
            assert len(regions()) < len(found), f"{op} is not elementwise, yet a region still runs through it"
    assert regions() == found
