"""Locations: finding blocks, projections and module boundaries in a captured graph by module path.

Nothing here names an attribute of a particular architecture.  Blocks are found from the graph's
structure (Note [Blocks are calls]); inside a block, the attention output projection is the first
linear map with a weight parameter after the attention probabilities are applied, and the MLP down
projection is the block's last linear map back to the hidden size; routed MoE experts are the
block's last grouped kernel.  A new architecture therefore needs no new code.
"""
from __future__ import annotations

import functools

import torch
import torch.fx

from .capture import CapturedModel
from .errors import InvalidSeedError
from .registry import projection_args

__all__ = ["Locations", "module_call", "module_path"]

aten = torch.ops.aten
_ATTENTION_CORES = {aten.scaled_dot_product_attention.default, aten.softmax.int, aten._softmax.default,
                    aten._safe_softmax.default}


# Note [Blocks are calls]
# ~~~~~~~~~~~~~~~~~~~~~~~
# A layer is one *call* of a block, not one block module: a looped model (HRM runs two stacks in
# cycles, ALBERT one shared layer group) calls the same module several times, and each call has its
# own inputs, heads and neurons.  torch.export names the k-th repeated call of a module in
# ``nn_module_stack`` with a key ending in ``@k`` (the first call has no suffix); a call is addressed
# as ``"path"`` (the first) or ``"path@k"``.  The blocks are the calls of the entries of the outermost
# ``ModuleList``s whose entries are modules of their own (not single linear maps) and run in the graph;
# where there are several such lists, those holding attention (XLM's ``attentions`` beside ``ffns``).
# Layers are numbered in execution order, so an encoder-decoder's depth fields (BART's
# ``num_hidden_layers`` is its *encoder's*) do not matter, and a looped model's layer ``ℓ`` is its
# ``ℓ``-th block call (HRM: the order of its cache slots).


def _call_names(node: torch.fx.Node) -> list[str]:
    """The module calls ``node`` is inside, outermost first: ``["model", "model.layers.0@1", …]``."""
    names = []
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        if path and not path.startswith("_empty"):
            _, at, count = key.rpartition("@")
            names.append(f"{path}@{count}" if at and count.isdigit() else path)
    return names


def module_path(node: torch.fx.Node) -> str:
    """The innermost module path of ``node`` (``"model.layers.0.mlp"``), or ``""`` at top level."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return "" if path.startswith("_empty_nn_module_stack") else path


def module_call(node: torch.fx.Node) -> str:
    """The innermost module call of ``node`` (``"model.H_module.layers.0@1"``; Note [Blocks are calls])."""
    names = _call_names(node)
    return names[-1] if names else ""


def _call_of(node: torch.fx.Node, path: str) -> str:
    """The call of module ``path`` that ``node`` is inside."""
    return next((name for name in _call_names(node) if name.partition("@")[0] == path), path)


def _is_grouped_kernel(node: torch.fx.Node) -> bool:
    """A grouped matmul over experts (``transformers.grouped_mm_fallback``, ``aten._grouped_mm``)."""
    return node.op == "call_function" and "grouped_mm" in str(node.target)


def _is_float_tensor(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point


class Locations:
    """Addressable places of one captured model.

    >>> where = Locations(captured, model)                          # doctest: +SKIP
    >>> where.output_projection(-1).name                             # doctest: +SKIP
    'linear_27'
    """

    def __init__(self, captured: CapturedModel, model: torch.nn.Module):
        self.captured = captured
        self.model = model
        config = getattr(model, "config", None)
        self.hidden_size = getattr(config, "hidden_size", None)
        self.num_heads = getattr(config, "num_attention_heads", None)
        self.nodes = [n for n in captured.graph.nodes if n.op == "call_function"]
        # Note [Indexed module paths]
        # A graph of a real model has tens of thousands of nodes and an attribution graph asks for every layer's
        # projections once per stage: scanning every node's module stack per question cost 18 million calls on
        # SmolLM2 (issue 19). The captured graph does not change once captured, so each node's paths and each
        # path's nodes are indexed once, and what is found per layer is kept.
        # Paths are module calls here (Note [Blocks are calls]); members are kept in execution order.
        self._paths_of = {n: frozenset(_call_names(n)) for n in self.nodes}
        self._members: dict[str, list[torch.fx.Node]] = {}
        for node in self.nodes:
            for path in _call_names(node):
                self._members.setdefault(path, []).append(node)
        self._found: dict[tuple[str, int], torch.fx.Node] = {}
        #: the block calls in execution order, one per layer (Note [Blocks are calls])
        self.blocks = self._find_blocks()

    def _find_blocks(self) -> list[str]:
        calls = self.paths()
        outermost: dict[str, list[str]] = {}
        for name, modules in self.model.named_modules():
            if not isinstance(modules, torch.nn.ModuleList) or any(name.startswith(f"{o}.") for o in outermost):
                continue
            entries = [f"{name}.{i}" if name else str(i) for i, m in enumerate(modules) if next(m.children(), None) is not None]
            if entries and len(entries) == len(modules):
                outermost[name] = entries
        ran = [[c for c in calls if c.partition("@")[0] in entries] for entries in outermost.values()]
        ran = [found for found in ran if found]
        attending = [found for found in ran if any(n.target in _ATTENTION_CORES for c in found for n in self._inside(c))]
        chosen = {c for found in (attending or ran) for c in found}
        return [c for c in calls if c in chosen]

    # -- addresses ---------------------------------------------------------------------------

    def layer(self, index: int) -> int:
        """Normalise a layer index (negative counts from the end); raise if out of range."""
        count = len(self.blocks)
        if not isinstance(index, int) or isinstance(index, bool) or not -count <= index < count:
            raise InvalidSeedError(f"layer {index!r} is out of range: the model has {count} layers (0..{count - 1}, or negative)")
        return index % count

    def paths(self) -> list[str]:
        """Every module call in the graph, in execution order: its path, with ``@k`` for the k-th repeated
        call of a module called several times (Note [Blocks are calls])."""
        return list(self._members)

    def _in(self, path: str, node: torch.fx.Node) -> bool:
        """Whether ``node`` belongs to module ``path``."""
        paths = self._paths_of.get(node)
        return path in (paths if paths is not None else _call_names(node))

    def _per_layer(self, what: str, layer: int, find) -> torch.fx.Node:
        """``find(layer)``, found once per layer."""
        key = (what, self.layer(layer))
        if key not in self._found:
            self._found[key] = find(key[1])
        return self._found[key]

    def _inside(self, path: str) -> list[torch.fx.Node]:
        """The nodes of one module call (``path`` is its first call, ``path@k`` a repeated one)."""
        nodes = self._members.get(path, [])
        if not nodes:
            raise InvalidSeedError(f"no module {path!r} in the captured graph; DecomposedModel.locations() lists them")
        return nodes

    @functools.cached_property
    def _depends_on_ids(self) -> set[torch.fx.Node]:
        ids = next(n for n in self.captured.graph.nodes if n.op == "placeholder" and n.name == "input_ids")
        depends = {ids}
        for node in self.nodes:
            # A SymInt (``sym_size``) carries the shape, not the data: it does not propagate dependence.
            if isinstance(node.meta.get("val"), (torch.Tensor, list, tuple)) and any(a in depends for a in node.all_input_nodes):
                depends.add(node)
        return depends

    def module_input(self, path: str) -> torch.fx.Node:
        """The data entering module ``path``: a float tensor computed outside it from the input ids."""
        inside = self._inside(path)
        candidates: list[torch.fx.Node] = []
        for node in inside:
            for arg in node.all_input_nodes:
                if arg in self._depends_on_ids and not self._in(path, arg) and _is_float_tensor(arg) and arg not in candidates:
                    candidates.append(arg)
        if self.hidden_size is not None:
            candidates = [c for c in candidates if c.meta["val"].shape[-1] == self.hidden_size] or candidates
        if not candidates:
            raise InvalidSeedError(f"could not find the input of {path}")
        return candidates[0]

    def module_output(self, path: str) -> torch.fx.Node:
        """The value module ``path`` returns: its last float tensor used outside it (or returned)."""
        inside = self._inside(path)
        outputs = [n for n in inside if _is_float_tensor(n) and any(not self._in(path, u) for u in n.users)]
        if not outputs:
            raise InvalidSeedError(f"could not find the output of {path}")
        return outputs[-1]

    def residual_entering(self, layer: int) -> torch.fx.Node:
        """The residual stream entering block ``layer``."""
        return self.module_input(self.blocks[self.layer(layer)])

    def block_output(self, layer: int) -> torch.fx.Node:
        """The residual stream leaving block ``layer``."""
        return self.module_output(self.blocks[self.layer(layer)])

    def _linear_maps(self, layer: int) -> list[torch.fx.Node]:
        weights = set(self.captured.tensors)
        return [n for n in self._inside(self.blocks[self.layer(layer)])
                if projection_args(n.target) is not None and any(a.name in weights for a in n.all_input_nodes)]

    def _to_hidden(self, layer: int) -> list[torch.fx.Node]:
        """Block ``layer``'s linear maps back to the hidden size (none when the config does not give it)."""
        return [n for n in self._linear_maps(layer) if n.meta["val"].shape[-1] == self.hidden_size]

    def output_projection(self, layer: int) -> torch.fx.Node:
        """The attention output projection of block ``layer`` (a ``linear``/``addmm`` node)."""
        return self._per_layer("output projection", layer, self._find_output_projection)

    def _find_output_projection(self, layer: int) -> torch.fx.Node:
        inside = self._inside(self.blocks[layer])
        cores = [i for i, n in enumerate(inside) if n.target in _ATTENTION_CORES]
        if not cores:
            raise InvalidSeedError(f"no attention found in {self.blocks[self.layer(layer)]}")
        after = [n for n in self._linear_maps(layer) if inside.index(n) > cores[0]]
        if not after:
            raise InvalidSeedError(f"no attention output projection found in {self.blocks[self.layer(layer)]}")
        return after[0]

    def down_projection(self, layer: int) -> torch.fx.Node:
        """The dense MLP down projection of block ``layer``: its last linear map back to the hidden size
        other than the attention output projection (the last linear map at all when the config does not
        give the hidden size).  In a MoE block that is the shared expert's; routed experts are :meth:`experts`."""
        return self._per_layer("down projection", layer, self._find_down_projection)

    def _find_down_projection(self, layer: int) -> torch.fx.Node:
        maps = self._to_hidden(layer) or self._linear_maps(layer)
        try:
            maps = [n for n in maps if n is not self.output_projection(layer)]
        except InvalidSeedError:  # a block without attention
            pass
        if not maps:
            kind = "a mixture of experts without a dense MLP" if self.experts(layer) is not None else "no MLP"
            raise InvalidSeedError(f"{self.blocks[self.layer(layer)]} has {kind}: no dense down projection")
        return maps[-1]

    def experts(self, layer: int) -> torch.fx.Node | None:
        """The routed experts' down projection of block ``layer`` — a grouped kernel
        ``(rows sorted by expert, weights [experts, …], offsets)`` — or ``None`` for a dense block."""
        grouped = [n for n in self._inside(self.blocks[self.layer(layer)]) if _is_grouped_kernel(n)]
        return grouped[-1] if grouped else None

    def shared_expert(self, layer: int) -> torch.fx.Node | None:
        """The down projection of block ``layer``'s shared expert: a dense down projection inside the
        module holding the routed experts (``None`` if there is none, or no experts)."""
        experts = self.experts(layer)
        if experts is None:
            return None
        moe = _call_of(experts, module_path(experts).rpartition(".")[0])
        inside = [n for n in self._to_hidden(layer) if self._in(moe, n)]
        return inside[-1] if inside else None

    def mlp_output(self, layer: int) -> torch.fx.Node:
        """What block ``layer``'s MLP adds to the residual stream: the dense down projection's output,
        or, in a MoE block, the output of the module holding the experts (routed and shared)."""
        return self._per_layer("mlp output", layer, self._find_mlp_output)

    def _find_mlp_output(self, layer: int) -> torch.fx.Node:
        experts = self.experts(layer)
        if experts is None:
            return self.down_projection(layer)
        return self.module_output(_call_of(experts, module_path(experts).rpartition(".")[0]))

    @staticmethod
    def features(projection: torch.fx.Node) -> torch.fx.Node:
        """The input (features) of a linear-map node."""
        return projection.args[projection_args(projection.target).features]
