"""Rewrite and generate: the captured graph becomes a ``GraphModule`` computing the real value and its components.

Every node of the captured graph is copied (the real run, under the precision policy); every node
the analysis marks as needed gets a second node computing its components (component axis first,
rest last) by calling its rule.  Node names come from module paths (``layers_3_mlp_down_proj`` for
the real value, ``layers_3_mlp_down_proj_c`` for its components), and every node keeps the original
metadata (``nn_module_stack``, ``stack_trace``), so the generated ``.code`` reads like the model.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import torch
import torch.fx

from fxdepass.rules.activations import allocate
from fxdepass.rules.linear import linear_map
from fxdepass.rules.products import symmetric_product

from .analysis import ACTIVATION, GATE, PRODUCT, Analysis, NodeInfo, analyse, normalize_args
from .capture import CapturedModel
from .errors import FxDePassError, InvalidReadoutError, node_location
from .registry import Kind, rest_only
from .locations import module_path
from .narrowing import fuse_seeded_projections, narrow_fused_projections
from .seeds import Seed, SeedPoint, sink_of

__all__ = ["Policy", "build_module"]

#: ops whose node inside a leaf module is that module's whole computation: named by the path alone
_MAIN_OPS = {"linear", "addmm", "embedding", "layer_norm", "conv1d"}


#: how attention is decomposed: the paper's frozen probabilities, or routing credit too (rules/attention.py
#: Note [Attention routing credit])
ATTENTIONS = ("frozen", "routed")


@dataclasses.dataclass(frozen=True)
class Policy:
    """How nonlinearities are decomposed (fixed for one compiled model)."""

    activation: str = "softmax"
    temperature: float = 0.1
    attention: str = "frozen"

    @property
    def variant(self) -> str | None:
        """The rule variant (registry Note [Rule variants]) this policy selects."""
        return None if self.attention == "frozen" else self.attention


class _Namer:
    """Readable node names from module paths, with the model's base prefix (``model.``) dropped."""

    def __init__(self, prefix: str):
        self.prefix = prefix + "." if prefix else ""

    def path(self, path: str) -> str:
        if self.prefix and path.startswith(self.prefix):
            path = path[len(self.prefix):]
        return re.sub(r"\W", "_", path)

    def node(self, node: torch.fx.Node) -> str:
        path = module_path(node)
        if not path or node.op != "call_function":
            return node.name
        op = getattr(getattr(node.target, "overloadpacket", node.target), "__name__", node.name).strip("_")
        stack = node.meta.get("nn_module_stack") or {}
        is_leaf = not any(p.startswith(path + ".") for p, _ in stack.values())
        base = self.path(path)
        return base if op in _MAIN_OPS and is_leaf else f"{base}_{op}"


def _axes(captured: CapturedModel, node: torch.fx.Node) -> dict[str, int | None]:
    return {
        "batch_axis": captured.axis_of(node, captured.batch_size),
        "position_axis": captured.axis_of(node, captured.sequence_length),
    }


def _literal(value: Any) -> bool:
    """Whether ``value`` can appear as a literal in generated code."""
    if isinstance(value, (list, tuple)):
        return all(_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def build_module(
    captured: CapturedModel,
    seed: Seed,
    points: list[SeedPoint],
    readouts: list[torch.fx.Node],
    policy: Policy,
    prefix: str = "",
) -> torch.fx.GraphModule:
    """Generate the decomposed module: ``forward(*inputs) -> ((real, components) per readout)``."""
    analysis = analyse(captured.graph, [p.node for p in points], readouts, policy.variant,
                       [p.node for p in points if p.carries])
    if policy.attention == "routed":
        _check_routable(analysis)
    starts = {p.node: p for p in points}
    graph = torch.fx.Graph()
    namer = _Namer(prefix)
    real: dict[torch.fx.Node, torch.fx.Node] = {}
    parts: dict[torch.fx.Node, torch.fx.Node] = {}
    attributes: dict[str, Any] = {}
    sink: torch.fx.Node | None = None
    for node in captured.graph.nodes:
        if node.op == "placeholder":
            if node.name in captured.tensors:
                target, tensor = captured.tensors[node.name]
                attributes[target] = tensor
                real[node] = graph.create_node("get_attr", target, name=namer.path(target))
            elif node.name in captured.inputs:
                real[node] = graph.create_node("placeholder", node.name, name=node.name)
            continue
        if node.op == "output":
            break
        if seed.sink_kwargs() is not None and sink is None:
            inputs = {n.name: real[n] for n in real if n.op == "placeholder"}
            sink = graph.call_function(sink_of, (inputs["input_ids"], inputs.get("attention_mask")), seed.sink_kwargs())
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: real[n])
        real[node] = graph.create_node(node.op, node.target, args, kwargs, name=namer.node(node))
        real[node].meta = dict(node.meta)
        if node in analysis.info:
            real[node].meta["fxdepass"] = analysis.info[node]
        if node in analysis.needed:
            if node in starts:
                point = starts[node]
                kwargs = dict(point.kwargs)
                for key, value in point.kwargs.items():
                    if not _literal(value):  # tensors and functions become attributes of the module
                        attributes[f"seed_{key}"] = value
                        kwargs[key] = graph.create_node("get_attr", f"seed_{key}", name=f"seed_{key}")
                missing = [n.name for n in point.inputs if n not in real]
                if missing:
                    raise FxDePassError(f"the seed at {node.name} ({node_location(node)}) needs {missing}, "
                                        "which the model computes only after it")
                carried = []
                if point.carries:
                    carried = [None]
                    if node in analysis.carried:
                        carried = [graph.create_node("call_function", *_emit(node, analysis, real, parts, captured, policy,
                                                                             sink, analysis.carried[node]),
                                                     name=real[node].name + "_carried")]
                        carried[0].meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
                        carried[0].meta["fxdepass_real"] = real[node]
                emitted = (point.split, (real[node], *carried, *(real[n] for n in point.inputs)), kwargs)
            else:
                try:
                    emitted = _emit(node, analysis, real, parts, captured, policy, sink)
                except FxDePassError:
                    raise
                except Exception as error:
                    raise FxDePassError(f"could not decompose {node.name} at {node_location(node)}: {error}") from error
            parts[node] = graph.create_node("call_function", *emitted, name=real[node].name + "_c")
            parts[node].meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
            parts[node].meta["fxdepass_real"] = real[node]
    first = next((parts[p.node] for p in points if p.node in parts), None)
    outputs = []
    for readout in readouts:
        if readout in parts:
            outputs.append((real[readout], parts[readout]))
        elif first is None:
            raise InvalidReadoutError("no readout depends on the seed")
        else:  # upstream of the seed or frozen: all of it is rest
            lifted = graph.call_function(rest_only, (real[readout],), {"like": first})
            lifted.meta["fxdepass_real"] = real[readout]
            outputs.append((real[readout], lifted))
    graph.output(tuple(outputs))
    graph.eliminate_dead_code()
    module = torch.fx.GraphModule(attributes, graph, class_name="DecomposedForward")
    narrow_fused_projections(module)
    fuse_seeded_projections(module)
    module.meta["fxdepass_analysis"] = analysis
    return module


def _emit(
    node: torch.fx.Node,
    analysis: Analysis,
    real: dict[torch.fx.Node, torch.fx.Node],
    parts: dict[torch.fx.Node, torch.fx.Node],
    captured: CapturedModel,
    policy: Policy,
    sink: torch.fx.Node | None,
    info: NodeInfo | None = None,
) -> tuple[Any, tuple, dict]:
    """The call (function, args, kwargs) computing ``node``'s components (as ``info`` says; default: the analysis)."""
    info = analysis.info[node] if info is None else info
    if info.flavour in (ACTIVATION, GATE):
        kwargs = {"mode": policy.activation, "temperature": policy.temperature}
        if sink is not None:
            kwargs.update(sink=sink, **_axes(captured, info.root))
        return allocate, (parts[info.root], real[node]), kwargs
    args, kwargs = normalize_args(node)
    real_args = torch.fx.node.map_arg(args, lambda n: real[n])
    real_kwargs = torch.fx.node.map_arg(kwargs, lambda n: real[n])
    if info.flavour == PRODUCT:
        warnings.warn(
            f"fxdepass: {node.name} at {node_location(node)} multiplies two decomposed values; "
            "using the exact symmetric split (a_m·b + a·b_m)/2",
            stacklevel=2,
        )
        first, second = info.component_args
        components = (parts[args[first]], parts[args[second]])
        return symmetric_product, (node.target, *real_args), {"components": components, **real_kwargs}
    if info.rule.kind is Kind.CUSTOM:
        declared = info.rule.linear_args
        carried = [parts[args[i]] if i in info.component_args else None for i in declared]
        components = carried[0] if len(declared) == 1 else tuple(carried)
        extra = {}
        if info.rule.allocates:
            extra = {"mode": policy.activation, "temperature": policy.temperature}
            if sink is not None:
                extra["sink"] = sink
        return info.rule.fn, tuple(real_args), {"components": components, **real_kwargs, **extra}

    def with_components(value: Any, position: int) -> tuple[Any, Any]:
        """(graph value, in_dim) for one argument: its components where it carries them."""
        if isinstance(value, (list, tuple)):
            pairs = [with_components(v, position) for v in value]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        if isinstance(value, torch.fx.Node):
            if position in info.component_args and value in parts:
                return parts[value], 0
            return real[value], None
        return value, None

    pairs = [with_components(a, i) for i, a in enumerate(args)]
    return linear_map, (node.target, *[p[0] for p in pairs]), {"in_dims": tuple(p[1] for p in pairs), **real_kwargs}


#: ops that normalise attention scores in an eagerly computed attention
_SOFTMAXES = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default, torch.ops.aten._safe_softmax.default}


def _check_routable(analysis: Analysis) -> None:
    """Refuse routed attention where attention is computed eagerly: its softmax of ``q·kᵀ`` is frozen
    by a rule that cannot see queries, keys and values together, so routing credit would be silently lost."""
    for node, info in analysis.info.items():
        if node.target not in _SOFTMAXES:
            continue
        todo, seen = [node.args[0]], set()
        while todo:  # back through the scaling and masking to the scores' product
            source = todo.pop()
            if not isinstance(source, torch.fx.Node) or source in seen or source not in analysis.info:
                continue
            seen.add(source)
            if analysis.info[source].flavour == PRODUCT:
                raise FxDePassError(
                    f"attention='routed' needs scaled_dot_product_attention, but {node.name} at "
                    f"{node_location(node)} is a softmax of q·kᵀ computed eagerly; load the model with "
                    "attn_implementation='sdpa' (or compile with attention='frozen')")
            rule = analysis.info[source].rule
            if rule is not None and (rule.elementwise or rule.kind is Kind.LINEAR):
                todo.extend(source.all_input_nodes)
