"""Exactness as a property: over families × random sizes × sequence length × batch, the components sum
to the real logits at every position — float64 (SPEC §5 policy) within 1e-9, float32 within 1e-4 of the
model's ordinary output."""
from __future__ import annotations

import functools

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import families
import fxdepass
from conftest import relative_error

SETTINGS = settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def architectures(draw: st.DrawFn) -> dict:
    family = draw(st.sampled_from(families.FAMILIES))
    kv_heads = draw(st.sampled_from([1, 2]))
    return dict(
        family=family,
        layers=draw(st.integers(1, 3)),
        heads=kv_heads * draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 8])),
        intermediate=draw(st.integers(8, 40)),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 3)),
    )


@functools.lru_cache(maxsize=8)
def _compiled(spec: tuple, dtype: torch.dtype | None) -> tuple[torch.nn.Module, fxdepass.DecomposedModel]:
    sizes = dict(spec)
    family = sizes.pop("family")
    model = families.build(family, **sizes)
    return model, fxdepass.compile(model, dtype=dtype)


def _readout(family: str) -> str:
    return "hidden" if family in families.ENCODERS else "logits"


@SETTINGS
@given(architectures(), st.integers(2, 9), st.integers(1, 3), st.data())
def test_float64_components_sum_to_real_logits(arch: dict, length: int, batch: int, data: st.DataObject) -> None:
    model, decomposed = _compiled(tuple(sorted(arch.items())), torch.float64)
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, families.VOCAB - 1), min_size=length, max_size=length),
                                          min_size=batch, max_size=batch)))
    attribution = decomposed.attribute(ids, positions="all", targets="all", readout=_readout(arch["family"]))
    assert attribution.components.dtype == torch.float64
    assert attribution.components.shape[0] == length + 1
    assert attribution.reconstruction_error() <= 1e-9


@SETTINGS
@given(architectures(), st.integers(2, 9))
def test_float32_components_sum_to_ordinary_output(arch: dict, length: int) -> None:
    model, decomposed = _compiled(tuple(sorted(arch.items())), None)
    ids = torch.randint(0, families.VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    readout = _readout(arch["family"])
    attribution = decomposed.attribute(ids, positions="all", targets="all", readout=readout)
    with torch.no_grad():
        output = model(input_ids=ids)
    ordinary = output.logits if readout == "logits" else output.last_hidden_state
    assert relative_error(attribution.components.sum(0), ordinary) <= 1e-4
