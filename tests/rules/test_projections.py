"""Projections and their bias (fxdepass/registry.py Note [Projections]) as properties against the dense
ops: for random shapes and random splits into components, a projection's components sum to the real
op's output (float64, 1e-12), its bias lands in rest only, and every reader of the op's one declaration
(the linear rule, the runner's in-place product, the seeded projection) agrees with it.  The dense
semantics and argument orders are written out here, not read from the registry."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxdepass  # noqa: F401  (fills the table)
from fxdepass.narrowing import project_feature_groups, project_into
from fxdepass.registry import add_to_rest, component_axis, projection_args, rest_in_block, rest_only
from fxdepass.rules.linear import linear_map

aten = torch.ops.aten
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _args(op: Any, x: Any, w: torch.Tensor, b: torch.Tensor | None) -> tuple[tuple, int]:
    """The op's arguments computing ``x @ w + b`` (``w`` is ``[in, out]``) and the features' position."""
    if op is aten.linear.default:
        return ((x, w.T) if b is None else (x, w.T, b)), 0
    if op is aten.addmm.default:
        return (b, x, w), 1
    return (x, w), 0  # mm, matmul


#: projections with a bias argument, and whether their features may have leading axes beyond one
HAS_BIAS = {aten.linear.default: True, aten.addmm.default: True, aten.mm.default: False, aten.matmul.default: False}
BATCHED_FEATURES = {aten.linear.default, aten.matmul.default}


def _split(value: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` components summing to ``value`` (some elements exactly zero), rest last."""
    parts = torch.randn(count - 1, *value.shape, dtype=value.dtype, generator=generator)
    parts = parts * (torch.rand(parts.shape, generator=generator) > 0.3)
    return torch.cat((parts, (value - parts.sum(0)).unsqueeze(0)))


@st.composite
def problems(draw: st.DrawFn, ops: list[Any], bias: bool = False) -> dict:
    """A projection of random features ``x`` by ``w`` (``[in, out]``), with a bias ``b`` (always, with ``bias``), and
    the features in random components."""
    op = draw(st.sampled_from(ops))
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3 if op in BATCHED_FEATURES else 1))
    inputs, outputs, count = draw(st.integers(1, 7)), draw(st.integers(1, 7)), draw(st.integers(1, 5))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(*lead, inputs, dtype=torch.float64, generator=generator)
    w = torch.randn(inputs, outputs, dtype=torch.float64, generator=generator)
    with_bias = HAS_BIAS[op] and (bias or op is aten.addmm.default or draw(st.booleans()))
    b = torch.randn(outputs, dtype=torch.float64, generator=generator) if with_bias else None
    return dict(op=op, x=x, w=w, b=b, components=_split(x, count, generator))


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(problems(list(HAS_BIAS)))
def test_projection_components_sum_to_the_dense_op_and_the_bias_lands_in_rest_only(problem: dict) -> None:
    op, x, w, b, components = (problem[k] for k in ("op", "x", "w", "b", "components"))
    args, at = _args(op, components, w, b)
    in_dims = tuple(0 if i == at else None for i in range(len(args)))
    out = linear_map(op, *args, in_dims=in_dims)
    dense = x @ w + (0 if b is None else b)
    _close(out.sum(0), dense)
    _close(out[:-1], components[:-1] @ w)  # the sources: no bias
    _close(out[-1], components[-1] @ w + (0 if b is None else b))


@SETTINGS
@given(problems(list(HAS_BIAS)))
def test_the_declaration_names_the_features_weight_and_bias(problem: dict) -> None:
    """The one declaration (what narrowing, locations, the graph and the runner read) against the op's signature."""
    op, x, w, b = (problem[k] for k in ("op", "x", "w", "b"))
    args, at = _args(op, x, w, b)
    found = projection_args(op)
    assert found.features == at and args[found.features] is x
    assert args[found.weight].shape[found.axes[0]] == w.shape[0] and args[found.weight].shape[found.axes[1]] == w.shape[1]
    assert found.bias_of(args) is b
    assert found.batched is (op is aten.matmul.default)
    if found.unbiased is not None:
        _close(found.unbiased(*found.without_bias(args)), x @ w)


@SETTINGS
@given(problems([aten.linear.default, aten.addmm.default, aten.mm.default]), st.booleans())
def test_the_runners_product_in_place_adds_the_projection_with_its_bias_in_rest(problem: dict, with_bias: bool) -> None:
    """The runner sums a projection into a residual with ``project_into`` and then its bias (Note [Residual accumulation])."""
    op, x, w, b, components = (problem[k] for k in ("op", "x", "w", "b", "components"))
    args, _ = _args(op, components, w, b)
    residual = torch.randn(components.shape[0], *x.shape[:-1], w.shape[1], dtype=torch.float64)
    total = residual.clone()
    assert project_into(total, (op, *args))
    if with_bias:
        projection_args(op).bias_to_rest(total, args)
    _close(total[:-1], residual[:-1] + components[:-1] @ w)
    _close(total[-1], residual[-1] + components[-1] @ w + (0 if b is None or not with_bias else b))


def test_a_product_by_a_batch_of_matrices_is_not_summed_in_place() -> None:
    """``matmul`` may multiply by a batch of matrices (Note [Projections]): the component passes leave it alone."""
    total, x, w = torch.zeros(2, 3, 4, 5), torch.randn(2, 3, 4, 6), torch.randn(3, 6, 5)
    assert not project_into(total, (aten.matmul.default, x, w))


@SETTINGS
@given(problems([aten.linear.default, aten.addmm.default, aten.mm.default]), st.data())
def test_seeded_projection_by_feature_groups_equals_the_dense_op(problem: dict, data: st.DataObject) -> None:
    """Note [Seeded projections]: group ``g`` is its features' product with their weight rows; the features in
    no group and the bias are rest."""
    op, x, w, b = (problem[k] for k in ("op", "x", "w", "b"))
    width = x.shape[-1]
    owner = data.draw(st.lists(st.integers(-1, 3), min_size=width, max_size=width))  # -1: in no group
    groups = tuple(g for g in (tuple(i for i in range(width) if owner[i] == k) for k in range(4)) if g) or ((0,),)
    args, _ = _args(op, x, w, b)
    out = project_feature_groups(op, *args, groups=groups)
    _close(out.sum(0), x @ w + (0 if b is None else b))
    for g, group in enumerate(groups):
        _close(out[g], x[..., list(group)] @ w[list(group)])
    rest = [i for i in range(width) if not any(i in g for g in groups)]
    _close(out[-1], x[..., rest] @ w[rest] + (0 if b is None else b))


@SETTINGS
@given(problems([aten.linear.default, aten.addmm.default], bias=True))
def test_a_part_of_the_components_without_rest_gets_no_constant_term(problem: dict) -> None:
    """registry Note [Rest in parts of the components]: in a causal block past the first (or a chunk before the
    last) the last row is a source, so the bias goes nowhere; outside the part it goes to rest again."""
    op, x, w, b, components = (problem[k] for k in ("op", "x", "w", "b", "components"))
    args, at = _args(op, components, w, b)
    in_dims = tuple(0 if i == at else None for i in range(len(args)))
    axis = component_axis()
    with rest_in_block(False):
        assert not component_axis().rest and component_axis().held(5) == axis.held(5)
        _close(linear_map(op, *args, in_dims=in_dims), components @ w)
        _close(rest_only(x, like=components), torch.zeros_like(components))
        _close(add_to_rest(components.clone(), 1.0), components)
        with rest_in_block(True):  # a part of a part without rest holds none either
            _close(linear_map(op, *args, in_dims=in_dims), components @ w)
    assert component_axis() is axis
    _close(linear_map(op, *args, in_dims=in_dims)[-1], components[-1] @ w + b)


@pytest.mark.parametrize("present", [True, False])
def test_rest_only_puts_the_value_in_rest_where_the_part_holds_it(present: bool) -> None:
    value, like = torch.randn(3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    with rest_in_block(present):
        out = rest_only(value, like=like)
    _close(out[:-1], torch.zeros(3, 3, dtype=torch.float64))
    _close(out[-1], value if present else torch.zeros(3, dtype=torch.float64))
