"""Activations: ``y = φ(z)`` is computed for real and allocated among the components of ``z``.

Note [Activation allocation]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
At every element, the components *present* there (``z_m ≠ 0`` exactly) share ``y`` with weights

* ``softmax`` (default, the paper's rule): ``w_m = softmax_m(z_m / T)``;
* ``linear``: ``w_m ∝ z_m − min z`` (equal shares when all ``z_m`` are equal);
* ``max``: everything to the largest ``z_m``.

Excluding absent components keeps information from flowing backwards in time: a token's component
is exactly zero at earlier positions, so it never receives a share there.  The sink option
(``fxdepass.tokens(sink=True)``) also excludes the first attended position's component everywhere
but at its own position, as the paper's ``ignore_special_token`` does.  Where no component is
present, ``y`` (``φ(0)``, zero for most activations) goes to the rest component.  The shares sum to
one, so ``Σ_m y_m = y`` exactly.
"""
from __future__ import annotations

import torch

from fxdepass.registry import across_components, component_axis, defactivation, defgate

aten = torch.ops.aten

defactivation([
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.elu.default, aten.selu.default,
    aten.celu.default, aten.softplus.default, aten.leaky_relu.default, aten.hardswish.default,
    aten.mish.default, aten.hardtanh.default, aten.relu6.default, aten.hardsigmoid.default,
])
defgate([aten.tanh.default, aten.sigmoid.default, aten.exp.default, aten.expm1.default, aten.log.default,
         aten.log1p.default, aten.erf.default, aten.sin.default, aten.cos.default, aten.clamp.default,
         aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default, aten.maximum.default,
         aten.minimum.default])

ALLOCATIONS = ("softmax", "linear", "max")


def _along(values: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """Reshape a 1-d tensor so that it broadcasts along ``axis`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def sink_mask(
    components: torch.Tensor, sink: torch.Tensor, batch_axis: int | None, position_axis: int
) -> torch.Tensor:
    """True where the sink component sits at a position other than the sink's own (component axis first).

    ``sink`` is ``[2, batch]``: per prompt, the sink's component index (−1: none) and its position.
    """
    ndim = components.ndim
    index = _along(component_axis().numbers(components.shape[0], components.device), 0, ndim)
    position = _along(torch.arange(components.shape[position_axis + 1], device=components.device), position_axis + 1, ndim)
    if batch_axis is None:
        component, own = sink[0, 0], sink[1, 0]
    else:
        component, own = _along(sink[0], batch_axis + 1, ndim), _along(sink[1], batch_axis + 1, ndim)
    return (index == component) & (position != own)


def allocation_weights(
    pre_activation: torch.Tensor, absent: torch.Tensor, mode: str = "softmax", temperature: float = 0.1
) -> torch.Tensor:
    """Shares of each component (axis 0) at each element; they sum to one over axis 0.

    Where every component is ``absent`` the rest component (the last) takes everything.  Each reduction
    over the components is completed by ``across_components`` (Note [Sharded components]), so the shares
    are the same whether this process holds every component or a range of them.
    """
    rest = component_axis().rest
    if mode == "softmax":
        logits = (pre_activation * (1.0 / temperature)).masked_fill_(absent, float("-inf"))
        top = across_components(logits.amax(0, keepdim=True), "max")
        nothing = top == float("-inf")  # no component present: rest takes everything
        top.masked_fill_(nothing, 0.0)
        if rest:
            logits[-1:].masked_fill_(nothing, 0.0)
        weights = logits.sub_(top).exp_()
        return weights.div_(across_components(weights.sum(0, keepdim=True), "sum"))
    present = (~absent).to(pre_activation.dtype)
    count = across_components(present.sum(0, keepdim=True), "sum")
    if rest:
        present[-1:].masked_fill_(count == 0, 1.0)
    absent = present == 0
    if mode == "linear":
        low = across_components(pre_activation.masked_fill(absent, float("inf")).amin(0, keepdim=True), "min")
        spread = (pre_activation - low).masked_fill_(absent, 0.0)
        total = across_components(spread.sum(0, keepdim=True), "sum")
        equal = present / count.clamp_min(1.0)
        return torch.where(total > 0, spread / total.clamp_min(torch.finfo(total.dtype).tiny), equal)
    if mode == "max":
        masked = pre_activation.masked_fill(absent, float("-inf"))
        top = across_components(masked.amax(0, keepdim=True), "max")
        # the first component (by number) reaching the maximum: the one-process argmax
        numbers = _along(component_axis().numbers(masked.shape[0], masked.device), 0, masked.ndim)
        first = torch.where(masked == top, numbers, torch.iinfo(torch.long).max).amin(0, keepdim=True)
        return (numbers == across_components(first, "min")).to(pre_activation.dtype)
    raise ValueError(f"unknown activation allocation {mode!r}; choose one of {ALLOCATIONS}")


#: neurons per chunk: the allocation is per element, so chunking the last axis is exact and bounds
#: the temporaries to a chunk's worth instead of components × positions × neurons
CHUNK = 1024


def allocate(
    components: torch.Tensor,
    activation: torch.Tensor,
    *,
    mode: str = "softmax",
    temperature: float = 0.1,
    sink: torch.Tensor | None = None,
    batch_axis: int | None = None,
    position_axis: int | None = None,
) -> torch.Tensor:
    """Allocate the real ``activation = φ(z)`` among the ``components`` of ``z``.

    >>> z = torch.tensor([[1.0, 0.0], [0.5, -2.0], [0.0, 0.0]])    # 2 components + rest, 2 elements
    >>> y = allocate(z, torch.nn.functional.silu(z.sum(0)))
    >>> torch.allclose(y.sum(0), torch.nn.functional.silu(z.sum(0)))
    True
    """
    excluded = None
    if sink is not None and position_axis is not None:
        excluded = sink_mask(components, sink, batch_axis, position_axis)
    width = components.shape[-1]
    if width <= CHUNK or components.ndim < 2 or activation.shape != components.shape[1:]:
        return _allocate_chunk(components, activation, excluded, mode, temperature)
    out = torch.empty_like(components)
    for start in range(0, width, CHUNK):
        part = slice(start, start + CHUNK)
        mask = None if excluded is None else excluded[..., part] if excluded.shape[-1] > 1 else excluded
        out[..., part] = _allocate_chunk(components[..., part], activation[..., part], mask, mode, temperature)
    return out


def _allocate_chunk(components: torch.Tensor, activation: torch.Tensor, excluded: torch.Tensor | None,
                    mode: str, temperature: float) -> torch.Tensor:
    absent = components == 0
    if excluded is not None:
        absent |= excluded
    weights = allocation_weights(components, absent, mode, temperature)
    return weights.mul_(activation) if weights.shape[1:] == activation.shape else weights * activation
