"""Analysis: which nodes carry components, and how each one is decomposed.

Note [Flavours of decomposed values]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Walking the graph forward from the seed, every node downstream of it gets one of

* ``frozen``: its real value is used as a constant (norm statistics, attention probabilities,
  routing decisions, anything computed only from frozen values);
* ``linear``: decomposed by its op's rule (linear map, hand-written rule, or a product);
* ``gate``: an elementwise nonlinearity of a single decomposed *root* (``pow(x, 2)``, ``tanh(z)``).
  A consumer that is not elementwise, or that mixes it with a different root, freezes it: that is how
  RMSNorm's ``rsqrt(mean(x²))`` and a ``sigmoid`` gate end up frozen;
* ``activation``: an elementwise function of a single root ``z`` that is nonlinear in ``z`` and not
  a bare gate: ``silu(z)``, ``z·sigmoid(z)``, GPT-2's ``0.5·z·(1+tanh(√(2/π)(z+0.044715z³)))``.  Its
  real output is allocated among the components of ``z`` (rules/activations.py).

The root of an elementwise node is the common root of its decomposed inputs (elementwise ops do not
change it); any other node, or an elementwise node whose inputs have different roots, is its own
root.  A product of two decomposed values with different roots is a *gated product* when exactly one
side is an activation (the other side is frozen) and a *symmetric product* otherwise.

Walking backwards from the readout then keeps only what reaches it (``needed``): ``q·kᵀ`` feeds only
a softmax and is never decomposed.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Iterable

import torch
import torch.fx

from . import rules  # noqa: F401  (the analysis reads the whole rule table: importing the rules fills it)
from .errors import UnsupportedOpError, node_location
from .registry import Kind, OpRule, lookup

__all__ = ["NodeInfo", "Analysis", "analyse", "normalize_args", "leaves_by_position"]

FROZEN, LINEAR, GATE, ACTIVATION, PRODUCT, SEED, UNSUPPORTED = (
    "frozen", "linear", "gate", "activation", "product", "seed", "unsupported",
)


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """What the analysis decided for one node downstream of the seed (kept in ``node.meta``)."""

    flavour: str
    root: torch.fx.Node | None = None
    #: argument positions whose values carry components when this node is decomposed
    component_args: tuple[int, ...] = ()
    rule: OpRule | None = None

    @property
    def decomposable(self) -> bool:
        return self.flavour != FROZEN


@dataclasses.dataclass
class Analysis:
    info: dict[torch.fx.Node, NodeInfo]
    needed: set[torch.fx.Node]
    #: a carrying seed downstream of another seed → how it would be decomposed from what reaches it (Note [Carrying seeds])
    carried: dict[torch.fx.Node, NodeInfo] = dataclasses.field(default_factory=dict)


def normalize_args(node: torch.fx.Node) -> tuple[list[Any], dict[str, Any]]:
    """Positional arguments (schema defaults filled in up to the last given one) and keyword-only ones."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return list(node.args), dict(node.kwargs)
    args, kwargs = list(node.args), dict(node.kwargs)
    positional = [a for a in schema.arguments if not a.kwarg_only]
    last = max([len(args) - 1] + [i for i, a in enumerate(positional) if a.name in kwargs])
    for i in range(len(args), last + 1):
        arg = positional[i]
        args.append(kwargs.pop(arg.name) if arg.name in kwargs else arg.default_value)
    return args, kwargs


def leaves_by_position(node: torch.fx.Node) -> dict[int, list[torch.fx.Node]]:
    """The input nodes of ``node`` grouped by the positional argument they appear in."""
    args, _ = normalize_args(node)
    out: dict[int, list[torch.fx.Node]] = {}
    for i, arg in enumerate(args):
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg(arg, found.append)
        if found:
            out[i] = found
    return out


def _is_tensor_valued(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor) or node.target is operator.getitem


def _classify(node: torch.fx.Node, info: dict[torch.fx.Node, NodeInfo], variant: str | None = None) -> NodeInfo | None:
    positions = leaves_by_position(node)
    participating = {i: [a for a in leaves if a in info and info[a].decomposable] for i, leaves in positions.items()}
    participating = {i: v for i, v in participating.items() if v}
    tainted = any(a in info for leaves in positions.values() for a in leaves)
    if not tainted:
        return None
    if not participating or not _is_tensor_valued(node):
        return NodeInfo(FROZEN)
    rule = lookup(node.target, variant)
    if rule is None:
        return NodeInfo(UNSUPPORTED, root=node)
    if rule.kind is Kind.FROZEN:
        return NodeInfo(FROZEN, rule=rule)
    if rule.kind is Kind.CUSTOM:
        live = tuple(i for i in rule.linear_args if any(info[a].flavour != GATE for a in participating.get(i, [])))
        return NodeInfo(LINEAR, node, live, rule) if live else NodeInfo(FROZEN, rule=rule)
    nonlinear = set(rule.nonlinear_args) if rule.kind is not Kind.ACTIVATION else set(participating)
    linear_in = {i: v for i, v in participating.items() if i in rule.linear_args}
    nonlinear_in = {i: v for i, v in participating.items() if i in nonlinear and i not in rule.linear_args}
    if rule.kind is Kind.GATE:
        nonlinear_in, linear_in = participating, {}
    if rule.elementwise:
        roots = {info[a].root for v in [*linear_in.values(), *nonlinear_in.values()] for a in v}
        if len(roots) == 1:
            return _same_root(rule, roots.pop(), linear_in, nonlinear_in, info)
    # Different roots, or not elementwise: gates and nonlinear arguments are frozen.
    live = {i: [a for a in v if info[a].flavour != GATE] for i, v in linear_in.items()}
    live = {i: v for i, v in live.items() if v}
    if not live:
        return NodeInfo(FROZEN, rule=rule)
    if rule.kind is Kind.BILINEAR and len(live) == 2:
        activation_sides = [i for i, v in live.items() if any(info[a].flavour == ACTIVATION for a in v)]
        if len(activation_sides) == 1:  # gated product: the activation carries the allocation
            return NodeInfo(LINEAR, node, tuple(activation_sides), rule)
        return NodeInfo(PRODUCT, node, tuple(sorted(live)), rule)
    if rule.kind is Kind.BILINEAR and sum(map(len, live.values())) > 1:
        # Several decomposed factors in one list argument (``einsum``'s operands): a product with no
        # split yet.  Fine as long as it is not needed (q·kᵀ feeding a softmax).
        return NodeInfo(UNSUPPORTED, root=node)
    return NodeInfo(LINEAR, node, tuple(sorted(live)), rule)


def _same_root(
    rule: OpRule,
    root: torch.fx.Node,
    linear_in: dict[int, list[torch.fx.Node]],
    nonlinear_in: dict[int, list[torch.fx.Node]],
    info: dict[torch.fx.Node, NodeInfo],
) -> NodeInfo:
    """Classify an elementwise node all of whose decomposed inputs come from ``root``."""
    flavours = {info[a].flavour for v in [*linear_in.values(), *nonlinear_in.values()] for a in v}
    if rule.kind is Kind.ACTIVATION or ACTIVATION in flavours:
        return NodeInfo(ACTIVATION, root, rule=rule)
    if rule.kind is Kind.GATE:
        return NodeInfo(GATE, root, rule=rule)
    if nonlinear_in or (rule.kind is Kind.BILINEAR and len(linear_in) == 2):
        return NodeInfo(ACTIVATION, root, rule=rule)  # z / f(z), z · g(z), z · z
    if flavours == {GATE}:
        return NodeInfo(GATE, root, rule=rule)
    if GATE in flavours:
        return NodeInfo(ACTIVATION, root, rule=rule)  # z + g(z)
    return NodeInfo(LINEAR, root, tuple(sorted(linear_in)), rule)


def analyse(graph: torch.fx.Graph, seeds: Iterable[torch.fx.Node], readouts: Iterable[torch.fx.Node],
            variant: str | None = None, carrying: Iterable[torch.fx.Node] = ()) -> Analysis:
    """Classify every node downstream of the ``seeds`` and find those whose components reach ``readouts``.

    A seed downstream of another seed starts afresh (``modules(layer)`` seeds the attention output and
    the MLP output), unless it is one of ``carrying`` (Note [Carrying seeds]).  Readouts the seeds cannot
    reach are left out of ``needed``: all of their value is rest.
    ``variant`` picks rule variants (registry Note [Rule variants]), e.g. ``"routed"`` attention.
    """
    # Note [Carrying seeds]
    # A carrying seed's split also receives the components that earlier seeds give its node, so that it can
    # keep them where it chooses (the attribution graph seeds one layer per prompt of a batch at one set of
    # points: fxdepass/graph.py Note [Stages in a batch]).  Such a node is classified as if it were no seed
    # (``carried``), and what that needs is needed too.
    seeds, carrying = set(seeds), set(carrying)
    info: dict[torch.fx.Node, NodeInfo] = {}
    carried: dict[torch.fx.Node, NodeInfo] = {}
    for node in graph.nodes:
        if node in seeds:
            if node in carrying and info:
                classified = _classify(node, info, variant)
                if classified is not None and classified.decomposable:
                    carried[node] = classified
            info[node] = NodeInfo(SEED, root=node)
        elif info and node.op == "call_function":
            classified = _classify(node, info, variant)
            if classified is not None:
                info[node] = classified
    needed: set[torch.fx.Node] = set()
    pending = [r for r in readouts if r in info and info[r].decomposable]
    while pending:
        node = pending.pop()
        if node in needed:
            continue
        needed.add(node)
        entry = carried.get(node, info[node])
        if entry.flavour == UNSUPPORTED:
            raise UnsupportedOpError(_unsupported_message(node))
        if entry.flavour in (ACTIVATION, GATE):
            pending.append(entry.root)
        elif entry.flavour != SEED:
            positions = leaves_by_position(node)
            pending.extend(a for i in entry.component_args for a in positions[i] if a in info and info[a].decomposable)
    return Analysis(info, needed, carried)


def _unsupported_message(node: torch.fx.Node) -> str:
    return (
        f"no DePass rule for {node.target} (node {node.name}) at {node_location(node)}. Its output must carry "
        "components to reach the readout. If the op is linear in its first argument, declare it with "
        f"`fxdepass.registry.deflinear({_op_expression(node.target)})`; otherwise write a rule with "
        "`@fxdepass.registry.register_rule(...)` (see rules/ for examples)."
    )


def _op_expression(op: Any) -> str:
    if isinstance(op, torch._ops.OpOverload):
        return f"torch.ops.{op.namespace}.{op._schema.name.split('::')[-1]}.{op._overloadname}"
    return getattr(op, "__name__", repr(op))
