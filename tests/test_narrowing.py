"""Fused projections narrowed to the columns components need (fxdepass/narrowing.py Note [Fused
projections]) give the unnarrowed result, in float64."""
from __future__ import annotations

import pytest
import torch

import families
import fxdepass
import fxdepass.rewrite
from conftest import load_tool, relative_error


@pytest.mark.parametrize("length", [7, 40])  # 40 tokens: the causal-block path
def test_narrowed_fused_qkv_equals_the_full_projection(length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = families.build("gpt2", layers=2, seed=3)
    ids = torch.randint(0, families.VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    narrowed = fxdepass.compile(model, dtype=torch.float64)
    got = narrowed.attribute(ids, positions="all", targets="all", readout=["logits", "layers"])
    assert narrowed.code.count("torch.narrow(h_") == 4  # c_attn's weight and bias in both layers
    monkeypatch.setattr(fxdepass.rewrite, "narrow_fused_projections", lambda module: 0)
    full = fxdepass.compile(model, dtype=torch.float64)
    expected = full.attribute(ids, positions="all", targets="all", readout=["logits", "layers"])
    assert "torch.narrow" not in full.code
    for name in expected:
        assert relative_error(got[name].components, expected[name].components) <= 1e-12


def test_projections_whose_pieces_are_all_read_stay_whole() -> None:
    """Llama's separate q, k, v projections and GPT-NeoX's per-head interleaved qkv are not narrowed."""
    for family in ("llama", "gpt_neox"):
        assert "torch.narrow" not in fxdepass.compile(families.build(family, layers=1)).code


_PROJECTIONS = {  # op → (weight shape for 10 inputs and 3 outputs, whether the bias comes first)
    torch.ops.aten.linear.default: ((3, 10), False),
    torch.ops.aten.mm.default: ((10, 3), None),
    torch.ops.aten.addmm.default: ((10, 3), True),
}


@pytest.mark.parametrize("op", list(_PROJECTIONS))
# heads; consecutive ranges with rest; uneven with rest; overlapping
@pytest.mark.parametrize("groups", [2, ((0, 1, 2), (3, 4, 5)), ((0, 1, 2), (5,), (-1, 7)), ((0, 1), (1, 2, 2))])
def test_feature_groups_projected_equal_the_split_then_projected(op: object, groups: object) -> None:
    """Note [Seeded projections]: the fused product equals split_features then the projection's rule."""
    from fxdepass.narrowing import project_feature_groups
    from fxdepass.rules.linear import linear_map
    from fxdepass.seeds import split_features

    shape, bias_first = _PROJECTIONS[op]
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(4, 10, dtype=torch.float64, generator=generator)
    weight = torch.randn(*shape, dtype=torch.float64, generator=generator)
    bias = torch.randn(3, dtype=torch.float64, generator=generator) if bias_first is not None else None
    split = split_features(value, groups=groups)
    if bias_first is None:
        expected, args = linear_map(op, split, weight, in_dims=(0, None)), (value, weight)
    elif bias_first:
        expected, args = linear_map(op, bias, split, weight, in_dims=(None, 0, None)), (bias, value, weight)
    else:
        expected, args = linear_map(op, split, weight, bias, in_dims=(0, None, None)), (value, weight, bias)
    got = project_feature_groups(op, *args, groups=groups)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= 1e-12


@pytest.mark.parametrize("op", [torch.ops.aten.linear.default, torch.ops.aten.mm.default])
def test_head_groups_are_projected_without_copying_the_weight(op: object) -> None:
    """Heads are consecutive equal feature ranges: their weight rows are views, so the projection holds
    its output and nothing of the weight's size (a gather of the rows would copy the whole weight)."""
    from fxdepass.narrowing import project_feature_groups

    value = torch.randn(8, 64)
    weight = torch.randn(1024, 64) if op is torch.ops.aten.linear.default else torch.randn(64, 1024)
    out_bytes = 5 * 8 * 1024 * 4
    peak = load_tool("bench").allocator_peak(lambda: project_feature_groups(op, value, weight, groups=4))
    assert out_bytes <= peak < out_bytes + weight.numel()  # a quarter of the weight's bytes


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_seeded_projections_equal_the_unfused_module(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Head and neuron seeds project their groups directly (no split of the hidden layer in the
    generated code) and give the unfused module's components, in float64."""
    model = families.build(family, layers=2, seed=3)
    ids = torch.randint(0, families.VOCAB, (1, 19), generator=torch.Generator().manual_seed(2))
    seeds = (fxdepass.heads(1), fxdepass.neurons(0, group_size=8), fxdepass.neurons(1, indices=[3, 1, 30, 7], group_size=3))
    fused = fxdepass.compile(model, dtype=torch.float64)
    got = [fused.attribute(ids, positions="all", targets="all", seed=seed, readout=["logits", "layers"]) for seed in seeds]
    for seed in seeds:
        code = fused._module(next(iter(fused._captures.values())), seed, ("logits", "layers"))[0].code
        assert "project_feature_groups" in code and "split_features" not in code
    monkeypatch.setattr(fxdepass.rewrite, "fuse_seeded_projections", lambda module: 0)
    unfused = fxdepass.compile(model, dtype=torch.float64)
    for seed, result in zip(seeds, got):
        expected = unfused.attribute(ids, positions="all", targets="all", seed=seed, readout=["logits", "layers"])
        assert result["logits"].reconstruction_error() <= 1e-9
        for name in expected:
            assert relative_error(result[name].components, expected[name].components) <= 1e-12
