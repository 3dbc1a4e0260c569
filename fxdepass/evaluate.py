"""Faithfulness evaluation: do the tokens and heads an attribution ranks highest matter, beyond the noise?

Token level (the paper's evaluation, then measures that do not saturate).  For k% of a prompt's
*eligible* tokens (all but the first and the last), ``patch_top`` deletes the k% a method ranks highest
— comprehensiveness: a faithful ranking changes the prediction a lot — and ``recover_top`` keeps only
them plus the first and last tokens — sufficiency: a faithful ranking changes it little.  Each is scored
``min(100, |p_clean − p_after| / p_clean × 100)``, ``p`` the target token's probability at the last
position, and averaged over k ∈ {10, 20, …, 100}%; the AOPC areas average the signed drop
``p_clean − p_after`` over the same k.  On short prompts 10% is already one token and most curves sit
near 100, so :data:`TOP_COUNTS` adds *deletion* (drop in ``p`` and in the logit difference
``z_target − z_foil`` when the top 1 / 2 / 3 tokens are deleted) and *insertion* (``p`` and the logit
difference when only they are kept, with the first and last tokens).  Where the decisive positions are
known, the top-1 / top-3 hit rates say how often one of them is ranked first / among the first three.

Component level.  Each prompt's top-p% heads (input columns of the attention output projection) or
neurons (input columns of the MLP down projection), ranked over all layers, are zeroed; accuracy
(argmax = target) and the drop of the logit difference are measured for the most important, and
accuracy for the least important (the mirror).  Every masked run of one prompt goes in one batch, each
row with its own mask (:func:`masked_predictions`, the same zeroing as :func:`fxdepass.ablate`).

Every measure is kept per prompt, so that :func:`interval` gives a bootstrap confidence interval over
prompts and :func:`versus` a paired one for the difference of two methods: a difference whose interval
holds 0 is not a win.

A token method is a callable ``Prompt → scores`` (higher: more important, one score per position); a
component method maps a list of prompts to one ``{"heads": [layers, heads], "neurons": [layers, neurons]}``
per prompt (DePass batches them).  :func:`token_methods` and :func:`component_methods` build the
standard sets, one DePass method per target kind (:data:`TARGET_KINDS`) for each compiled model; captum
is imported only when integrated gradients run.

>>> variants = {"DePass": fxdepass.compile(model)}                                      # doctest: +SKIP
>>> results = evaluate_tokens(model, prompts, token_methods(model, variants))           # doctest: +SKIP
>>> results["DePass log-prob"].mean("deletion Δp, top 1"), results["random"].interval("top-1 hit")  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .ablation import locate
from .api import DecomposedModel
from .errors import InvalidInputError
from .locations import module_path
from .seeds import Seed, heads, neurons, tokens
from .targets import as_target, diff, logprob

__all__ = [
    "PERCENTS", "TOP_COUNTS", "MASK_PERCENTS", "TARGET_KINDS", "RESAMPLES", "TOKEN_MEASURES", "Prompt", "Result",
    "depass_variants",
    "ranking", "count", "patch_top", "recover_top", "change", "predictions", "with_foils", "answered", "target_of",
    "interval", "versus", "masked_predictions",
    "depass_tokens", "integrated_gradients", "input_x_gradient", "gradient_norm", "attention_last_layer",
    "attention_all_layers", "attention_rollout", "random_tokens", "token_methods",
    "depass_components", "attribution_patching", "activation_magnitude", "weight_activation",
    "random_components", "component_methods", "component_measures", "evaluate_tokens", "evaluate_components",
]

#: k of the token-removal curves, in percent of the eligible tokens
PERCENTS = tuple(range(10, 101, 10))
#: how many top tokens the deletion and insertion measures delete / keep
TOP_COUNTS = (1, 2, 3)
#: p of the masking study, in percent of all heads or all neurons
MASK_PERCENTS = (1, 2, 5, 10)
#: what a DePass method explains (:func:`target_of`): the answer's logit (the paper's), its log-probability
#: with the softmax normaliser frozen, and the logit difference answer − foil
TARGET_KINDS = ("logit", "log-prob", "contrastive")
#: bootstrap resamples of :func:`interval` and :func:`versus`
RESAMPLES = 2000

TokenMethod = Callable[["Prompt"], torch.Tensor]
ComponentMethod = Callable[[Sequence["Prompt"]], list[dict[str, torch.Tensor]]]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: token ids ``[N]`` (first token included), the ``target`` token expected next,
    the positions of the tokens known to decide it (ground truth; empty when unknown), and the ``foil``
    the logit difference is taken against (``None``: the model's runner-up, filled by :func:`with_foils`).

    >>> Prompt(torch.tensor([1, 7, 8, 9]), target=8, decisive=(2,), foil=7).foil
    7
    """

    ids: torch.Tensor
    target: int
    decisive: tuple[int, ...] = ()
    foil: int | None = None


# -- measures on one prompt -----------------------------------------------------------------------


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
    """``ids`` without the positions ``chosen`` (comprehensiveness, deletion).

    >>> patch_top(torch.tensor([1, 5, 6, 7, 9]), [3, 1]).tolist()
    [1, 6, 9]
    """
    keep = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
    keep[list(chosen)] = False
    return ids[keep]


def recover_top(ids: torch.Tensor, chosen: Sequence[int]) -> torch.Tensor:
    """The first token, the positions ``chosen`` in prompt order, the last token (sufficiency, insertion).

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


def _last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[rows, vocabulary]`` logits at the last position of equally long rows ``ids`` (only that position
    through the head where the model's forward takes ``logits_to_keep``)."""
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    return model(input_ids=ids, **keep).logits[:, -1].float()


@torch.no_grad()
def predictions(model: torch.nn.Module, sequences: Sequence[torch.Tensor], target: int, foil: int,
                batch: int = 64) -> tuple[list[float], list[float]]:
    """For each sequence, the probability of ``target`` after it and the logit difference ``target − foil``;
    sequences of one length run together (no padding)."""
    probability, difference = [0.0] * len(sequences), [0.0] * len(sequences)
    by_length: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        by_length.setdefault(len(sequence), []).append(index)
    for rows in by_length.values():
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            logits = _last_logits(model, torch.stack([sequences[i] for i in chunk]))
            for i, p, d in zip(chunk, logits.softmax(-1)[:, target].tolist(), (logits[:, target] - logits[:, foil]).tolist()):
                probability[i], difference[i] = p, d
    return probability, difference


def with_foils(model: torch.nn.Module, prompts: Sequence[Prompt]) -> list[Prompt]:
    """The prompts, each without a foil given the model's most likely token other than its target.

    >>> with_foils(model, [Prompt(ids, target=8)])[0].foil                                 # doctest: +SKIP
    """
    filled = []
    for prompt in prompts:
        if prompt.foil is None:
            with torch.no_grad():
                logits = _last_logits(model, prompt.ids.unsqueeze(0))[0]
            logits[prompt.target] = -math.inf
            prompt = dataclasses.replace(prompt, foil=int(logits.argmax()))
        filled.append(prompt)
    return filled


def answered(model: torch.nn.Module, prompts: Sequence[Prompt]) -> list[Prompt]:
    """The prompts the model answers correctly (argmax over the whole vocabulary)."""
    with torch.no_grad():
        return [p for p in prompts if int(_last_logits(model, p.ids.unsqueeze(0))[0].argmax()) == p.target]


def target_of(kind: str, prompt: Prompt) -> Any:
    """The ``targets=`` of ``decomposed.attribute`` for a target kind (:data:`TARGET_KINDS`).

    >>> target_of("contrastive", Prompt(torch.tensor([1, 2, 3]), target=4, foil=5))
    Diff(first=Token(token=4), second=Token(token=5))
    """
    if kind == "logit":
        return prompt.target
    if kind == "log-prob":
        return logprob(prompt.target)
    if kind == "contrastive":
        if prompt.foil is None:
            raise InvalidInputError("the contrastive target needs the prompt's foil (with_foils fills it)")
        return diff(prompt.target, prompt.foil)
    raise InvalidInputError(f"unknown target kind {kind!r}; choose one of {TARGET_KINDS}")


# -- confidence intervals -------------------------------------------------------------------------


def _resampled_means(values: Sequence[float], resamples: int, seed: int) -> torch.Tensor:
    """Means of ``resamples`` bootstrap resamples of ``values``; the resampled indices depend only on
    ``len(values)`` and ``seed``, so two methods measured on the same prompts are resampled alike (paired)."""
    data = torch.tensor(values, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    return data[torch.randint(len(data), (resamples, len(data)), generator=generator)].mean(1)


def interval(values: Sequence[float], level: float = 0.95, resamples: int = RESAMPLES,
             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (one per prompt).

    >>> interval([2.0, 2.0, 2.0])
    (2.0, 2.0)
    """
    if not values:
        raise InvalidInputError("interval() needs at least one value")
    means = _resampled_means(values, resamples, seed)
    tail = (1 - level) / 2
    return float(means.quantile(tail)), float(means.quantile(1 - tail))


def versus(first: Sequence[float], second: Sequence[float], higher_is_better: bool, level: float = 0.95,
           resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float, int]:
    """Paired comparison of two methods measured on the same prompts: the mean of ``first − second``, its
    bootstrap interval, and ``1`` when ``first`` is better beyond the noise (the interval excludes 0 on
    its side), ``-1`` when worse, ``0`` within the noise.

    >>> versus([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], higher_is_better=True)
    (1.0, 1.0, 1.0, 1)
    """
    if len(first) != len(second):
        raise InvalidInputError(f"versus() pairs prompts: {len(first)} values against {len(second)}")
    differences = [a - b for a, b in zip(first, second)]
    low, high = interval(differences, level, resamples, seed)
    if (low > 0 and higher_is_better) or (high < 0 and not higher_is_better):
        verdict = 1
    elif (high < 0 and higher_is_better) or (low > 0 and not higher_is_better):
        verdict = -1
    else:
        verdict = 0
    return sum(differences) / len(differences), low, high, verdict


# -- results --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One method over a set of prompts: each measure's value on every prompt (prompts in order)."""

    values: dict[str, list[float]]
    #: wall time spent computing the method's scores
    seconds: float
    prompts: int
    #: token level: mean comprehensiveness / sufficiency at each k of ``percents`` (empty for components)
    percents: tuple[int, ...] = ()
    comprehensiveness_curve: list[float] = dataclasses.field(default_factory=list)
    sufficiency_curve: list[float] = dataclasses.field(default_factory=list)
    #: component level: how many components each masking percentage zeroes
    counts: dict[int, int] = dataclasses.field(default_factory=dict)

    def mean(self, measure: str) -> float:
        values = self.values[measure]
        return sum(values) / len(values)

    def interval(self, measure: str, level: float = 0.95) -> tuple[float, float]:
        """Bootstrap interval over prompts of the measure's mean (:func:`interval`)."""
        return interval(self.values[measure], level)

    @property
    def comprehensiveness(self) -> float:
        return self.mean("comprehensiveness")

    @property
    def sufficiency(self) -> float:
        return self.mean("sufficiency")


def _token_measures(top_counts: Sequence[int]) -> dict[str, bool]:
    measures = {"comprehensiveness": True, "sufficiency": False, "AOPC comprehensiveness": True,
                "AOPC sufficiency": False}
    for kind in ("deletion Δp", "deletion Δlogit-diff", "insertion p", "insertion logit-diff"):
        measures.update({f"{kind}, top {n}": True for n in top_counts})
    return {**measures, "top-1 hit": True, "top-3 hit": True}


#: every token-level measure, and whether higher is better
TOKEN_MEASURES: dict[str, bool] = _token_measures(TOP_COUNTS)


# -- the DePass variants -------------------------------------------------------------------------


def depass_variants(model: torch.nn.Module, **options: Any) -> tuple[dict[str, DecomposedModel], dict[str, str]]:
    """``{"DePass": the paper's frozen attention, "DePass routed": attention="routed"}`` compiled with
    ``options`` (``dtype``, ``tokenizer``, …), and the variants this build cannot compile, with why.

    >>> compiled, unavailable = depass_variants(model, dtype=torch.float64)                  # doctest: +SKIP
    """
    from .api import compile
    from .errors import FxDePassError

    compiled, unavailable = {"DePass": compile(model, **options)}, {}
    if "attention" not in inspect.signature(compile).parameters:
        unavailable["DePass routed"] = "not available in this build (fxdepass.compile has no attention= option)"
        return compiled, unavailable
    try:
        compiled["DePass routed"] = compile(model, attention="routed", **options)
    except FxDePassError as error:
        unavailable["DePass routed"] = f"not available for this model ({type(error).__name__}: {error})"
    return compiled, unavailable


# -- token-level methods --------------------------------------------------------------------------


class _LastPass:
    """The last value ``compute`` gave, by key: the target kinds of one compiled model share one pass."""

    def __init__(self, compute: Callable[..., Any]):
        self.compute, self.key, self.value = compute, None, None

    def __call__(self, key: Any, *args: Any) -> Any:
        if key != self.key:
            self.value, self.key = self.compute(*args), key
        return self.value


def _key(prompts: Sequence[Prompt]) -> tuple:
    return tuple((tuple(p.ids.tolist()), p.target, p.foil) for p in prompts)


# Note [One pass, every target kind]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The target kinds differ only in the functional of the logits they read (fxdepass/targets.py): a target
# is ``c·z + o`` with ``c`` and ``o`` frozen from the real logits, so through a linear head ``z = Wh + b``
# a component's share is ``(cW)·h_m`` and ``c·b + o`` goes to rest.  The harness therefore reads the
# ``"hidden"`` readout at the last position once per prompt (or batch, and seed) and applies each kind's
# functional to it, instead of one decomposed pass per kind; ``targets="all"`` would give the same from
# the logits readout, but on a batch it computes the head at every position (49k columns on SmolLM2).
# tests/test_evaluate.py checks the shares against ``attribute(..., targets=…)``.


def _hidden_pass(decomposed: DecomposedModel, ids: torch.Tensor, seed: Seed) -> Any:
    """The ``"hidden"`` readout's attribution at the last position of each row of ``ids`` (equally long)."""
    return decomposed.attribute(ids, seed=seed, readout="hidden", positions="last")


def _shares(decomposed: DecomposedModel, hidden: Any, specs: Sequence[Any]) -> torch.Tensor:
    """``[components + rest, batch]``: each component's share of each row's target (``specs``, one per row)
    from the hidden readout at the last position (Note [One pass, every target kind])."""
    head = decomposed.model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise InvalidInputError(f"the harness reads targets through a linear language-model head, not {type(head).__name__}")
    components, total = hidden.components[:, :, -1], hidden.total[:, -1]               # [M+1, B, d], [B, d]
    weight = head.weight.to(components.dtype)
    bias = None if head.bias is None else head.bias.to(components.dtype)
    logits = torch.nn.functional.linear(total, weight, bias)                            # [B, V]
    shares = components.new_empty(components.shape[:2])
    for row, spec in enumerate(specs):
        target = as_target(spec)
        coefficients = target.coefficients(logits[row:row + 1])                          # [1, V]
        shares[:, row] = components[:, row] @ (coefficients @ weight)[0]
        shares[-1, row] += target.constant(logits[row:row + 1])[0] + (0 if bias is None else coefficients[0] @ bias)
    return shares


def depass_tokens(decomposed: DecomposedModel, sink: bool = True,
                  kinds: Sequence[str] = TARGET_KINDS) -> dict[str, TokenMethod]:
    """DePass token contributions to each target kind (:func:`target_of`), by kind, from one decomposed
    pass per prompt (Note [One pass, every target kind]; ``sink``: SPEC §2's sink-token option)."""
    seed = tokens(sink=sink)
    hidden = _LastPass(lambda ids: _hidden_pass(decomposed, ids.unsqueeze(0), seed))

    def method(kind: str) -> TokenMethod:
        def scores(prompt: Prompt) -> torch.Tensor:
            return _shares(decomposed, hidden(_key([prompt]), prompt.ids), [target_of(kind, prompt)])[:-1, 0].float()

        return scores

    return {kind: method(kind) for kind in kinds}


def _log_probability(model: torch.nn.Module, embeddings: torch.Tensor, target: int) -> torch.Tensor:
    """``[batch]`` log-probabilities of ``target`` at the last position, from input embeddings."""
    return model(inputs_embeds=embeddings).logits[:, -1].float().log_softmax(-1)[:, target]


def _embeddings(model: torch.nn.Module, prompt: Prompt) -> torch.Tensor:
    """``[1, N, d]`` input embeddings of the prompt, a leaf that records gradients."""
    return model.get_input_embeddings()(prompt.ids.unsqueeze(0)).detach().requires_grad_(True)


def _last_call(function: Callable[[torch.nn.Module, Prompt], Any]) -> Callable[[torch.nn.Module, Prompt], Any]:
    """``function(model, prompt)`` that remembers its last result: the baselines of one prompt share one
    gradient and one set of attention maps (the first method to ask is timed for it)."""
    last: dict[str, Any] = {}

    def remembered(model: torch.nn.Module, prompt: Prompt) -> Any:
        key = (tuple(prompt.ids.tolist()), prompt.target)
        if last.get("model") is not model or last.get("key") != key:
            last.update(model=model, key=key, value=function(model, prompt))
        return last["value"]

    return remembered


@_last_call
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


@contextlib.contextmanager
def _eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the context the model runs eager attention (which returns its probabilities); the model's
    own setting is restored on leaving."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@_last_call
@torch.no_grad()
def _attention_maps(model: torch.nn.Module, prompt: Prompt) -> torch.Tensor:
    """``[layers, heads, N, N]`` attention probabilities."""
    with _eager_attention(model):
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
        identity = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device)
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


def token_methods(model: torch.nn.Module, decomposed: Mapping[str, DecomposedModel], *,
                  kinds: Sequence[str] = TARGET_KINDS, ig_steps: int = 50, seed: int = 0) -> dict[str, TokenMethod]:
    """``f"{name} {kind}"`` for each compiled model in ``decomposed`` and target kind, then the baselines.

    >>> list(token_methods(model, {"DePass": decomposed}))                             # doctest: +SKIP
    ['DePass logit', 'DePass log-prob', 'DePass contrastive', 'integrated gradients', ...]
    """
    methods: dict[str, TokenMethod] = {}
    for name, compiled in decomposed.items():
        methods.update({f"{name} {kind}": m for kind, m in depass_tokens(compiled, kinds=kinds).items()})
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


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def evaluate_tokens(model: torch.nn.Module, prompts: Sequence[Prompt], methods: Mapping[str, TokenMethod],
                    percents: Sequence[int] = PERCENTS, top_counts: Sequence[int] = TOP_COUNTS) -> dict[str, Result]:
    """Score every token-level method on ``prompts`` (module docstring); prompts without a foil get the
    model's runner-up (:func:`with_foils`).  The hit rates are measured when every prompt has decisive
    positions.

    >>> results = evaluate_tokens(model, prompts, {"random": random_tokens()})          # doctest: +SKIP
    >>> results["random"].mean("sufficiency"), results["random"].interval("insertion p, top 1")  # doctest: +SKIP
    """
    if not prompts:
        raise InvalidInputError("evaluate_tokens() needs at least one prompt")
    prompts = with_foils(model, prompts)
    grounded = all(p.decisive for p in prompts)
    measures = [m for m in _token_measures(top_counts) if grounded or "hit" not in m]
    seconds = dict.fromkeys(methods, 0.0)
    values = {name: {m: [] for m in measures} for name in methods}
    curves = {name: ([], []) for name in methods}      # per prompt: change at each k (patch, recover)
    for prompt in prompts:
        orders = {}
        for name, method in methods.items():
            started = time.perf_counter()
            orders[name] = ranking(method(prompt))
            seconds[name] += time.perf_counter() - started
        eligible = len(prompt.ids) - 2
        sizes = [count(k, eligible) for k in percents] + [min(n, eligible) for n in top_counts]
        plans = {name: [(patch_top(prompt.ids, order[:s]), recover_top(prompt.ids, order[:s])) for s in sizes]
                 for name, order in orders.items()}
        # Methods often agree on a subset: each distinct sequence runs once.
        distinct = {tuple(s.tolist()): s for pairs in plans.values() for pair in pairs for s in pair}
        index = {key: i + 1 for i, key in enumerate(distinct)}
        probability, difference = predictions(model, [prompt.ids, *distinct.values()], prompt.target, prompt.foil)
        clean_p, clean_d = probability[0], difference[0]
        for name, pairs in plans.items():
            at = [(index[tuple(p.tolist())], index[tuple(r.tolist())]) for p, r in pairs]
            curve, tops = at[:len(percents)], at[len(percents):]
            comprehensive = [change(clean_p, probability[p]) for p, _ in curve]
            sufficient = [change(clean_p, probability[r]) for _, r in curve]
            curves[name][0].append(comprehensive)
            curves[name][1].append(sufficient)
            row = values[name]
            row["comprehensiveness"].append(_mean(comprehensive))
            row["sufficiency"].append(_mean(sufficient))
            row["AOPC comprehensiveness"].append(_mean([clean_p - probability[p] for p, _ in curve]))
            row["AOPC sufficiency"].append(_mean([clean_p - probability[r] for _, r in curve]))
            for n, (p, r) in zip(top_counts, tops):
                row[f"deletion Δp, top {n}"].append(clean_p - probability[p])
                row[f"deletion Δlogit-diff, top {n}"].append(clean_d - difference[p])
                row[f"insertion p, top {n}"].append(probability[r])
                row[f"insertion logit-diff, top {n}"].append(difference[r])
            if grounded:
                row["top-1 hit"].append(float(orders[name][0] in prompt.decisive))
                row["top-3 hit"].append(float(any(p in prompt.decisive for p in orders[name][:3])))
    return {
        name: Result(values[name], seconds[name], len(prompts), tuple(percents),
                     [_mean(column) for column in zip(*curves[name][0])],
                     [_mean(column) for column in zip(*curves[name][1])])
        for name in methods
    }


# -- component-level methods ----------------------------------------------------------------------


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


def depass_components(decomposed: DecomposedModel, kinds: Sequence[str] = TARGET_KINDS,
                      parts: Sequence[str] = ("heads", "neurons"), batch: int = 8) -> dict[str, ComponentMethod]:
    """DePass head (and neuron) contributions to each target kind at the last position, every layer, by
    kind: one decomposed pass per layer and seed for up to ``batch`` equally long prompts at once, shared
    by the kinds (Note [One pass, every target kind])."""
    layers = range(len(locate(decomposed)[1].blocks))
    seeds: dict[str, Callable[[int], Seed]] = {"heads": heads, "neurons": neurons}

    def compute(prompts: Sequence[Prompt]) -> list[dict[str, dict[str, torch.Tensor]]]:
        scores: list[dict[str, dict[str, list[torch.Tensor]]]] = [{k: {p: [] for p in parts} for k in kinds}
                                                                   for _ in prompts]
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt.ids), []).append(index)
        for rows in by_length.values():
            for start in range(0, len(rows), batch):
                chunk = rows[start:start + batch]
                ids = torch.stack([prompts[i].ids for i in chunk])
                for part in parts:
                    for layer in layers:
                        hidden = _hidden_pass(decomposed, ids, seeds[part](layer))
                        for kind in kinds:
                            values = _shares(decomposed, hidden, [target_of(kind, prompts[i]) for i in chunk])[:-1].float()
                            for column, i in enumerate(chunk):
                                scores[i][kind][part].append(values[:, column])
        return [{kind: {part: torch.stack(found) for part, found in by_kind.items()} for kind, by_kind in s.items()}
                for s in scores]

    shared = _LastPass(compute)

    def method(kind: str) -> ComponentMethod:
        return lambda prompts: [s[kind] for s in shared(_key(prompts), prompts)]

    return {kind: method(kind) for kind in kinds}


def attribution_patching(model: torch.nn.Module) -> ComponentMethod:
    """|activation × gradient| of the target log-probability (the first-order estimate of zeroing the
    component), summed over positions and the component's features."""
    modules, count = _projections(model)

    def one(prompt: Prompt) -> dict[str, torch.Tensor]:
        with _inputs_of(modules["heads"]) as attention, _inputs_of(modules["neurons"]) as mlp, torch.enable_grad():
            log_probability = _log_probability(model, _embeddings(model, prompt), prompt.target).sum()
            gradients = torch.autograd.grad(log_probability, attention + mlp)
        effects = [(a * g)[0].detach().sum(0).float() for a, g in zip(attention + mlp, gradients)]
        return {"heads": torch.stack([_per_head(e, count).sum(-1) for e in effects[:len(attention)]]).abs(),
                "neurons": torch.stack(effects[len(attention):]).abs()}

    return lambda prompts: [one(p) for p in prompts]


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
    return lambda prompts: [_activation_norms(model, modules, count, p) for p in prompts]


def weight_activation(model: torch.nn.Module) -> ComponentMethod:
    """Activation norm times the norm of the component's columns of the projection weight (how large a
    write into the residual stream the activation can make)."""
    modules, count = _projections(model)
    with torch.no_grad():
        weights = {"heads": torch.stack([_per_head(m.weight.float(), count).pow(2).sum((0, 2)).sqrt()
                                         for m in modules["heads"]]),
                   "neurons": torch.stack([m.weight.float().norm(dim=0) for m in modules["neurons"]])}

    def one(prompt: Prompt) -> dict[str, torch.Tensor]:
        norms = _activation_norms(model, modules, count, prompt)
        return {kind: norms[kind] * weights[kind] for kind in norms}

    return lambda prompts: [one(p) for p in prompts]


def random_components(model: torch.nn.Module, seed: int = 0) -> ComponentMethod:
    """Uniform random scores (deterministic in ``seed`` and the order of calls)."""
    modules, count = _projections(model)
    shapes = {"heads": (len(modules["heads"]), count),
              "neurons": (len(modules["neurons"]), modules["neurons"][0].weight.shape[1])}
    generator = torch.Generator().manual_seed(seed)
    return lambda prompts: [{kind: torch.rand(shape, generator=generator) for kind, shape in shapes.items()}
                            for _ in prompts]


def component_methods(model: torch.nn.Module, decomposed: Mapping[str, DecomposedModel], *,
                      kinds: Sequence[str] = TARGET_KINDS, parts: Sequence[str] = ("heads", "neurons"),
                      seed: int = 0) -> dict[str, ComponentMethod]:
    """``f"{name} {kind}"`` for each compiled model in ``decomposed`` and target kind, then the baselines."""
    methods: dict[str, ComponentMethod] = {}
    for name, compiled in decomposed.items():
        methods.update({f"{name} {kind}": m for kind, m in depass_components(compiled, kinds, parts).items()})
    methods.update({
        "attribution patching": attribution_patching(model),
        "activation magnitude": activation_magnitude(model),
        "weight norm × activation": weight_activation(model),
        "random": random_components(model, seed),
    })
    return methods


@torch.no_grad()
def masked_predictions(model: torch.nn.Module, ids: torch.Tensor, masks: Mapping[str, torch.Tensor],
                       batch: int = 64) -> torch.Tensor:
    """``[rows, vocabulary]`` last-position logits of the prompt ``ids`` run once per row of the masks, each
    row with its own heads / neurons zeroed: ``masks[kind]`` is ``[rows, layers, components]``, True where
    zeroed (``"heads"``: the head's input columns of the attention output projection, ``"neurons"``: the
    neuron's column of the MLP down projection — what :func:`fxdepass.ablate` zeroes).

    >>> masks = {"heads": torch.zeros(2, layers, heads, dtype=torch.bool)}                   # doctest: +SKIP
    >>> masks["heads"][1, 0, 3] = True; masked_predictions(model, ids, masks)  # row 1 without L0H3  # doctest: +SKIP
    """
    modules, head_count = _projections(model)
    rows = next(iter(masks.values())).shape[0]
    outputs = []
    for start in range(0, rows, batch):
        keeps: dict[torch.nn.Module, torch.Tensor] = {}
        for kind, mask in masks.items():
            for layer, module in enumerate(modules[kind]):
                keep = ~mask[start:start + batch, layer]
                if kind == "heads":
                    keep = keep.repeat_interleave(module.weight.shape[1] // head_count, dim=-1)
                keeps[module] = keep.unsqueeze(1)                         # [rows, 1 (positions), features]

        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            return (args[0] * keeps[module].to(args[0].dtype), *args[1:])

        handles = [module.register_forward_pre_hook(hook) for module in keeps]
        try:
            chunk = ids.unsqueeze(0).expand(len(next(iter(keeps.values()))), -1)
            outputs.append(_last_logits(model, chunk))
        finally:
            for handle in handles:
                handle.remove()
    return torch.cat(outputs)


def component_measures(percents: Sequence[int] = MASK_PERCENTS) -> dict[str, bool]:
    """Every component-level measure at the masking percentages, and whether higher is better."""
    measures = {}
    for p in percents:
        measures.update({f"accuracy, top {p}% masked": False, f"Δlogit-diff, top {p}% masked": True,
                         f"accuracy, bottom {p}% masked": True})
    return measures


def evaluate_components(model: torch.nn.Module, prompts: Sequence[Prompt], methods: Mapping[str, ComponentMethod],
                        percents: Sequence[int] = MASK_PERCENTS) -> dict[str, dict[str, Result]]:
    """Masking study: ``{"heads" | "neurons": {method: result}}`` with :func:`component_measures` per prompt;
    ``counts`` of the result say how many components p% zeroes.  ``prompts`` should be ones the model
    answers (:func:`answered`), so that accuracy starts at 1; the logit difference is against each prompt's
    foil (:func:`with_foils`).

    >>> kept = answered(model, prompts)                                                        # doctest: +SKIP
    >>> results = evaluate_components(model, kept, component_methods(model, {"DePass": decomposed}))  # doctest: +SKIP
    >>> results["heads"]["DePass contrastive"].interval("accuracy, top 5% masked")             # doctest: +SKIP
    """
    if not prompts:
        raise InvalidInputError("evaluate_components() needs at least one prompt")
    prompts = with_foils(model, prompts)
    seconds, scores = {}, {}
    for name, method in methods.items():
        started = time.perf_counter()
        scores[name] = method(prompts)
        seconds[name] = time.perf_counter() - started
    parts = list(scores[next(iter(methods))][0])
    shapes = {part: scores[next(iter(methods))][0][part].shape for part in parts}
    counts = {part: {p: count(p, math.prod(shapes[part])) for p in percents} for part in parts}
    values = {part: {name: {m: [] for m in component_measures(percents)} for name in methods} for part in parts}
    for index, prompt in enumerate(prompts):
        for part in parts:
            plans, rows = {}, {}                                  # (name, most, p) → row; mask → row
            for name in methods:
                order = torch.argsort(scores[name][index][part].flatten(), descending=True, stable=True)
                for most in (True, False):
                    ranked = order if most else order.flip(0)
                    for p in percents:
                        key = tuple(sorted(ranked[:counts[part][p]].tolist()))   # the same mask runs once
                        plans[(name, most, p)] = rows.setdefault(key, len(rows) + 1)
            mask = torch.zeros(len(rows) + 1, math.prod(shapes[part]), dtype=torch.bool, device=prompt.ids.device)  # row 0: unmasked
            for key, row in rows.items():
                mask[row, list(key)] = True
            logits = masked_predictions(model, prompt.ids, {part: mask.view(-1, *shapes[part])})
            correct = (logits.argmax(-1) == prompt.target).float().tolist()
            difference = (logits[:, prompt.target] - logits[:, prompt.foil]).tolist()
            for name in methods:
                row = values[part][name]
                for p in percents:
                    top, bottom = plans[(name, True, p)], plans[(name, False, p)]
                    row[f"accuracy, top {p}% masked"].append(correct[top])
                    row[f"Δlogit-diff, top {p}% masked"].append(difference[0] - difference[top])
                    row[f"accuracy, bottom {p}% masked"].append(correct[bottom])
    return {part: {name: Result(values[part][name], seconds[name], len(prompts), counts=counts[part]) for name in methods}
            for part in parts}
