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

from .analysis import ACTIVATION, GATE, PRODUCT, SEED, Analysis, analyse, normalize_args
from .capture import CapturedModel
from .errors import FxDePassError, node_location
from .registry import Kind
from .seeds import Seed, module_path, sink_positions

__all__ = ["Policy", "build_module"]

#: ops whose node inside a leaf module is that module's whole computation: named by the path alone
_MAIN_OPS = {"linear", "addmm", "embedding", "layer_norm", "conv1d"}


@dataclasses.dataclass(frozen=True)
class Policy:
    """How nonlinearities are decomposed (fixed for one compiled model)."""

    activation: str = "softmax"
    temperature: float = 0.1


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


def build_module(
    captured: CapturedModel,
    seed: Seed,
    seed_node: torch.fx.Node,
    readout: torch.fx.Node,
    policy: Policy,
    prefix: str = "",
) -> torch.fx.GraphModule:
    """Generate the decomposed module: ``forward(*inputs) -> (real readout, readout components)``."""
    analysis = analyse(captured.graph, seed_node, [readout])
    graph = torch.fx.Graph()
    namer = _Namer(prefix)
    real: dict[torch.fx.Node, torch.fx.Node] = {}
    parts: dict[torch.fx.Node, torch.fx.Node] = {}
    attributes: dict[str, torch.Tensor] = {}
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
        if seed.sink and sink is None:
            inputs = {n.name: real[n] for n in real if n.op == "placeholder" and n in real}
            sink = graph.call_function(sink_positions, (inputs["input_ids"], inputs.get("attention_mask")))
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: real[n])
        real[node] = graph.create_node(node.op, node.target, args, kwargs, name=namer.node(node))
        real[node].meta = dict(node.meta)
        if node in analysis.info:
            real[node].meta["fxdepass"] = analysis.info[node]
        if node in analysis.needed:
            try:
                emitted = _emit(node, analysis, real, parts, seed, captured, policy, sink)
            except FxDePassError:
                raise
            except Exception as error:
                raise FxDePassError(f"could not decompose {node.name} at {node_location(node)}: {error}") from error
            parts[node] = graph.create_node(
                "call_function", emitted[0], emitted[1], emitted[2], name=real[node].name + "_c"
            )
            parts[node].meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
    graph.output((real[readout], parts[readout]))
    graph.eliminate_dead_code()
    module = torch.fx.GraphModule(attributes, graph, class_name="DecomposedForward")
    module.meta["fxdepass_analysis"] = analysis
    return module


def _emit(
    node: torch.fx.Node,
    analysis: Analysis,
    real: dict[torch.fx.Node, torch.fx.Node],
    parts: dict[torch.fx.Node, torch.fx.Node],
    seed: Seed,
    captured: CapturedModel,
    policy: Policy,
    sink: torch.fx.Node | None,
) -> tuple[Any, tuple, dict]:
    """The call (function, args, kwargs) computing ``node``'s components."""
    info = analysis.info[node]
    if info.flavour == SEED:
        split, kwargs = seed.split_call(captured, node)
        return split, (real[node],), kwargs
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
        (position,) = info.component_args
        return info.rule.fn, tuple(real_args), {"components": parts[args[position]], **real_kwargs}

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
