"""Every rule on its own: random inputs split into random components; the output components must sum
to the op's real output (float64, 1e-12).  A rule without a sample here fails ``test_every_rule_is_sampled``."""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterator

import pytest
import torch

import fxdepass  # noqa: F401  (fills the table)
from fxdepass.registry import RULES, Kind, lookup
from fxdepass.rules.activations import allocate
from fxdepass.rules.linear import linear_map
from fxdepass.rules.products import symmetric_product

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _float64_by_default() -> Iterator[None]:
    """Samples are float64 (tolerance 1e-12); the default goes back afterwards, for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class D:
    """Marks an argument that carries components in a sample."""

    def __init__(self, value: torch.Tensor):
        self.value = value


def r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def split(value: torch.Tensor, count: int = 4) -> torch.Tensor:
    """``count`` random components (some elements exactly zero) summing to ``value``."""
    parts = torch.randn(count - 1, *value.shape, dtype=value.dtype)
    parts = parts * (torch.rand(parts.shape) > 0.2)  # also for complex values
    return torch.cat((parts, (value - parts.sum(0)).unsqueeze(0)))


def _idx(*values: int) -> torch.Tensor:
    return torch.tensor(values)


def _mask(*shape: int) -> torch.Tensor:
    return torch.rand(*shape) > 0.5


# (op, factory of args, kwargs).  Factories run under a fixed seed.
SAMPLES: list[tuple[Any, Callable[[], tuple], dict]] = [
    (aten.view.default, lambda: (D(r(2, 3, 4)), [2, 12]), {}),
    (aten._unsafe_view.default, lambda: (D(r(2, 3, 4)), [6, 4]), {}),
    (aten.reshape.default, lambda: (D(r(2, 3, 4)), [3, 8]), {}),
    (aten.permute.default, lambda: (D(r(2, 3, 4)), [2, 0, 1]), {}),
    (aten.transpose.int, lambda: (D(r(2, 3, 4)), 0, 2), {}),
    (aten.t.default, lambda: (D(r(3, 4)),), {}),
    (aten.expand.default, lambda: (D(r(3, 1)), [2, 3, 5]), {}),
    (aten.slice.Tensor, lambda: (D(r(2, 3, 4)), 1, 0, 2), {}),
    (aten.select.int, lambda: (D(r(2, 3, 4)), 2, 1), {}),
    (aten.narrow.default, lambda: (D(r(2, 3, 4)), 2, 1, 2), {}),
    (aten.squeeze.dim, lambda: (D(r(3, 1)), 1), {}),
    (aten.squeeze.dims, lambda: (D(r(3, 1)), [1]), {}),
    (aten.squeeze.default, lambda: (D(r(3, 1)),), {}),
    (aten.unsqueeze.default, lambda: (D(r(2, 3)), 1), {}),
    (aten.flatten.using_ints, lambda: (D(r(2, 3, 4)), 0, 1), {}),
    (aten.unflatten.int, lambda: (D(r(2, 3, 4)), 2, [2, 2]), {}),
    (aten.flip.default, lambda: (D(r(2, 3, 4)), [0, 2]), {}),
    (aten.roll.default, lambda: (D(r(2, 3, 4)), [1], [1]), {}),
    (aten.repeat.default, lambda: (D(r(2, 3, 4)), [1, 2, 1]), {}),
    (aten.repeat_interleave.self_int, lambda: (D(r(2, 3, 4)), 2, 1), {}),
    (aten.diagonal.default, lambda: (D(r(3, 3, 4)), 0, 0, 1), {}),
    (aten.index.Tensor, lambda: (D(r(2, 3, 4)), [None, _idx(0, 2)]), {}),
    (aten.gather.default, lambda: (D(r(2, 3, 4)), 2, torch.randint(0, 4, (2, 3, 2))), {}),
    (aten.split.Tensor, lambda: (D(r(2, 3, 4)), 2, 2), {}),
    (aten.split_with_sizes.default, lambda: (D(r(2, 3, 4)), [1, 3], 2), {}),
    (aten.chunk.default, lambda: (D(r(2, 3, 4)), 2, 2), {}),
    (aten.unbind.int, lambda: (D(r(2, 3, 4)), 1), {}),
    (aten.expand_as.default, lambda: (D(r(3, 1)), r(2, 3, 5)), {}),
    (aten.view_as.default, lambda: (D(r(2, 3, 4)), r(6, 4)), {}),
    (aten.reshape_as.default, lambda: (D(r(2, 3, 4)), r(4, 6)), {}),
    (aten.sum.dim_IntList, lambda: (D(r(2, 3, 4)), [1], True), {}),
    (aten.sum.default, lambda: (D(r(2, 3, 4)),), {}),
    (aten.mean.dim, lambda: (D(r(2, 3, 4)), [-1], True), {}),
    (aten.mean.default, lambda: (D(r(2, 3, 4)),), {}),
    (aten.cumsum.default, lambda: (D(r(2, 3, 4)), 1), {}),
    (aten.cat.default, lambda: ([D(r(2, 3)), r(2, 2)], 1), {}),
    (aten.stack.default, lambda: ([D(r(2, 3)), D(r(2, 3))], 0), {}),
    (aten.index_put.default, lambda: (r(5, 4), [_idx(0, 2)], D(r(2, 4))), {}),
    (aten.index_put.default, lambda: (D(r(5, 4)), [_idx(1, 3)], D(r(2, 4)), True), {}),
    (aten.index_add.default, lambda: (r(5, 4), 0, _idx(0, 2, 0), D(r(3, 4))), {}),
    (aten.scatter_add.default, lambda: (D(r(3, 4)), 1, torch.randint(0, 4, (3, 2)), D(r(3, 2))), {}),
    (aten.scatter.src, lambda: (r(3, 4), 1, torch.tensor([[0, 1], [2, 3], [1, 0]]), D(r(3, 2))), {}),
    (aten.constant_pad_nd.default, lambda: (D(r(2, 3)), [1, 1], 0.5), {}),
    (aten.embedding.default, lambda: (D(r(10, 4)), torch.randint(0, 10, (2, 3))), {}),
    (aten.clone.default, lambda: (D(r(2, 3)),), {"memory_format": torch.contiguous_format}),
    (aten.alias.default, lambda: (D(r(2, 3)),), {}),
    (aten._to_copy.default, lambda: (D(r(2, 3)),), {"dtype": torch.float64}),
    (aten.type_as.default, lambda: (D(r(2, 3)), r(1)), {}),
    (aten.neg.default, lambda: (D(r(2, 3)),), {}),
    (aten.dropout.default, lambda: (D(r(2, 3)), 0.1, False), {}),
    (aten.lift_fresh_copy.default, lambda: (D(r(2, 3)),), {}),
    (aten.detach.default, lambda: (D(r(2, 3)),), {}),
    (aten.mul.Scalar, lambda: (D(r(2, 3)), 2.5), {}),
    (aten.div.Scalar, lambda: (D(r(2, 3)), 2.5), {}),
    (aten.add.Tensor, lambda: (D(r(2, 3)), D(r(3))), {}),
    (aten.add.Tensor, lambda: (D(r(2, 3)), r(2, 3)), {"alpha": 2}),
    (aten.add.Tensor, lambda: (D(r(2, 3)), 1e-6), {}),
    (aten.add.Scalar, lambda: (D(r(2, 3)), 1.5), {}),
    (aten.sub.Tensor, lambda: (r(2, 3), D(r(2, 3))), {}),
    (aten.sub.Scalar, lambda: (D(r(2, 3)), 1.5), {}),
    (aten.rsub.Scalar, lambda: (D(r(2, 3)), 2.0), {}),
    (aten.rsub.Tensor, lambda: (D(r(2, 3)), r(2, 3)), {}),
    (aten.where.self, lambda: (_mask(2, 3), D(r(2, 3)), r(2, 3)), {}),
    (aten.where.ScalarOther, lambda: (_mask(2, 3), D(r(2, 3)), 0.5), {}),
    (aten.where.ScalarSelf, lambda: (_mask(2, 3), 0.5, D(r(2, 3))), {}),
    (aten.masked_fill.Scalar, lambda: (D(r(2, 3)), _mask(2, 3), 0.5), {}),
    (aten.masked_fill.Tensor, lambda: (D(r(2, 3)), _mask(2, 3), torch.tensor(0.5)), {}),
    (aten.div.Tensor, lambda: (D(r(2, 3)), r(2, 3).abs() + 0.5), {}),
    (aten.linear.default, lambda: (D(r(2, 3, 4)), r(5, 4), r(5)), {}),
    (aten.mul.Tensor, lambda: (r(4), D(r(2, 3, 4))), {}),
    (aten.mul.Tensor, lambda: (D(r(2, 3, 4)), D(r(2, 3, 4))), {}),
    (aten.matmul.default, lambda: (D(r(2, 3, 4)), r(4, 5)), {}),
    (aten.matmul.default, lambda: (D(r(2, 3, 4)), D(r(2, 4, 5))), {}),
    (aten.mm.default, lambda: (r(3, 4), D(r(4, 5))), {}),
    (aten.bmm.default, lambda: (D(r(2, 3, 4)), r(2, 4, 5)), {}),
    (aten.addmm.default, lambda: (r(5), D(r(3, 4)), r(4, 5)), {}),
    (aten.addmm.default, lambda: (r(5), D(r(3, 4)), D(r(4, 5))), {"beta": 0.5, "alpha": 2.0}),
    (aten.baddbmm.default, lambda: (r(2, 3, 5), r(2, 3, 4), D(r(2, 4, 5))), {}),
    (operator.getitem, lambda: ([D(r(2, 3)), D(r(2, 2))], 1), {}),
    (aten.layer_norm.default, lambda: (D(r(2, 3, 6)), [6], r(6), r(6), 1e-5), {}),
    (aten.scaled_dot_product_attention.default, lambda: (r(2, 4, 5, 8), r(2, 4, 5, 8), D(r(2, 4, 5, 8))), {"is_causal": True}),
    (aten.scaled_dot_product_attention.default,
     lambda: (r(2, 4, 5, 8), r(2, 2, 5, 8), D(r(2, 2, 5, 8)), _mask(2, 1, 5, 5) | torch.eye(5, dtype=torch.bool)),
     {"enable_gqa": True, "scale": 0.3}),
    (aten.scaled_dot_product_attention.default, lambda: (r(1, 2, 4, 8), r(1, 2, 4, 8), D(r(1, 2, 4, 8)), r(1, 1, 4, 4)), {}),
    (aten.pad.default, lambda: (D(r(2, 3)), [1, 2], "constant", 0.5), {}),
    (aten.pad.default, lambda: (D(r(1, 2, 5)), [2, 1], "reflect"), {}),
    (aten.rms_norm.default, lambda: (D(r(2, 3, 6)), [6], r(6), 1e-6), {}),
    (aten.rms_norm.default, lambda: (D(r(2, 3, 6)), [3, 6]), {}),
    (aten.slice_scatter.default, lambda: (D(r(4, 5)), D(r(4, 2)), 1, 1, 5, 2), {}),
    (aten.slice_scatter.default, lambda: (D(r(4, 5)), D(r(3, 5)), 0, 1, 9223372036854775807), {}),  # x[1:] = …
    (aten.select_scatter.default, lambda: (r(4, 5), D(r(4)), 1, 3), {}),
    (aten.conv1d.default, lambda: (D(r(2, 4, 7)), r(4, 1, 3), r(4), [1], [2], [1], 4), {}),
    (aten.conv1d.padding, lambda: (D(r(2, 4, 7)), r(6, 4, 3), r(6), [1], "same"), {}),
    (aten.conv2d.default, lambda: (D(r(2, 3, 5, 5)), r(4, 3, 3, 3), r(4), [1, 1], [1, 1]), {}),
    (aten.conv2d.padding, lambda: (D(r(2, 3, 5, 5)), r(4, 3, 3, 3), None, [1, 1], "valid"), {}),
    (aten.convolution.default, lambda: (D(r(2, 4, 7)), r(4, 1, 3), r(4), [1], [2], [1], False, [0], 4), {}),
    (aten.concatenate.default, lambda: ([r(2, 2), D(r(2, 3))], 1), {}),
    (aten.im2col.default, lambda: (D(r(2, 3, 5, 5)), [3, 3], [1, 1], [1, 1], [1, 1]), {}),
    (aten.unfold.default, lambda: (D(r(2, 7, 3)), 1, 3, 2), {}),
    (aten.fft_fft.default, lambda: (D(r(2, 6)),), {}),
    (aten.fft_ifft.default, lambda: (D(torch.randn(2, 6, dtype=torch.complex128)), None, 0), {}),
    (aten.fft_fftn.default, lambda: (D(r(2, 3, 4)), None, [1, 2]), {}),
    (aten.view_as_real.default, lambda: (D(torch.randn(2, 3, dtype=torch.complex128)),), {}),
    (aten.real.default, lambda: (D(torch.randn(2, 3, dtype=torch.complex128)),), {}),
    (aten.copy.default, lambda: (r(2, 3), D(r(3))), {}),
    (aten.multiply.Tensor, lambda: (D(r(2, 3)), r(3)), {}),
    (aten.einsum.default, lambda: ("bij,bjk->bik", [D(r(2, 3, 4)), r(2, 4, 5)]), {}),
    (aten.einsum.default, lambda: ("ij,j->i", [r(3, 4), D(r(4))]), {}),
]


def _transformers_op(name: str) -> Any:
    """A custom op transformers registers on import, its rule bound (registry Note [Ops of other libraries])."""
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.*)

    op = getattr(torch.ops.transformers, name).default
    lookup(op)
    return op


SAMPLES += [
    # Three experts own rows 0:2, 2:2 (none) and 2:6.
    (_transformers_op("grouped_mm_fallback"), lambda: (D(r(6, 4)), r(3, 4, 5), torch.tensor([2, 2, 6], dtype=torch.int32)), {}),
]


def _real(value: Any) -> Any:
    if isinstance(value, D):
        return value.value
    if isinstance(value, list):
        return [_real(v) for v in value]
    return value


def _decompose(op: Any, args: tuple, kwargs: dict) -> Any:
    """Apply the rule for ``op`` as the generated module would."""
    rule = RULES[op]
    split_args = [[split(v.value) if isinstance(v, D) else v for v in a] if isinstance(a, list)
                  else (split(a.value) if isinstance(a, D) else a) for a in args]
    marked = [i for i, a in enumerate(args) if isinstance(a, D) or (isinstance(a, list) and any(isinstance(v, D) for v in a))]
    real_args = [_real(a) for a in args]
    if rule.kind is Kind.CUSTOM:
        (position,) = marked
        return rule.fn(*real_args, components=split_args[position], **kwargs)
    if rule.kind is Kind.BILINEAR and len(marked) == 2:
        return symmetric_product(op, *real_args, components=(split_args[marked[0]], split_args[marked[1]]), **kwargs)
    in_dims = tuple([0 if isinstance(v, D) else None for v in a] if isinstance(a, list) else (0 if isinstance(a, D) else None)
                    for a in args)
    return linear_map(op, *split_args, in_dims=in_dims, **kwargs)


def _check(decomposed: Any, real: Any) -> None:
    if isinstance(real, (list, tuple)):
        assert len(decomposed) == len(real)
        for d, v in zip(decomposed, real):
            _check(d, v)
        return
    assert decomposed.shape[1:] == real.shape
    torch.testing.assert_close(decomposed.sum(0), real, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op,factory,kwargs", SAMPLES, ids=[f"{RULES[s[0]].name}-{i}" for i, s in enumerate(SAMPLES)])
def test_rule_components_sum_to_real_output(op: Any, factory: Callable[[], tuple], kwargs: dict) -> None:
    torch.manual_seed(0)
    args = factory()
    real = op(*[_real(a) for a in args], **kwargs)
    _check(_decompose(op, args, kwargs), real)


def test_constant_terms_go_to_rest() -> None:
    x, w, b = r(2, 4), r(3, 4), r(3)
    components = split(x)
    out = linear_map(aten.linear.default, components, w, b, in_dims=(0, None, None))
    torch.testing.assert_close(out[:-1], components[:-1] @ w.T)
    torch.testing.assert_close(out[-1], components[-1] @ w.T + b)


def test_every_rule_is_sampled() -> None:
    sampled = {s[0] for s in SAMPLES}
    needs_sample = {op for op, rule in RULES.items() if rule.kind in (Kind.LINEAR, Kind.BILINEAR, Kind.CUSTOM)}
    missing = sorted(RULES[op].name for op in needs_sample - sampled)
    assert not missing, f"rules without a unit-test sample: {missing}"


ACTIVATIONS = [op for op, rule in RULES.items() if rule.kind in (Kind.ACTIVATION, Kind.GATE)]


def _activation_input(op: Any) -> torch.Tensor:
    z = r(2, 5, 6)
    return z.abs() + 0.1 if op in (aten.log.default, aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default,
                                   aten.pow.Tensor_Tensor, aten.log1p.default) else z


def _extra(op: Any) -> tuple:
    """The operands of an activation or gate after its input."""
    extra = {aten.pow.Tensor_Scalar: (2.0,), aten.pow.Tensor_Tensor: (r(1).abs() + 0.5,), aten.clamp.default: (-0.5, 0.5),
             aten.clamp.Tensor: (torch.tensor(-0.5), torch.tensor(0.5)), aten.clamp_min.default: (0.0,),
             aten.clamp_max.default: (0.0,), aten.maximum.default: (r(6),), aten.minimum.default: (r(6),)}
    return extra.get(op, ())


def _apply(op: Any, z: torch.Tensor) -> torch.Tensor:
    return op(z, *_extra(op))


@pytest.mark.parametrize("mode", ["softmax", "linear", "max"])
@pytest.mark.parametrize("op", ACTIVATIONS, ids=[RULES[op].name for op in ACTIVATIONS])
def test_activation_allocation_sums_to_activation(op: Any, mode: str) -> None:
    torch.manual_seed(1)
    z = _activation_input(op)
    components = split(z, 5)
    y = _apply(op, z)
    for sink in (None, torch.tensor([[0, 1], [0, 1]])):
        out = allocate(components, y, mode=mode, temperature=0.1, sink=sink, batch_axis=0, position_axis=1)
        torch.testing.assert_close(out.sum(0), y.expand_as(out[0]), rtol=1e-12, atol=1e-12)


def test_absent_and_sink_components_get_no_share() -> None:
    z = torch.tensor([[[1.0, 2.0], [3.0, 0.0]], [[0.0, -1.0], [0.5, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])  # [M+1=3, B=1... ]
    components = z.unsqueeze(1)  # [3, 1, 2, 2]: component, batch, position, neuron
    y = torch.nn.functional.silu(components.sum(0))
    out = allocate(components, y)
    assert (out[components == 0] == 0).all()
    with_sink = allocate(components, y, sink=torch.tensor([[0], [0]]), batch_axis=0, position_axis=1)
    assert (with_sink[0, 0, 1] == 0).all()                   # component 0 (the sink) at position 1
    torch.testing.assert_close(with_sink[0, 0, 0], out[0, 0, 0])  # …keeps its share at its own position


@pytest.mark.parametrize("mode", ["softmax", "linear", "max"])
def test_chunked_allocation_equals_whole(monkeypatch, mode: str) -> None:
    import fxdepass.rules.activations as activations

    torch.manual_seed(2)
    z = r(2, 5, 23)
    components, y = split(z, 6), torch.nn.functional.gelu(z)
    sink = torch.tensor([[0, 1], [0, 1]])
    whole = allocate(components, y, mode=mode, sink=sink, batch_axis=0, position_axis=1)
    monkeypatch.setattr(activations, "CHUNK", 4)
    chunked = allocate(components, y, mode=mode, sink=sink, batch_axis=0, position_axis=1)
    torch.testing.assert_close(chunked, whole, rtol=1e-14, atol=1e-18)


def test_temperature_and_modes_behave() -> None:
    components = torch.tensor([[1.0], [0.9], [0.0]])
    y = torch.tensor([2.0])
    hot = allocate(components, y, temperature=10.0)
    cold = allocate(components, y, temperature=0.01)
    assert hot[0] < cold[0] and cold[0] > 1.99
    torch.testing.assert_close(allocate(components, y, mode="max"), torch.tensor([[2.0], [0.0], [0.0]]))
    torch.testing.assert_close(allocate(components, y, mode="linear")[:2].sum(0), y)


DIRECT = [
    (aten.view.default, (r(3, 4, 6), [4, 2, 3])),
    (aten.view.default, (r(3, 4, 6), [-1])),
    (aten.transpose.int, (r(3, 4, 6), 0, 1)),
    (aten.transpose.int, (r(3, 4, 6), -1, -2)),
    (aten.permute.default, (r(3, 4, 6), [1, 0])),
    (aten.unsqueeze.default, (r(3, 4, 6), 0)),
    (aten.unsqueeze.default, (r(3, 4, 6), -1)),
    (aten.mm.default, (r(3, 4, 6), r(6, 5))),
    (aten.linear.default, (r(3, 4, 6), r(5, 6))),
    (aten.mul.Tensor, (r(3, 4, 6), r(6))),
    (aten.mul.Tensor, (r(3, 4, 6), r(4, 6))),
    (aten.mul.Tensor, (r(3, 4, 6), r(1, 4, 6))),  # the constant outranks one component: vmap's broadcasting
    (aten.div.Tensor, (r(3, 4, 6), r(4, 1).abs() + 1)),
    (aten.neg.default, (r(3, 4, 6),)),
]


@pytest.mark.parametrize("op,args", DIRECT, ids=[f"{RULES[op].name}-{i}" for i, (op, _) in enumerate(DIRECT)])
def test_direct_kernels_equal_vmap(op: Any, args: tuple) -> None:
    """Note [Direct component kernels]: each component's result is the op on that component."""
    in_dims = (0,) + (None,) * (len(args) - 1)
    expected = torch.vmap(op, in_dims=in_dims)(*args)
    got = linear_map(op, *args, in_dims=in_dims)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)


def test_add_to_rest_updates_in_place_only_where_the_constant_fits() -> None:
    from fxdepass.registry import add_to_rest

    components = r(3, 4)
    fresh = add_to_rest(components, r(4))
    assert fresh.data_ptr() == components.data_ptr()  # no copy of every component
    wider, constant = r(3, 1), r(2, 5)
    out = add_to_rest(wider, constant)
    torch.testing.assert_close(out.sum(0), wider.sum(0) + constant)
    single = torch.ones(3, 4, dtype=torch.float32)
    promoted = add_to_rest(single, torch.full((4,), 1e-12, dtype=torch.float64))
    assert promoted.dtype == torch.float64 and single.dtype == torch.float32


def test_attention_probabilities_apply_to_grouped_value_heads() -> None:
    from fxdepass.rules.attention import apply_probabilities

    probabilities, values = torch.rand(2, 6, 5, 5), r(3, 2, 2, 5, 4)  # 6 query heads share 2 value heads
    expected = probabilities @ values.repeat_interleave(3, dim=-3)
    torch.testing.assert_close(apply_probabilities(probabilities, values), expected, rtol=1e-12, atol=1e-12)
