"""Seeds: where the decomposition starts and how the value there is split into components.

A seed knows how to find its location in a captured graph (by module path, from ``nn_module_stack``),
how to split the real value there (a function the generated graph calls), and how to name its
components.  The last component is always *rest*.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx

from .capture import CapturedModel
from .errors import InvalidSeedError

__all__ = ["Seed", "Tokens", "tokens", "split_positions", "sink_positions", "block_paths", "module_path"]


def module_path(node: torch.fx.Node) -> str:
    """The innermost module path of ``node`` (``"model.layers.0.mlp"``), or ``""`` at top level."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return "" if path.startswith("_empty_nn_module_stack") else path


def _in_module(node: torch.fx.Node, path: str) -> bool:
    return any(p == path for p, _ in (node.meta.get("nn_module_stack") or {}).values())


def block_paths(model: torch.nn.Module) -> list[str]:
    """Module paths of the model's transformer blocks, in order (``["model.layers.0", …]``).

    Found from the structure, not from attribute names: the ``ModuleList`` holding as many modules
    as the config has layers (the longest ``ModuleList`` when the config does not say).
    """
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    matching = [(name, m) for name, m in lists if layers is None or len(m) == layers]
    if not matching:
        raise InvalidSeedError(f"could not find the transformer blocks of {type(model).__name__}")
    name, blocks = max(matching, key=lambda item: len(item[1])) if layers is None else matching[0]
    return [f"{name}.{i}" if name else str(i) for i in range(len(blocks))]


def residual_entering(captured: CapturedModel, block: str, hidden_size: int | None) -> torch.fx.Node:
    """The node holding the residual stream that enters ``block``: a float tensor computed outside the
    block, used inside it, that depends on the input ids (not only on positions or the mask)."""
    graph = captured.graph
    ids = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    depends = {ids}
    for node in graph.nodes:
        # A SymInt (``sym_size``) carries the shape, not the data: it does not propagate dependence.
        if node.op == "call_function" and isinstance(node.meta.get("val"), (torch.Tensor, list, tuple)):
            if any(a in depends for a in node.all_input_nodes):
                depends.add(node)
    candidates = []
    for node in graph.nodes:
        if node.op != "call_function" or not _in_module(node, block):
            continue
        for arg in node.all_input_nodes:
            if arg in depends and arg is not ids and not _in_module(arg, block) and _is_float_tensor(arg) and arg not in candidates:
                candidates.append(arg)
    if hidden_size is not None:
        candidates = [c for c in candidates if c.meta["val"].shape[-1] == hidden_size] or candidates
    if not candidates:
        raise InvalidSeedError(f"could not find the residual stream entering {block}")
    return candidates[0]


def _is_float_tensor(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point


class Seed:
    """Base class of seeds.  Subclasses are frozen dataclasses (hashable: the compiled graph is cached per seed)."""

    #: whether the sink-token option applies to activation allocation
    sink: bool = False

    def locate(self, captured: CapturedModel, model: torch.nn.Module) -> torch.fx.Node:
        raise NotImplementedError

    def split_call(self, captured: CapturedModel, node: torch.fx.Node) -> tuple[Any, dict[str, Any]]:
        """The function the generated graph calls on the real value at the seed, and its keyword arguments."""
        raise NotImplementedError

    def labels(self, input_ids: torch.Tensor, tokenizer: Any = None) -> list[str]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Tokens(Seed):
    """Token-level seed: one component per input position, at the residual stream entering the first block.

    ``sink=True`` gives the first attended position's component no share of activations at other
    positions (the paper's ``ignore_special_token``; rules/activations.py Note [Activation allocation]).

    >>> attribution = decomposed.attribute(ids, seed=fxdepass.tokens(sink=False))  # doctest: +SKIP
    """

    sink: bool = True

    def locate(self, captured: CapturedModel, model: torch.nn.Module) -> torch.fx.Node:
        first = block_paths(model)[0]
        return residual_entering(captured, first, getattr(getattr(model, "config", None), "hidden_size", None))

    def split_call(self, captured: CapturedModel, node: torch.fx.Node) -> tuple[Any, dict[str, Any]]:
        axis = captured.axis_of(node, captured.sequence_length)
        if axis is None:
            raise InvalidSeedError(f"the value at the token seed ({node.name}) has no sequence axis")
        return split_positions, {"position_axis": axis}

    def labels(self, input_ids: torch.Tensor, tokenizer: Any = None) -> list[str]:
        ids = input_ids[0] if input_ids.ndim == 2 else input_ids
        names = []
        for position, token in enumerate(ids.tolist()):
            text = tokenizer.decode([token]) if tokenizer is not None else str(token)
            names.append(f"tok {position} {text!r}")
        return names + ["rest"]


def tokens(sink: bool = True) -> Tokens:
    """Token-level seed (the default): one component per input position; see :class:`Tokens`."""
    return Tokens(sink=sink)


def split_positions(value: torch.Tensor, *, position_axis: int) -> torch.Tensor:
    """Split ``value`` by position: component ``p`` is ``value`` at position ``p`` and zero elsewhere.

    >>> split_positions(torch.ones(1, 3, 2), position_axis=1).shape   # 3 positions + rest
    torch.Size([4, 1, 3, 2])
    """
    count = value.shape[position_axis]
    one_hot = torch.eye(count, dtype=value.dtype, device=value.device)
    shape = [count] + [1] * value.ndim
    shape[position_axis + 1] = count
    parts = one_hot.reshape(shape) * value.unsqueeze(0)
    return torch.cat((parts, torch.zeros_like(value).unsqueeze(0)))


def sink_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per prompt, the first attended position: the sink token (0 unless the prompt is left-padded).

    >>> sink_positions(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    tensor([0, 1])
    """
    if attention_mask is None:
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    return (attention_mask != 0).int().argmax(dim=-1)

