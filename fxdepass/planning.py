"""How one decomposed pass runs: its plan, its memory estimate and guard, its runner and its checks.

Every caller of a decomposed pass goes through this module — ``DecomposedModel.attribute`` (and so
``generate_attributed``, ``attribute_dataset``, the lens, the evaluation harness and the graph's seed passes)
and ``DecomposedModel.decompose_nodes`` (the graph builder's passes over nodes no readout names) — so each
gets the same strategy, the memory guard before the pass and the reconstruction check after it:

- :func:`plan_pass` decides, for one call, whether token components run in causal blocks (Note [Causal
  blocks] in fxdepass/blocked.py), MLPs in neuron slices (Note [Neuron chunks]), routed sections in chunks
  of rows (Note [Routed rows]), everything after the last attention at the last position only, and how
  many target rows of the head are read afterwards;
- :func:`estimate_memory` weighs what that plan holds at its peak and :func:`guard` refuses a pass above
  the limit (:func:`available_memory` of the model's device by default);
- :meth:`PassPlan.run` runs the generated module as planned, and :func:`check_sums` checks what it returned.

>>> plan = plan_pass(module, captured, ids, fxdepass.tokens(), causal=lambda: True, causal_blocks=8)  # doctest: +SKIP
>>> guard(estimate_memory(module, captured, ids, ids.shape[1] + 1, plan, torch.float32), None, ids.device, ids.shape[1])  # doctest: +SKIP
>>> outputs = plan.run(module, arguments)                                                          # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import sympy
import torch
import torch.fx

from .blocked import SLICE_WIDTH, BlockedInterpreter, neuron_regions, position_wise_tail, routes_in_chunks, supports_blocks
from .capture import CapturedModel
from .checks import relative_error
from .diagnose import diagnose
from .errors import InvalidInputError, OutOfMemoryEstimateError, ReconstructionError
from .narrowing import last_axis, shape_of
from .routed import routed_regions
from .seeds import Seed, Tokens
from fxdepass.rules.attention import ROUTED_CHUNK, routed_attention

__all__ = ["PassPlan", "plan_pass", "estimate_memory", "guard", "available_memory", "check_sums", "TOLERANCE"]

#: largest relative reconstruction error accepted per compute dtype (SPEC §5)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}

#: one causal block per this many positions (up to ``causal_blocks``): smaller blocks save less time
#: than their Python overhead costs; prompts shorter than this run in one block
BLOCK_POSITIONS = 16
#: but at least this many blocks: fewer leave short prompts above 2.5 residual streams of memory
#: (llama medium, N = 16: 2.64 with two blocks, 2.44 with three, for 2% more time)
MIN_BLOCKS = 3
#: neuron slices' width relative to the projection out's in causal blocks (Note [Neuron chunks] in fxdepass/blocked.py;
#: one block holds every component at every position and keeps ``blocked.SLICE_WIDTH``).  Blocks hold about
#: (k + 1) / 2k of the components, so wider slices, fewer re-reads of the input, still fit the memory target
#: (allocator peak ≤ 2.5·(M+1)·N·d values + the plain forward's own + the weights).  ``python tools/bench.py
#: --only slices`` measures time and peak per width on SmolLM2 (the Slice width section of docs/performance.md).
BLOCKED_SLICE_WIDTH = 2.0


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """How one decomposed pass runs: in ``blocks`` causal blocks (``blocked``), MLPs in neuron slices
    (``sliced``) ``slice_width`` times as wide as their projection out's, routed sections in chunks
    (``routed``), everything after the last attention at the last position only, and ``target_rows``
    values of the logits read for the targets afterwards (prompts × read positions × vocabulary; 0 when
    the logits are the output).  ``symbol`` and ``batch`` are the capture's size symbols the blocked runner
    narrows; ``compiled`` runs the dense module through ``torch.compile``.

    >>> PassPlan().interpreted
    False
    """

    blocked: bool = False
    sliced: bool = False
    routed: bool = False
    last_position_only: bool = False
    target_rows: int = 0
    blocks: int = 1
    symbol: sympy.Symbol | None = None
    batch: sympy.Symbol | None = None
    compiled: bool = False
    slice_width: float = SLICE_WIDTH

    @property
    def interpreted(self) -> bool:
        """Whether the pass needs the blocked runner (blocks, slices or the last position; each a dynamic length)."""
        return self.blocked or self.sliced or self.last_position_only

    @property
    def runner_options(self) -> dict[str, Any]:
        """The options of the :class:`~fxdepass.blocked.BlockedInterpreter` this plan runs in."""
        return dict(symbol=self.symbol, batch=self.batch, blocks=self.blocks, last_position_only=self.last_position_only,
                    slice_width=self.slice_width)

    def run(self, module: torch.fx.GraphModule, arguments: list[torch.Tensor]) -> Any:
        """The outputs of ``module`` on ``arguments``, run as planned (without autograd)."""
        with torch.no_grad():
            if self.interpreted:
                return BlockedInterpreter(module, **self.runner_options).run(*arguments)
            if self.compiled:
                if "compiled" not in module.meta:
                    module.meta["compiled"] = torch.compile(module, dynamic=True)
                return module.meta["compiled"](*arguments)
            return module(*arguments)


def position_wise(module: torch.fx.GraphModule, captured: CapturedModel) -> bool:
    """Whether no component op of ``module`` reduces or gathers over positions (MoE routing does), so that
    its components can be computed for a subset of positions (cached on the module)."""
    if "position_wise" not in module.meta:
        module.meta["position_wise"] = supports_blocks(module, captured.sequence_length.node.expr, captured.batch_symbol)
    return module.meta["position_wise"]


def blocks_apply(module: torch.fx.GraphModule, captured: CapturedModel, seed: Seed, ids: torch.Tensor,
                 causal: Callable[[], bool], causal_blocks: int) -> bool:
    """Whether to run with causal blocks (Note [Causal blocks] in fxdepass/blocked.py): one prompt of at least
    :data:`BLOCK_POSITIONS` token components, one per token, of a causal position-wise model captured with a
    dynamic length.  ``causal`` is asked last (it runs the model)."""
    if (causal_blocks < 2 or ids.shape[0] != 1 or ids.shape[1] < BLOCK_POSITIONS
            or not isinstance(seed, Tokens) or seed.groups is not None
            or not isinstance(captured.sequence_length, torch.SymInt)):
        return False
    return causal() and position_wise(module, captured)


def plan_pass(module: torch.fx.GraphModule, captured: CapturedModel, ids: torch.Tensor, seed: Seed, *,
              causal: Callable[[], bool], causal_blocks: int, compiled: bool = False, last_position_read: bool = False,
              target_rows: int = 0) -> PassPlan:
    """The plan of one pass of ``module`` (generated for ``seed``) over the prompts ``ids``.

    ``last_position_read``: the outputs are read at the last position only (and are position-wise readouts),
    so a single prompt of a position-wise model computes everything after its last attention there alone.

    >>> plan_pass(module, captured, ids, fxdepass.tokens(), causal=lambda: True, causal_blocks=8).blocks   # doctest: +SKIP
    4
    """
    dynamic = isinstance(captured.sequence_length, torch.SymInt)
    restrict = ids.shape[0] == 1 and last_position_read and dynamic and position_wise(module, captured)
    blocked = blocks_apply(module, captured, seed, ids, causal, causal_blocks)
    # MLP hidden layers run in neuron slices (Note [Neuron chunks]) by the interpreter, in one block if not causal
    sliced = dynamic and ids.shape[0] == 1 and not compiled and bool(neuron_regions(module))
    blocks = min(causal_blocks, max(MIN_BLOCKS, ids.shape[1] // BLOCK_POSITIONS)) if blocked else 1
    routed = (blocked or restrict or sliced) and routes_in_chunks(blocks, restrict)  # as the runner will
    symbols = dict(symbol=captured.sequence_length.node.expr, batch=captured.batch_symbol) if dynamic else {}
    return PassPlan(blocked=blocked, sliced=sliced, routed=routed, last_position_only=restrict, target_rows=target_rows,
                    blocks=blocks, compiled=compiled, slice_width=BLOCKED_SLICE_WIDTH if blocked else SLICE_WIDTH, **symbols)


def estimate_memory(module: torch.fx.GraphModule, captured: CapturedModel, ids: torch.Tensor, components: int,
                    plan: PassPlan, dtype: torch.dtype) -> int:
    """Estimated peak bytes of one pass of ``module`` over ``ids`` with ``components`` components, run as ``plan`` says.

    Inside the pass, the largest components tensor and the largest real tensor, each held about three
    times (an input, the output, a temporary), 0.6 of that in causal blocks; the outputs' components
    2.5 times (1.5 read at the last position only) and the real outputs once, all held at once
    (assembled whole, then summed by the reconstruction check); and the target rows' logits,
    coefficients and their copies, twice ``target_rows`` values.  tests/test_api.py holds this within
    0.8–1.5× of the allocator's peak on SmolLM2 (``test_memory_estimate_on_smollm2``).  Values run in
    neuron slices (``sliced``, Note [Neuron chunks]) or routed chunks (``routed``, Note [Routed rows])
    do not count; ``attention="routed"`` adds its score parts for one chunk of heads, four times.  After
    the last attention a ``last_position_only`` pass holds one position.  A projection narrowed to the
    columns that are read counts those; values whose size depends on the data (the rows routed to one
    expert) are left out, unknown before the run.  The bench checks the estimate against the allocator's
    peak (docs/performance.md, *estimate MB*).

    >>> estimate_memory(module, captured, ids, ids.shape[1] + 1, PassPlan(), torch.float32)   # doctest: +SKIP
    50331648
    """
    values = ((captured.batch_size, ids.shape[0]), (captured.sequence_length, ids.shape[1]))
    symbols = {size.node.expr: value for size, value in values if isinstance(size, torch.SymInt)}
    tail = set()
    if plan.last_position_only and isinstance(captured.sequence_length, torch.SymInt):
        tail = position_wise_tail(module, captured.sequence_length.node.expr, captured.batch_symbol)
    sizes = _value_sizes(module, plan.sliced, plan.routed)

    def evaluate(size: sympy.Expr, node: torch.fx.Node) -> int | None:
        last = {captured.sequence_length.node.expr: 1} if node in tail else {}
        found = size.subs({**symbols, **last})
        return None if found.free_symbols else int(found)  # unbacked: unknown

    def largest(found: list[tuple[torch.fx.Node, sympy.Expr]], growing: bool = False) -> int:
        kept = [evaluate(size, node) for node, size in found if not growing or size.free_symbols & set(symbols)]
        return max([k for k in kept if k is not None], default=0)

    def total(found: list[tuple[torch.fx.Node, sympy.Expr]]) -> int:
        return sum(v for v in (evaluate(size, node) for node, size in found) if v is not None)

    inner = 3 * (components * largest(sizes.components) + largest(sizes.real, growing=True))
    held = 1.5 if plan.last_position_only else 2.5  # measured on SmolLM2: the pass's own blocks, then assembled
    outputs = held * components * total(sizes.outputs) + total(sizes.real_outputs)
    inside = inner * (0.6 if plan.blocked else 1.0)
    # routed attention's score parts for one chunk of heads, held about 4 times (the parts, their signed
    # copy, the allocation's weights and shares), assembled in full by either runner
    routing = 0
    for node, per_head, heads in sizes.routing:
        found = evaluate(per_head, node)
        if found is not None:
            chunk = min(heads, max(1, ROUTED_CHUNK // max(components * found, 1)))
            routing = max(routing, 4 * components * chunk * found)
    return int((inside + routing + outputs + 2 * plan.target_rows) * torch.finfo(dtype).bits // 8)


def guard(need: int, limit: float | None, device: torch.device, positions: int) -> int:
    """``need`` (the estimated peak bytes of a pass over ``positions`` positions), if it is within ``limit``
    (``None``: 80% of :func:`available_memory` of ``device``); raises :class:`OutOfMemoryEstimateError` if not.

    >>> guard(1024, 2048, torch.device("cpu"), 8)
    1024
    """
    if limit is None:
        available = available_memory(device)
        limit = None if available is None else available * 8 // 10
    if limit is not None and need > limit:
        fits = int(positions * (limit / need) ** 0.5)
        raise OutOfMemoryEstimateError(
            f"the decomposed pass needs about {need / 2**30:.1f} GiB but the limit on {device} is {limit / 2**30:.1f} GiB: "
            f"about {fits} positions (token components) would fit; shorten the prompt, group tokens "
            "(fxdepass.tokens(groups=...)), read fewer positions or a target instead of targets='all', or raise memory_limit"
        )
    return need


def available_memory(device: torch.device) -> int | None:
    """Bytes that tensors on ``device`` can still take: on a CUDA device, what the driver reports free plus what
    torch's caching allocator holds unused (it hands that out first); on the CPU, ``MemAvailable`` (16 GiB where
    that cannot be read); ``None`` where it cannot be known (``meta``, a backend without ``mem_get_info``), and
    the memory guard then checks only an explicit ``memory_limit``.

    >>> available_memory(torch.device("meta")) is None
    True
    """
    device = torch.device(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 16 * 2**30
    if device.type == "cuda":  # also ROCm's devices
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    backend = getattr(torch, device.type, None)  # xpu and others with the same interface
    info = getattr(backend, "mem_get_info", None)
    return int(info(device)[0]) if callable(info) else None


def check_sums(sums: dict[str, tuple[torch.Tensor, torch.Tensor, int]], module: torch.fx.GraphModule,
               arguments: list[torch.Tensor], plan: PassPlan, dtype: torch.dtype, strict: bool = False) -> None:
    """Check that every result of a pass is finite and that its components sum to its real value.

    ``sums`` maps a result's name to (real value, components, the components' axis).  A failure is explained by
    its first node, found by running the pass again (fxdepass/diagnose.py): the dense module first (every value
    whole, so the first wrong node is exact), and where that does not reproduce it, the runner that failed.
    NaN or inf raises :class:`InvalidInputError`; a sum off by more than :data:`TOLERANCE` warns
    (``strict=True``: raises :class:`ReconstructionError`).

    >>> check_sums({"hidden": (total, components, 0)}, module, arguments, plan, torch.float64)   # doctest: +SKIP
    """
    tolerance = TOLERANCE.get(dtype, 1e-2)
    # NaN or inf in any component makes the sum over components non-finite, so the check reads the sum (one
    # value per output entry) instead of the components, whose temporaries would cost the pass's peak.
    finite = all(bool(torch.isfinite(components.sum(axis)).all() and torch.isfinite(total).all())
                 for total, components, axis in sums.values())
    errors = {name: relative_error(*value) for name, value in sums.items()} if finite else {}
    if finite and all(e <= tolerance for e in errors.values()):
        return
    found = diagnose(module, arguments, tolerance)
    if plan.interpreted and (found.not_finite is None if not finite else found.diverges is None):
        found = diagnose(module, arguments, tolerance, BlockedInterpreter, **plan.runner_options)
    if not finite and found.decomposition:
        raise InvalidInputError(
            f"the decomposed pass produced NaN or inf first at {found.not_finite}, where the model's own value is "
            "finite: the components there overflow (a seed's values or a split far larger than the model's "
            "activations, an extreme temperature); try dtype=torch.float64 or smaller seed values")
    if not finite:
        raise InvalidInputError(
            "the pass produced NaN or inf" + (f", first at {found.not_finite}" if found.not_finite else "")
            + "; check the model's weights and the inputs for NaN/inf or overflow (try dtype=torch.float64)"
        )
    worst = max(errors, key=errors.get)
    message = (f"components of {worst!r} do not sum to the real value: error {errors[worst]:.2e} > {tolerance:.0e}"
               + (f"; the sum first diverges at {found.diverges}" if found.diverges else ""))
    if strict:
        raise ReconstructionError(message)
    warnings.warn("fxdepass: " + message, stacklevel=3)


@dataclasses.dataclass(frozen=True)
class _ValueSizes:
    """Element counts, in the graph's size symbols, with the node each belongs to: of the components values
    that exist in full inside the pass, of the real values, of the outputs' components and of the real outputs."""

    components: list[tuple[torch.fx.Node, sympy.Expr]]
    real: list[tuple[torch.fx.Node, sympy.Expr]]
    outputs: list[tuple[torch.fx.Node, sympy.Expr]]
    real_outputs: list[tuple[torch.fx.Node, sympy.Expr]]
    #: per routed attention (Note [Attention routing credit]): batch × queries × keys, and the heads
    routing: list[tuple[torch.fx.Node, sympy.Expr, int]]


def _value_sizes(module: torch.fx.GraphModule, sliced: bool, routed: bool) -> _ValueSizes:
    """The sizes :func:`estimate_memory` weighs, found once per module and runner (distinct per node kind)."""
    key = ("value_sizes", sliced, routed)
    if key not in module.meta:
        chunked = {m for r in neuron_regions(module).values() for m in r.members[:-1]} if sliced else set()
        if routed:
            chunked |= {m for r in routed_regions(module).values() for m in r.members if m is not r.total}
        returned = set(module.graph.output_node().all_input_nodes)
        components, real, outputs, real_outputs, routing = {}, {}, [], [], []
        for node in module.graph.nodes:
            if node.target is routed_attention:
                queries, keys = shape_of(node.args[0]), shape_of(node.args[1])
                routing.append((node, _numel(queries[:-3]) * queries[-2] * keys[-2], int(queries[-3])))
            value = node.meta.get("fxdepass_real")
            if value is None and node in returned:
                real_outputs.append((node, _numel(shape_of(node))))
            elif value is None:
                real.setdefault(_numel(shape_of(node)), node)
            elif node in returned:
                outputs.append((node, _numel(shape_of(value))))
            elif node not in chunked:
                columns = node.meta.get("fxdepass_columns")  # narrowed projections (Note [Fused projections])
                share = sympy.Rational(columns, last_axis(value)) if columns is not None else 1
                components.setdefault(_numel(shape_of(value)) * share, node)
        module.meta[key] = _ValueSizes([(n, s) for s, n in components.items()], [(n, s) for s, n in real.items()], outputs,
                                       real_outputs, routing)
    return module.meta[key]


def _numel(shape: list[sympy.Expr] | None) -> sympy.Expr:
    """The number of elements of a value of this shape (0 for a value that is not a tensor)."""
    return sympy.Mul(*shape) if shape is not None else sympy.Integer(0)
