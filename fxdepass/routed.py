"""Routed rows: a mixture-of-experts layer's experts run on chunks of their routed rows.

Note [Routed rows]
~~~~~~~~~~~~~~~~~~
transformers' experts gather every token's hidden state once per chosen expert (``k`` rows a token),
sorted by expert, run the expert kernel on those rows, scale them by the frozen routing weights,
put them back in token order (a gather by the inverse permutation) and sum each token's ``k`` rows.
With components, every one of those values is ``k`` times the residual stream's size.  Between the
two gathers every op acts on each routed row separately: the expert kernel (a row's expert is fixed
by the frozen routing), the per-element activation allocation, products with real values taken row
by row.  So the section runs exactly in chunks: each chunk takes a range of tokens, gathers their
routed rows (still sorted by expert), runs the experts with the kernel's offsets recounted for the
chunk, and adds its rows straight into their tokens (``index_add_``), which stands for the unsorting
gather, the view into ``[tokens, k, d]`` and the sum together.  :func:`routed_regions` finds such
sections in the generated graph; the blocked runner (fxdepass/blocked.py) runs them, so no value
``k`` times the residual's size exists in full.

Note [Norm on gathered rows]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The rows are gathered from the norm's output, one more residual-sized value held beside the residual
stream for the whole section.  When only the gather reads that output, and the norm ends in scalings
by real values (``x · rsqrt(mean x²)``, then ``· weight``) and views flattening the tokens, those ops
(the *prelude*) are deferred: each chunk gathers its rows from the residual itself and scales them by
the matching rows of the real factors, the same products on the same numbers, so the norm's output
never exists.  The section's output is then summed into that same residual, which is safe because
chunks are ranges of tokens and each row is gathered from the token it is added back into (checked
before the run; else the output is summed apart): a token's rows are all gathered before anything
is added to it, and no later chunk reads it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
import torch.fx

from fxdepass.rules.activations import allocate
from fxdepass.rules.routing import grouped_mm_fallback

from .narrowing import VIEWS, component_inputs, component_op, real_shape, scaled_components, shape_of
from .registry import is_elementwise

__all__ = ["CHUNK_SHARE", "RoutedRegion", "routed_regions"]

aten = torch.ops.aten
#: a chunk's widest value relative to the section's output (Mixtral-small: a quarter is no faster at
#: N = 256 and holds 0.2 residuals more at N = 16)
CHUNK_SHARE = 0.125


@dataclasses.dataclass
class RoutedRegion:
    """A routed section that runs in chunks of rows (Note [Routed rows])."""

    #: the row-wise component nodes, in graph order: the gather into routed rows first
    body: list[torch.fx.Node]
    #: the unsorting gather, the view into ``[tokens, k, d]`` and the sum over ``k`` (the region's output)
    unsort: torch.fx.Node
    view: torch.fx.Node
    total: torch.fx.Node
    #: real values read by the body with the routed rows on their first axis (sliced per chunk)
    sliced: set[torch.fx.Node]
    #: expert kernels' offsets (shifted per chunk)
    offsets: set[torch.fx.Node]
    #: body member → the members whose last reader it is
    frees: dict[torch.fx.Node, list[torch.fx.Node]]
    #: the per-token scalings and flattening views the gather reads through, in graph order (run on each
    #: chunk's gathered rows, Note [Norm on gathered rows]); empty: the gather reads its input as it is
    prelude: list[torch.fx.Node] = dataclasses.field(default_factory=list)

    @property
    def members(self) -> list[torch.fx.Node]:
        return [*self.prelude, *self.body, self.unsort, self.view, self.total]

    @property
    def source(self) -> torch.fx.Node:
        """The component node the chunks gather their rows from."""
        return component_inputs(self.prelude[0])[0] if self.prelude else self.body[0].args[1]

    @property
    def permutation(self) -> torch.fx.Node:
        """The real index of the unsorting gather."""
        return self.unsort.args[2][0]


def routed_regions(module: torch.fx.GraphModule) -> dict[torch.fx.Node, RoutedRegion]:
    """Routed sections of ``module`` that can run in chunks of rows, keyed by their output (found once,
    kept in ``module.meta``)."""
    if "routed_regions" not in module.meta:
        found = (_region(node) for node in module.graph.nodes if component_op(node) is aten.sum.dim_IntList)
        module.meta["routed_regions"] = {region.total: region for region in found if region is not None}
    return module.meta["routed_regions"]


def _region(total: torch.fx.Node) -> RoutedRegion | None:
    view = total.args[1]
    if list(total.args[2]) != [1] or len(total.args) != 3 or total.kwargs.get("in_dims", (0,))[0] != 0:
        return None
    if component_op(view) not in VIEWS or len(view.users) != 1:
        return None
    unsort = view.args[1]
    if component_op(unsort) is not aten.index.Tensor or len(unsort.users) != 1 or len(unsort.args[2]) != 1:
        return None
    rows, viewed = real_shape(unsort), real_shape(view)
    if rows is None or viewed is None or len(viewed) != 3 or not viewed[1].is_integer:
        return None
    body = _body(unsort.args[1], rows[0])
    if body is None or any(user not in body and user is not unsort for m in body for user in m.users):
        return None
    order = {n: i for i, n in enumerate(total.graph.nodes)}
    body.sort(key=order.get)
    sliced, offsets = set(), set()
    for member in body:
        if member.target is grouped_mm_fallback:
            offsets.add(member.args[2])
        for arg in member.all_input_nodes:
            shape = None if "fxdepass_real" in arg.meta or arg in offsets else shape_of(arg)
            if shape and shape[0] == rows[0]:
                sliced.add(arg)
    frees: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for member in body[:-1]:
        frees.setdefault(max(member.users, key=order.get), []).append(member)
    return RoutedRegion(body, unsort, view, total, sliced, offsets, frees, _prelude(body[0]))


def _prelude(gather: torch.fx.Node) -> list[torch.fx.Node]:
    """The chain of per-token scalings (a product or quotient of the components by a real value) and
    flattening views into ``[tokens, width]`` that only ``gather`` reads, in graph order."""
    chain, node = [], gather.args[1]
    while isinstance(node, torch.fx.Node) and len(node.users) == 1 and (_scaling(node) or _flattening(node)):
        chain.append(node)
        node = component_inputs(node)[0]
    return chain[::-1]


def _scaling(node: torch.fx.Node) -> bool:
    source = scaled_components(node)
    return source is not None and real_shape(node) == real_shape(source)


def _flattening(node: torch.fx.Node) -> bool:
    shape, source = real_shape(node), real_shape(node.args[1]) if component_op(node) in VIEWS else None
    return source is not None and shape is not None and len(shape) == 2 and shape[-1] == source[-1]


def _body(last: Any, rows: sympy.Expr) -> list[torch.fx.Node] | None:
    """The row-wise component nodes from the gather into routed rows up to ``last``, or ``None``."""
    body, todo, gathers = [], [last], 0
    while todo:
        node = todo.pop()
        if node in body:
            continue
        shape = real_shape(node) if isinstance(node, torch.fx.Node) and "fxdepass_real" in node.meta else None
        if not shape or shape[0] != rows:
            return None
        body.append(node)
        inputs = component_inputs(node)
        if component_op(node) is aten.index.Tensor and len(node.args[2]) == 1 and tuple(node.kwargs["in_dims"])[0] == 0:
            source = real_shape(node.args[1])
            if source is not None and source[0] != rows:  # the gather into routed rows: the body starts here
                gathers += 1
                continue
        if node.target is not grouped_mm_fallback and node.target is not allocate and not is_elementwise(component_op(node)):
            return None
        todo.extend(inputs)
    return body if gathers == 1 else None
