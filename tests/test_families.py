"""Every architecture family of the core issue, explicitly: exact in float64, within 1e-4 in float32,
and the real pass under the float64 policy agrees with the model's own float64 output (float32 for MoE)."""
from __future__ import annotations

import pytest
import torch

import families
import fxdepass
from conftest import relative_error


@pytest.mark.parametrize("family", families.FAMILIES)
def test_family_is_exact(family: str) -> None:
    model = families.build(family, layers=2, seed=7)
    readout = "hidden" if family in families.ENCODERS else "logits"
    ids = torch.randint(0, families.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    attribution = fxdepass.compile(model, dtype=torch.float64).attribute(ids, positions="all", targets="all", readout=readout)
    assert attribution.reconstruction_error() <= 1e-9
    with torch.no_grad():  # MoE models stay float32: their grouped expert kernel has no float64 CPU version
        output = (model if family in families.MOE else model.double())(input_ids=ids)
    ordinary = output.logits if readout == "logits" else output.last_hidden_state
    assert relative_error(attribution.total, ordinary.double()) <= 1e-5  # only the removed float32 casts differ
    single = fxdepass.compile(model.float()).attribute(ids, positions="all", targets="all", readout=readout)
    assert relative_error(single.components.sum(0), ordinary.float()) <= 1e-4
