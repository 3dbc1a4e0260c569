"""Checks of the values users pass: integers that are integers, index lists that name each index once.

Every public entry point that takes a count, an index or a list of indices (seeds, positions, ablation,
generation) reads it through these helpers, so that a float, a bool or a repeated index is refused with the
same clear :class:`~fxdepass.errors.FxDePassError` everywhere instead of being truncated or counted twice.

>>> integer(3, "layer"), integers(range(3), "indices")
(3, (0, 1, 2))
>>> index_groups([[0, 1], [-1]], 4, what="tokens()", unit="position", scope="the prompt has 4 tokens")
((0, 1), (3,))
"""
from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any, Sequence

import torch

from .errors import FxDePassError, InvalidInputError

__all__ = ["integer", "integers", "index_groups", "has_data", "real", "relative_error"]


def integer(value: Any, what: str, error: type[FxDePassError] = InvalidInputError) -> int:
    """``value`` as an ``int``: a Python or NumPy integer, or a one-element integer tensor.  Bools, floats
    (even ``2.0``) and text are refused rather than truncated.

    >>> integer(torch.tensor(-1), "layer")
    -1
    """
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise error(f"{what} must be an integer, got the bool {value!r}")
    if isinstance(value, torch.Tensor):
        has_data(value, what, error)
    try:
        return operator.index(value)
    except (TypeError, ValueError, RuntimeError):
        raise error(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None


def integers(values: Any, what: str, error: type[FxDePassError] = InvalidInputError) -> tuple[int, ...]:
    """A list, tuple, range or one-dimensional tensor or array of integers, as a tuple (:func:`integer` each).

    >>> integers(torch.tensor([2, -1]), "indices")
    (2, -1)
    """
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise error(f"{what} must be a list of integers, got {values!r} ({type(values).__name__})")
    if isinstance(values, torch.Tensor):
        has_data(values, what, error)
        if values.ndim != 1:
            raise error(f"{what} must be a list of integers, got a tensor of shape {tuple(values.shape)}")
    return tuple(integer(v, f"{what}: entry {k}", error) for k, v in enumerate(values))


def index_groups(groups: Sequence[Sequence[int]], size: int | None, *, what: str, unit: str, scope: str = "",
                 error: type[FxDePassError] = InvalidInputError) -> tuple[tuple[int, ...], ...]:
    """Groups of integer indices into ``size`` items (negative counting from the end), each made non-negative;
    raises when one is out of range or when an item is named twice, in one group or in two — as ``3`` and
    ``3``, or as ``-1`` and ``63`` of 64.  An item in two components would be counted twice and their sum
    would no longer be the real value.  ``size=None`` checks the indices as given (before the size is known).

    >>> index_groups([[3, -1]], 64, what="neurons()", unit="neuron", scope="the MLP has 64 neurons")
    ((3, 63),)
    """
    seen: dict[int, tuple[int, int]] = {}  # item → (group, index as given)
    normal = []
    for g, group in enumerate(groups):
        kept = []
        for i in group:
            if size is not None and not -size <= i < size:
                raise error(f"{what}: {unit} {i} is out of range ({scope}; negative indices count from the end)")
            item = i % size if size is not None else i
            if item in seen:
                first, given = seen[item]
                where = (f"as {given} in group {first}, as {i} in group {g}" if len(groups) > 1
                         else f"as {given} and as {i}")
                raise error(f"{what}: {unit} {item} is named twice ({where}); each {unit} may be in one component "
                            "only, or it would be counted twice")
            seen[item] = (g, i)
            kept.append(item)
        normal.append(tuple(kept))
    return tuple(normal)


def has_data(tensor: torch.Tensor, what: str, error: type[FxDePassError] = InvalidInputError) -> torch.Tensor:
    """``tensor`` itself; raises if it is on the ``meta`` device, which holds shapes but no values.

    >>> has_data(torch.ones(2), "targets").shape
    torch.Size([2])
    """
    if tensor.is_meta:
        raise error(f"{what} is on the meta device, which holds no values; give a tensor with data")
    return tensor


def real(value: Any, what: str, error: type[FxDePassError] = InvalidInputError) -> float:
    """``value`` as a ``float``: a Python or NumPy number or a one-element real tensor; bools and text are refused
    (``"0.1"`` is not parsed: a number given as text is more often a mistake than a convenience).

    >>> real(0.5, "temperature")
    0.5
    """
    if isinstance(value, (bool, str, bytes)) or (isinstance(value, torch.Tensor) and (value.dtype == torch.bool
                                                                                    or value.is_complex())):
        raise error(f"{what} must be a real number, got {value!r} ({type(value).__name__})")
    if isinstance(value, torch.Tensor):
        has_data(value, what, error)
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise error(f"{what} must be a real number, got {value!r} ({type(value).__name__})") from None
    return number


def relative_error(total: torch.Tensor, components: torch.Tensor, axis: int) -> float:
    """Max error of the sum of ``components`` over ``axis`` against ``total``, relative to ``total``'s largest entry.

    >>> relative_error(torch.tensor([2.0]), torch.tensor([[1.0], [1.5]]), 0)
    0.25
    """
    error = (components.sum(axis) - total).abs().max()
    scale = total.abs().max().clamp_min(torch.finfo(total.dtype).tiny)
    return float(error / scale)
