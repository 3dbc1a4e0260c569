"""Seeds: where the decomposition starts and how the value there is split into components (SPEC §3).

A seed names one or more *points* of the model by module path (found through
:class:`fxdepass.locations.Locations`) and, for each, a function the generated graph calls on the real
value there to split it.  Everything upstream of the points is constant.  The last component is
always *rest*: what no chosen source explains (biases, the residual stream before the seed, …).

>>> fxdepass.tokens()                          # one component per input position (the default)
>>> fxdepass.heads(3)                          # layer 3's attention heads
>>> fxdepass.neurons(-1, group_size=64)        # last layer's MLP neurons, in groups of 64
>>> fxdepass.modules(0)                        # layer 0's attention and MLP outputs
>>> fxdepass.subspace(2, [fxdepass.orthogonal_projector(probe.weight.T)])
>>> fxdepass.custom("model.layers.1.mlp", where="output", split=my_split)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx

from .checks import has_data, index_groups, integer, integers
from .errors import InvalidSeedError
from .registry import ComponentAxis, component_axis, held_rows, on_component_axis
from .locations import Locations

__all__ = [
    "Seed", "SeedPoint", "Tokens", "Heads", "Neurons", "Modules", "DirectHeads", "DirectModules", "Subspace", "Custom",
    "tokens", "heads", "neurons", "modules", "subspace", "custom", "orthogonal_projector",
    "split_groups", "split_features", "split_experts", "split_expert", "as_component", "split_subspaces", "checked_split", "sink_of",
]


@dataclasses.dataclass(frozen=True)
class SeedPoint:
    """One place where components start: ``split(value, *inputs, **kwargs)`` gives them (rest last);
    ``inputs`` are real values the split also needs (computed before ``node``).  A ``carries`` point's split
    is ``split(value, carried, *inputs, **kwargs)``, ``carried`` being the components earlier points give
    ``node`` (``None`` where none reach it; Note [Carrying seeds] in fxdepass/analysis.py)."""

    node: torch.fx.Node
    split: Callable[..., torch.Tensor]
    kwargs: dict[str, Any]
    inputs: tuple[torch.fx.Node, ...] = ()
    carries: bool = False


class Seed:
    """Base class of seeds.  Seeds are frozen dataclasses: the compiled graph is cached per seed."""

    #: whether SPEC §2's sink-token option applies to activation allocation
    sink: bool = False

    def points(self, where: Locations) -> list[SeedPoint]:
        raise NotImplementedError

    def labels(self, input_ids: torch.Tensor, where: Locations, tokenizer: Any = None) -> list[str]:
        raise NotImplementedError

    def prompt_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, where: Locations,
                      tokenizer: Any = None) -> list[list[str]]:
        """The labels of each prompt of a batch (rest last); the same for every prompt unless the components
        are the prompt's own tokens.

        >>> fxdepass.heads(0).prompt_labels(ids, None, where)[1][:2]                  # doctest: +SKIP
        ['L0H0', 'L0H1']
        """
        return [self.labels(input_ids, where, tokenizer)] * input_ids.shape[0]

    def sink_kwargs(self) -> dict[str, Any] | None:
        """Keyword arguments of :func:`sink_of` when the sink option is on, else ``None``."""
        return None


def _token_text(token: int, tokenizer: Any) -> str:
    return repr(tokenizer.decode([token])) if tokenizer is not None else repr(str(token))


#: the label text of a padding position (its attention mask is 0)
PADDING = "<pad>"


def is_padding(label: str) -> bool:
    """Whether a component label names a padding position.

    >>> is_padding("tok 0 <pad>"), is_padding("tok 1 'Paris'")
    (True, False)
    """
    return label.startswith("tok ") and label.endswith(" " + PADDING)


@dataclasses.dataclass(frozen=True)
class Tokens(Seed):
    """Token-level seed at the residual stream entering the first block.

    One component per position by default, per listed position with ``positions``, or per group with
    ``groups`` (a list of position lists, or a mapping name → positions); unlisted positions go to rest.
    ``sink=True`` gives the first attended position's component no share of activations at other
    positions (the paper's ``ignore_special_token``; rules/activations.py Note [Activation allocation]).

    >>> decomposed.attribute(ids, seed=fxdepass.tokens(groups={"context": range(0, 9), "question": range(9, 14)}))  # doctest: +SKIP
    """

    positions: tuple[int, ...] | None = None
    groups: Any = None
    sink: bool = True
    group_names: tuple[str, ...] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.positions is not None and self.groups is not None:
            raise InvalidSeedError("tokens(): give positions or groups, not both")
        if not isinstance(self.sink, bool):
            raise InvalidSeedError(f"tokens(): sink must be True or False, got {self.sink!r}")
        if self.positions is not None:
            object.__setattr__(self, "positions", integers(self.positions, "tokens(positions=...)", InvalidSeedError))
            object.__setattr__(self, "groups", tuple((p,) for p in self.positions))
            if not self.positions:
                raise InvalidSeedError("tokens(): positions is empty; give at least one position (or None for all)")
        elif self.groups is not None:
            groups = self.groups.values() if isinstance(self.groups, Mapping) else self.groups
            if isinstance(self.groups, Mapping):
                object.__setattr__(self, "group_names", tuple(str(k) for k in self.groups))
            elif isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__"):
                raise InvalidSeedError(f"tokens(): groups must be a list of position lists or a mapping name → "
                                       f"positions, got {self.groups!r}")
            object.__setattr__(self, "groups", tuple(integers(g, "each group of tokens(groups=...)", InvalidSeedError)
                                                     for g in groups))
            if not self.groups or any(len(g) == 0 for g in self.groups):
                raise InvalidSeedError("tokens(): every group needs at least one position")
        if self.groups is not None:  # the same position twice, as given; -1 and n-1 are found by check()
            index_groups(self.groups, None, what="tokens()", unit="position", error=InvalidSeedError)

    def points(self, where: Locations) -> list[SeedPoint]:
        node = where.residual_entering(0)
        axis, added = where.captured.axis_of(node, where.captured.sequence_length), 0
        if axis is None and where.captured.prefixed_axis_of(node) is not None:
            axis, added = where.captured.prefixed_axis_of(node)  # Note [Positions a model adds]
        if axis is None:
            raise InvalidSeedError(f"the value at the token seed ({node.name}) has no sequence axis")
        return [SeedPoint(node, split_groups, {"position_axis": axis, "groups": self.groups, "added": added})]

    def sink_kwargs(self) -> dict[str, Any] | None:
        return {"groups": self.groups} if self.sink else None

    def check(self, length: int) -> None:
        """Raise if a listed position is outside a prompt of ``length`` tokens, or is named twice (``1`` and ``-4``
        of 5 tokens): a position in two components would be counted twice."""
        if self.groups is not None:
            index_groups(self.groups, length, what="tokens()", unit="position", scope=f"the prompt has {length} tokens",
                         error=InvalidSeedError)

    def labels(self, input_ids: torch.Tensor, where: Locations, tokenizer: Any = None) -> list[str]:
        return self.prompt_labels(input_ids[:1], None, where, tokenizer)[0]

    def prompt_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, where: Locations,
                      tokenizer: Any = None) -> list[list[str]]:
        """Each prompt's own tokens (``"tok 3 ' Paris'"``); padding positions read ``"tok 0 <pad>"``.

        >>> fxdepass.tokens().prompt_labels(torch.tensor([[0, 7]]), torch.tensor([[0, 1]]), where)  # doctest: +SKIP
        [['tok 0 <pad>', "tok 1 '7'", 'rest']]
        """
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return [self._labels(ids, kept, tokenizer) for ids, kept in zip(input_ids.tolist(), mask.tolist())]

    def _labels(self, ids: list[int], kept: list[int], tokenizer: Any) -> list[str]:
        def token(p: int) -> str:
            return f"tok {p} {_token_text(ids[p], tokenizer) if kept[p] else PADDING}"

        if self.groups is None:
            return [token(p) for p in range(len(ids))] + ["rest"]
        names = []
        for i, group in enumerate(self.groups):
            positions = [p % len(ids) for p in group]
            if self.group_names is not None:
                names.append(self.group_names[i])
            elif len(positions) == 1:
                names.append(token(positions[0]))
            else:
                names.append("toks " + ",".join(map(str, positions)))
        return names + ["rest"]


@dataclasses.dataclass(frozen=True)
class Heads(Seed):
    """The input of layer ``layer``'s attention output projection, split by head (GQA, fused qkv and
    parallel blocks alike: the split is over the projection's input features)."""

    layer: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", integer(self.layer, "heads(): the layer", InvalidSeedError))

    def points(self, where: Locations) -> list[SeedPoint]:
        projection = where.output_projection(self.layer)
        return [SeedPoint(Locations.features(projection), split_features, {"groups": _count(where.num_heads, "heads")})]

    def labels(self, input_ids: torch.Tensor, where: Locations, tokenizer: Any = None) -> list[str]:
        layer = where.layer(self.layer)
        return [f"L{layer}H{h}" for h in range(where.num_heads)] + ["rest"]


def _count(value: int | None, what: str) -> int:
    if not value:
        raise InvalidSeedError(f"the model's config does not say how many {what} it has")
    return value


@dataclasses.dataclass(frozen=True)
class Neurons(Seed):
    """The input of layer ``layer``'s MLP down projection, one component per neuron (or per
    ``group_size`` consecutive neurons of ``indices``); neurons left out go to rest.

    In a mixture-of-experts layer the components are the routed experts (plus one for the shared
    expert, if any) at the experts' down projection; ``expert=e`` splits expert ``e``'s neurons instead
    (``indices``/``group_size`` as above; the other experts go to rest).

    >>> decomposed.attribute(ids, seed=fxdepass.neurons(-1, expert=2, group_size=8))   # doctest: +SKIP
    """

    layer: int
    indices: tuple[int, ...] | None = None
    group_size: int = 1
    expert: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", integer(self.layer, "neurons(): the layer", InvalidSeedError))
        if self.indices is not None:
            object.__setattr__(self, "indices", integers(self.indices, "neurons(indices=...)", InvalidSeedError))
            if not self.indices:
                raise InvalidSeedError("neurons(): indices is empty; give at least one neuron (or None for all)")
            index_groups([self.indices], None, what="neurons()", unit="neuron", error=InvalidSeedError)
        if self.expert is not None:
            object.__setattr__(self, "expert", integer(self.expert, "neurons(): expert", InvalidSeedError))
        group_size = integer(self.group_size, "neurons(): group_size", InvalidSeedError)
        if group_size < 1:
            raise InvalidSeedError(f"neurons(): group_size must be a positive integer, got {self.group_size!r}")
        object.__setattr__(self, "group_size", group_size)

    def _selection(self, width: int) -> tuple[tuple[int, ...], ...]:
        indices = self.indices if self.indices is not None else tuple(range(width))
        scope = f"the {'expert' if self.expert is not None else 'MLP'} has {width} neurons"
        indices, = index_groups([indices], width, what="neurons()", unit="neuron", scope=scope, error=InvalidSeedError)
        return tuple(indices[i:i + self.group_size] for i in range(0, len(indices), self.group_size))

    def _experts(self, where: Locations) -> tuple[torch.fx.Node, int, torch.fx.Node | None] | None:
        """``(grouped kernel, number of experts, shared expert's down projection or None)``, or ``None``
        for a dense layer; checks ``expert`` and ``indices`` against the layer's kind."""
        grouped = where.experts(self.layer)
        layer = where.layer(self.layer)
        if grouped is None:
            if self.expert is not None:
                raise InvalidSeedError(f"neurons(): layer {layer}'s MLP has no routed experts; leave expert=None")
            return None
        count = int(grouped.args[1].meta["val"].shape[0])
        if self.expert is None and self.indices is not None:
            raise InvalidSeedError(f"neurons(): layer {layer} is a mixture of {count} experts; choose one "
                                   "with expert=e to split its neurons (or leave indices out for per-expert components)")
        if self.expert is not None and not -count <= self.expert < count:
            raise InvalidSeedError(f"neurons(): expert {self.expert} is out of range (layer {layer} has {count} experts)")
        return grouped, count, where.shared_expert(self.layer)

    def points(self, where: Locations) -> list[SeedPoint]:
        moe = self._experts(where)
        if moe is None:
            node = Locations.features(where.down_projection(self.layer))
            return [SeedPoint(node, split_features, {"groups": self._selection(node.meta["val"].shape[-1])})]
        grouped, count, shared = moe
        rows, offsets = grouped.args[0], grouped.args[2]
        if self.expert is not None:
            groups = self._selection(rows.meta["val"].shape[-1])
            return [SeedPoint(rows, split_expert, {"expert": self.expert % count, "groups": groups}, (offsets,))]
        points = [SeedPoint(rows, split_experts, {"count": count + (shared is not None)}, (offsets,))]
        if shared is not None:
            points.append(SeedPoint(Locations.features(shared), as_component, {"index": count, "count": count + 1}))
        return points

    def labels(self, input_ids: torch.Tensor, where: Locations, tokenizer: Any = None) -> list[str]:
        layer = where.layer(self.layer)
        moe = self._experts(where)
        if moe is not None and self.expert is None:
            return [f"L{layer}E{e}" for e in range(moe[1])] + ([f"L{layer} shared expert"] if moe[2] is not None else []) + ["rest"]
        prefix = f"L{layer}" if moe is None else f"L{layer}E{self.expert % moe[1]}"
        node = Locations.features(where.down_projection(self.layer)) if moe is None else moe[0].args[0]
        groups = self._selection(node.meta["val"].shape[-1])
        return [f"{prefix}N{g[0]}" if len(g) == 1 else f"{prefix}N{g[0]}-{g[-1]}" for g in groups] + ["rest"]


@dataclasses.dataclass(frozen=True)
class Modules(Seed):
    """Layer ``layer``'s attention output and MLP output; rest is the residual stream entering it."""

    layer: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", integer(self.layer, "modules(): the layer", InvalidSeedError))

    def points(self, where: Locations) -> list[SeedPoint]:
        return [SeedPoint(where.output_projection(self.layer), as_component, {"index": 0, "count": 2}),
                SeedPoint(where.mlp_output(self.layer), as_component, {"index": 1, "count": 2})]

    def labels(self, input_ids: torch.Tensor, where: Locations, tokenizer: Any = None) -> list[str]:
        layer = where.layer(self.layer)
        return [f"L{layer} attention", f"L{layer} mlp", "rest"]


class _Direct(Seed):
    """Base of :class:`DirectHeads` and :class:`DirectModules`; see Note [Direct contributions]."""

    # Note [Direct contributions]
    # TransformerLens's table of direct contributions gives every head (or attention/MLP output) of every layer
    # what it writes into the residual stream, read through the final norm (scale frozen) and the unembedding.
    # Seeding several layers' sources in one pass gives exactly that when every attention and MLP output from the
    # first seeded layer on is a seed point: a value reseeded at a point is split afresh (what earlier sources
    # contributed to it is dropped there), so nothing a source writes reaches the readout through a later block.
    # Outputs that are not sources are reseeded into rest.  Between the seeded points only residual additions,
    # the final norm and the head carry components: one cheap decomposed pass.  The split at a head layer keeps
    # every layer's slots on the one component axis (empty feature groups for the other layers' heads), so the
    # seeded-projection fusion (fxdepass/narrowing.py) applies unchanged.

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", integers(self.layers, f"{self._kind}(): the layers", InvalidSeedError))
            if not self.layers:
                raise InvalidSeedError(f"{self._kind}(): give at least one layer, or 'all'")
            index_groups([self.layers], None, what=f"{self._kind}()", unit="layer", error=InvalidSeedError)

    _kind = ""

    def resolved(self, where: Locations) -> list[int]:
        """The seeded layers, as non-negative indices in increasing order; a layer named twice (``0`` and ``-2``
        of 2) is refused like any repeated index."""
        count = len(where.blocks)
        layers, = index_groups([self.layers or range(count)], count, what=f"{self._kind}()", unit="layer",
                               scope=f"the model has {count} layers", error=InvalidSeedError)
        return sorted(layers)

    def _sources(self, where: Locations, layer: int) -> int:
        raise NotImplementedError

    def _offsets(self, where: Locations) -> tuple[dict[int, int], int]:
        """Each seeded layer's first component index and the number of components."""
        offsets, count = {}, 0
        for layer in self.resolved(where):
            offsets[layer] = count
            count += self._sources(where, layer)
        return offsets, count

    def _attention(self, where: Locations, layer: int, offset: int | None, count: int) -> SeedPoint:
        return SeedPoint(where.output_projection(layer), as_component, {"index": count if offset is None else offset,
                                                                        "count": count})

    def _mlp(self, where: Locations, layer: int, offset: int | None, count: int) -> SeedPoint:
        return SeedPoint(where.mlp_output(layer), as_component, {"index": count if offset is None else offset,
                                                                 "count": count})


@dataclasses.dataclass(frozen=True)
class DirectHeads(_Direct):
    """Every head of ``layers`` (``None``: all) at once, each its direct contribution (Note [Direct
    contributions]); rest: the residual stream entering the first of them, every MLP output from there on,
    the attention outputs of layers not listed, and biases.

    >>> decomposed.attribute(ids, seed=fxdepass.heads("all")).top(5)                  # doctest: +SKIP
    [('L1H3', 2.91), ('L0H1', -1.22), ...]
    """

    layers: tuple[int, ...] | None = None
    _kind = "heads"

    def _sources(self, where: Locations, layer: int) -> int:
        return _count(where.num_heads, "heads")

    def points(self, where: Locations) -> list[SeedPoint]:
        offsets, count = self._offsets(where)
        heads = _count(where.num_heads, "heads")
        points = []
        for layer in range(min(offsets), len(where.blocks)):
            if layer in offsets:
                features = Locations.features(where.output_projection(layer))
                width = features.meta["val"].shape[-1]
                own = tuple(tuple(range(h * width // heads, (h + 1) * width // heads)) for h in range(heads))
                groups = ((),) * offsets[layer] + own + ((),) * (count - offsets[layer] - heads)
                points.append(SeedPoint(features, split_features, {"groups": groups}))
            else:
                points.append(self._attention(where, layer, None, count))
            points.append(self._mlp(where, layer, None, count))
        return points

    def labels(self, input_ids: torch.Tensor, where: Locations, tokenizer: Any = None) -> list[str]:
        heads = _count(where.num_heads, "heads")
        return [f"L{layer}H{h}" for layer in self.resolved(where) for h in range(heads)] + ["rest"]


@dataclasses.dataclass(frozen=True)
class DirectModules(_Direct):
    """The attention output and MLP output of every layer of ``layers`` (``None``: all) at once, each its
    direct contribution (Note [Direct contributions]); rest: the residual stream entering the first of them,
    the outputs of layers not listed, and biases outside the modules.

    >>> decomposed.attribute(ids, seed=fxdepass.modules("all")).labels[:3]           # doctest: +SKIP
    ['L0 attention', 'L0 mlp', 'L1 attention']
    """

    layers: tuple[int, ...] | None = None
    _kind = "modules"

    def _sources(self, where: Locations, layer: int) -> int:
        return 2

    def points(self, where: Locations) -> list[SeedPoint]:
        offsets, count = self._offsets(where)
        points = []
        for layer in range(min(offsets), len(where.blocks)):
            offset = offsets.get(layer)
            points.append(self._attention(where, layer, offset, count))
            points.append(self._mlp(where, layer, None if offset is None else offset + 1, count))
        return points

    def labels(self, input_ids: torch.Tensor, where: Locations, tokenizer: Any = None) -> list[str]:
        return [f"L{layer} {part}" for layer in self.resolved(where) for part in ("attention", "mlp")] + ["rest"]


@dataclasses.dataclass(frozen=True, eq=False)
class Subspace(Seed):
    """The residual stream entering ``layer`` split by projection matrices ``P_k`` (``[d, d]`` each):
    components ``P_k x``; rest ``(I − Σ P_k) x``.  Projectors need not be orthogonal."""

    layer: int
    projectors: tuple[torch.Tensor, ...]
    names: tuple[str, ...] | None = None
    check: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", integer(self.layer, "subspace(): the layer", InvalidSeedError))
        if isinstance(self.projectors, (torch.Tensor, str, bytes)) or not hasattr(self.projectors, "__iter__"):
            raise InvalidSeedError(f"subspace(): projectors must be a list of [d, d] matrices, got "
                                   f"{type(self.projectors).__name__}")
        try:
            projectors = tuple(has_data(torch.as_tensor(p), "a projector", InvalidSeedError) for p in self.projectors)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InvalidSeedError(f"subspace(): projectors must be [d, d] matrices of numbers ({error})") from None
        if not projectors:
            raise InvalidSeedError("subspace(): give at least one projector")
        object.__setattr__(self, "names", _names(self.names, len(projectors), "subspace()", "projectors"))
        if not isinstance(self.check, bool):
            raise InvalidSeedError(f"subspace(): check must be True or False, got {self.check!r}")
        for k, p in enumerate(projectors):
            if p.is_complex() or p.dtype == torch.bool:
                raise InvalidSeedError(f"subspace(): projector {k} must hold real numbers, got {p.dtype}")
            if p.ndim != 2 or p.shape[0] != p.shape[1]:
                raise InvalidSeedError(f"subspace(): projector {k} must be a square [d, d] matrix, got shape {tuple(p.shape)}")
            if not bool(torch.isfinite(p).all()):
                raise InvalidSeedError(f"subspace(): projector {k} holds NaN or inf")
            if self.check and not torch.allclose(p.double() @ p.double(), p.double(), atol=1e-6):
                raise InvalidSeedError(f"subspace(): projector {k} is not a projection (P·P ≠ P)")
            same = next((j for j in range(k) if projectors[j].shape == p.shape and torch.equal(projectors[j], p)), None)
            if same is not None:  # the same subspace twice: each copy would be credited with all of it
                raise InvalidSeedError(f"subspace(): projectors {same} and {k} are equal; each subspace may be in "
                                       "one component only, or it would be counted twice")
        object.__setattr__(self, "projectors", projectors)

    def points(self, where: Locations) -> list[SeedPoint]:
        node = where.residual_entering(self.layer)
        width = node.meta["val"].shape[-1]
        for k, p in enumerate(self.projectors):
            if p.shape[0] != width:
                raise InvalidSeedError(f"subspace(): projector {k} is {tuple(p.shape)} but the residual stream has width {width}")
        device = node.meta["val"].device  # the model's: the projectors may have been made anywhere
        return [SeedPoint(node, split_subspaces, {"projectors": torch.stack([p.to(device) for p in self.projectors])})]

    def labels(self, input_ids: torch.Tensor, where: Locations, tokenizer: Any = None) -> list[str]:
        return list(self.names or [f"subspace {k}" for k in range(len(self.projectors))]) + ["rest"]


@dataclasses.dataclass(frozen=True)
class Custom(Seed):
    """Any module's input or output, split by a user function returning ``[K, *value.shape]``
    components; the sum is verified when the graph runs and the (tiny) remainder goes to rest."""

    path: str
    where: str = "output"
    split: Callable[[torch.Tensor], torch.Tensor] | None = None
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.where not in ("input", "output"):
            raise InvalidSeedError(f"custom(): where must be 'input' or 'output', got {self.where!r}")
        if not callable(self.split):
            raise InvalidSeedError("custom(): split must be a function returning the components")
        if not isinstance(self.path, str):
            raise InvalidSeedError(f"custom(): path must be a module path such as 'model.layers.1.mlp', got {self.path!r}")
        object.__setattr__(self, "names", _names(self.names, None, "custom()", "components"))

    def points(self, where: Locations) -> list[SeedPoint]:
        node = where.module_input(self.path) if self.where == "input" else where.module_output(self.path)
        count = None if self.names is None else len(self.names)
        return [SeedPoint(node, checked_split, {"split": self.split, "name": f"{self.path} ({self.where})", "count": count})]

    def labels(self, input_ids: torch.Tensor, where: Locations, tokenizer: Any = None) -> list[str]:
        if self.names is None:
            raise InvalidSeedError("custom(): labels are known once the split has run")
        return list(self.names) + ["rest"]


def _names(names: Sequence[str] | None, count: int | None, kind: str, what: str) -> tuple[str, ...] | None:
    """A seed's component names as a tuple, checked: strings, one per component (when ``count`` is known)."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise InvalidSeedError(f"{kind}: names must be a list of strings, got {names!r}")
    names = tuple(names)
    if not all(isinstance(name, str) for name in names):
        raise InvalidSeedError(f"{kind}: names must be strings, got {list(names)!r}")
    if count is not None and len(names) != count:
        raise InvalidSeedError(f"{kind}: {len(names)} names for {count} {what}; give one name per component")
    return names


def tokens(positions: Sequence[int] | None = None, groups: Any = None, sink: bool = True) -> Tokens:
    """Token-level seed (the default); see :class:`Tokens`."""
    return Tokens(positions=positions, groups=groups, sink=sink)


def heads(layer: int | Sequence[int] | str) -> Heads | DirectHeads:
    """Per-head seed at layer ``layer`` (negative counts from the end; see :class:`Heads`: the heads' components
    carry on through later layers), or the direct contributions of every head of several layers at once
    (``"all"``, ``range(L)``, a list; see :class:`DirectHeads`).

    >>> fxdepass.heads("all"), fxdepass.heads(range(2))
    (DirectHeads(layers=None), DirectHeads(layers=(0, 1)))
    """
    if _one_layer(layer):
        return Heads(layer)
    return DirectHeads(_layers(layer, "heads"))


def neurons(layer: int, indices: Sequence[int] | None = None, group_size: int = 1, expert: int | None = None) -> Neurons:
    """Per-neuron seed at layer ``layer``'s MLP (per expert, or per neuron of ``expert``, in a MoE
    layer); see :class:`Neurons`."""
    return Neurons(layer, indices, group_size, expert)


def modules(layer: int | Sequence[int] | str) -> Modules | DirectModules:
    """Attention-output / MLP-output seed at layer ``layer`` (see :class:`Modules`), or the direct contributions
    of the attention and MLP outputs of several layers at once (``"all"``, ``range(L)``, a list; see
    :class:`DirectModules`).

    >>> fxdepass.modules("all")
    DirectModules(layers=None)
    """
    if _one_layer(layer):
        return Modules(layer)
    return DirectModules(_layers(layer, "modules"))


def _one_layer(layer: Any) -> bool:
    """Whether ``heads(layer)`` / ``modules(layer)`` name one layer (not ``"all"`` or a list of them)."""
    if isinstance(layer, torch.Tensor):
        return layer.ndim == 0
    return not isinstance(layer, (str, bytes)) and not hasattr(layer, "__iter__")


def _layers(layers: Sequence[int] | str, kind: str) -> tuple[int, ...] | None:
    if isinstance(layers, str):
        if layers != "all":
            raise InvalidSeedError(f"{kind}({layers!r}): give a layer number, a list or range of them, or 'all'")
        return None
    return integers(layers, f"{kind}(): the layers", InvalidSeedError)


def subspace(layer: int, projectors: Sequence[torch.Tensor], names: Sequence[str] | None = None,
             check: bool = False) -> Subspace:
    """Subspace seed on the residual stream entering ``layer``; see :class:`Subspace`.  ``check=True``
    verifies that every matrix is a projection (``P·P = P``)."""
    return Subspace(layer, projectors, names, check)


def custom(path: str, where: str = "output", split: Callable[[torch.Tensor], torch.Tensor] | None = None,
           names: Sequence[str] | None = None) -> Custom:
    """Seed at any module's input or output with a user ``split``; see :class:`Custom`."""
    return Custom(path, where, split, names)


def orthogonal_projector(basis: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector ``Q Qᵀ`` onto the column space of ``basis`` (``[d, c]``), e.g. a probe's
    weight matrix transposed.

    >>> P = orthogonal_projector(torch.randn(16, 3)); torch.allclose(P @ P, P, atol=1e-6)
    True
    """
    basis = torch.as_tensor(basis)
    if basis.ndim != 2 or basis.shape[1] > basis.shape[0]:
        raise InvalidSeedError(f"orthogonal_projector(): basis must be [d, c] with c ≤ d, got {tuple(basis.shape)}")
    q, _ = torch.linalg.qr(basis.double())
    return (q @ q.T).to(basis.dtype if basis.is_floating_point() else torch.float64)


# -- functions the generated graph calls --------------------------------------------------------


# Note [Positions a model adds]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Some models prepend positions of their own before the first block (CpmAnt: ``prompt_length``
# learned prompt tokens), so the residual stream entering it is ``k`` positions longer than the
# prompt.  The token seed keeps one component per *prompt* token, counted as the user counts them
# (position 0 is the prompt's first token); the ``k`` added positions, the first ones along the
# sequence axis, are no token of the prompt and go to rest.  That the added positions come first is
# an assumption a static capture cannot check: ProphetNet *appends* two n-gram streams (3·N positions),
# so its prompt tokens land on the streams and get almost nothing (docs/coverage.md: "degenerate").
# The sink token (SPEC §2) is found only at
# values whose position axis is the prompt's, so it does not apply inside such a model.


def split_groups(value: torch.Tensor, *, position_axis: int, groups: tuple[tuple[int, ...], ...] | None = None,
                 added: int = 0) -> torch.Tensor:
    """Split ``value`` by position: one component per group of positions (default: per position);
    positions in no group, and the ``added`` positions the model prepends (Note [Positions a model
    adds]), go to rest.

    >>> split_groups(torch.ones(1, 3, 2), position_axis=1).shape   # 3 positions + rest
    torch.Size([4, 1, 3, 2])
    >>> split_groups(torch.ones(1, 3, 2), position_axis=1, added=1)[:, 0, :, 0]   # 2 prompt tokens + rest
    tensor([[0., 1., 0.],
            [0., 0., 1.],
            [1., 0., 0.]])
    """
    count = value.shape[position_axis] - added
    if groups is None:
        membership = torch.eye(count, dtype=value.dtype, device=value.device)
    else:
        membership = torch.zeros(len(groups), count, dtype=value.dtype, device=value.device)
        for g, positions in enumerate(groups):
            membership[g, [p % count for p in positions]] = 1.0
    membership = torch.nn.functional.pad(membership, (added, 0))
    return _split_by_membership(value, membership, position_axis)


def _split_by_membership(value: torch.Tensor, membership: torch.Tensor, axis: int) -> torch.Tensor:
    """Components ``value · membership[k]`` along ``axis``, then the rest ``value · (1 − covered)``: those
    this process holds (registry Note [Sharded components])."""
    held = component_axis()
    start, end = held.held(membership.shape[0])
    shape = [end - start] + [1] * value.ndim
    shape[axis + 1] = membership.shape[1]
    parts = membership[start:end].reshape(shape) * value.unsqueeze(0)
    if not held.rest:
        return parts
    covered = membership.sum(0).clamp_max(1.0).reshape(shape[1:])
    return torch.cat((parts, (value * (1.0 - covered)).unsqueeze(0)))


def split_features(value: torch.Tensor, *, groups: int | tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Split the last (feature) axis: into ``groups`` equal slices (heads), or by index groups (neurons).

    >>> split_features(torch.ones(2, 8), groups=4).shape            # 4 heads of 2 features + rest
    torch.Size([5, 2, 8])
    """
    width = value.shape[-1]
    if isinstance(groups, int):
        membership = torch.eye(groups, dtype=value.dtype, device=value.device).repeat_interleave(width // groups, dim=1)
    else:
        membership = torch.zeros(len(groups), width, dtype=value.dtype, device=value.device)
        for g, indices in enumerate(groups):
            membership[g, list(indices)] = 1.0
    return _split_by_membership(value, membership, value.ndim - 1)


def _expert_of_rows(rows: int, offsets: torch.Tensor) -> torch.Tensor:
    """The expert of each row of a grouped kernel's input (rows sorted by expert; ``offsets[e]`` is
    where expert ``e``'s rows end); rows past the last offset get ``len(offsets)``."""
    return torch.searchsorted(offsets.to(torch.long), torch.arange(rows, device=offsets.device), right=True)


def split_experts(value: torch.Tensor, offsets: torch.Tensor, *, count: int) -> torch.Tensor:
    """Split a grouped kernel's input ``[rows, features]`` by expert: component ``e`` keeps expert ``e``'s
    rows; ``count`` may exceed the number of experts (components filled elsewhere, e.g. a shared expert).

    >>> split_experts(torch.ones(3, 2), torch.tensor([1, 3]), count=2)[:, :, 0]
    tensor([[1., 0., 0.],
            [0., 1., 1.],
            [0., 0., 0.]])
    """
    expert = _expert_of_rows(value.shape[0], offsets)
    membership = torch.nn.functional.one_hot(expert, count + 1)[:, :count].T.to(value.dtype)
    return _split_by_membership(value, membership, 0)


def split_expert(value: torch.Tensor, offsets: torch.Tensor, *, expert: int, groups: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Split expert ``expert``'s rows of a grouped kernel's input by neuron groups; all else is rest."""
    rows = (_expert_of_rows(value.shape[0], offsets) == expert).to(value.dtype).unsqueeze(-1)
    with on_component_axis(ComponentAxis()):  # every group, for the rest
        parts = split_features(value * rows, groups=groups)[:-1]
    return held_rows(torch.cat((parts, (value - parts.sum(0)).unsqueeze(0))))


def as_component(value: torch.Tensor, *, index: int, count: int) -> torch.Tensor:
    """All of ``value`` in component ``index`` of ``count`` (plus an empty rest), in the rows this process holds."""
    held = component_axis()
    start, end = held.held(count)
    out = value.new_zeros(end - start + held.rest, *value.shape)
    if start <= index < end or (index == count and held.rest):
        out[index - start if index < count else -1] = value
    return out


def split_subspaces(value: torch.Tensor, *, projectors: torch.Tensor) -> torch.Tensor:
    """Components ``P_k x`` and rest ``x − Σ_k P_k x`` (projectors ``[K, d, d]`` act on the last axis)."""
    parts = torch.einsum("kij,...j->k...i", projectors.to(value.device, value.dtype), value)
    return held_rows(torch.cat((parts, (value - parts.sum(0)).unsqueeze(0))))


def checked_split(value: torch.Tensor, *, split: Callable[[torch.Tensor], torch.Tensor], name: str,
                  count: int | None = None) -> torch.Tensor:
    """Call a user's ``split`` and check that its components sum to ``value`` (and that there are ``count``,
    one per name, when names were given); the remainder goes to rest."""
    parts = split(value)
    expected = f"[K, {', '.join(map(str, value.shape))}]"
    if not isinstance(parts, torch.Tensor):
        raise InvalidSeedError(f"custom seed at {name}: split returned {type(parts).__name__}, not a tensor "
                               f"{expected} (torch.stack a list of components)")
    if parts.shape[1:] != value.shape:
        raise InvalidSeedError(f"custom seed at {name}: split returned shape {tuple(parts.shape)}, expected {expected}")
    if count is not None and parts.shape[0] != count:
        raise InvalidSeedError(f"custom seed at {name}: split returned {parts.shape[0]} components but {count} names "
                               "were given; give one name per component")
    if not (parts.is_floating_point() or parts.dtype == value.dtype):
        raise InvalidSeedError(f"custom seed at {name}: split returned {parts.dtype} components of a {value.dtype} value")
    remainder = value - parts.sum(0)
    tolerance = 1e-6 if value.dtype in (torch.float32, torch.float64) else 1e-2
    scale = value.abs().max().clamp_min(torch.finfo(value.dtype).tiny)
    if float(remainder.abs().max() / scale) > (1e-12 if value.dtype == torch.float64 else tolerance):
        raise InvalidSeedError(f"custom seed at {name}: the components do not sum to the value "
                               f"(max relative error {float(remainder.abs().max() / scale):.2e})")
    return held_rows(torch.cat((parts.to(value.dtype), remainder.unsqueeze(0))))


def sink_of(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            *, groups: tuple[tuple[int, ...], ...] | None = None) -> torch.Tensor:
    """``[2, batch]``: per prompt, the sink token's component (−1 when it is in rest) and its position —
    the first attended position (0 unless the prompt is left-padded).

    >>> sink_of(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    tensor([[0, 1],
            [0, 1]])
    """
    if attention_mask is None:
        position = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    else:
        position = (attention_mask != 0).int().argmax(dim=-1)
    if groups is None:
        return torch.stack((position, position))
    length = input_ids.shape[-1]
    component = torch.full_like(position, -1)
    for g in reversed(range(len(groups))):
        members = torch.tensor([p % length for p in groups[g]], device=position.device)
        component = torch.where((position.unsqueeze(-1) == members).any(-1), g, component)
    return torch.stack((component, position))
