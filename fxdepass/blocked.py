"""Causal block sparsity: run a generated module with token components in lower-triangular blocks.

Note [Causal blocks]
~~~~~~~~~~~~~~~~~~~~
With token seeds on a causal model, component ``m`` is exactly zero at every position before ``m``:
it starts at position ``m``, causal attention never moves it backwards, position-wise ops keep
zeros, biases go to rest, and absent components get no share of activations.  Multiplying those
zeros is wasted work.  :class:`BlockedInterpreter` runs the *same* generated module with the
components split into blocks ``[m0, m1)``, each block restricted to positions ``≥ m0``: every real
tensor a rule reads is narrowed along its position axes, every size derived from the sequence length
is re-evaluated for the shorter length, and the rules run unchanged on each block (torch.fx's
Interpreter pattern: only ``call_function`` is overridden).  Two things couple the blocks and are
handled here: the rest component lives in block 0 only (``registry.rest_in_block``), and an
activation's allocation normalises over all components, so its pre-activation is assembled in full
for that one step.  Attention probabilities are computed once on all positions, then sliced.  Routed
attention (rules/attention.py Note [Attention routing credit]) allocates among all components at every
(query, key) pair, so its queries, keys and values are assembled in full and its output split again.
With ``k`` blocks the work is about ``(k + 1) / 2k`` of the dense pass; results are identical up to
floating-point rounding (tests compare against the dense path in float64).

A run needs batch size 1 (a merged batch·position axis is then a position axis), a model the
caller has checked is causal, and no component op that reduces over positions.  With a single
block (``blocks=1``) nothing is narrowed, so any model with a batch of one runs this way: only the
neuron slices below apply (mixture-of-experts and encoder models).

Note [Neuron chunks]
~~~~~~~~~~~~~~~~~~~~
An MLP's hidden components (components × positions × neurons) are several times larger than the
residual stream's, and an activation's allocation makes a few temporaries of that size.  Every op
between the projection into the hidden layer and the projection out of it acts on each neuron
separately (elementwise ops, views keeping the neuron axis last, the per-element allocation), so
the region runs exactly in slices of neurons: the projection in on a slice of its weight rows, the
real values the region reads on the same slice, the projection out on the matching weight columns,
the slices' outputs summed (bias in the first slice only) into the first slice's output with one
matrix product each (``addmm_``, no temporary).  :func:`neuron_regions` finds such regions in the
generated graph; :class:`BlockedInterpreter` runs them slice by slice, so the hidden layer never
exists in full.  Inside a region every value is the region's own, so a member whose components
input no one else reads (the allocation, the scaling by the real up projection) overwrites it,
and each slice value is dropped after its last reader: a slice holds about one hidden value.

Note [Residual accumulation]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A block's output projection (attention's ``o_proj``, the MLP's ``down_proj``) is read only by the
residual add, and the residual stream it is added to is read by nothing after that add (its norm
ran before).  :class:`BlockedInterpreter` then sums the projection straight into the residual's
components (one ``addmm_`` per block or neuron slice, the bias into rest) and the add returns them:
the projection's output never exists on its own, one residual-sized value less at the MLP's peak.
The residual must be a value no one else can see: an add's or the seed's own result, whose other
readers make fresh values (the norm's arithmetic), so no view of it outlives the add.

Note [Component chunks]
~~~~~~~~~~~~~~~~~~~~~~~
In one block (mixture-of-experts models, seeds other than tokens, short prompts) a layer's attention
would hold the residual, the values and their copy by head at once: three residual-sized values.
Every op from the residual to the output projection acts on each component separately (the norm's
scaling, the value projection, the frozen probabilities, views), and the projection is summed into
the residual (above), so that stretch runs exactly in chunks of components: each chunk reads its
rows of the residual and adds its projection into the same rows; constant terms (biases) go to rest
in the chunk that holds it.  The probabilities are computed once for all chunks.

Note [Allocation without masks]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The softmax allocation is the costliest elementwise work of a run (MLP hidden components, several
passes each), and on CPU a comparison into a boolean mask costs two to three arithmetic passes, a
masked fill four to five.  So absent components (exactly zero) become −inf arithmetically:
``z + 0·(z/z)`` is ``z`` wherever ``z`` is finite and not 0 (``z/z`` is exactly 1, also for
subnormals) and NaN where ``z = 0``, and ``nan_to_num`` turns that NaN into −inf; the sink's
exclusion fills two slices of its own row.  A position whose maximum stays −inf has no component
present: its rest takes everything.  The temperature is applied in the subtraction of the maximum,
``z/T − max/T``, then ``exp``: seven arithmetic passes where there were nine, three of them masks.

That one pass (``add`` with ``alpha``, a fused multiply-add) rounds ``z/T`` and ``max/T`` differently,
so at the maximum the exponent is not exactly 0 but off by about ``|max/T|·eps``: nothing while that
is small, but at tiny temperatures (1e-20 in float64, 1e-12 in float32) it reaches hundreds, and the
shares overflow to inf or all underflow to 0 (NaN after normalising), where the dense rule, which
scales first and lets the softmax subtract its maximum, stays finite.  Where ``max|z|/T·eps`` exceeds
:data:`ROUNDED_EXPONENT` the runner therefore subtracts first, ``(z − max)·(1/T)``, exactly 0 at the
maximum and at most 0 elsewhere (one pass more); below it both forms err by that much, as the dense
rule's own rounding of ``z/T`` does.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
import torch.fx

from fxdepass.rules.activations import allocate
from fxdepass.rules import attention as attention_rules
from fxdepass.rules.attention import apply_to_values_by_head, routed_attention, scaled_dot_product_attention, values_by_head
from fxdepass.rules.norms import layer_norm, rms_norm

from . import registry
from .errors import FxDePassError
from .narrowing import (VIEWS, Projection, component_inputs, component_op, last_axis, project_into,
                        projection, real_shape, scaled_components)
from .routed import CHUNK_SHARE, RoutedRegion, routed_regions
from .seeds import split_groups

__all__ = ["Blocks", "BlockedInterpreter", "NeuronRegion", "neuron_regions", "routes_in_chunks", "supports_blocks", "block_starts",
           "slice_columns"]

aten = torch.ops.aten
#: a neuron slice's width relative to the projection out's (the residual stream's) unless the plan says
#: otherwise (``fxdepass.planning``): wider slices cost memory, narrower ones re-read the input and
#: re-write the output once more per slice
SLICE_WIDTH = 0.5
#: largest error, in the exponent, of the softmax allocation's one-pass ``z/T − max/T`` (Note [Allocation without masks])
ROUNDED_EXPONENT = 1e-3
#: component ops whose result is a fresh tensor: readers of a residual that leave it free to update
_FRESH = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
#: chunks of components a one-block stretch from the residual to its output projection runs in
COMPONENT_CHUNKS = 4
#: norm rules: they read a residual and make fresh values
_NORMS = {layer_norm, rms_norm}
#: ops between an output projection and its residual add that keep the rows (dropout's clone, views)
_PASSING = {*VIEWS, aten.clone.default, aten.alias.default}


@dataclasses.dataclass
class NeuronRegion:
    """An MLP hidden layer that runs in neuron slices (Note [Neuron chunks])."""

    #: the region's component nodes, in graph order; the last is the projection out
    members: list[torch.fx.Node]
    #: the hidden layer's width
    width: int
    #: real inputs to slice → the axis holding the neurons
    sliced: dict[torch.fx.Node, int]
    #: the projection out's bias (kept in the first slice only), if any
    bias: torch.fx.Node | None
    #: member → the members whose last reader it is (their slices are freed once it has run)
    frees: dict[torch.fx.Node, list[torch.fx.Node]] = dataclasses.field(default_factory=dict)
    #: nodes that may overwrite their components input (a member, or the output, no one else reads)
    in_place: set[torch.fx.Node] = dataclasses.field(default_factory=set)


def neuron_regions(module: torch.fx.GraphModule) -> dict[torch.fx.Node, NeuronRegion]:
    """MLP hidden layers of ``module`` that can run in neuron slices, keyed by their projection out
    (found once, kept in ``module.meta``)."""
    if "neuron_regions" not in module.meta:
        module.meta["neuron_regions"] = _find_regions(module)
    return module.meta["neuron_regions"]


def _find_regions(module: torch.fx.GraphModule) -> dict[torch.fx.Node, NeuronRegion]:
    regions = {}
    for node in module.graph.nodes:
        found = projection(node)
        region = _region(found) if found is not None else None
        if region is not None:
            regions[node] = region
    return regions


def _region(down: Projection) -> NeuronRegion | None:
    width = last_axis(down.features)
    if not isinstance(width, int):
        return None
    sliced = {down.weight: down.in_axis}  # the projection out's weight: neurons on its input axis
    if down.real_index is not None:  # an expert kernel also reads the real hidden layer
        real = down.node.args[down.real_index]
        sliced[real] = real.meta["val"].ndim - 1
    members, todo = [down.node], [down.features]
    while todo:
        node = todo.pop()
        if node in members:
            continue
        if last_axis(node) != width:
            return None
        members.append(node)
        inner = projection(node)
        if inner is not None:  # the projection in: slice its weight's outputs and its bias
            sliced[inner.weight] = inner.out_axis
            if inner.bias is not None:
                sliced[inner.bias] = 0
            continue
        op = component_op(node)
        if node.target is not allocate and not registry.is_elementwise(op) and op not in VIEWS:
            return None
        for arg in node.all_input_nodes:
            if "fxdepass_real" in arg.meta:
                todo.append(arg)
            elif last_axis(arg) == width and isinstance(arg.meta.get("val"), torch.Tensor):
                sliced[arg] = arg.meta["val"].ndim - 1
    if any(user not in members for m in members[1:] for user in m.users):
        return None  # a hidden value is read outside the region
    order = {n: i for i, n in enumerate(down.node.graph.nodes)}
    frees: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for member in members[1:]:
        frees.setdefault(max(member.users, key=order.get), []).append(member)
    in_place = {m for m in members if (source := _overwritten(m)) in members and len(source.users) == 1}
    if len(down.node.users) == 1 and _overwritten(next(iter(down.node.users))) is down.node:
        in_place.add(next(iter(down.node.users)))  # the region's output is its own too (experts' routing weights)
    return NeuronRegion(sorted(members, key=order.get), width, sliced, down.bias, frees, in_place)


def slice_columns(width: int, out_width: int, slice_width: float) -> int:
    """Neurons per slice of a hidden layer ``width`` neurons wide, for slices about ``slice_width`` times its
    projection out's width ``out_width``, made equal so that none is left over (the last may be shorter by
    less than one per slice).

    >>> slice_columns(1536, 576, 0.5)
    256
    """
    chunk = max(1, int(out_width * slice_width))
    return -(-width // -(-width // chunk))


def _same_rows(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Whether two component nodes' real values have the same last axis and the same number of rows."""
    x, y = real_shape(a), real_shape(b)
    return x is not None and y is not None and x[-1] == y[-1] and sympy.expand(sympy.prod(x) - sympy.prod(y)) == 0


def _overwritten(node: torch.fx.Node) -> torch.fx.Node | None:
    """The components input ``node`` could write its result over: that of a softmax allocation or of
    a scaling of components by a real value."""
    if node.target is allocate and node.kwargs.get("mode", "softmax") == "softmax":
        return node.args[0]
    return scaled_components(node)


def _scaling_in_place(node: torch.fx.Node) -> bool:
    """Whether ``node`` may scale its components input in place outside a neuron region: the input is
    a fresh value (an arithmetic op's or a norm's) that only ``node`` reads."""
    source = _overwritten(node)
    return (node.target is not allocate and source is not None and len(source.users) == 1
            and (component_op(source) in _FRESH or source.target in _NORMS))


@dataclasses.dataclass
class Blocks:
    """Components in blocks: ``parts[k]`` holds components ``starts[k]..starts[k+1]-1`` (block 0 also
    holds rest, last) at positions ``≥ starts[k]``."""

    parts: list[Any]
    #: per block, the first position it holds (its first component's position, or later)
    starts: list[int]


def routes_in_chunks(blocks: int, last_position_only: bool) -> bool:
    """Whether a run with these settings takes routed sections in chunks of tokens (Note [Routed rows]):
    in one block, with every position computed."""
    return blocks == 1 and not last_position_only


def block_starts(length: int, blocks: int) -> list[int]:
    """Start positions of ``blocks`` equal blocks of ``length`` token components."""
    blocks = max(1, min(blocks, length))
    return [round(i * length / blocks) for i in range(blocks)]


def _position_axes(node: Any, symbol: sympy.Symbol, batch: sympy.Symbol | None) -> tuple[int, ...]:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(value, (list, tuple)) and value:  # multi-output ops (split): their outputs' axes
        value = value[0]
    if not isinstance(value, torch.Tensor):
        return ()
    axes = []
    for axis, size in enumerate(value.shape):
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            if batch is not None:
                expr = expr.subs(batch, 1)
            if expr == symbol:
                axes.append(axis)
    return tuple(axes)


def supports_blocks(module: torch.fx.GraphModule, symbol: sympy.Symbol, batch: sympy.Symbol | None) -> bool:
    """Whether no component op of ``module`` loses a position axis (a reduction over positions)."""
    for node in module.graph.nodes:
        real = node.meta.get("fxdepass_real")
        if real is None:
            continue
        out_axes = len(_position_axes(real, symbol, batch))
        for arg in node.all_input_nodes:
            source = arg.meta.get("fxdepass_real")
            if source is not None and len(_position_axes(source, symbol, batch)) > out_axes:
                return False
    return True


def _exclude_sink(logits: torch.Tensor, component: int, own: int, count: int, position_axis: int) -> None:
    """Set the sink ``component``'s logits to −inf at every position but its ``own`` (both counted in
    this block; nothing to do if the block's first ``count`` components do not hold it)."""
    if not 0 <= component < count:
        return
    row = logits[component]
    length = row.shape[position_axis]
    own = min(max(own, -1), length)  # −1: before the block, length: after it
    row.narrow(position_axis, 0, max(own, 0)).fill_(float("-inf"))
    if own + 1 < length:
        row.narrow(position_axis, own + 1, length - own - 1).fill_(float("-inf"))


def _reads_index(node: torch.fx.Node) -> bool:
    """Whether a real value ``node`` is an index or mask (integer or boolean): a gather, scatter or
    permutation by it may move rows between positions (the rows sorted by expert in a mixture of experts)."""
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and not (value.dtype.is_floating_point or value.dtype.is_complex)


def position_wise_tail(module: torch.fx.GraphModule, symbol: sympy.Symbol, batch: sympy.Symbol | None) -> set[torch.fx.Node]:
    """Component nodes after the last one that may mix positions: attention applied to values (a rule
    reading a real value with two position axes), a rule reading a real index or mask, or one reading
    components with no position axis to narrow (rows of tokens × experts).  The tail is position-wise, so
    a pass read at the last position only computes it there (cached on the module).

    An index counts as mixing even where it does not move rows across positions: ending the tail too early
    costs memory, ending it too late reads positions the pass no longer holds.
    """
    key = ("position_wise_tail", symbol, batch)
    if key not in module.meta:
        nodes = [n for n in module.graph.nodes if "fxdepass_real" in n.meta]

        def mixes(node: torch.fx.Node) -> bool:
            if node.target in (scaled_dot_product_attention, routed_attention):
                return True
            for arg in node.all_input_nodes:
                real = arg.meta.get("fxdepass_real")  # set on components: the real value they decompose
                if real is None and (len(_position_axes(arg, symbol, batch)) > 1 or _reads_index(arg)):
                    return True
                if real is not None and not _position_axes(real, symbol, batch):
                    return True
            return False

        mixing = [i for i, n in enumerate(nodes) if mixes(n)]
        module.meta[key] = set(nodes[mixing[-1] + 1:] if mixing else nodes)
    return module.meta[key]


class BlockedInterpreter(torch.fx.Interpreter):
    """Run a generated module with token components in causal blocks; see Note [Causal blocks].

    ``last_position_only`` also restricts everything after the last attention (position-wise: output
    projection, MLP, norms, head) to the last position, for readouts read only there.  ``slice_width``:
    each neuron slice's width relative to its projection out's (Note [Neuron chunks]).

    >>> real, components = BlockedInterpreter(module, sequence_symbol, batch_symbol, blocks=8).run(*inputs)[0]  # doctest: +SKIP
    """

    def __init__(self, module: torch.fx.GraphModule, symbol: sympy.Symbol, batch: sympy.Symbol | None,
                 blocks: int = 8, last_position_only: bool = False, slice_width: float = SLICE_WIDTH):
        super().__init__(module)
        self.symbol, self.batch, self.blocks, self.slice_width = symbol, batch, blocks, slice_width
        self._axes: dict[torch.fx.Node, tuple[int, ...]] = {}
        self._sizes: dict[torch.fx.Node, Any] = {}
        self.tail = position_wise_tail(module, symbol, batch) if last_position_only else set()
        # routed sections run in chunks of rows (one block only); their experts then need no neuron slices
        routed = list(routed_regions(module).values()) if routes_in_chunks(blocks, last_position_only) else []
        self.routed = {m: r for r in routed for m in r.members}
        neurons = [r for r in neuron_regions(module).values() if not any(m in self.routed for m in r.members)]
        self.regions = {m: r for r in neurons for m in r.members}
        self.in_place = {m for r in neuron_regions(module).values() for m in r.in_place}
        self.in_place |= {n for n in module.graph.nodes if _scaling_in_place(n)}
        order = {n: i for i, n in enumerate(module.graph.nodes)}
        for members in [r.members for r in neurons] + [r.members for r in routed]:
            self._hold(members, order)
        self.passes: dict[torch.fx.Node, tuple[torch.fx.Node, int]] = {}
        self.accumulate = self._accumulations(module, {r.total for r in routed})
        self.segment_frees: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self.segments = {m: s for s in self._segments(module) for m in s} if blocks == 1 else {}
        for segment in {id(s): s for s in self.segments.values()}.values():
            self._hold(segment, order)
        self.rest_here = True  # whether the components being run hold rest (Note [Component chunks])
        self._token_split = any(n.target is split_groups and n.kwargs.get("groups") is None for n in module.graph.nodes)
        self._probabilities: dict[torch.fx.Node, torch.Tensor] | None = None

    def _hold(self, members: list[torch.fx.Node], order: dict[torch.fx.Node, int]) -> None:
        """Keep what ``members`` read (and the members) until the last of them, where they run together."""
        last = members[-1]
        held = {a for m in members for a in m.all_input_nodes} | set(members)
        for user, deleted in list(self.user_to_last_uses.items()):
            if order[user] < order[last] and any(n in held for n in deleted):
                self.user_to_last_uses[user] = [n for n in deleted if n not in held]
                self.user_to_last_uses.setdefault(last, []).extend(n for n in deleted if n in held)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        ids = args[0]
        if ids.shape[0] != 1:
            raise ValueError("causal blocks need a batch of one prompt")
        self.length = ids.shape[1]
        # the token components this process holds (Note [Sharded components] in fxdepass/registry.py)
        axis = registry.component_axis()
        first, self.end = axis.held(self.length) if self._token_split else (0, self.length)
        self.holds_rest = axis.rest
        #: each block's first component; with several blocks also its first position, else that is 0
        self.firsts = [first + start for start in block_starts(self.end - first, self.blocks)]
        self.starts = self.firsts if len(self.firsts) > 1 else [0]
        return super().run(*args, **kwargs)

    # -- helpers -----------------------------------------------------------------------------

    def _accumulations(self, module: torch.fx.GraphModule, outputs: set[torch.fx.Node]) -> dict[torch.fx.Node, torch.fx.Node]:
        """Projection → the residual it can be summed into (Note [Residual accumulation]); the views
        and copies between the projection and the add go to ``self.passes`` (they pass the sum on).  Routed
        sections' ``outputs`` are summed into a residual the same way."""
        found = {}
        for node in module.graph.nodes:
            if projection(node) is None and node not in outputs:
                continue
            chain, add = [], node
            while len(add.users) == 1 and (component_op(add) in _PASSING or add is node):
                chain.append(add)
                add = next(iter(add.users))
            if component_op(add) is not aten.add.Tensor or len(add.args) != 3 or tuple(add.kwargs["in_dims"]) != (0, 0):
                continue
            residual = add.args[1] if add.args[2] is chain[-1] else add.args[2]
            owned = component_op(residual) is aten.add.Tensor or residual.target is split_groups
            others_fresh = all(component_op(u) in _FRESH or u.target in _NORMS for u in residual.users if u is not add)
            if (residual is not chain[-1] and owned and others_fresh and residual in self.user_to_last_uses.get(add, ())
                    and _same_rows(node, add) and real_shape(residual) == real_shape(add)):
                found[node] = residual
                self.passes.update({n: (node, 1) for n in chain[1:]})
                self.passes[add] = (node, add.args.index(chain[-1]))
        return found

    def _segments(self, module: torch.fx.GraphModule) -> list[list[torch.fx.Node]]:
        """Per output projection summed into its residual, the component nodes from that residual to it
        when every one acts on each component separately, in graph order ending with the projection
        (Note [Component chunks])."""
        order = {n: i for i, n in enumerate(module.graph.nodes)}
        found = []
        for node, residual in self.accumulate.items():
            projected = projection(node)
            if projected is None:
                continue
            members, todo, reaches = [], [projected.features], True
            while todo and reaches:
                member = todo.pop()
                if member is residual or member in members:
                    continue
                sources = component_inputs(member)
                per_component = component_op(member) is not None or member.target in _NORMS or member.target is scaled_dot_product_attention
                reaches = bool(sources) and per_component and member not in self.regions and member not in self.routed
                members.append(member)
                todo.extend(sources)
            if reaches and members and all(u in members or u is node for m in members for u in m.users):
                found.append(sorted(members, key=order.get) + [node])
                for member in members:  # each value is dropped after its last reader
                    self.segment_frees.setdefault(max(member.users, key=order.get), []).append(member)
        return found

    def _residual_for(self, node: torch.fx.Node) -> Blocks | None:
        """The residual ``node``'s projection is summed into, if it is laid out as ``node``'s output."""
        residual = self.env.get(self.accumulate.get(node))
        fits = isinstance(residual, Blocks) and residual.starts == self._starts_for(node)
        return residual if fits else None

    def axes(self, node: torch.fx.Node) -> tuple[int, ...]:
        """Position axes of ``node``'s real value (cached)."""
        if node not in self._axes:
            self._axes[node] = _position_axes(node, self.symbol, self.batch)
        return self._axes[node]

    def _narrow(self, node: torch.fx.Node, value: Any, start: int) -> Any:
        """``value`` (the real value of ``node``) restricted to positions ``≥ start``."""
        if start == 0:
            return value
        if isinstance(value, (list, tuple)):
            return [self._narrow_tensor(node, v, start) for v in value]
        if isinstance(value, torch.Tensor):
            return self._narrow_tensor(node, value, start)
        size = node.meta.get("val")
        if isinstance(size, torch.SymInt) and isinstance(value, int):
            return self._size(node, size, start)
        return value

    def _narrow_tensor(self, node: torch.fx.Node, value: torch.Tensor, start: int, offset: int = 0) -> torch.Tensor:
        for axis in self.axes(node):
            value = value.narrow(axis + offset, start, value.shape[axis + offset] - start)
        return value

    def _size(self, node: torch.fx.Node, size: torch.SymInt, start: int) -> int:
        """A size derived from the sequence length, re-evaluated for the length ``length − start``."""
        if node not in self._sizes:
            expr = size.node.expr
            free = sorted(expr.free_symbols, key=str)
            self._sizes[node] = (free, sympy.lambdify(free, expr))
        free, fn = self._sizes[node]
        values = [self.length - start if s == self.symbol else 1 for s in free]  # batch is 1
        return int(fn(*values))

    def _starts_for(self, node: torch.fx.Node) -> list[int]:
        return [self.length - 1] * len(self.starts) if node in self.tail else self.starts

    def _part(self, arg: torch.fx.Node, value: Blocks, k: int, start: int) -> torch.Tensor:
        """Block ``k`` of ``value`` restricted to positions ``≥ start``."""
        shift = start - value.starts[k]
        return self._narrow_tensor(arg.meta["fxdepass_real"], value.parts[k], shift, offset=1) if shift else value.parts[k]

    def _block_args(self, node: torch.fx.Node, args: tuple, kwargs: dict, k: int, start: int) -> tuple[tuple, dict]:
        """``node``'s argument values for block ``k``, restricted to positions ``≥ start``."""
        def pick(template: Any, value: Any) -> Any:
            if isinstance(template, torch.fx.Node):
                return self._part(template, value, k, start) if isinstance(value, Blocks) else self._narrow(template, value, start)
            if isinstance(template, (list, tuple)):  # plain lists and tuples: vmap matches in_dims by type
                return (list if isinstance(template, list) else tuple)(pick(t, v) for t, v in zip(template, value))
            return value

        return pick(node.args, args), {key: pick(node.kwargs[key], v) for key, v in kwargs.items()}

    def _assemble(self, value: Blocks, real: torch.fx.Node, base: int | None = None) -> tuple[torch.Tensor, int]:
        """The dense ``[M+1, …]`` components of a blocked value at positions ``≥ base`` (default: the smallest
        block start; zeros before each block's start), and ``base``."""
        base = min(value.starts) if base is None else base
        shape = list(value.parts[0].shape[1:])  # the real value's shape, restricted to positions ≥ base
        for axis in self.axes(real):
            shape[axis] = self.length - base
        like = value.parts[0].new_empty(shape)
        count = sum(part.shape[0] for part in value.parts)  # one block holds any seed's components
        full = like.new_zeros(count, *like.shape)
        for k, part in enumerate(value.parts):
            first, end = self._rows(k, count)
            index = [slice(first, end)] + [slice(None)] * like.ndim
            for axis in self.axes(real):
                index[axis + 1] = slice(value.starts[k] - base, None)
            full[tuple(index)] = part[:end - first]
            if k == 0 and self.holds_rest:
                full[-1] = part[-1]
        return full, base

    def _rows(self, k: int, count: int) -> tuple[int, int]:
        """The rows of block ``k``'s sources among ``count`` dense components (this process's, rest last if held)."""
        end = self.firsts[k + 1] if k + 1 < len(self.firsts) else self.firsts[0] + count - self.holds_rest
        return self.firsts[k] - self.firsts[0], end - self.firsts[0]

    def _split(self, real: torch.fx.Node, full: torch.Tensor, base: int, starts: list[int]) -> Blocks:
        """Blocks of dense components given at positions ``≥ base``."""
        parts = []
        for k, start in enumerate(starts):
            first, end = self._rows(k, full.shape[0])
            part = torch.cat((full[first:end], full[-1:])) if k == 0 and self.holds_rest else full[first:end]
            parts.append(self._narrow_tensor(real, part, start - base, offset=1) if start > base else part)
        return Blocks(parts, list(starts))

    # -- the hooks -----------------------------------------------------------------------------

    def run_node(self, node: torch.fx.Node) -> Any:
        routed = self.routed.get(node)
        if routed is not None:  # members wait for the region's output, then run in chunks of rows
            return self._run_routed(routed) if node is routed.total else None
        segment = self.segments.get(node)
        if segment is not None:  # members wait for the projection, then run in chunks of components
            return self._run_segment(segment) if node is segment[-1] else None
        region = self.regions.get(node)
        if region is not None:  # members wait for the projection out, then run in slices
            return self._run_region(region) if node is region.members[-1] else None
        self.node = node
        return super().run_node(node)

    def _run_region(self, region: NeuronRegion) -> Any:
        """The region's projection out, summed over neuron slices (Note [Neuron chunks])."""
        down = region.members[-1]
        chunk = slice_columns(region.width, last_axis(down), self.slice_width)
        saved = {n: self.env[n] for n in [*region.sliced, *([region.bias] if region.bias is not None else [])]}
        total = self._residual_for(down)
        first = total is not None
        try:
            for start in range(0, region.width, chunk):
                size = min(chunk, region.width - start)
                for node, axis in region.sliced.items():
                    self.env[node] = saved[node].narrow(axis, start, size)
                if region.bias is not None and start:
                    self.env[region.bias] = torch.zeros_like(saved[region.bias])
                for member in region.members:
                    self.node = member
                    args, kwargs = self.fetch_args_kwargs_from_env(member)
                    if component_op(member) in VIEWS and args[2][-1] == region.width:
                        args = (*args[:2], [*args[2][:-1], size], *args[3:])
                    if member is down and isinstance(total, Blocks):
                        self._add_blocks(total, member, args, kwargs, with_bias=first)
                        first = False
                    else:
                        self.env[member] = self.call_function(member.target, args, kwargs)
                    for done in region.frees.get(member, ()):
                        self.env[done] = None
                if total is None:
                    total = self.env[down]
                for member in region.members:
                    self.env[member] = None
        finally:
            self.env.update(saved)
        return total

    def _run_segment(self, segment: list[torch.fx.Node]) -> Blocks:
        """The output projection ``segment[-1]``, the nodes from its residual to it run in chunks of
        components (Note [Component chunks]); summed into the residual where that is laid out as the
        projection's output (not for a last-position tail), else gathered chunk by chunk."""
        *members, down = segment
        source = self.accumulate[down]
        whole, residual = self.env[source], self._residual_for(down)
        if residual is not None and not residual.parts[0].is_contiguous():
            residual = None
        count = whole.parts[0].shape[0]
        size = -(-count // COMPONENT_CHUNKS)
        out = None
        self._probabilities = {}
        try:
            for start in range(0, count, size):
                self.env[source] = Blocks([whole.parts[0][start:start + size]], whole.starts)
                self.rest_here = start + size >= count  # rest is the last component
                self._run_members(members)
                self.node = down
                args, kwargs = self.fetch_args_kwargs_from_env(down)
                if residual is not None:
                    self._add_blocks(self.env[source], down, args, kwargs, with_bias=self.rest_here)
                else:
                    part = self.call_function(down.target, args, kwargs)
                    if out is None:
                        out = Blocks([part.parts[0].new_empty(count, *part.parts[0].shape[1:])], part.starts)
                    out.parts[0][start:start + size] = part.parts[0]
                    del part
                del args, kwargs
                for member in members:
                    self.env[member] = None
        finally:
            self.env[source], self.rest_here, self._probabilities = whole, True, None
        return residual if residual is not None else out

    def _run_members(self, members: list[torch.fx.Node]) -> None:
        """Run a segment's ``members`` in order, each value dropped after its last reader among them."""
        for member in members:
            self.node = member
            self.env[member] = self.call_function(member.target, *self.fetch_args_kwargs_from_env(member))
            for done in self.segment_frees.get(member, ()):
                self.env[done] = None

    def _rest(self, k: int) -> bool:
        """Whether block ``k`` of the components being run holds rest."""
        return k == 0 and self.rest_here

    def _run_routed(self, region: RoutedRegion) -> Blocks:
        """The routed section's output, run in chunks of tokens and added into them (Note [Routed rows])."""
        permutation = self.env[region.permutation]
        rows = permutation.shape[0]
        if not bool((torch.bincount(permutation, minlength=rows) == 1).all()):
            raise FxDePassError(f"{region.unsort.name}: the routed rows are not put back by a permutation")
        per_token = int(real_shape(region.view)[1])
        total = self._residual_for(region.total)
        if total is not None and not total.parts[0].is_contiguous():
            total = None
        if total is not None and region.prelude and not self._rows_from_own_tokens(region, permutation, per_token):
            total = None  # the chunks gather from this residual: adding into it must wait (Note [Norm on gathered rows])
        width = int(real_shape(region.total)[-1])
        out = total.parts[0].view(total.parts[0].shape[0], -1, width) if total is not None else None
        tokens = rows // per_token
        chunk = max(1, int(CHUNK_SHARE * tokens * width / per_token / max(int(real_shape(m)[-1]) for m in region.body)))
        saved = {n: self.env[n] for n in [*region.sliced, *region.offsets]}
        try:
            for start in range(0, tokens, chunk):
                # the chunk's routed rows, still sorted by expert, and their tokens
                chosen, order = permutation[start * per_token:(start + chunk) * per_token].sort()
                for node in region.sliced:
                    self.env[node] = saved[node].index_select(0, chosen)
                for node in region.offsets:  # each expert's rows in the chunk, counted up
                    counts = torch.bincount(torch.searchsorted(saved[node], chosen, right=True), minlength=len(saved[node]))
                    self.env[node] = counts.cumsum(0).to(saved[node].dtype)
                for member in region.body:
                    self.node = member
                    args, kwargs = self.fetch_args_kwargs_from_env(member)
                    if member is region.body[0]:
                        self.env[member] = Blocks([self._gather_rows(region, args[2][0])], [0])
                    else:
                        self.env[member] = self.call_function(member.target, args, kwargs)
                    for done in region.frees.get(member, ()):
                        self.env[done] = None
                    del args, kwargs  # a chunk's values live only as long as their readers
                part, self.env[region.body[-1]] = self.env[region.body[-1]].parts[0], None
                if out is None:
                    out = part.new_zeros(part.shape[0], tokens, width)
                out.index_add_(1, start + order // per_token, part)
                del part
        finally:
            self.env.update(saved)
        return total if total is not None else Blocks([out], [0])

    def _rows_from_own_tokens(self, region: RoutedRegion, permutation: torch.Tensor, per_token: int) -> bool:
        """Whether every routed row is gathered from the token it is added back into."""
        inverse = torch.empty_like(permutation)
        inverse[permutation] = torch.arange(permutation.shape[0], device=permutation.device)
        return torch.equal(self.env[region.body[0].args[2][0]], inverse // per_token)

    def _gather_rows(self, region: RoutedRegion, index: torch.Tensor) -> torch.Tensor:
        """The routed rows ``index`` of the region's source, row-major (the expert kernel reads rows
        without a copy), with the prelude's scalings applied to them (Note [Norm on gathered rows])."""
        components = self.env[region.source].parts[0]
        shape = list(components.shape[1:])  # the real value's shape, flattened by the prelude's views
        rows = components.reshape(components.shape[0], -1, shape[-1]).transpose(0, 1)[index].transpose(0, 1)
        for member in region.prelude:
            if component_op(member) in VIEWS:
                shape = [-1, shape[-1]]
                continue
            op, *operands = self.fetch_args_kwargs_from_env(member)[0]
            at = list(member.kwargs["in_dims"]).index(0)
            real = operands[1 - at]
            if isinstance(real, torch.Tensor) and real.ndim > 1:  # per token: its gathered rows
                real = real.expand(*shape[:-1], real.shape[-1]).reshape(-1, real.shape[-1])[index]
            if torch.result_type(rows, real) != rows.dtype:
                rows = op(*((rows, real) if at == 0 else (real, rows)))
            else:  # in place on the chunk's own rows (a product is the same either way round)
                rows.mul_(real) if op is aten.mul.Tensor else rows.div_(real)
        return rows

    def _add_blocks(self, total: Blocks, node: torch.fx.Node, args: tuple, kwargs: dict, with_bias: bool = False) -> None:
        """Add ``node``'s blocks to ``total`` one at a time (no second full-size value); a projection's
        bias goes to rest ``with_bias``, else it is left out."""
        for k, start in enumerate(self._starts_for(node)):
            block_args, block_kwargs = self._block_args(node, args, kwargs, k, start)
            with registry.rest_in_block(self._rest(k)):
                if not project_into(total.parts[k], block_args):
                    total.parts[k].add_(node.target(*block_args, **block_kwargs).reshape(total.parts[k].shape))
                elif with_bias:  # project_into made the product without the bias
                    registry.projection_args(block_args[0]).bias_to_rest(total.parts[k], block_args[1:])

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        node = self.node
        real = node.meta.get("fxdepass_real")
        if real is None:
            return super().call_function(target, args, kwargs)
        starts = self._starts_for(node)
        if target is split_groups and kwargs.get("groups") is None and starts == self.starts:
            return self._split_tokens(args[0], kwargs["position_axis"], starts)
        if target is split_groups:
            return self._split(real, target(*args, **kwargs), 0, starts)
        if target is allocate and kwargs.get("mode", "softmax") == "softmax":
            return self._softmax_allocation(node, args, kwargs, in_place=node in self.in_place)
        scaled = self._scale_in_place(node, args, kwargs) if node in self.in_place else None
        if scaled is not None:
            return scaled
        if target is allocate:
            dense, base = self._assemble(args[0], node.args[0].meta["fxdepass_real"])
            activation = self._narrow(node.args[1], args[1], base)
            if kwargs.get("sink") is not None:  # positions are now counted from base
                kwargs = {**kwargs, "sink": kwargs["sink"] - torch.tensor([[0], [base]], device=kwargs["sink"].device)}
            return self._split(real, target(dense, activation, **kwargs), base, starts)
        if target is scaled_dot_product_attention:
            return self._attention(node, kwargs)
        if target is routed_attention:
            return self._assembled(node, args, kwargs)
        residual = self._residual_for(node) if node in self.accumulate else None
        if residual is not None:
            self._add_blocks(residual, node, args, kwargs, with_bias=True)
            return residual
        summed, index = self.passes.get(node, (None, 0))
        if summed is not None and args[index] is self.env.get(self.accumulate[summed]):  # already summed in
            return args[index]
        parts = []
        for k, start in enumerate(starts):
            block_args, block_kwargs = self._block_args(node, args, kwargs, k, start)
            with registry.rest_in_block(self._rest(k)):
                parts.append(target(*block_args, **block_kwargs))
        return Blocks(parts, list(starts))

    def _split_tokens(self, value: torch.Tensor, axis: int, starts: list[int]) -> Blocks:
        """One component per position, straight into blocks: block ``k``'s component ``j`` is ``value`` at
        position ``firsts[k] + j``, on the diagonal of (component, position); block 0 ends with an empty rest
        where this process holds rest."""
        parts = []
        for k, start in enumerate(starts):
            first = self.firsts[k]
            count = (self.firsts[k + 1] if k + 1 < len(self.firsts) else self.end) - first
            held = value.narrow(axis, start, value.shape[axis] - start)
            part = held.new_zeros(count + (k == 0 and self.holds_rest), *held.shape)
            torch.diagonal(part[:count], offset=first - start, dim1=0, dim2=axis + 1).copy_(
                held.narrow(axis, first - start, count).movedim(axis, -1))
            parts.append(part)
        return Blocks(parts, list(starts))

    def _scale_in_place(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Blocks | None:
        """Scale the components (read by no one else) by the real value beside them in place, block by
        block, and return them; ``None`` (nothing done) where the result would not fit their shape."""
        at, by = (1, 2) if tuple(node.kwargs["in_dims"]) == (0, None) else (2, 1)
        components, starts = args[at], self._starts_for(node)
        if not isinstance(components, Blocks) or starts != components.starts:
            return None
        blocks = [self._block_args(node, args, kwargs, k, start)[0] for k, start in enumerate(starts)]
        if any(torch.broadcast_shapes(b[at].shape, (1, *torch.as_tensor(b[by]).shape)) != b[at].shape
               or torch.result_type(b[at], b[by]) != b[at].dtype for b in blocks):
            return None
        scale = torch.Tensor.mul_ if args[0] is aten.mul.Tensor else torch.Tensor.div_
        for block in blocks:
            scale(block[at], block[by])
        return components

    def _softmax_allocation(self, node: torch.fx.Node, args: tuple, kwargs: dict, in_place: bool = False) -> Blocks:
        """The softmax allocation (rules/activations.py Note [Activation allocation]) block by block:
        the normaliser is accumulated across blocks, so the components are never assembled;
        ``in_place`` writes the shares over the components.  See Note [Allocation without masks]."""
        value, activation = args[0], args[1]
        real = node.args[0].meta["fxdepass_real"]
        sink, scale = kwargs.get("sink"), 1.0 / kwargs.get("temperature", 0.1)

        def stat(k: int, stats: torch.Tensor) -> torch.Tensor:  # a statistic at block k's positions
            return self._narrow_tensor(real, stats, value.starts[k])

        top = torch.full(activation.shape, float("-inf"), dtype=value.parts[0].dtype, device=activation.device)
        logits = []
        for k, part in enumerate(value.parts):
            logit = torch.addcdiv(part, part, part, value=0, out=part if in_place else None).nan_to_num_(nan=float("-inf"))
            if sink is not None and kwargs.get("position_axis") is not None:
                count = part.shape[0] - (k == 0 and self.holds_rest)  # block 0's rest is never the sink
                _exclude_sink(logit, int(sink[0, 0]) - self.firsts[k], int(sink[1, 0]) - value.starts[k], count,
                              kwargs["position_axis"])
            torch.maximum(stat(k, top), logit.amax(0), out=stat(k, top))
            logits.append(logit)
        top = registry.across_components(top, "max")
        nothing = top == float("-inf")  # no component present: rest takes everything
        if self.holds_rest:
            logits[0][-1].masked_fill_(stat(0, nothing), 0.0)
        top.masked_fill_(nothing, 0.0)
        # one pass (z/T − max/T) unless its rounding could blow up at a tiny temperature
        one_pass = top.is_meta or scale * float(top.abs().max()) * torch.finfo(top.dtype).eps <= ROUNDED_EXPONENT  # meta: no values
        lowered = top.mul_(-scale) if one_pass else top
        total = torch.zeros_like(top)
        for k, logit in enumerate(logits):
            if one_pass:
                torch.add(stat(k, lowered), logit, alpha=scale, out=logit)
            else:  # subtract first: exactly 0 at the maximum, however small the temperature
                torch.sub(logit, stat(k, top), out=logit).mul_(scale)
            stat(k, total).add_(logit.exp_().sum(0))
        ratio = activation / registry.across_components(total, "sum")
        starts = self._starts_for(node)
        parts = []
        for k, share in enumerate(logits):
            part = share.mul_(stat(k, ratio))
            shift = starts[k] - value.starts[k]
            parts.append(self._narrow_tensor(real, part, shift, offset=1) if shift else part)
        return Blocks(parts, list(starts))

    def _assembled(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Blocks:
        """``node``'s rule run on its components assembled in full (a rule coupling every component at
        every pair of positions: routed attention), its result split back into blocks."""
        templates, carried = node.kwargs["components"], kwargs["components"]
        dense, bases = [], set()
        for template, value in zip(templates, carried):
            if isinstance(value, Blocks):
                full, base = self._assemble(value, template.meta["fxdepass_real"])
                dense.append(full)
                bases.add(base)
            else:
                dense.append(value)
        if len(bases) != 1:
            raise FxDePassError(f"{node.name}: its components start at different positions {sorted(bases)}")
        base = bases.pop()
        args = tuple(self._narrow(t, v, base) if isinstance(t, torch.fx.Node) else v for t, v in zip(node.args, args))
        kwargs = {**kwargs, "components": tuple(dense)}
        if kwargs.get("sink") is not None:  # positions are now counted from base
            kwargs["sink"] = kwargs["sink"] - torch.tensor([[0], [base]], device=kwargs["sink"].device)
        with registry.rest_in_block(self.rest_here):
            result = node.target(*args, **kwargs)
        return self._split(node.meta["fxdepass_real"], result, base, self._starts_for(node))

    def _attention(self, node: torch.fx.Node, kwargs: dict) -> Blocks:
        query, key, *rest = [self.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args]
        mask = rest[1] if len(rest) > 1 else kwargs.get("attn_mask")
        causal = rest[3] if len(rest) > 3 else kwargs.get("is_causal", False)
        probabilities = self._probabilities.get(node) if self._probabilities is not None else None
        if probabilities is None:  # through the module: the rule and this runner share one definition (tests patch it)
            probabilities = attention_rules.attention_probabilities(query, key, mask, causal, kwargs.get("scale"))
            if self._probabilities is not None:  # computed once for every chunk of components
                self._probabilities[node] = probabilities
        values = self.env[node.kwargs["components"]]
        last_reader = (node.kwargs["components"] in self.user_to_last_uses.get(node, ())
                       or (node in self.segments and len(node.kwargs["components"].users) == 1))
        parts = []
        for k, start in enumerate(values.starts):
            shape, by_head = values.parts[k].shape, values_by_head(values.parts[k])
            if last_reader:  # the values' copy by head is all the product needs: free the originals first
                values.parts[k] = None
            parts.append(apply_to_values_by_head(probabilities[..., start:, start:], by_head, shape))
        return Blocks(parts, list(values.starts))

    def output(self, target: Any, args: tuple, kwargs: dict) -> Any:
        results = []
        for real, components in self.node.args[0]:
            value = self.env[components]
            if isinstance(value, Blocks):  # at every position but after the last-position tail
                base = min(value.starts) if components in self.tail else 0
                dense, base = self._assemble(value, components.meta["fxdepass_real"], base)
                results.append((self._narrow(real, self.env[real], base), dense))
            else:
                results.append((self.env[real], value))
        return tuple(results)


