"""Elementwise declarations as a property against the dense ops: an op its rule declares ``elementwise``
gives, on any slice of any axis of its inputs (the last: neuron slices), that slice of its output, and so
do its components.
Neuron slices and routed rows (fxdepass/blocked.py Note [Neuron chunks], fxdepass/routed.py) run exactly
because of that, and they take the declaration from the registry (tests/test_blocked.py checks they do)."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxdepass.registry import RULES, Kind, is_elementwise
from fxdepass.rules.linear import linear_map
from test_rules import ACTIVATIONS, SAMPLES, D, _activation_input, _extra, split

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

#: samples of linear-map rules declared elementwise (test_rules.py samples every rule)
LINEAR = [s for s in SAMPLES if is_elementwise(s[0]) and RULES[s[0]].kind in (Kind.LINEAR, Kind.BILINEAR)]


def _widened(value: Any, old: int, width: int, generator: torch.Generator) -> Any:
    """A tensor whose last axis is the output's (``old``) made again with ``width`` there; else ``value``."""
    if isinstance(value, D):
        return D(_widened(value.value, old, width, generator))
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[-1] != old:
        return value
    shape = (*value.shape[:-1], width)
    if value.dtype is torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    fresh = torch.randn(shape, dtype=value.dtype, generator=generator)
    return fresh.abs() + 0.5 if bool((value > 0).all()) else fresh  # a divisor stays away from 0


def _sliced(value: Any, axis: int, size: int, start: int, length: int) -> Any:
    """``value`` narrowed to ``[start, start + length)`` along the output's axis ``axis`` (negative: broadcasting
    aligns the last axes) where it has that axis in full; else ``value`` (broadcast along it)."""
    if isinstance(value, torch.Tensor) and value.ndim >= -axis and value.shape[axis] == size:
        return value.narrow(axis, start, length)
    return value


def _check_slices(apply: Callable[..., torch.Tensor], args: list, data: st.DataObject, components: bool = False) -> None:
    """``apply`` on a random slice of a random axis of ``args`` is that slice of ``apply(*args)``: the last axis
    is what neuron slices cut, any axis is what elementwise means (the component axis aside: rest is its last)."""
    whole = apply(*args)
    axis = data.draw(st.integers(-whole.ndim + components, -1), label="axis")
    size = whole.shape[axis]
    start = data.draw(st.integers(0, size - 1), label="start")
    length = data.draw(st.integers(1, size - start), label="length")
    part = apply(*[_sliced(a, axis, size, start, length) for a in args])
    torch.testing.assert_close(part, whole.narrow(axis, start, length), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op,factory,kwargs", LINEAR, ids=[f"{RULES[s[0]].name}-{i}" for i, s in enumerate(LINEAR)])
@SETTINGS
@given(width=st.integers(1, 9), data=st.data())
def test_elementwise_linear_rules_commute_with_slices_of_the_last_axis(op: Any, factory: Callable[[], tuple], kwargs: dict,
                                                                       width: int, data: st.DataObject) -> None:
    torch.manual_seed(0)
    sample = factory()
    old = op(*[a.value if isinstance(a, D) else a for a in sample], **kwargs).shape[-1]
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    args = [_widened(a, old, width, generator) for a in sample]
    _check_slices(lambda *a: op(*a, **kwargs), [a.value if isinstance(a, D) else a for a in args], data)
    if sum(isinstance(a, D) for a in args) == 1:  # the rule on components (a product of two is the products' rule)
        in_dims = tuple(0 if isinstance(a, D) else None for a in args)
        components = [split(a.value, 3) if isinstance(a, D) else a for a in args]
        _check_slices(lambda *a: linear_map(op, *a, in_dims=in_dims, **kwargs), components, data, components=True)


@pytest.mark.parametrize("op", ACTIVATIONS, ids=[RULES[op].name for op in ACTIVATIONS])
@SETTINGS
@given(data=st.data())
def test_elementwise_activations_and_gates_commute_with_slices_of_the_last_axis(op: Any, data: st.DataObject) -> None:
    assert is_elementwise(op)
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    z = _activation_input(op)
    _check_slices(op, [z, *_extra(op)], data)
