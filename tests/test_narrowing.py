"""Fused projections narrowed to the columns components need (fxdepass/narrowing.py Note [Fused
projections]) give the unnarrowed result, in float64."""
from __future__ import annotations

import pytest
import torch

import families
import fxdepass
import fxdepass.rewrite
from conftest import relative_error


@pytest.mark.parametrize("length", [7, 40])  # 40 tokens: the causal-block path
def test_narrowed_fused_qkv_equals_the_full_projection(length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = families.build("gpt2", layers=2, seed=3)
    ids = torch.randint(0, families.VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    narrowed = fxdepass.compile(model, dtype=torch.float64)
    got = narrowed.attribute(ids, readout=["logits", "layers"])
    assert narrowed.code.count("torch.narrow(h_") == 4  # c_attn's weight and bias in both layers
    monkeypatch.setattr(fxdepass.rewrite, "narrow_fused_projections", lambda module: 0)
    full = fxdepass.compile(model, dtype=torch.float64)
    expected = full.attribute(ids, readout=["logits", "layers"])
    assert "torch.narrow" not in full.code
    for name in expected:
        assert relative_error(got[name].components, expected[name].components) <= 1e-12


def test_projections_whose_pieces_are_all_read_stay_whole() -> None:
    """Llama's separate q, k, v projections and GPT-NeoX's per-head interleaved qkv are not narrowed."""
    for family in ("llama", "gpt_neox"):
        assert "torch.narrow" not in fxdepass.compile(families.build(family, layers=1)).code
