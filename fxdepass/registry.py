"""The rule table: how every ATen op maps to its decomposed counterpart.

``RULES`` is a dict keyed by ``OpOverload`` (or a plain callable such as ``operator.getitem``), filled
by the one-line declarations and the ``@register_rule`` decorator below; registering an op twice is an
error.  Rules live in ``fxdepass.rules`` (the repository's ``rules/`` folder), one module per family.

Note [Kinds of ops]
~~~~~~~~~~~~~~~~~~~
Each op has one kind (SPEC §2):

* ``LINEAR``: jointly linear in ``linear_args``.  Applied to every component; an argument of the linear
  group that carries no components (a bias, an added constant, a constant piece of a ``cat``) is a
  constant term and goes to the rest component.
* ``BILINEAR``: linear in whichever one of ``linear_args`` carries components, the other being a
  multiplier (``mul``, ``matmul``, ``addmm``).  When both carry components the product rules apply.
  ``additive_args`` are constant terms (``addmm``'s bias).
* ``FROZEN``: never carries components; its real value is used (softmax, comparisons, top-k).
* ``GATE``: an elementwise nonlinearity (``rsqrt``, ``tanh``, ``pow``, ``sigmoid``).  Used on its own
  it is frozen (norm statistics, a sigmoid gate); combined elementwise with the value it came from it
  is part of an activation (GPT-2's ``0.5·z·(1+tanh(…))``), see ``fxdepass.analysis``.
* ``ACTIVATION``: an elementwise activation (``silu``, ``gelu``, ``relu``); its output is allocated
  among the components of its input.
* ``CUSTOM``: a hand-written rule ``fn`` with the op's own signature, receiving real argument values
  plus ``components=`` for the one argument that carries them (``layer_norm``, attention).  A rule
  declared on several arguments receives a tuple, one entry per declared argument, ``None`` where that
  argument carries no components; one declared ``allocates`` also receives the activation allocation
  policy (``mode=``, ``temperature=``, and ``sink=`` for token seeds, Note [Activation allocation]).

Note [Rule variants]
~~~~~~~~~~~~~~~~~~~~
An op may have a second rule under a *variant* name, chosen for a whole compiled model
(``fxdepass.compile(model, attention="routed")`` selects the ``"routed"`` variant of attention).
``lookup(op, variant)`` returns the variant's rule where one is registered, else the op's default rule,
so a variant only names the ops it changes.

``elementwise`` marks ops whose output element depends only on the same element of the inputs; the
analysis uses it to find multi-op activations, and the runner's neuron slices (fxdepass/blocked.py Note
[Neuron chunks]) and routed rows ask :func:`is_elementwise` to know which component ops keep each element.

Note [Projections]
~~~~~~~~~~~~~~~~~~
A *projection* multiplies features by a constant weight (``linear``, ``addmm``, ``mm``, ``matmul``).
Several passes rewrite or locate projections: the linear rule puts a constant bias in rest with one add,
narrowing computes only the weight columns that are read, the runner sums a projection into a residual
and slices neurons, the locations find a block's output and down projections, the attribution graph
reads their weights.  They all read where the features, the weight and the bias sit from the op's one
declaration, ``projection=ProjectionArgs(...)`` on its ``deflinear``/``defbilinear``, as positions among
the op's own arguments; :func:`projection_args` returns it.  A reader that sees the op's arguments
shifted (a generated ``linear_map(op, *args)`` node) shifts the positions itself, in one place.
``batched`` marks an op whose weight may be a batch of matrices (``matmul``): a projection only where
the weight is a parameter (a matrix), which the graph readers check and the component passes do not,
so those leave it alone.

Note [Ops of other libraries]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Some models call custom ops that a library registers when it is imported (transformers' expert
kernel ``torch.ops.transformers.grouped_mm_fallback``).  ``rules/`` imports only torch, so such an op
may not exist yet when its rule is declared.  It is then declared by its qualified name,
``"transformers::grouped_mm_fallback"`` (``.overload`` optional, argument *positions* only: there is
no schema to look names up in), and the rule is bound to the op at the first :func:`lookup` after
the library has registered it: necessarily before any graph using the op is analysed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .errors import FxDePassError

__all__ = [
    "Kind",
    "OpRule",
    "RULES",
    "VARIANTS",
    "deflinear",
    "defbilinear",
    "deffrozen",
    "defgate",
    "defactivation",
    "register_rule",
    "add_to_rest",
    "rest_only",
    "rest_in_block",
    "lookup",
    "ComponentAxis",
    "component_axis",
    "across_components",
    "on_component_axis",
    "held_rows",
    "ProjectionArgs",
    "projection_args",
    "is_elementwise",
]


class Kind(enum.Enum):
    LINEAR = "linear"
    BILINEAR = "bilinear"
    FROZEN = "frozen"
    GATE = "gate"
    ACTIVATION = "activation"
    CUSTOM = "custom"


@dataclasses.dataclass(frozen=True)
class ProjectionArgs:
    """Where a projection's operands sit among the op's positional arguments (Note [Projections]).

    Declared with argument names or positions; stored with positions.

    >>> projection_args(torch.ops.aten.addmm.default)
    ProjectionArgs(features=1, weight=2, axes=(0, 1), bias=0, unbiased=<OpOverload(op='aten.mm', overload='default')>, batched=False)
    """

    features: int | str
    weight: int | str
    #: the weight's input axis (the features') and output axis
    axes: tuple[int, int]
    bias: int | str | None = None
    #: the op computing the same projection without its bias (``addmm`` → ``mm``), called on the other arguments
    unbiased: Any = None
    #: the weight may be a batch of matrices (``matmul``): component passes do not treat the op as a projection
    batched: bool = False

    def bias_of(self, args: Sequence[Any]) -> Any:
        """The bias among the op's ``args``, ``None`` where the op has none or it is not given.

        >>> b, x, w = torch.zeros(2), torch.zeros(1, 3), torch.zeros(3, 2)
        >>> projection_args(torch.ops.aten.addmm.default).bias_of((b, x, w)) is b
        True
        """
        return args[self.bias] if self.bias is not None and len(args) > self.bias else None

    def without_bias(self, args: Sequence[Any]) -> tuple[Any, ...]:
        """The op's ``args`` without the bias: the arguments of :attr:`unbiased`."""
        return tuple(a for i, a in enumerate(args) if i != self.bias)

    def bias_to_rest(self, components: torch.Tensor, args: Sequence[Any]) -> torch.Tensor:
        """``components`` of the projection made without its bias, with the bias in ``args`` (the op's
        arguments) added to rest: the bias is a constant term (rules/linear.py Note [Constant terms of
        affine ops]).  Every place that projects components without the bias finishes with this.

        >>> linear = projection_args(torch.ops.aten.linear.default)
        >>> linear.bias_to_rest(torch.zeros(3, 2), (None, None, torch.ones(2)))[:, 0]
        tensor([0., 0., 1.])
        """
        bias = self.bias_of(args)
        return components if bias is None else add_to_rest(components, bias)


@dataclasses.dataclass(frozen=True)
class OpRule:
    """How one op is decomposed.  Argument positions refer to the op's positional arguments."""

    op: Any
    kind: Kind
    linear_args: tuple[int, ...] = ()
    additive_args: tuple[int, ...] = ()
    elementwise: bool = False
    nonlinear_args: tuple[int, ...] = ()
    fn: Callable[..., Any] | None = None
    #: a hand-written rule that also takes the activation allocation policy (Note [Kinds of ops])
    allocates: bool = False
    #: where a projection's features, weight and bias are (Note [Projections])
    projection: ProjectionArgs | None = None

    @property
    def name(self) -> str:
        return str(self.op) if isinstance(self.op, torch._ops.OpOverload) else getattr(self.op, "__name__", str(self.op))


RULES: dict[Any, OpRule] = {}

#: variant name → op → the op's rule in that variant (Note [Rule variants])
VARIANTS: dict[str, dict[Any, OpRule]] = {}


#: rules declared by the qualified name of an op not registered yet (Note [Ops of other libraries]),
#: with the variant they belong to
_PENDING: dict[tuple[str, str | None], OpRule] = {}


def lookup(op: Any, variant: str | None = None) -> OpRule | None:
    """The rule for ``op`` (in ``variant`` where it has one, Note [Rule variants]), or ``None`` when the
    table has none.

    >>> lookup(torch.ops.aten.scaled_dot_product_attention.default, "routed").allocates
    True
    """
    if op not in RULES and _PENDING:
        for name, pending_variant in list(_PENDING):
            resolved = _resolve(name)
            if resolved is not None:
                _register(dataclasses.replace(_PENDING.pop((name, pending_variant)), op=resolved), pending_variant)
    if variant is not None and op in VARIANTS.get(variant, {}):
        return VARIANTS[variant][op]
    return RULES.get(op)


def _resolve(name: str) -> Any:
    """The op called ``"namespace::op"`` or ``"namespace::op.overload"``, or ``None`` while it does not exist.

    >>> _resolve("aten::add.Tensor") is torch.ops.aten.add.Tensor
    True
    """
    namespace, _, qualified = name.partition("::")
    packet, _, overload = qualified.partition(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload or "default")
    except (AttributeError, RuntimeError):
        return None


def projection_args(op: Any) -> ProjectionArgs | None:
    """Where ``op``'s features, weight and bias are when it is a projection, else ``None`` (Note [Projections]).

    >>> projection_args(torch.ops.aten.linear.default).weight
    1
    """
    rule = lookup(op)
    return rule.projection if rule is not None else None


def is_elementwise(op: Any) -> bool:
    """Whether ``op``'s rule declares it ``elementwise``: each output element depends only on the same
    element of the inputs.  Passes that need to know ask this, so an op declared later needs nothing more.

    >>> is_elementwise(torch.ops.aten.add.Tensor), is_elementwise(torch.ops.aten.mm.default)
    (True, False)
    """
    rule = lookup(op) if isinstance(op, torch._ops.OpOverload) else None
    return rule is not None and rule.elementwise


def _positions(op: Any, args: Iterable[int | str]) -> tuple[int, ...]:
    """Turn argument names (from the op's schema) or positions into positions."""
    names = [a.name for a in op._schema.arguments] if hasattr(op, "_schema") else []
    out = []
    for a in args:
        if isinstance(a, int):
            out.append(a)
        elif a in names:
            out.append(names.index(a))
        else:
            raise FxDePassError(f"{op} has no argument named {a!r} (its arguments: {names})")
    return tuple(out)


def _register(rule: OpRule, variant: str | None = None) -> None:
    if isinstance(rule.op, str):  # Note [Ops of other libraries]
        resolved = _resolve(rule.op)
        if resolved is None:
            _PENDING[(rule.op, variant)] = rule
            return
        rule = dataclasses.replace(rule, op=resolved)
    table = RULES if variant is None else VARIANTS.setdefault(variant, {})
    if rule.op in table:
        where = "" if variant is None else f" in variant {variant!r}"
        raise FxDePassError(f"a rule for {rule.name} is already registered{where} ({table[rule.op].kind.value})")
    table[rule.op] = rule


def _ops(ops: Any) -> Sequence[Any]:
    return ops if isinstance(ops, (list, tuple)) else [ops]


def _projection(op: Any, declared: ProjectionArgs | None) -> ProjectionArgs | None:
    """``declared`` with its argument names turned into ``op``'s positions."""
    if declared is None:
        return None
    features, weight = _positions(op, (declared.features, declared.weight))
    bias = None if declared.bias is None else _positions(op, (declared.bias,))[0]
    return dataclasses.replace(declared, features=features, weight=weight, bias=bias)


def deflinear(
    ops: Any, args: Sequence[int | str] = (0,), *, nonlinear: Sequence[int | str] = (), elementwise: bool = False,
    projection: ProjectionArgs | None = None,
) -> None:
    """Declare ``ops`` jointly linear in ``args``; the others are static (shapes, dims, indices, weights).

    ``nonlinear`` names arguments the op is nonlinear in and that are frozen when they carry
    components (``div``'s divisor); elementwise, with the same source as ``args``, they make an activation.
    ``projection`` says where a projection's operands are (Note [Projections]).

    >>> deflinear(torch.ops.aten.view.default)
    >>> deflinear(torch.ops.aten.add.Tensor, ("self", "other"), elementwise=True)
    """
    for op in _ops(ops):
        linear = _positions(op, args)
        _register(OpRule(op, Kind.LINEAR, linear, linear, elementwise, _positions(op, nonlinear),
                         projection=_projection(op, projection)))


def defbilinear(
    ops: Any, factors: Sequence[int | str] = (0, 1), additive: Sequence[int | str] = (), *, elementwise: bool = False,
    projection: ProjectionArgs | None = None,
) -> None:
    """Declare ``ops`` linear in each of ``factors`` separately, plus the constant terms ``additive``;
    ``projection`` says where a projection's operands are (Note [Projections]).

    >>> defbilinear(torch.ops.aten.addmm.default, ("mat1", "mat2"), additive=("self",),
    ...             projection=ProjectionArgs("mat1", "mat2", axes=(0, 1), bias="self", unbiased=torch.ops.aten.mm.default))
    """
    for op in _ops(ops):
        positions = _positions(op, factors)
        _register(OpRule(op, Kind.BILINEAR, positions, _positions(op, additive), elementwise,
                         projection=_projection(op, projection)))


def deffrozen(ops: Any) -> None:
    """Declare ``ops`` frozen: their real value is used, they never carry components."""
    for op in _ops(ops):
        _register(OpRule(op, Kind.FROZEN))


def defgate(ops: Any) -> None:
    """Declare elementwise nonlinearities that are frozen unless part of a multi-op activation."""
    for op in _ops(ops):
        _register(OpRule(op, Kind.GATE, elementwise=True, nonlinear_args=(0, 1)))


def defactivation(ops: Any) -> None:
    """Declare elementwise activations whose output is allocated among their input's components."""
    for op in _ops(ops):
        _register(OpRule(op, Kind.ACTIVATION, elementwise=True, nonlinear_args=(0,)))


def register_rule(
    ops: Any, decomposes: int | str | Sequence[int | str] = 0, *, variant: str | None = None, allocates: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a hand-written rule for ``ops``; argument ``decomposes`` is the one carrying components.

    The rule is called with the op's own arguments (real values) and ``components=`` holding the
    components of argument ``decomposes`` (component axis first, rest last)::

        @register_rule(torch.ops.aten.layer_norm.default, decomposes="input")
        def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True, *, components):
            ...

    With several arguments (``decomposes=("query", "key", "value")``) ``components=`` is a tuple, ``None``
    where an argument carries none.  ``variant`` registers the rule under that variant name (Note [Rule
    variants]); ``allocates`` passes the activation allocation policy to the rule.  An op of a library
    that may not be loaded yet is named ``"namespace::op"`` (Note [Ops of other libraries]).
    """
    names = [decomposes] if isinstance(decomposes, (int, str)) else list(decomposes)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for op in _ops(ops):
            _register(OpRule(op, Kind.CUSTOM, _positions(op, names), fn=fn, allocates=allocates), variant)
        return fn

    return decorate


# Note [Sharded components]
# ~~~~~~~~~~~~~~~~~~~~~~~~~
# Rules see the components their process holds.  In one process that is all of them; in a distributed
# run (fxdepass/shards.py) each process holds a contiguous range of the sources, and the first process
# also holds rest.  Nearly every rule acts on each component separately and needs nothing more.  What
# couples components is a reduction over the component axis (the activation allocation's maximum and
# normaliser, its linear mode's minimum, sum and count, the max mode's winner) and the component's own
# number (the sink token, the max mode's first-of-equals): a rule reduces over the components it holds,
# then completes the reduction with :func:`across_components`, and numbers its rows with
# :meth:`ComponentAxis.numbers`.  The seeds' splits ask :meth:`ComponentAxis.held` which rows to make.


class ComponentAxis:
    """Where the component axis lives: by default all in this process.  fxdepass/shards.py subclasses it
    for a run sharded across processes (Note [Sharded components])."""

    #: whether this process holds the rest component
    rest = True

    def held(self, count: int) -> tuple[int, int]:
        """Of ``count`` sources (rest not counted), the range ``[start, end)`` this process makes."""
        return 0, count

    def reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        """Complete, in place, a reduction (``"sum"``, ``"max"`` or ``"min"``) over the components held here."""
        return value

    def numbers(self, rows: int, device: torch.device) -> torch.Tensor:
        """The component numbers of the ``rows`` held here (rest: the number of sources), as a ``long`` tensor.

        >>> ComponentAxis().numbers(3, torch.device("cpu"))
        tensor([0, 1, 2])
        """
        return torch.arange(rows, device=device)


_AXIS = [ComponentAxis()]


def component_axis() -> ComponentAxis:
    """The component axis of the run in progress (Note [Sharded components])."""
    return _AXIS[-1]


def across_components(value: torch.Tensor, op: str) -> torch.Tensor:
    """Complete a reduction over the component axis that the caller made over its own components.

    >>> across_components(torch.ones(3, 2).sum(0), "sum")    # in one process: the value itself
    tensor([3., 3.])
    """
    return _AXIS[-1].reduce(value, op)


def held_rows(components: torch.Tensor) -> torch.Tensor:
    """The rows this process holds of ``components`` made in full (sources, then rest): all of them in one process.

    >>> held_rows(torch.arange(4.0))
    tensor([0., 1., 2., 3.])
    """
    axis = _AXIS[-1]
    start, end = axis.held(components.shape[0] - 1)
    if (start, end) == (0, components.shape[0] - 1) and axis.rest:
        return components
    return torch.cat((components[start:end], components[-1:])) if axis.rest else components[start:end]


@contextlib.contextmanager
def on_component_axis(axis: ComponentAxis) -> Iterator[None]:
    """Within the context, rules and seeds hold the components ``axis`` says (and rest only if it holds it)."""
    _AXIS.append(axis)
    try:
        yield
    finally:
        _AXIS.pop()


class _WithoutRest(ComponentAxis):
    """``axis`` in a part of its components that holds no rest (Note [Rest in parts of the components])."""

    rest = False

    def __init__(self, axis: ComponentAxis):
        self.axis = axis

    def held(self, count: int) -> tuple[int, int]:
        return self.axis.held(count)

    def reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        return self.axis.reduce(value, op)

    def numbers(self, rows: int, device: torch.device) -> torch.Tensor:
        return self.axis.numbers(rows, device)


@contextlib.contextmanager
def rest_in_block(present: bool) -> Iterator[None]:
    """Within the context, the components rules see do (or do not) include the rest component
    (Note [Rest in parts of the components]).

    Only ``fxdepass.blocked`` enters it: its blocks past the first hold no rest (Note [Causal blocks]);
    a process that holds no rest at all (Note [Sharded components]) holds none in any block.

    >>> with rest_in_block(False):
    ...     add_to_rest(torch.zeros(2, 1), 1.0)[-1]
    tensor([0.])
    """
    axis = _AXIS[-1]
    with on_component_axis(axis if present or not axis.rest else _WithoutRest(axis)):
        yield


def add_to_rest(components: torch.Tensor, constant: torch.Tensor | float) -> torch.Tensor:
    """Return ``components`` with ``constant`` added to the rest component (the last one).

    Updates ``components`` in place where the constant's shape fits it: callers pass tensors they
    just computed, and a copy of every component would cost a full pass.

    >>> add_to_rest(torch.zeros(3, 2), torch.ones(2))[-1]
    tensor([1., 1.])
    """
    constant = torch.as_tensor(constant, device=components.device)
    dtype = torch.result_type(components, constant)
    shape = torch.broadcast_shapes(components.shape[1:], constant.shape)
    if shape != components.shape[1:] or dtype != components.dtype:  # the constant widens the value
        each = components.reshape(components.shape[0], *[1] * (len(shape) - components.ndim + 1), *components.shape[1:])
        components = each + components.new_zeros(shape, dtype=dtype)
    if _AXIS[-1].rest:
        components[-1].add_(constant)
    return components


def rest_only(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Components of a value no source reaches: all of it in rest, as many components as ``like`` has.

    >>> rest_only(torch.ones(2), like=torch.zeros(4, 2))[:, 0]
    tensor([0., 0., 0., 1.])
    """
    out = value.new_zeros(like.shape[0], *value.shape)
    if _AXIS[-1].rest:
        out[-1] = value
    return out
