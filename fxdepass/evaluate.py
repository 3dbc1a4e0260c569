"""Faithfulness evaluation: do the tokens, heads and neurons an attribution ranks highest matter?

Token level (the paper's evaluation).  For k% of a prompt's *eligible* tokens (all but the first and
the last), ``patch_top`` deletes the k% a method ranks highest — comprehensiveness: a faithful ranking
changes the prediction a lot — and ``recover_top`` keeps only them plus the first and last tokens —
sufficiency: a faithful ranking changes it little.  Each is scored
``min(100, |p_clean − p_after| / p_clean × 100)``, ``p`` the target token's probability at the last
position, and averaged over k ∈ {10, 20, …, 100}%.  The AOPC areas average the signed drop
``p_clean − p_after`` over the same k.  Where the decisive positions of a prompt are known, the top-1 /
top-3 hit rates say how often one of them is ranked first / among the first three eligible tokens.

Component level.  On prompts the model answers correctly, each prompt's top-p% heads (input columns of
the attention output projection) or neurons (input columns of the MLP down projection), ranked over all
layers, are zeroed with :func:`fxdepass.ablate`; accuracy (argmax = target) after masking is reported
for the most important (lower is better) and, mirrored, the least important (higher is better).

A method is a callable ``Prompt → scores`` (higher: more important): one score per position for
tokens, ``{"heads": [layers, heads], "neurons": [layers, neurons]}`` for components.
:func:`token_methods` and :func:`component_methods` build the standard sets; captum is imported only
when integrated gradients run.

>>> decomposed = {a: fxdepass.compile(model, activation=a) for a in ACTIVATIONS}      # doctest: +SKIP
>>> results = evaluate_tokens(model, prompts, token_methods(model, decomposed))        # doctest: +SKIP
>>> results["DePass softmax"].comprehensiveness                                         # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .ablation import ablate, locate
from .api import DecomposedModel
from .errors import InvalidInputError
from .locations import module_path
from .seeds import Seed, heads, neurons, tokens

__all__ = [
    "PERCENTS", "MASK_PERCENTS", "ACTIVATIONS", "Prompt", "TokenResult", "ComponentResult",
    "ranking", "count", "patch_top", "recover_top", "change", "target_probabilities", "answered",
    "depass_tokens", "integrated_gradients", "input_x_gradient", "gradient_norm", "attention_last_layer",
    "attention_all_layers", "attention_rollout", "random_tokens", "token_methods",
    "depass_components", "attribution_patching", "activation_magnitude", "weight_activation",
    "random_components", "component_methods", "evaluate_tokens", "evaluate_components",
]

#: k of the token-removal curves, in percent of the eligible tokens
PERCENTS = tuple(range(10, 101, 10))
#: p of the masking study, in percent of all heads or all neurons
MASK_PERCENTS = (1, 2, 5, 10)
#: DePass's activation allocation rules
ACTIVATIONS = ("softmax", "linear", "max")

TokenMethod = Callable[["Prompt"], torch.Tensor]
ComponentMethod = Callable[["Prompt"], dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: token ids ``[N]`` (first token included), the ``target`` token expected next,
    and the positions of the tokens known to decide it (ground truth; empty when unknown).

    >>> Prompt(torch.tensor([1, 7, 8, 9]), target=8, decisive=(2,)).target
    8
    """

    ids: torch.Tensor
    target: int
    decisive: tuple[int, ...] = ()


# -- token-level metrics ------------------------------------------------------------------------


def ranking(scores: torch.Tensor) -> list[int]:
    """Eligible positions (all but the first and the last) from most to least important; ties keep
    position order.

    >>> ranking(torch.tensor([9.0, 1.0, 3.0, 2.0, 9.0]))
    [2, 3, 1]
    """
    if len(scores) < 3:
        raise InvalidInputError(f"a prompt of {len(scores)} tokens has no eligible token (first and last are excluded)")
    return (torch.argsort(scores[1:-1], descending=True, stable=True) + 1).tolist()


def count(percent: int, total: int) -> int:
    """How many of ``total`` items ``percent``% selects, rounded up (every percentage selects one at least).

    >>> count(10, 18), count(5, 8), count(100, 7)
    (2, 1, 7)
    """
    return -(-percent * total // 100)


def patch_top(ids: torch.Tensor, chosen: Sequence[int]) -> torch.Tensor:
    """``ids`` without the positions ``chosen`` (comprehensiveness).

    >>> patch_top(torch.tensor([1, 5, 6, 7, 9]), [3, 1]).tolist()
    [1, 6, 9]
    """
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[list(chosen)] = False
    return ids[keep]


def recover_top(ids: torch.Tensor, chosen: Sequence[int]) -> torch.Tensor:
    """The first token, the positions ``chosen`` in prompt order, the last token (sufficiency).

    >>> recover_top(torch.tensor([1, 5, 6, 7, 9]), [3, 1]).tolist()
    [1, 5, 7, 9]
    """
    return ids[sorted({0, len(ids) - 1, *chosen})]


def change(p_clean: float, p_after: float) -> float:
    """``min(100, |p_clean − p_after| / p_clean × 100)``: the score of one removal.

    >>> change(0.5, 0.125), change(0.25, 1.0)
    (75.0, 100.0)
    """
    return min(100.0, abs(p_clean - p_after) / p_clean * 100.0)


@torch.no_grad()
def target_probabilities(model: torch.nn.Module, sequences: Sequence[torch.Tensor], target: int,
                         batch: int = 256) -> torch.Tensor:
    """The probability of ``target`` after each sequence, in right-padded batches (causal attention and the
    mask keep the padding out of every real position)."""
    probabilities = []
    for start in range(0, len(sequences), batch):
        chunk = sequences[start:start + batch]
        lengths = torch.tensor([len(s) for s in chunk])
        ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(chunk):
            ids[row, :len(sequence)], mask[row, :len(sequence)] = sequence, 1
        logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(chunk)), lengths - 1]
        probabilities.append(logits.float().softmax(-1)[:, target])
    return torch.cat(probabilities)


@torch.no_grad()
def _predicts(model: torch.nn.Module, prompt: Prompt) -> bool:
    """Whether the model's argmax after the prompt is the target."""
    return int(model(input_ids=prompt.ids.unsqueeze(0)).logits[0, -1].argmax()) == prompt.target


def answered(model: torch.nn.Module, prompts: Sequence[Prompt]) -> list[Prompt]:
    """The prompts the model answers correctly (argmax over the whole vocabulary)."""
    return [p for p in prompts if _predicts(model, p)]


# -- token-level methods ------------------------------------------------------------------------


def depass_tokens(decomposed: DecomposedModel, sink: bool = True) -> TokenMethod:
    """DePass token contributions to the target logit (``sink``: SPEC §2's sink-token option)."""
    seed = tokens(sink=sink)

    def scores(prompt: Prompt) -> torch.Tensor:
        attribution = decomposed.attribute(prompt.ids.unsqueeze(0), seed=seed, targets=[prompt.target])
        return attribution.scores(prompt.target)[:-1].float()  # without rest

    return scores


def _log_probability(model: torch.nn.Module, embeddings: torch.Tensor, target: int) -> torch.Tensor:
    """``[batch]`` log-probabilities of ``target`` at the last position, from input embeddings."""
    return model(inputs_embeds=embeddings).logits[:, -1].float().log_softmax(-1)[:, target]


def _embeddings(model: torch.nn.Module, prompt: Prompt) -> torch.Tensor:
    """``[1, N, d]`` input embeddings of the prompt, a leaf that records gradients."""
    return model.get_input_embeddings()(prompt.ids.unsqueeze(0)).detach().requires_grad_(True)


def _embedding_gradient(model: torch.nn.Module, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[N, d]`` and the gradient of the target log-probability with respect to them."""
    embeddings = _embeddings(model, prompt)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(_log_probability(model, embeddings, prompt.target).sum(), embeddings)
    return embeddings[0].detach(), gradient[0]


def integrated_gradients(model: torch.nn.Module, steps: int = 50) -> TokenMethod:
    """Integrated gradients (captum) of the target log-probability from a zero-embedding baseline,
    summed over the embedding dimensions."""

    def scores(prompt: Prompt) -> torch.Tensor:
        from captum.attr import IntegratedGradients  # optional dependency: only this method needs it

        embeddings = _embeddings(model, prompt)
        method = IntegratedGradients(lambda e, target: _log_probability(model, e, target))
        with torch.enable_grad():
            attributions = method.attribute(embeddings, baselines=torch.zeros_like(embeddings), n_steps=steps,
                                            additional_forward_args=(prompt.target,), internal_batch_size=steps)
        return attributions[0].sum(-1).detach().float()

    return scores


def input_x_gradient(model: torch.nn.Module) -> TokenMethod:
    """Embedding · gradient of the target log-probability, per token."""

    def scores(prompt: Prompt) -> torch.Tensor:
        embeddings, gradient = _embedding_gradient(model, prompt)
        return (embeddings * gradient).sum(-1).float()

    return scores


def gradient_norm(model: torch.nn.Module) -> TokenMethod:
    """L2 norm of the gradient of the target log-probability with respect to each token's embedding."""

    def scores(prompt: Prompt) -> torch.Tensor:
        return _embedding_gradient(model, prompt)[1].norm(dim=-1).float()

    return scores


@torch.no_grad()
def _attention_maps(model: torch.nn.Module, prompt: Prompt) -> torch.Tensor:
    """``[layers, heads, N, N]`` attention probabilities (the model must run eager attention)."""
    maps = model(input_ids=prompt.ids.unsqueeze(0), output_attentions=True).attentions
    if not maps:
        raise InvalidInputError("attention methods need the attention probabilities: load the model with "
                                "attn_implementation='eager'")
    return torch.stack([m[0] for m in maps]).float()


def attention_last_layer(model: torch.nn.Module) -> TokenMethod:
    """Attention of the last position to each token in the last layer, mean over heads."""
    return lambda prompt: _attention_maps(model, prompt)[-1].mean(0)[-1]


def attention_all_layers(model: torch.nn.Module) -> TokenMethod:
    """Attention of the last position to each token, mean over layers and heads."""
    return lambda prompt: _attention_maps(model, prompt).mean((0, 1))[-1]


def attention_rollout(model: torch.nn.Module) -> TokenMethod:
    """Attention rollout (Abnar & Zuidema 2020): per layer ``½(mean over heads) + ½I`` renormalised,
    multiplied from the first layer to the last; the last position's row."""

    def scores(prompt: Prompt) -> torch.Tensor:
        maps = _attention_maps(model, prompt).mean(1)
        identity = torch.eye(maps.shape[-1])
        rollout = identity
        for layer in maps:
            mixed = 0.5 * layer + 0.5 * identity  # the residual connection carries half of each position
            rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
        return rollout[-1]

    return scores


def random_tokens(seed: int = 0) -> TokenMethod:
    """Uniform random scores (deterministic in ``seed`` and the order of calls)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda prompt: torch.rand(len(prompt.ids), generator=generator)


def token_methods(model: torch.nn.Module, decomposed: Mapping[str, DecomposedModel], *, ig_steps: int = 50,
                  seed: int = 0) -> dict[str, TokenMethod]:
    """DePass for each compiled activation rule in ``decomposed`` (with and without the sink option), then
    the baselines.

    >>> list(token_methods(model, {"softmax": decomposed}))                      # doctest: +SKIP
    ['DePass softmax', 'DePass softmax, no sink', 'integrated gradients', 'input×gradient', ...]
    """
    methods: dict[str, TokenMethod] = {}
    for activation, compiled in decomposed.items():
        methods[f"DePass {activation}"] = depass_tokens(compiled, sink=True)
        methods[f"DePass {activation}, no sink"] = depass_tokens(compiled, sink=False)
    methods.update({
        "integrated gradients": integrated_gradients(model, ig_steps),
        "input×gradient": input_x_gradient(model),
        "gradient norm": gradient_norm(model),
        "attention, last layer": attention_last_layer(model),
        "attention, all layers": attention_all_layers(model),
        "attention rollout": attention_rollout(model),
        "random": random_tokens(seed),
    })
    return methods


# -- component-level methods --------------------------------------------------------------------


def _projections(model: torch.nn.Module | DecomposedModel) -> tuple[dict[str, list[torch.nn.Module]], int]:
    """Each layer's attention output projection (``"heads"``) and MLP down projection (``"neurons"``)
    modules — the places :func:`fxdepass.ablate` zeroes — and the number of heads."""
    root, where = locate(model)
    layers = range(len(where.blocks))
    nodes = {"heads": [where.output_projection(l) for l in layers],
             "neurons": [where.down_projection(l) for l in layers]}
    return {kind: [root.get_submodule(module_path(n)) for n in found] for kind, found in nodes.items()}, where.num_heads


@contextlib.contextmanager
def _inputs_of(modules: Sequence[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Within the context, the list fills with the inputs of ``modules`` as they run."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda module, args: seen.append(args[0])) for m in modules]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _per_head(values: torch.Tensor, count: int) -> torch.Tensor:
    """``[..., heads × head_dim]`` → ``[..., heads, head_dim]``."""
    return values.unflatten(-1, (count, -1))


def depass_components(decomposed: DecomposedModel) -> ComponentMethod:
    """DePass head and neuron contributions to the target logit at the last position, every layer."""
    layers = range(len(locate(decomposed)[1].blocks))

    def scores(prompt: Prompt) -> dict[str, torch.Tensor]:
        ids = prompt.ids.unsqueeze(0)

        def layer_scores(seed: Seed) -> torch.Tensor:
            attribution = decomposed.attribute(ids, seed=seed, targets=[prompt.target])
            return attribution.scores(prompt.target)[:-1].float()

        return {"heads": torch.stack([layer_scores(heads(l)) for l in layers]),
                "neurons": torch.stack([layer_scores(neurons(l)) for l in layers])}

    return scores


def attribution_patching(model: torch.nn.Module) -> ComponentMethod:
    """|activation × gradient| of the target log-probability (the first-order estimate of zeroing the
    component), summed over positions and the component's features."""
    modules, count = _projections(model)

    def scores(prompt: Prompt) -> dict[str, torch.Tensor]:
        with _inputs_of(modules["heads"]) as attention, _inputs_of(modules["neurons"]) as mlp, torch.enable_grad():
            log_probability = _log_probability(model, _embeddings(model, prompt), prompt.target).sum()
            gradients = torch.autograd.grad(log_probability, attention + mlp)
        effects = [(a * g)[0].detach().sum(0).float() for a, g in zip(attention + mlp, gradients)]
        return {"heads": torch.stack([_per_head(e, count).sum(-1) for e in effects[:len(attention)]]).abs(),
                "neurons": torch.stack(effects[len(attention):]).abs()}

    return scores


@torch.no_grad()
def _activation_norms(model: torch.nn.Module, modules: Mapping[str, list[torch.nn.Module]], count: int,
                      prompt: Prompt) -> dict[str, torch.Tensor]:
    """L2 norm of each head's / neuron's activation over all positions, ``[layers, components]``."""
    with _inputs_of(modules["heads"]) as attention, _inputs_of(modules["neurons"]) as mlp:
        model(input_ids=prompt.ids.unsqueeze(0))
    return {"heads": torch.stack([_per_head(a[0].float(), count).pow(2).sum((0, 2)).sqrt() for a in attention]),
            "neurons": torch.stack([a[0].float().norm(dim=0) for a in mlp])}


def activation_magnitude(model: torch.nn.Module) -> ComponentMethod:
    """The L2 norm of each head's output (before the output projection) and each neuron's activation."""
    modules, count = _projections(model)
    return lambda prompt: _activation_norms(model, modules, count, prompt)


def weight_activation(model: torch.nn.Module) -> ComponentMethod:
    """Activation norm times the norm of the component's columns of the projection weight (how large a
    write into the residual stream the activation can make)."""
    modules, count = _projections(model)
    with torch.no_grad():
        weights = {"heads": torch.stack([_per_head(m.weight.float(), count).pow(2).sum((0, 2)).sqrt()
                                         for m in modules["heads"]]),
                   "neurons": torch.stack([m.weight.float().norm(dim=0) for m in modules["neurons"]])}

    def scores(prompt: Prompt) -> dict[str, torch.Tensor]:
        norms = _activation_norms(model, modules, count, prompt)
        return {kind: norms[kind] * weights[kind] for kind in norms}

    return scores


def random_components(model: torch.nn.Module, seed: int = 0) -> ComponentMethod:
    """Uniform random scores (deterministic in ``seed`` and the order of calls)."""
    modules, count = _projections(model)
    shapes = {"heads": (len(modules["heads"]), count),
              "neurons": (len(modules["neurons"]), modules["neurons"][0].weight.shape[1])}
    generator = torch.Generator().manual_seed(seed)
    return lambda prompt: {kind: torch.rand(shape, generator=generator) for kind, shape in shapes.items()}


def component_methods(model: torch.nn.Module, decomposed: DecomposedModel, *,
                      seed: int = 0) -> dict[str, ComponentMethod]:
    """DePass (the compiled ``decomposed``) and the baselines, by name."""
    return {
        "DePass": depass_components(decomposed),
        "attribution patching": attribution_patching(model),
        "activation magnitude": activation_magnitude(model),
        "weight norm × activation": weight_activation(model),
        "random": random_components(model, seed),
    }


# -- evaluation ---------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclasses.dataclass
class TokenResult:
    """One token-level method over a set of prompts; curves are indexed like ``percents``."""

    percents: tuple[int, ...]
    #: mean ``change`` after ``patch_top`` at each k (higher is better)
    comprehensiveness_curve: list[float]
    #: mean ``change`` after ``recover_top`` at each k (lower is better)
    sufficiency_curve: list[float]
    #: mean over k of ``p_clean − p_after`` after ``patch_top`` (higher is better)
    aopc_comprehensiveness: float
    #: mean over k of ``p_clean − p_after`` after ``recover_top`` (lower is better)
    aopc_sufficiency: float
    #: share of prompts whose top-ranked eligible token is decisive (``None`` without ground truth)
    top1: float | None
    #: share of prompts with a decisive token among the top three eligible ones
    top3: float | None
    #: wall time spent computing the method's scores
    seconds: float
    prompts: int

    @property
    def comprehensiveness(self) -> float:
        """The comprehensiveness score: the curve's mean over k."""
        return _mean(self.comprehensiveness_curve)

    @property
    def sufficiency(self) -> float:
        """The sufficiency score: the curve's mean over k."""
        return _mean(self.sufficiency_curve)


def evaluate_tokens(model: torch.nn.Module, prompts: Sequence[Prompt], methods: Mapping[str, TokenMethod],
                    percents: Sequence[int] = PERCENTS) -> dict[str, TokenResult]:
    """Score every token-level method on ``prompts`` (see the module docstring for the metrics).

    >>> results = evaluate_tokens(model, prompts, {"random": random_tokens()})          # doctest: +SKIP
    >>> results["random"].sufficiency                                                 # doctest: +SKIP
    """
    if not prompts:
        raise InvalidInputError("evaluate_tokens() needs at least one prompt")
    seconds = dict.fromkeys(methods, 0.0)
    comprehensive = {name: [] for name in methods}    # per prompt: change at each k
    sufficient = {name: [] for name in methods}
    drops = {name: ([], []) for name in methods}      # per prompt: mean p_clean − p_after (patch, recover)
    hits = {name: ([], []) for name in methods}       # per prompt: top-1, top-3 hit
    for prompt in prompts:
        orders = {}
        for name, method in methods.items():
            started = time.perf_counter()
            orders[name] = ranking(method(prompt))
            seconds[name] += time.perf_counter() - started
        tops = {name: [order[:count(k, len(order))] for k in percents] for name, order in orders.items()}
        plans = {name: [(patch_top(prompt.ids, top), recover_top(prompt.ids, top)) for top in chosen]
                 for name, chosen in tops.items()}
        # Methods often agree on a subset: each distinct sequence runs once.
        distinct = {tuple(s.tolist()): s for pairs in plans.values() for pair in pairs for s in pair}
        index = {key: i + 1 for i, key in enumerate(distinct)}
        probabilities = target_probabilities(model, [prompt.ids, *distinct.values()], prompt.target).tolist()
        clean = probabilities[0]
        for name, pairs in plans.items():
            patched = [probabilities[index[tuple(p.tolist())]] for p, _ in pairs]
            recovered = [probabilities[index[tuple(r.tolist())]] for _, r in pairs]
            comprehensive[name].append([change(clean, p) for p in patched])
            sufficient[name].append([change(clean, p) for p in recovered])
            drops[name][0].append(_mean([clean - p for p in patched]))
            drops[name][1].append(_mean([clean - p for p in recovered]))
            if prompt.decisive:
                hits[name][0].append(orders[name][0] in prompt.decisive)
                hits[name][1].append(any(p in prompt.decisive for p in orders[name][:3]))
    return {
        name: TokenResult(
            percents=tuple(percents),
            comprehensiveness_curve=[_mean(column) for column in zip(*comprehensive[name])],
            sufficiency_curve=[_mean(column) for column in zip(*sufficient[name])],
            aopc_comprehensiveness=_mean(drops[name][0]),
            aopc_sufficiency=_mean(drops[name][1]),
            top1=_mean(hits[name][0]) if hits[name][0] else None,
            top3=_mean(hits[name][1]) if hits[name][1] else None,
            seconds=seconds[name],
            prompts=len(prompts),
        )
        for name in methods
    }


@dataclasses.dataclass
class ComponentResult:
    """One component-level method and kind (heads or neurons) over the prompts the model answers."""

    #: accuracy after zeroing each prompt's top-p% components, by p (lower is better)
    most: dict[int, float]
    #: accuracy after zeroing each prompt's bottom-p% components, by p (higher is better)
    least: dict[int, float]
    #: how many components p% zeroes
    counts: dict[int, int]
    #: wall time spent computing the method's scores (heads and neurons together)
    seconds: float
    prompts: int


def _by_layer(chosen: torch.Tensor, width: int) -> dict[int, list[int]]:
    """Flat indices over ``[layers, width]`` → ``{layer: [indices]}`` for :func:`fxdepass.ablate`.

    >>> _by_layer(torch.tensor([5, 0, 3]), 4)
    {1: [1], 0: [0, 3]}
    """
    layers: dict[int, list[int]] = {}
    for flat in chosen.tolist():
        layers.setdefault(flat // width, []).append(flat % width)
    return layers


def evaluate_components(model: torch.nn.Module, prompts: Sequence[Prompt], methods: Mapping[str, ComponentMethod],
                        percents: Sequence[int] = MASK_PERCENTS) -> dict[str, dict[str, ComponentResult]]:
    """Masking study: ``{"heads" | "neurons": {method: result}}``.  ``prompts`` should be ones the model
    answers correctly (:func:`answered`), so that accuracy starts at 1.

    >>> kept = answered(model, prompts)                                                    # doctest: +SKIP
    >>> results = evaluate_components(model, kept, component_methods(model, decomposed))   # doctest: +SKIP
    >>> results["heads"]["DePass"].most[5]   # accuracy, each prompt's top 5% heads zeroed  # doctest: +SKIP
    """
    if not prompts:
        raise InvalidInputError("evaluate_components() needs at least one prompt")
    seconds = dict.fromkeys(methods, 0.0)
    correct: dict[tuple[str, str, bool, int], list[bool]] = {}
    counts: dict[str, dict[int, int]] = {}         # kind → p → how many components p% zeroes
    for prompt in prompts:
        masked: dict[tuple[str, tuple[int, ...]], bool] = {}   # the same mask on the same prompt runs once
        for name, method in methods.items():
            started = time.perf_counter()
            scores = method(prompt)
            seconds[name] += time.perf_counter() - started
            for kind, values in scores.items():
                order = torch.argsort(values.flatten(), descending=True, stable=True)
                counts.setdefault(kind, {p: count(p, len(order)) for p in percents})
                for most in (True, False):
                    ranked = order if most else order.flip(0)
                    for p in percents:
                        chosen = ranked[:counts[kind][p]]
                        key = (kind, tuple(sorted(chosen.tolist())))
                        if key not in masked:
                            with ablate(model, **{kind: _by_layer(chosen, values.shape[-1])}):
                                masked[key] = _predicts(model, prompt)
                        correct.setdefault((kind, name, most, p), []).append(masked[key])
    return {
        kind: {
            name: ComponentResult(
                most={p: _mean(correct[(kind, name, True, p)]) for p in percents},
                least={p: _mean(correct[(kind, name, False, p)]) for p in percents},
                counts=counts[kind], seconds=seconds[name], prompts=len(prompts),
            )
            for name in methods
        }
        for kind in counts
    }
