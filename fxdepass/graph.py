"""Attribution graphs: which tokens, attention heads and MLP blocks carry a target, as a ``networkx.DiGraph``.

:func:`build_graph` runs one decomposed pass per *stage* and assembles the results; docs/graph-format.md
describes the graph.  The stages, in model order, are the prompt's tokens, then for every layer its
attention heads (split by head and position) and its MLP block (split by position).  Every number is
an exact DePass component, none is a gradient:

* a node's ``contribution`` c_T is its DePass contribution to the target (from its stage's pass);
* the edge S → target weighs c_S;
* the edge S → T between two nodes weighs c_T · ⟨o_ST, o_T⟩ / ‖o_T‖², where o_T is T's output (a head's
  or MLP block's write into the residual stream at its position) and o_ST is S's DePass component of
  it (from S's stage pass, read out at T): the part of T's contribution that S supplies, measured
  along T's own output.

For every node T and every stage before it, the weights from that stage plus the stage's *rest*
(biases and, for a layer's stage, the residual stream entering it) add up to c_T exactly; for the
target, to its real value.  Pruning follows circuit-tracer (nodes by cumulative influence |c_T|, edges
by cumulative |weight|, orphans dropped, tokens and target always kept).

>>> graph = build_graph(decomposed, tokenizer("alice has red . what does alice have ?",
...                     return_tensors="pt").input_ids)                          # doctest: +SKIP
>>> graph.graph["explained_fraction"], graph.graph["value"]                   # doctest: +SKIP
(0.93, 7.41)
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx

from .api import Attribution, DecomposedModel
from .errors import FxDePassError, InvalidInputError, OutOfMemoryEstimateError
from .lens import layer_lens
from .locations import Locations
from .readouts import readout_nodes
from .registry import projection_args
from .seeds import Heads, Modules, Neurons, Seed, SeedPoint, Tokens, split_features, split_groups, tokens

__all__ = ["Target", "logit_target", "embedding_target", "resolve_target", "build_graph", "attribution_seconds",
           "seed_graph", "keep_fraction", "split_heads_by_position", "token_texts", "layer_scores", "seed_activations"]


#: progress callback: (passes done, passes in all, what runs next)
Progress = Callable[[int, int, str], None]


# -- the target: a linear functional of a readout ------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """The scalar a graph explains: ``Σ readout[0] · weights`` (a logit, or a pooled embedding along a direction).

    It is linear in the readout, so each component's share of it is the same sum over that component.
    ``positions`` (``[N]``) and ``direction`` (``[hidden]``, or ``None``: use the norm) express it in the
    residual stream, for the per-layer heatmap.

    >>> target = Target("logits", torch.zeros(3, 5).index_put_((torch.tensor(2), torch.tensor(4)), torch.tensor(1.)), "x")
    >>> float(target.of(torch.arange(15.).view(3, 5)))   # logit 4 at position 2
    14.0
    """

    readout: str
    weights: torch.Tensor
    label: str
    #: the target token's id and text (-1 and the label for a target that is no logit)
    token: int = -1
    text: str = ""
    probability: float = 1.0
    positions: torch.Tensor | None = None
    direction: torch.Tensor | None = None

    def of(self, value: torch.Tensor) -> torch.Tensor:
        """The functional on the last two axes of ``value`` (``[..., positions, width]`` → ``[...]``)."""
        return (value * self.weights.to(value.dtype)).sum((-2, -1))


def token_texts(input_ids: torch.Tensor, tokenizer: Any) -> list[str]:
    """Each token's text (the id as text without a tokenizer).

    >>> token_texts(torch.tensor([[3, 4]]), None)
    ['3', '4']
    """
    ids = input_ids.reshape(-1).tolist()
    return [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in ids]


def _token_id(token: int | str, tokenizer: Any, vocabulary: int) -> int:
    if isinstance(token, str):
        if tokenizer is None:
            raise InvalidInputError(f"target {token!r} is text: compile with tokenizer=… or give a token id")
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            ids = [tokenizer.convert_tokens_to_ids(token)]
        unknown = getattr(tokenizer, "unk_token_id", None)
        if ids[0] is None or (ids[0] == unknown and token != getattr(tokenizer, "unk_token", None)):
            raise InvalidInputError(f"target {token!r} is not one token of the vocabulary; give a single token")
        token = ids[0]
    if not 0 <= int(token) < vocabulary:
        raise InvalidInputError(f"target {token} is outside the vocabulary (size {vocabulary})")
    return int(token)


def logit_target(logits: torch.Tensor, token: int | str | None, model: torch.nn.Module, tokenizer: Any = None) -> Target:
    """The logit of ``token`` (default: the argmax) at the last position, from the real ``logits`` (``[N, V]``).

    ``direction`` is the token's unembedding row (unit length); the heatmap of a logit target does not use it
    but reads the layer lens, through the final norm (:func:`layer_scores`).

    >>> logit_target(torch.tensor([[0., 1.], [2., 0.]]), None, model).token            # doctest: +SKIP
    0
    """
    length, vocabulary = logits.shape
    token = int(logits[-1].argmax()) if token is None else _token_id(token, tokenizer, vocabulary)
    weights = torch.zeros_like(logits)
    weights[-1, token] = 1.0
    positions = torch.zeros(length, dtype=logits.dtype, device=logits.device)
    positions[-1] = 1.0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    direction = None
    if head is not None and getattr(head, "weight", None) is not None and head.weight.shape[0] == vocabulary:
        row = head.weight[token].detach().to(logits.dtype)
        direction = row / row.norm().clamp_min(torch.finfo(row.dtype).tiny)
    text = tokenizer.decode([token]) if tokenizer is not None else str(token)
    probability = float(logits[-1].softmax(-1)[token])
    return Target("logits", weights, f"logit {text!r}", token, text, probability, positions, direction)


def embedding_target(hidden: torch.Tensor, other: torch.Tensor | None = None) -> Target:
    """The mean-pooled embedding of the real final hidden state ``hidden`` (``[N, D]``) as a scalar.

    Without ``other``: its length ‖e‖ (each component's share is its projection on e/‖e‖).  With
    ``other`` (another sentence's pooled embedding): the cosine similarity, ‖e‖ frozen at its real
    value like a norm scale, so the shares add up to the real cosine exactly.

    >>> float(embedding_target(torch.tensor([[3., 0.], [3., 8.]])).of(torch.tensor([[3., 0.], [3., 8.]])))
    5.0
    """
    pooled = hidden.mean(0)
    length = pooled.norm().clamp_min(torch.finfo(hidden.dtype).tiny)
    if other is None:
        direction, scale, label = pooled / length, 1.0, "embedding length"
    else:
        other = torch.as_tensor(other, dtype=hidden.dtype, device=hidden.device).reshape(-1)
        direction = other / other.norm().clamp_min(torch.finfo(hidden.dtype).tiny)
        scale, label = 1.0 / length, "cosine similarity"
    count = hidden.shape[0]
    weights = (scale * direction / count).expand(count, -1).clone()
    positions = torch.full((count,), 1.0 / count, dtype=hidden.dtype, device=hidden.device)
    return Target("hidden", weights, label, -1, label, 1.0, positions, direction)


# -- stages: one seed per layer part, split by head and position ---------------------------------------------


def split_heads_by_position(value: torch.Tensor, *, position_axis: int, heads: int) -> torch.Tensor:
    """Split the features entering an attention output projection into one component per
    (head, position), head-major, plus an empty rest.

    >>> split_heads_by_position(torch.ones(1, 3, 4), position_axis=1, heads=2).shape   # 2 heads × 3 positions + rest
    torch.Size([7, 1, 3, 4])
    """
    per_head = split_features(value, groups=heads)[:-1]                       # [H, *value.shape]
    per_position = torch.stack([split_groups(h, position_axis=position_axis)[:-1] for h in per_head])
    parts = per_position.flatten(0, 1)                                          # [H·N, *value.shape]
    return torch.cat((parts, torch.zeros_like(value).unsqueeze(0)))


@dataclasses.dataclass(frozen=True)
class _Stage:
    """Layer ``layer``'s attention heads (``kind="attention"``: the output projection's input, split by
    head and position) or MLP block (``kind="mlp"``: its output, split by position)."""

    kind: str
    layer: int

    def node(self, where: Locations) -> torch.fx.Node:
        """The value this stage splits, which is also what later stages read as its nodes' outputs."""
        return readout_nodes(self.readout, where)[0]

    @property
    def readout(self) -> str:
        """The readout of that value (fxdepass/readouts.py)."""
        return f"layer {self.layer} {'heads' if self.kind == 'attention' else 'mlp'}"


# Note [Stages in a batch]
# Every stage of the graph is a seed (a layer's heads split by head and position, or its MLP output split by
# position) whose pass reads every later stage.  Generating one module per stage cost more than running it
# (issue 19: 61 modules of ~2,400 nodes on SmolLM2), and a pass of few components keeps the matrix products
# small.  So consecutive layers of one kind share a pass: the prompt is repeated, prompt b of the batch is
# seeded at layer ``first + b``, and one module (cached, like any, across graphs) has a carrying seed point at
# every layer of the chunk (Note [Carrying seeds] in fxdepass/analysis.py).  At its own layer a prompt's value
# is split afresh; after it, the prompt keeps what it carries; before it, all of the value is rest, as it is
# upstream of a seed in a pass of its own — and the rules keep it there (a sum with nothing but rest is rest,
# and an activation where no component is present goes to rest whole).  So each prompt gets the components
# of its own stage's pass, up to the rounding of the rest: the value entering its seed's block is the rest
# propagated through the earlier layers rather than the real value (tests/test_graph.py compares them with
# one pass per stage).  The chunk's first layer is fixed by the module, not given at run time, because a
# prompt computes all its components — as zeros — at every seed point before its own: layers before the
# chunk would cost as much as those after it and serve nothing.  A chunk holds about ``BATCH_COMPONENTS``
# components in all, and is halved where the memory guard refuses its pass.

#: components (prompts × components per prompt) one graph pass aims at (Note [Stages in a batch])
BATCH_COMPONENTS = 256


@dataclasses.dataclass(frozen=True)
class _Stages(Seed):
    """``count`` stages of one kind from layer ``first``: prompt b of the batch is seeded at layer ``first + b``
    (Note [Stages in a batch]); with ``count=1`` it is one stage's own seed, for any batch."""

    kind: str
    first: int
    count: int = 1

    def points(self, where: Locations) -> list[SeedPoint]:
        points = []
        for index in range(self.count):
            stage = _Stage(self.kind, self.first + index)
            node = stage.node(where)
            position = _position_axis(where, node)
            if position is None:
                raise FxDePassError(f"{node.name} (layer {stage.layer} {self.kind}) has no sequence axis")
            batch = _batch_axis(where, node) if self.count > 1 else None
            kwargs = {"position_axis": position, "batch_axis": batch, "index": index}
            if self.kind == "attention":
                points.append(SeedPoint(node, stage_heads, {**kwargs, "heads": where.num_heads}, carries=True))
            else:
                points.append(SeedPoint(node, stage_positions, kwargs, carries=True))
        return points

    def labels(self, input_ids: torch.Tensor, where: Locations, tokenizer: Any = None) -> list[str]:
        positions = range(input_ids.shape[1])
        if self.kind == "attention":
            return [f"H{h}@{p}" for h in range(where.num_heads) for p in positions] + ["rest"]
        return [f"@{p}" for p in positions] + ["rest"]


def _position_axis(where: Locations, node: torch.fx.Node) -> int | None:
    captured = where.captured
    axis = captured.axis_of(node, captured.sequence_length)
    if axis is None:
        # GPT-2 and OPT flatten batch and positions before a linear map; with one prompt that axis is the positions.
        axis = captured.axis_of(node, captured.batch_size * captured.sequence_length)
    return axis


def _batch_axis(where: Locations, node: torch.fx.Node) -> int | None:
    """The batch axis of ``node``'s value when the capture has a dynamic batch (``None``: one prompt per pass)."""
    captured = where.captured
    if not isinstance(captured.batch_size, torch.SymInt) or captured.axis_of(node, captured.sequence_length) is None:
        return None
    return captured.axis_of(node, captured.batch_size)


def _staged(fresh: torch.Tensor, value: torch.Tensor, carried: torch.Tensor | None, batch_axis: int | None,
            index: int) -> torch.Tensor:
    """Prompt ``index`` of the batch gets ``fresh``, those before it ``carried``, those after it ``value`` as rest."""
    if batch_axis is None:
        return fresh
    shape = [1] * fresh.ndim
    shape[batch_axis + 1] = -1
    prompt = torch.arange(value.shape[batch_axis], device=value.device).reshape(shape)
    before = torch.zeros_like(fresh)
    before[-1] = value
    out = torch.where(prompt == index, fresh, before)
    return out if carried is None else torch.where(prompt < index, carried, out)


def stage_heads(value: torch.Tensor, carried: torch.Tensor | None, *, position_axis: int, heads: int,
                batch_axis: int | None, index: int) -> torch.Tensor:
    """The attention stage's carrying split (Note [Stages in a batch]): :func:`split_heads_by_position` for
    prompt ``index``.

    >>> stage_heads(torch.ones(2, 3, 4), None, position_axis=1, heads=2, batch_axis=0, index=0)[:, 1].sum((1, 2))
    tensor([0., 0., 0., 0., 0., 0., 12.])
    """
    fresh = split_heads_by_position(value, position_axis=position_axis, heads=heads)
    return _staged(fresh, value, carried, batch_axis, index)


def stage_positions(value: torch.Tensor, carried: torch.Tensor | None, *, position_axis: int,
                    batch_axis: int | None, index: int) -> torch.Tensor:
    """The MLP stage's carrying split (Note [Stages in a batch]): :func:`split_groups` for prompt ``index``."""
    return _staged(split_groups(value, position_axis=position_axis), value, carried, batch_axis, index)


def _output_weight(where: Locations, layer: int) -> torch.Tensor:
    """``W`` with ``output projection(x) = x @ W (+ bias)`` for layer ``layer``."""
    projection = where.output_projection(layer)
    found = projection_args(projection.target)  # a linear map Locations found
    weight = projection.args[found.weight]
    if not isinstance(weight, torch.fx.Node) or weight.name not in where.captured.tensors:
        raise FxDePassError(f"the attention output projection of layer {layer} ({projection.name}) has no weight parameter")
    tensor = where.captured.tensors[weight.name][1].detach()
    return tensor if found.axes == (0, 1) else tensor.T


def _stage_shares(stage: _Stage, where: Locations, real: torch.Tensor, parts: torch.Tensor,
                  weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``⟨o_m, o⟩ / ‖o‖²`` of each component ``m`` and node (``[K, B, nodes]``, 0 for a node whose output is 0;
    they sum to 1) and ``‖o‖`` (``[B, nodes]``), ``o`` being a node's output, from the stage's value for ``B``
    prompts (``real [B, N, F]``, ``parts [K, B, N, F]``); heads head-major like the seed.

    A head's output is its features times its rows of the output projection, ``o = x_h W_h``; its components'
    products with it are taken back in feature space, ``⟨x_m,h W_h, o⟩ = ⟨x_m,h, W_h o⟩``, so the components
    are never projected."""
    if stage.kind == "mlp":
        norm, dots = (real * real).sum(-1), (parts * real).sum(-1)
    else:
        heads = where.num_heads
        per_head = weight.to(real.dtype).unflatten(0, (heads, -1))                 # [H, F/H, D]
        out = torch.einsum("bnhf,hfd->bhnd", real.unflatten(-1, (heads, -1)), per_head)
        back = torch.einsum("bhnd,hfd->bnhf", out, per_head)
        dots = torch.einsum("kbnhf,bnhf->kbhn", parts.unflatten(-1, (heads, -1)), back).flatten(2, 3)
        norm = (out * out).sum(-1).flatten(1, 2)
    return dots / torch.where(norm > 0, norm, torch.ones_like(norm)), norm.sqrt()


# -- pruning ----------------------------------------------------------------------------------------------


def keep_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the largest (non-negative) ``scores`` that together hold at least ``fraction`` of their sum,
    as circuit-tracer's ``find_threshold`` (ties with the last kept score are kept; zeros never).

    >>> keep_fraction(torch.tensor([1., 5., 3., 1.]), 0.8)
    tensor([False,  True,  True, False])
    """
    if not 0.0 <= fraction <= 1.0:
        raise InvalidInputError(f"thresholds are fractions in [0, 1], got {fraction}")
    total = scores.sum()
    if scores.numel() == 0 or total <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / total
    index = min(int(torch.searchsorted(cumulative, torch.tensor([fraction], dtype=cumulative.dtype, device=cumulative.device))), len(ordered) - 1)
    return (scores >= ordered[index]) & (scores > 0)


def _cumulative(scores: torch.Tensor) -> torch.Tensor:
    """Each score's cumulative share when sorted in decreasing order (circuit-tracer's node ``influence``)."""
    total = scores.sum()
    if scores.numel() == 0 or total <= 0:
        return torch.zeros_like(scores)
    order = scores.argsort(descending=True)
    out = torch.empty_like(scores)
    out[order] = scores[order].cumsum(0) / total
    return out


def _prune(weights: torch.Tensor, influence: torch.Tensor, fixed: torch.Tensor, node_threshold: float,
           edge_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(node mask, edge mask) for ``weights[source, target]``: circuit-tracer's pruning with exact influences.

    Nodes that are not ``fixed`` (tokens, target) are kept by cumulative ``influence``; edges between kept
    nodes by cumulative |weight|; then nodes with no kept edge out (no way to the target) are dropped until
    none is left.  A node may keep no edge in: its output can come mostly from biases, which are no node.
    """
    nodes = fixed | keep_fraction(torch.where(fixed, torch.zeros_like(influence), influence), node_threshold)
    candidates = weights.abs() * (nodes[:, None] & nodes[None, :])
    edges = keep_fraction(candidates, edge_threshold)
    while True:
        keep = fixed | (nodes & edges.any(1))
        if torch.equal(keep, nodes):
            return nodes, edges
        nodes = keep
        edges &= nodes[:, None] & nodes[None, :]


# -- the graph ------------------------------------------------------------------------------------------------


def _one_prompt(decomposed: DecomposedModel, input_ids: Any) -> torch.Tensor:
    ids = decomposed.prompt_inputs(input_ids)["input_ids"]
    if ids.shape[0] != 1:
        raise InvalidInputError(f"build_graph() takes one prompt, got a batch of {ids.shape[0]}")
    return ids


def resolve_target(decomposed: DecomposedModel, real: torch.Tensor, target: int | str | torch.Tensor | Target | None) -> Target:
    """The :class:`Target` for ``target`` given the real value of the model's default readout for one
    prompt (``[N, V]`` logits or ``[N, D]`` final hidden state); see :func:`build_graph`.

    >>> resolve_target(decomposed, decomposed.attribute(ids).total[0], "blue").token       # doctest: +SKIP
    """
    if isinstance(target, Target):
        return target
    if decomposed.default_readout == "logits":
        return logit_target(real, target, decomposed.model, decomposed.tokenizer)
    if target is not None and not isinstance(target, torch.Tensor):
        raise InvalidInputError("an encoder's target is None (its embedding) or another embedding to compare with")
    return embedding_target(real, target)


def _prompt(ids: torch.Tensor, tokenizer: Any, texts: list[str]) -> str:
    return tokenizer.decode(ids[0].tolist()) if tokenizer is not None else " ".join(texts)


def _node(kind: str, layer: int, position: int, token: str, index: int, stage: int, label: str) -> dict[str, Any]:
    return {"kind": kind, "layer": layer, "position": position, "token": token, "index": index, "stage": stage,
            "label": label}


def _stage_nodes(stage: _Stage | None, number: int, texts: list[str], heads: int) -> list[tuple[str, dict[str, Any]]]:
    """(id, attributes) of a stage's nodes, in the order of its components."""
    if stage is None:
        return [(f"tok{p}", _node("token", -1, p, t, -1, number, f"tok {p} {t!r}")) for p, t in enumerate(texts)]
    if stage.kind == "mlp":
        return [(f"L{stage.layer}MLP@{p}", _node("mlp", stage.layer, p, t, -1, number, f"L{stage.layer} MLP @{p} {t!r}"))
                for p, t in enumerate(texts)]
    return [(f"L{stage.layer}H{h}@{p}", _node("head", stage.layer, p, t, h, number, f"L{stage.layer}H{h} @{p} {t!r}"))
            for h in range(heads) for p, t in enumerate(texts)]


def build_graph(
    decomposed: DecomposedModel,
    input_ids: Any,
    target: int | str | torch.Tensor | Target | None = None,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    progress: Progress | None = None,
) -> nx.DiGraph:
    """The pruned attribution graph of one prompt (module docstring; docs/graph-format.md).

    ``target``: for a model with logits, a token id or text (default: the argmax next token at the last
    position); for an encoder, ``None`` (its mean-pooled embedding's length) or another sentence's pooled
    embedding (cosine similarity); or a :class:`Target`.  ``progress(done, total, label)`` is called before each
    decomposed pass, ``done`` counting the ``2 × layers + 1`` stages (tokens, then each layer's heads and MLP) that
    earlier passes covered: stages of one kind share passes (Note [Stages in a batch]).  Thresholds of 1.0 keep
    every nonzero node and edge.

    >>> graph = build_graph(decomposed, ids, node_threshold=0.8)                       # doctest: +SKIP
    >>> [graph.nodes[n]["label"] for n in graph.predecessors("target")][:3]             # doctest: +SKIP
    """
    ids = _one_prompt(decomposed, input_ids)
    where = decomposed.locations_for(decomposed.prompt_inputs(ids))
    layers, heads = len(where.blocks), where.num_heads
    if not layers or not heads:
        raise FxDePassError(f"build_graph() needs transformer blocks with attention heads; found {layers} blocks")
    stages = [None] + [_Stage(kind, layer) for layer in range(layers) for kind in ("attention", "mlp")]
    passes = _run_passes(decomposed, ids, where, stages, target, progress)
    return _assemble(decomposed, ids, heads, stages, passes, node_threshold, edge_threshold)


def attribution_seconds(decomposed: DecomposedModel, input_ids: Any, repeats: int = 1) -> float:
    """Seconds one token-level attribution of the prompt takes (the default seed, readout and target; the median
    of ``repeats``, after a first call that builds its module): the unit the graph's build time is reported in
    (issue 19: a graph should cost at most 40 of them).

    >>> build_seconds / attribution_seconds(decomposed, ids)                          # doctest: +SKIP
    21.3
    """
    ids = _one_prompt(decomposed, input_ids)
    readout = "logits" if decomposed.default_readout == "logits" else "hidden"
    decomposed.attribute(ids, readout=readout)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        decomposed.attribute(ids, readout=readout)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@dataclasses.dataclass
class _Passes:
    """What the decomposed passes of :func:`build_graph` found, per stage ``k`` (``None`` is the token stage)."""

    target: Target
    value: float
    #: ``[nodes + 1]`` each node's contribution to the target, rest last
    contributions: list[torch.Tensor]
    #: ``[nodes]`` the norm of each node's output
    activations: list[torch.Tensor]
    #: ``(k, t)`` → ``[nodes of k + 1, nodes of t]``: each component's share of each later node's output
    shares: dict[tuple[int, int], torch.Tensor]
    #: the token seed's components of the residual stream entering each block and leaving the last, stacked
    layer_parts: torch.Tensor


def _run_passes(decomposed: DecomposedModel, ids: torch.Tensor, where: Locations, stages: list[_Stage | None],
                target: Any, progress: Progress | None) -> _Passes:
    """The token stage's pass, then the other stages' in batches (Note [Stages in a batch]), each through
    ``DecomposedModel.attribute`` (memory guard, reconstruction check), reading the target's readout and every
    later stage (and, for the token stage, the ``"layers"`` readout of the heatmap)."""
    weights = {s.layer: _output_weight(where, s.layer) for s in stages[1:] if s.kind == "attention"}
    readout, length = decomposed.default_readout, ids.shape[1]
    contributions: list[torch.Tensor | None] = [None] * len(stages)
    activations: list[torch.Tensor | None] = [None] * len(stages)
    shares: dict[tuple[int, int], torch.Tensor] = {}
    later = [s.readout for s in stages[1:]]
    if progress is not None:
        progress(0, len(stages), "tokens")
    found = decomposed.attribute(ids, seed=tokens(), readout=[readout, *later, "layers"], positions="all",
                                 targets="all" if readout == "logits" else None)
    real = found[readout].total[0]
    resolved = resolve_target(decomposed, real, target)
    value = float(resolved.of(real))
    contributions[0] = resolved.of(found[readout].components[:, 0])
    activations[0] = found["layers"].total[0, 0].norm(dim=-1)          # the real value entering layer 0: embeddings

    def read_stages(numbers: list[int], results: dict[str, Attribution]) -> None:
        """The shares of every node after stage ``numbers[b]``, prompt ``b``'s stage in a pass's ``results``."""
        for t in range(numbers[0] + 1, len(stages)):
            result = results[stages[t].readout]
            # [B, N, F] or, flattened, [B·N, F] (batch-major)
            real_t = result.total.reshape(len(numbers), length, result.total.shape[-1])
            parts_t = result.components.reshape(len(result.components), len(numbers), length, -1)
            found_t, norms = _stage_shares(stages[t], where, real_t, parts_t, weights.get(stages[t].layer))
            for prompt, k in enumerate(numbers):
                if k < t:
                    shares[k, t] = found_t[:, prompt]
            if numbers[0] == 0:
                activations[t] = norms[0]

    read_stages([0], found)
    number = {(s.kind, s.layer): k for k, s in enumerate(stages) if s is not None}
    done = 1
    pending = [(kind, *chunk) for kind in ("attention", "mlp") for chunk in _chunks(decomposed, where, ids, kind)]
    while pending:
        kind, first, count = pending.pop(0)
        if progress is not None:
            progress(done, len(stages), f"layers {first}–{first + count - 1} {kind}" if count > 1 else f"layer {first} {kind}")
        k0 = number[kind, first]
        names = [s.readout for s in stages[k0 + 1:]]
        target_readout, spec = _target_readout(resolved)
        try:
            results = decomposed.attribute(ids.repeat(count, 1), seed=_Stages(kind, first, count),
                                           readout=[target_readout, *names], positions="all",
                                           targets=spec if spec is not None else "all" if target_readout == "logits" else None)
        except OutOfMemoryEstimateError:
            if count == 1:
                raise
            half = count // 2
            pending[:0] = [(kind, first, half), (kind, first + half, count - half)]
            continue
        final = results[target_readout]
        numbers = [number[kind, first + prompt] for prompt in range(count)]
        for prompt, k in enumerate(numbers):
            if spec is not None:                                                 # the target's own logit at the last position
                contributions[k] = final.components[:, prompt, -1, 0]
            else:
                contributions[k] = resolved.of(final.components[:, prompt])
        read_stages(numbers, results)
        done += count
    if progress is not None:
        progress(len(stages), len(stages), "done")
    return _Passes(resolved, value, contributions, activations, shares, found["layers"].components)


def _target_readout(target: Target) -> tuple[str, int | None]:
    """The readout a stage pass reads for ``target`` and, for one logit at the last position, its token (read as
    ``attribute``'s target, through the head's row); otherwise ``None``: the whole readout is read.  Every position
    is read: a pass read at the last position only would not split the positions of the last MLP stage."""
    if target.readout == "logits" and target.token >= 0:
        one = torch.zeros_like(target.weights)
        one[-1, target.token] = 1.0
        if torch.equal(target.weights, one):
            return "logits", target.token
    return target.readout, None


def _chunks(decomposed: DecomposedModel, where: Locations, ids: torch.Tensor, kind: str) -> list[tuple[int, int]]:
    """``(first layer, count)`` of each batch of ``kind`` stages (Note [Stages in a batch]): about
    :data:`BATCH_COMPONENTS` components a pass, one stage a pass where the values have no batch axis."""
    layers = len(where.blocks)
    stages = [_Stage(kind, layer) for layer in range(layers)]
    if any(_batch_axis(where, s.node(where)) is None for s in stages):
        size = 1
    else:
        components = (where.num_heads if kind == "attention" else 1) * ids.shape[1] + 1
        size = max(1, BATCH_COMPONENTS // components)
    return [(first, min(size, layers - first)) for first in range(0, layers, size)]


def _assemble(decomposed: DecomposedModel, ids: torch.Tensor, heads: int, stages: list[_Stage | None], passes: _Passes,
              node_threshold: float, edge_threshold: float) -> nx.DiGraph:
    """The weight matrix ``[source, target]`` of all nodes (the target last), pruned, as a ``networkx.DiGraph``."""
    texts = token_texts(ids, decomposed.tokenizer)
    described = [_stage_nodes(stage, number, texts, heads) for number, stage in enumerate(stages)]
    blocks, start = [], 0
    for nodes in described:
        blocks.append(slice(start, start + len(nodes)))
        start += len(nodes)
    count = start + 1
    contributions, target, value = passes.contributions, passes.target, passes.value
    weights = contributions[0].new_zeros(count, count)
    influence = weights.new_zeros(count)
    for block, c in zip(blocks, contributions):
        influence[block] = c[:-1].abs()
        weights[block, -1] = c[:-1]
    for (k, t), share in passes.shares.items():
        weights[blocks[k], blocks[t]] = share[:-1] * contributions[t][:-1]
    fixed = torch.zeros(count, dtype=torch.bool, device=weights.device)
    fixed[blocks[0]] = True
    fixed[-1] = True
    kept, edges = _prune(weights, influence, fixed, node_threshold, edge_threshold)

    internal = ~fixed
    cumulative = torch.zeros_like(influence)
    cumulative[internal] = _cumulative(influence[internal])
    cumulative[blocks[0]] = _cumulative(influence[blocks[0]])
    names = [name for nodes in described for name, _ in nodes] + ["target"]
    attributes = [a for nodes in described for _, a in nodes]
    activation = torch.cat(passes.activations)
    signed = torch.cat([c[:-1] for c in contributions])
    graph = nx.DiGraph()
    for i in kept.nonzero().flatten().tolist():
        if i == count - 1:
            graph.add_node("target", **_node("target", len(stages) // 2, len(texts) - 1, target.text, target.token,
                                             len(stages), target.label), contribution=value, activation=value, influence=0.0)
        else:
            graph.add_node(names[i], **attributes[i], contribution=float(signed[i]), activation=float(activation[i]),
                           influence=float(cumulative[i]))
    for s, t in edges.nonzero().tolist():
        graph.add_edge(names[s], names[t], weight=float(weights[s, t]))

    stage_rows = []
    for stage, block, c in zip(stages, blocks, contributions):
        carried = float((weights[block, -1] * edges[block, -1]).sum())
        stage_rows.append({"stage": "tokens" if stage is None else f"layer {stage.layer} {stage.kind}",
                           "kept": carried, "pruned": float(c[:-1].sum()) - carried, "rest": float(c[-1])})
    pruned = sum(row["pruned"] for row in stage_rows)
    all_influence = float(influence[internal].sum())
    graph.graph.update(
        prompt=_prompt(ids, decomposed.tokenizer, texts), prompt_tokens=texts, input_ids=ids[0].tolist(),
        model=type(decomposed.model).__name__, readout=target.readout, target=target.label, target_token=target.token,
        probability=target.probability, value=value, node_threshold=node_threshold, edge_threshold=edge_threshold,
        heads=heads, stages=stage_rows,
        explained_fraction=1.0 - pruned / (len(stage_rows) * value) if value else 0.0,
        influence_fraction=float(influence[internal & kept].sum()) / all_influence if all_influence else 0.0,
        **layer_scores(decomposed, ids, target, passes.layer_parts),
    )
    return graph


def layer_scores(decomposed: DecomposedModel, ids: torch.Tensor, target: Target,
                 parts: torch.Tensor | None = None) -> dict[str, list]:
    """The report's tokens × layers heatmap: ``layer_scores[ℓ][q]`` is token q's share of the target as it stands
    in the residual stream after layer ℓ (row 0: entering layer 0).

    For a logit target it is :func:`fxdepass.layer_lens`'s table — the stream read through the final norm with its
    real (frozen) scale and the head, as the last block's output is read — so the last row *is* the tokens'
    contributions (tests/test_report.py).  An encoder's target (an embedding's length or cosine) has no lens: its
    rows are the token seed's ``"layers"`` components ``parts`` (``[L+1, N+1, 1, N, D]``) projected on the target's
    ``direction`` and weighted over its ``positions``.

    >>> layer_scores(decomposed, ids, resolve_target(decomposed, logits, None))["layer_labels"][:2]  # doctest: +SKIP
    ['embeddings', 'after layer 0']
    """
    if target.readout == "logits":
        lens = layer_lens(decomposed, ids, targets=target.token)
        return {"layer_scores": lens.table()[:, :-1].tolist(), "layer_labels": lens.layer_labels,
                "layer_meaning": "lens"}
    tokens = parts[:, :-1, 0]                                                   # [L+1, N tokens, N positions, D]
    along = tokens.norm(dim=-1) if target.direction is None else tokens @ target.direction.to(tokens.dtype)
    scores = (along * target.positions.to(tokens.dtype)).sum(-1)
    labels = ["embeddings"] + [f"after layer {layer}" for layer in range(len(parts) - 1)]
    return {"layer_scores": scores.tolist(), "layer_labels": labels, "layer_meaning": "projection"}


def seed_activations(decomposed: DecomposedModel, input_ids: Any, seed: Seed) -> torch.Tensor:
    """Each component's activation as docs/graph-format.md defines it: the norm of the component where ``seed``
    splits it, at its position (a token's at its own, others' at the last), over all of the seed's points.

    >>> seed_activations(decomposed, ids, fxdepass.tokens())      # the embeddings' norms  # doctest: +SKIP
    """
    ids = _one_prompt(decomposed, input_ids)
    where = decomposed.locations_for(decomposed.prompt_inputs(ids))
    points = seed.points(where)
    length = ids.shape[1]
    squares = 0.0
    for _, parts in decomposed.decompose_nodes(ids, seed, [p.node for p in points]):
        squares = squares + parts[:-1].reshape(len(parts) - 1, length, -1).square().sum(-1)   # [M, N]
    positions = [_seed_component(seed, index, length - 1)[1] for index in range(len(squares))]
    return squares[torch.arange(len(squares), device=squares.device), torch.tensor(positions, device=squares.device)].sqrt()


# -- the graph of one seed's attribution ------------------------------------------------------------------------


def seed_graph(attribution: Attribution, seed: Seed, target: Target, *, layers: int, tokenizer: Any = None,
               model_name: str = "", activations: torch.Tensor, heatmap: dict[str, list] | None = None) -> nx.DiGraph:
    """One decomposed pass as a graph: a node per component of ``seed`` and an edge from each to the
    ``target`` (weight: its share of the target), with the same attributes as :func:`build_graph`'s nodes.

    ``layers`` (the model's number of blocks) resolves negative layer indices; components without a position
    (heads, neurons, modules) sit at the last position.  Nothing is pruned; rest is the graph attribute
    ``rest``.  ``activations`` (:func:`seed_activations`) are the nodes' ``activation``;
    ``heatmap`` (:func:`layer_scores`, for a token seed) adds the report's tokens × layers view.

    >>> att = decomposed.attribute(ids, seed=fxdepass.heads(1))                            # doctest: +SKIP
    >>> seed_graph(att, fxdepass.heads(1), resolve_target(decomposed, att.total[0], None), layers=2,
    ...            activations=seed_activations(decomposed, ids, fxdepass.heads(1)))                  # doctest: +SKIP
    """
    scores = target.of(attribution.components[:, 0])
    ids = attribution.input_ids[:1]
    texts = token_texts(ids, tokenizer)
    last = len(texts) - 1
    layer = seed.layer % layers if hasattr(seed, "layer") else -1
    graph = nx.DiGraph()
    cumulative = _cumulative(scores[:-1].abs())
    for index, label in enumerate(attribution.labels[:-1]):
        kind, position, node_index = _seed_component(seed, index, last)
        graph.add_node(f"c{index}", **_node(kind, layer, position, texts[position], node_index, 0, label),
                       contribution=float(scores[index]), influence=float(cumulative[index]),
                       activation=float(activations[index]))
        graph.add_edge(f"c{index}", "target", weight=float(scores[index]))
    value = float(scores.sum())
    graph.add_node("target", **_node("target", layers, last, target.text, target.token, 1, target.label),
                   contribution=value, activation=value, influence=0.0)
    graph.graph.update(prompt=_prompt(ids, tokenizer, texts), prompt_tokens=texts, input_ids=ids[0].tolist(),
                       model=model_name, readout=target.readout, target=target.label, target_token=target.token,
                       probability=target.probability, value=value, rest=float(scores[-1]), node_threshold=1.0,
                       edge_threshold=1.0, explained_fraction=1.0)
    if heatmap is not None:
        graph.graph.update(heatmap)
    return graph


def _seed_component(seed: Seed, index: int, position: int) -> tuple[str, int, int]:
    """(kind, position, index) of component ``index`` of ``seed`` (the index of a head, or of the component
    among neurons and groups); components without a position of their own sit at ``position``."""
    if isinstance(seed, Tokens):
        if seed.groups is None:
            return "token", index, -1
        return "group", position, index
    if isinstance(seed, Heads):
        return "head", position, index
    if isinstance(seed, Neurons):
        return "neuron", position, index
    if isinstance(seed, Modules):
        return ("attention", "mlp")[index], position, -1
    return "component", position, index
