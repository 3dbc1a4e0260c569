"""User API: :func:`compile`, :class:`DecomposedModel` and :class:`Attribution`."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Iterator, Sequence

import torch
import torch.fx

from . import shards
from .capture import (CapturedModel, capture, cast_floats, evaluating, forward_hooks, model_device, model_inputs,
                      position_limit, probe_ids, run_options, stamp)
from .checks import has_data, index_groups, integer, real
from .dataset import Record, attribute_dataset
from .errors import (
    CaptureError,
    InvalidInputError,
    InvalidReadoutError,
    ModelChangedError,
)
from .inputs import Encoded, encode
from .locations import Locations
from .planning import TOLERANCE, PassPlan, check_sums, estimate_memory, guard, plan_pass
from .readouts import READOUTS, readout_nodes
from .registry import projection_args
from .results import Attribution
from .rewrite import ATTENTIONS, Policy, build_module
from .seeds import Custom, Seed, Tokens, tokens
from .targets import LogProb, Predicted, Target, Token, TokenAt, per_prompt
from fxdepass.rules.activations import ALLOCATIONS

__all__ = ["compile", "DecomposedModel", "Attribution", "GeneratedAttribution"]



class DecomposedModel:
    """A model compiled for DePass.  Create it with :func:`fxdepass.compile`."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        example_inputs: Any = None,
        activation: str = "softmax",
        temperature: float = 0.1,
        attention: str = "frozen",
        dtype: torch.dtype | None = None,
        tokenizer: Any = None,
        causal_blocks: int = 8,
        torch_compile: bool = False,
        cache: bool = True,
        progress: bool | None = None,
    ):
        _check_model(model)
        if activation not in ALLOCATIONS:
            raise InvalidInputError(f"activation={activation!r}; choose one of {ALLOCATIONS}")
        if attention not in ATTENTIONS:
            raise InvalidInputError(f"attention={attention!r}; choose one of {ATTENTIONS}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in TOLERANCE):
            raise InvalidInputError(f"dtype={dtype!r}: give a floating-point torch dtype, one of "
                                    f"{', '.join(map(str, TOLERANCE))}, or None (the model's own)")
        self.model = model
        self.tokenizer = tokenizer
        self.causal_blocks = integer(causal_blocks, "causal_blocks")
        if self.causal_blocks < 0:
            raise InvalidInputError(f"causal_blocks must be 0 or more, got {causal_blocks!r}")
        self.torch_compile = bool(torch_compile)
        self._cache, self._progress = bool(cache), progress
        parameter = next(model.parameters(), None)
        self.model_dtype = parameter.dtype if parameter is not None else torch.float32
        self.device = model_device(model)
        self.dtype = dtype or self.model_dtype
        self.policy = Policy(activation, _checked_temperature(temperature, self.dtype), attention)
        self._explicit_dtype = dtype is not None
        self.input_names = model_inputs(model)
        if "input_ids" not in self.input_names:
            raise CaptureError(f"{type(model).__name__}.forward takes no input_ids")
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        if "position_ids" in self.input_names and not self._numbers_positions_from_zero():
            self.input_names = tuple(n for n in self.input_names if n != "position_ids")
        self._captures: dict[Any, CapturedModel] = {}
        self._modules: dict[Any, tuple[torch.fx.GraphModule, list[int]]] = {}
        self._locations: dict[int, Locations] = {}
        example = self._inputs(self._example_ids(example_inputs))
        self._dynamic = True
        self._capture(example)

    # -- capture and generation -------------------------------------------------------------

    def _example_ids(self, example_inputs: Any) -> torch.Tensor:
        if example_inputs is not None:
            ids = example_inputs["input_ids"] if isinstance(example_inputs, dict) else example_inputs
            return self._validate_ids(ids)
        return probe_ids(self.model, (2, 8))

    def _capture(self, inputs: dict[str, torch.Tensor]) -> CapturedModel:
        """The capture serving these inputs (made on first use), following the model as it is now."""
        batch, length = inputs["input_ids"].shape
        key = None if (self._dynamic and length >= 2) else (batch, length)
        if key in self._captures:
            captured = self._captures[key]
            self._follow_model(captured)
            return captured
        try:
            captured = capture(self.model, inputs, dynamic=key is None, cache=self._cache, progress=self._progress)
        except CaptureError:
            if key is not None:
                raise
            self._dynamic, key = False, (batch, length)
            captured = capture(self.model, inputs, dynamic=False, cache=self._cache, progress=self._progress)
        if self._casts:  # SPEC §5: no casts to lower precision
            cast_floats(captured.graph, self.dtype)
            captured.tensors = {name: (target, self._held(t)) for name, (target, t) in captured.tensors.items()}
        self._captures[key] = captured
        return captured

    @property
    def _casts(self) -> bool:
        """Whether the passes run in a dtype of their own (SPEC §5), on copies of the model's tensors."""
        return self._explicit_dtype or self.dtype == torch.float64

    def _held(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor the passes read for one of the model's: itself, or its copy in the compute dtype."""
        return tensor.detach().to(self.dtype) if self._casts and tensor.is_floating_point() else tensor

    # Note [Following the live model]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # A capture holds the model's parameters and buffers as they were at compile time: the tensors
    # themselves, or (float64 mode) copies in the compute dtype, which no later edit of the model
    # reaches.  An attribution must explain the model as it is when it is asked for, so every use of a
    # capture first compares each tensor's stamp (fxdepass/capture.py: the object, its storage, its
    # version counter) with the model's tensor at the same path: an in-place edit, ``param.data = …``,
    # ``load_state_dict`` (plain or ``assign=True``) all change it, and only the changed tensors are
    # copied again and rebound in the generated modules, so an unchanged model costs one look per
    # tensor.  (A write through ``param.data`` in place bumps a version counter of its own, not the
    # parameter's: in float64 mode such an edit stays unseen; edit under ``torch.no_grad()`` instead.)
    # What the graph itself assumes cannot be followed and is refused: a tensor's new shape or device (or
    # dtype, outside float64 mode), and forward hooks added or removed since the capture (the graph runs
    # the hooks that were there when it was captured; ``fxdepass.ablate``'s zeroing is such a hook, so
    # the decomposed pass would explain the unablated model while the model's own logits are ablated).

    def _follow_model(self, captured: CapturedModel) -> None:
        """Refuse a model changed in a way ``captured`` cannot follow; bring its tensors, and its generated
        modules', up to date with the model's (Note [Following the live model])."""
        self._check_hooks(captured)
        changed: dict[str, torch.Tensor] = {}
        for name, before in captured.stamps.items():
            path = captured.tensors[name][0]
            owner, _, field = path.rpartition(".")
            live = getattr(self.model.get_submodule(owner), field, None) if _has_submodule(self.model, owner) else None
            if not isinstance(live, torch.Tensor):
                raise ModelChangedError(f"the model no longer has the tensor {path} it had at compile(); compile it again")
            now = stamp(live)
            if now.same(before):
                continue
            (shape, dtype, device), (was_shape, was_dtype, was_device) = now.layout, before.layout
            if shape != was_shape or device != was_device or (dtype != was_dtype and not self._casts):
                raise ModelChangedError(
                    f"the model's {path} is now {list(shape)} {dtype} on {device}, but was {list(was_shape)} {was_dtype} "
                    f"on {was_device} at compile(); compile the model again")
            held = self._held(live)
            captured.tensors[name], captured.stamps[name] = (path, held), now
            changed[path] = held
        if changed:
            for (of, _, _), (module, _) in self._modules.items():
                if of == id(captured):
                    for path, tensor in changed.items():
                        _rebind(module, path, tensor)

    def _check_hooks(self, captured: CapturedModel) -> None:
        """Refuse forward hooks added or removed since ``captured`` was made (Note [Following the live model])."""
        now = forward_hooks(self.model)
        if now.keys() == captured.hooks.keys():
            return
        if any(getattr(now[key], "fxdepass_ablation", False) for key in now.keys() - captured.hooks.keys()):
            raise ModelChangedError(
                "attribute() inside `with fxdepass.ablate(...)`: the ablation zeroes heads or neurons through hooks "
                "in the model's own forward, which the decomposed pass (the graph captured at compile()) does not run, "
                "so it would explain the unablated model while the model's logits are ablated; attribute outside "
                "the ablate block and compare (an ablated head's effect is the change of the model's logits)")
        changes = sorted([f"added on {p or '<root>'} ({kind})" for p, kind, _ in now.keys() - captured.hooks.keys()]
                         + [f"removed from {p or '<root>'} ({kind})" for p, kind, _ in captured.hooks.keys() - now.keys()])
        raise ModelChangedError(
            f"forward hooks changed since compile(): {', '.join(changes)}; the decomposed pass runs the graph captured "
            "then, with the hooks it had, so it would not explain the model as it now runs: restore the hooks, or "
            "compile the model again with them in place")

    def locations_of(self, captured: CapturedModel) -> Locations:
        """The :class:`~fxdepass.locations.Locations` of one capture."""
        if id(captured) not in self._locations:
            self._locations[id(captured)] = Locations(captured, self.model)
        return self._locations[id(captured)]

    def _module(self, captured: CapturedModel, seed: Seed, readouts: tuple[str, ...]) -> tuple[torch.fx.GraphModule, list[int]]:
        """The generated module for ``seed`` and ``readouts``, and how many outputs each readout has."""
        key = (id(captured), seed, readouts)
        if key not in self._modules:
            groups = [readout_nodes(r, self.locations_of(captured)) for r in readouts]
            self._modules[key] = (self._build(captured, seed, [n for g in groups for n in g]), [len(g) for g in groups])
        return self._modules[key]

    def _build(self, captured: CapturedModel, seed: Seed, nodes: list[torch.fx.Node]) -> torch.fx.GraphModule:
        """The generated module computing the components of ``nodes`` (of ``captured``'s graph) for ``seed``."""
        prefix = getattr(self.model, "base_model_prefix", "")
        return build_module(captured, seed, seed.points(self.locations_of(captured)), nodes, self.policy, prefix)

    @property
    def default_readout(self) -> str:
        captured = next(iter(self._captures.values()))
        return "logits" if "logits" in captured.outputs else "hidden"

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The generated module for token-level attribution of the default readout."""
        captured = next(iter(self._captures.values()))
        return self._module(captured, tokens(), (self.default_readout,))[0]

    @property
    def code(self) -> str:
        """The generated Python code of :attr:`graph_module`."""
        return self.graph_module.code

    def locations(self) -> list[str]:
        """Every module path a seed or readout can address, in execution order (``path@k``: the k-th
        repeated call of a module called several times)."""
        return self.locations_of(next(iter(self._captures.values()))).paths()

    @property
    def layers(self) -> int:
        """How many layers seeds address: block calls, in execution order (Note [Blocks are calls]
        in fxdepass/locations.py).

        >>> fxdepass.compile(model).layers   # doctest: +SKIP
        30
        """
        return len(self.locations_of(next(iter(self._captures.values()))).blocks)

    # -- attribution ---------------------------------------------------------------------------

    def _validate_ids(self, input_ids: Any) -> torch.Tensor:
        try:
            ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InvalidInputError(f"input_ids must be a [batch, length] tensor of token ids: {error}") from None
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2 or ids.numel() == 0:
            raise InvalidInputError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise InvalidInputError(f"input_ids must hold integer token ids, got {ids.dtype}")
        if ids.device != self.device:
            raise InvalidInputError(f"input_ids are on {ids.device} but the model is on {self.device}; move them with .to()")
        if self.vocab_size is not None and bool(((ids < 0) | (ids >= self.vocab_size)).any()):
            raise InvalidInputError(f"input_ids must lie in [0, {self.vocab_size}); got {int(ids.min())}..{int(ids.max())}")
        limit = position_limit(self.model)
        if limit is not None and ids.shape[1] > limit:
            raise InvalidInputError(f"the prompt has {ids.shape[1]} tokens but the model takes at most {limit} "
                                    "(config.max_position_embeddings)")
        return ids.long()

    def _inputs(self, ids: torch.Tensor, attention_mask: Any = None) -> dict[str, torch.Tensor]:
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            try:
                mask = torch.as_tensor(attention_mask)
            except (TypeError, ValueError, RuntimeError) as error:
                raise InvalidInputError(f"attention_mask must be a tensor of 0 and 1: {error}") from None
            if mask.device != ids.device:  # first: a mask on the meta device has no values to check
                raise InvalidInputError(f"attention_mask is on {mask.device} but input_ids are on {ids.device}")
            if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
                raise InvalidInputError("attention_mask must hold 0 (padding) and 1 (token) only")
            mask = mask.long()
            if mask.ndim == 1:
                mask = mask.unsqueeze(0)
            if mask.shape != ids.shape:
                raise InvalidInputError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
            # a given mask only (reading values: on the meta device only fxdepass's own mask works)
            if bool((mask.sum(-1) == 0).any()):
                raise InvalidInputError("every prompt needs at least one token the attention_mask keeps")
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self.input_names:
            # Left-padded prompts keep the positions they would have alone.
            inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return {k: v for k, v in inputs.items() if k in self.input_names}

    def prompt_inputs(self, input_ids: Any, attention_mask: Any = None) -> dict[str, torch.Tensor]:
        """The model's inputs for a prompt, checked; ``input_ids`` becomes a [batch, length] long tensor.

        >>> decomposed.prompt_inputs([5, 9, 2])["input_ids"].shape                        # doctest: +SKIP
        torch.Size([1, 3])
        """
        return self._inputs(self._validate_ids(input_ids), attention_mask)

    def encode(self, inputs: Any, attention_mask: Any = None) -> Encoded:
        """Prompts as token ids and their mask: a string or list of strings (tokenized with the tokenizer given
        to :func:`compile`, padded on the left for causal models), a tokenizer's ``BatchEncoding``, or ids
        (see :mod:`fxdepass.inputs`).

        >>> decomposed.encode(["The capital of France is", "Paris is"]).attention_mask         # doctest: +SKIP
        tensor([[1, 1, 1, 1, 1],
                [0, 0, 1, 1, 1]])
        """
        return encode(inputs, attention_mask, tokenizer=self.tokenizer, left=self.causal, device=self.device)

    def _describe(self, results: Sequence[Attribution], seed: Seed, captured: CapturedModel, ids: torch.Tensor,
                  attention_mask: Any, texts: list[str] | None) -> None:
        """Give every result its prompts' own labels, their mask and :attr:`Attribution.metadata`."""
        from . import __version__

        mask = None if attention_mask is None else torch.as_tensor(attention_mask).long().reshape(ids.shape)
        first = results[0]
        per_prompt = None
        if (ids.shape[0] > 1 or mask is not None) and not (isinstance(seed, Custom) and not seed.names):
            per_prompt = seed.prompt_labels(ids, mask, self.locations_of(captured), self.tokenizer)
            per_prompt = None if all(labels == first.labels for labels in per_prompt) else per_prompt
        if texts is None and self.tokenizer is not None:
            kept = ids.tolist() if mask is None else [[t for t, m in zip(r, k) if m] for r, k in zip(ids.tolist(), mask.tolist())]
            texts = [self.tokenizer.decode(row) for row in kept]
        config = getattr(self.model, "config", None)
        metadata = {"model": getattr(config, "name_or_path", "") or type(self.model).__name__, "prompts": texts,
                    "seed": repr(seed), "dtype": str(self.dtype).removeprefix("torch."), "fxdepass_version": __version__}
        for result in results:
            result.attention_mask, result.prompt_labels, result.metadata = mask, per_prompt, dict(metadata)
            if per_prompt is not None:
                result.labels = per_prompt[0]

    def locations_for(self, inputs: dict[str, torch.Tensor]) -> Locations:
        """The :class:`~fxdepass.locations.Locations` of the graph captured for these model inputs."""
        return self.locations_of(self._capture(inputs))

    def attribute(
        self,
        input_ids: Any,
        *,
        attention_mask: Any = None,
        seed: Seed | None = None,
        readout: str | Sequence[str] = "logits",
        targets: Any = None,
        positions: Any = None,
        memory_limit: float | None = None,
        strict: bool = False,
        distributed: Any = False,
        gather: str = "rank0",
    ) -> Attribution | dict[str, Attribution] | None:
        """Decompose ``readout`` by ``seed`` (default: one component per input token).

        The logits readout explains one scalar per prompt and read position — ``targets``: the predicted token
        (default), a token id or one-token string, ``fxdepass.diff(a, b)``, ``fxdepass.logprob(t)``, a list with
        one of these per prompt (fxdepass/targets.py), or ``"all"`` for every logit — at ``positions``: the
        last (default for ``"logits"``), ``"all"`` (default for other readouts) or a list of positions.  Only
        what that needs is computed: the last block after its attention, the final norm and the head run at
        the read positions only (single prompts of position-wise models), and the head only for the target.
        Several readouts (``readout=["logits", "layers"]``) come from one decomposed pass and are returned as
        a dict of attributions.  ``memory_limit`` (bytes; default 80% of what the model's device has available:
        free GPU memory on CUDA, available RAM on the CPU, :func:`fxdepass.planning.available_memory`) bounds the estimated peak
        of the decomposed pass: above it, :class:`OutOfMemoryEstimateError` says what would fit.
        Every result is checked: components summing to the real value within :data:`TOLERANCE` of the
        compute dtype, everything finite.  A failed sum warns (``strict=True``: raises
        :class:`ReconstructionError`) naming the first node where the sum diverges; NaN or inf raises
        :class:`InvalidInputError` naming the first node that produced it.
        ``distributed=True`` (with ``torch.distributed`` initialised; or a process group) shards the components
        across the processes, which must all make this call with the same inputs (docs/distributed.md); the
        result is gathered to the first process (``gather="rank0"``; the others get ``None``) or to every one
        (``gather="all"``).

        >>> attribution = fxdepass.compile(model, tokenizer=tokenizer).attribute(tokenizer("The capital of France is",
        ...     return_tensors="pt").input_ids, targets=" Paris")                    # doctest: +SKIP
        >>> attribution.scores()                                                    # doctest: +SKIP
        """
        input_ids, attention_mask, texts = self.encode(input_ids, attention_mask)
        seed = tokens() if seed is None else seed
        if not isinstance(seed, Seed):
            raise InvalidInputError(f"seed must be an fxdepass seed such as fxdepass.tokens(), got {seed!r}")
        if not isinstance(readout, (str, list, tuple)):
            raise InvalidReadoutError(f"readout must be a name ({', '.join(READOUTS)}), a module path or a list of them, "
                                      f"got {readout!r}")
        names = (readout,) if isinstance(readout, str) else tuple(readout)
        if not names:
            raise InvalidReadoutError("give at least one readout")
        twice = next((name for k, name in enumerate(names) if name in names[:k]), None)
        if twice is not None:
            raise InvalidReadoutError(f"readout {twice!r} is listed twice")
        memory_limit = _memory_limit(memory_limit)
        ids = self._validate_ids(input_ids)
        if isinstance(seed, Tokens):
            seed.check(ids.shape[1])
        if not (positions is None or positions == "all") and not {"logits", "hidden"} & set(names):
            raise InvalidReadoutError("positions= reads 'logits' and 'hidden'; other readouts have every position")
        reads = {name: self._read_positions(positions if name in ("logits", "hidden") else "all", name, ids.shape[1])
                 for name in names}
        every_logit = isinstance(targets, str) and targets == "all"
        if not (targets is None or every_logit) and "logits" not in names:
            raise InvalidReadoutError("targets= chooses what the 'logits' readout explains; add that readout")
        wanted = (self._resolve_targets(targets, ids.shape[0]) if "logits" in names and not every_logit else None)
        inputs = self._inputs(ids, attention_mask)
        captured = self._capture(inputs)
        head = self._linear_head(captured) if wanted is not None else None
        computed = tuple(dict.fromkeys("hidden" if (n == "logits" and head is not None) else n for n in names))
        module, counts = self._module(captured, seed, computed)
        last = [ids.shape[1] - 1]
        target_rows = 0 if head is None else ids.shape[0] * len(reads["logits"] or range(ids.shape[1])) * head[0].shape[0]
        plan = self._plan(module, captured, seed, ids, last_position_read=set(computed) <= {"logits", "hidden"}
                          and all(r == last for r in reads.values()), target_rows=target_rows)
        arguments = [inputs[name] for name in captured.inputs]
        labels = self._labels(seed, ids, captured)
        count = _component_count(labels, ids)
        shard = shards.shard_for(distributed, gather, causal=plan.blocked, attention=self.policy.attention,
                                 compiled=self.torch_compile)
        if shard is not None:
            shards.check_same_inputs(ids, shard)
            count = max(shard.rows(count - 1))  # the most any process holds
        with shards.together(shard):
            estimate = guard(self.estimate_memory(module, captured, ids, count, plan), memory_limit, self.device, ids.shape[1])
        with shards.sharded(shard):
            outputs = plan.run(module, arguments)
        if shard is not None:
            outputs = shards.gather(outputs, shard)
            if outputs is None:
                return None
        if labels is None:
            labels = [f"part {k}" for k in range(outputs[0][1].shape[0] - 1)] + ["rest"]
        values, start = {}, 0
        for name, count in zip(computed, counts):
            values[name] = outputs[start:start + count]
            start += count

        def read(name: str, at: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
            """(total, components) of a position-wise readout at positions ``at`` (``None``: all)."""
            (total, components), = values[name]
            if plan.last_position_only or at is None:  # a restricted pass computed the last position only
                return total, components
            index = torch.tensor(at, device=total.device)
            return total.index_select(1, index), components.index_select(2, index)

        results: dict[str, Attribution] = {}
        for name in names:
            common = dict(labels=labels, input_ids=ids, readout=name, memory_estimate=estimate, positions=reads[name],
                          resolve_target=self._resolve_targets if name == "logits" else None)
            if name == "layers":
                pairs = values[name]
                results[name] = Attribution(torch.stack([p[1] for p in pairs]), torch.stack([p[0] for p in pairs]),
                                            **{**common, "positions": None}, component_axis=1)
            elif name == "logits" and wanted is not None:
                total, components = read("hidden" if head is not None else "logits", reads[name])
                parts, value, titles = self._target_parts(wanted, total, components, head)
                results[name] = Attribution(parts, value, **common, targets=wanted, target_labels=titles)
            else:
                results[name] = Attribution(*reversed(read(name, reads[name])), **common)
        check_sums({name: (a.total, a.components, a.component_axis) for name, a in results.items()}, module, arguments,
                   plan, self.dtype, strict)
        self._describe(list(results.values()), seed, captured, ids, attention_mask, texts)
        return results[names[0]] if isinstance(readout, str) else results

    def decompose_nodes(self, input_ids: Any, seed: Seed, nodes: Sequence[torch.fx.Node], *, memory_limit: float | None = None,
                        strict: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(real value, components) of each of ``nodes`` — nodes of the graph captured for ``input_ids``
        (:meth:`locations_for`), including values no readout names, such as a head's output before its output
        projection — for one pass of ``seed``.  Planned, guarded and checked as :meth:`attribute` is: each value's
        components (leading axis, rest last) sum to it within :data:`TOLERANCE`.

        >>> where = decomposed.locations_for(decomposed.prompt_inputs(ids))                    # doctest: +SKIP
        >>> decomposed.decompose_nodes(ids, fxdepass.tokens(), [p.node for p in fxdepass.tokens().points(where)])  # doctest: +SKIP
        """
        inputs = self.prompt_inputs(input_ids)
        ids, captured = inputs["input_ids"], self._capture(inputs)
        nodes = tuple(nodes)
        key = (id(captured), seed, nodes)
        if key not in self._modules:
            self._modules[key] = (self._build(captured, seed, list(nodes)), [len(nodes)])
        module = self._modules[key][0]
        plan = self._plan(module, captured, seed, ids)
        arguments = [inputs[name] for name in captured.inputs]
        guard(self.estimate_memory(module, captured, ids, _component_count(self._labels(seed, ids, captured), ids), plan),
              _memory_limit(memory_limit), self.device, ids.shape[1])
        outputs = [tuple(pair) for pair in plan.run(module, arguments)]
        check_sums({node.name: (real, parts, 0) for node, (real, parts) in zip(nodes, outputs)}, module, arguments, plan,
                   self.dtype, strict)
        return outputs

    def _labels(self, seed: Seed, ids: torch.Tensor, captured: CapturedModel) -> list[str] | None:
        """The labels of ``seed``'s components for these prompts (``None``: a custom seed without names)."""
        if isinstance(seed, Custom) and not seed.names:
            return None
        return seed.labels(ids, self.locations_of(captured), self.tokenizer)

    def _read_positions(self, positions: Any, readout: str, length: int) -> list[int] | None:
        """The positions ``readout`` is read at (``None``: all): ``positions`` is ``None`` (the last for logits,
        all otherwise), ``"last"``, ``"all"``, a position or a list of distinct positions (negative from the end);
        only ``"logits"`` and ``"hidden"`` are given anything but ``"all"``."""
        if positions is None:
            positions = "last" if readout == "logits" else "all"
        if isinstance(positions, str):
            if positions not in ("last", "all"):
                raise InvalidInputError(f"positions={positions!r}: give 'last', 'all' or a list of positions")
            if positions == "all":
                return None
            positions = [length - 1]
        if isinstance(positions, torch.Tensor):
            has_data(positions, "positions")
        one = not isinstance(positions, (list, tuple, range)) and not (isinstance(positions, torch.Tensor) and positions.ndim)
        listed = [integer(p, "positions") for p in ([positions] if one else positions)]
        if not listed:
            raise InvalidInputError("positions is empty: give 'last', 'all' or at least one position")
        normal, = index_groups([listed], length, what="positions", unit="position",
                               scope=f"the prompt has {length} tokens")
        return list(normal)

    def _resolve_targets(self, targets: Any, batch: int) -> list[Target]:
        """One checked target per prompt (fxdepass/targets.py ``per_prompt``) with this model's tokenizer."""
        return per_prompt(targets, batch, self.tokenizer, self.vocab_size)

    def _target_parts(self, targets: list[Target], total: torch.Tensor, components: torch.Tensor,
                      head: tuple[torch.Tensor, torch.Tensor | None] | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Each component's share of each prompt's target, ``[M+1, batch, positions, 1]``, the targets' real values
        ``[batch, positions, 1]`` and their labels, from the readout read at the target positions: the final hidden
        state when ``head`` (its weight and bias) maps it to the logits, else the logits themselves.

        A target is ``c·z + o`` with ``c`` and ``o`` frozen from the real logits (fxdepass/targets.py), so a
        component's share is ``c·z_m``, and through the head ``(cW)·h_m`` with ``c·b + o`` to rest."""
        logits = total if head is None else torch.nn.functional.linear(total, *head)
        coefficients = torch.stack([t.coefficients(logits[b]) for b, t in enumerate(targets)])   # [B, P, V]
        constant = torch.stack([t.constant(logits[b]) for b, t in enumerate(targets)])           # [B, P]
        value = torch.stack([t.value(logits[b]) for b, t in enumerate(targets)])                 # [B, P]
        if head is None:
            parts = torch.einsum("mbpv,bpv->mbp", components, coefficients)
        else:
            weight, bias = head
            flat = coefficients.flatten(0, 1)
            # token targets have one or two nonzero coefficients: their rows of the head are gathered, not multiplied
            sparse = bool((flat != 0).sum(-1).max() <= 2)
            rows = torch.sparse.mm(flat.to_sparse(), weight) if sparse else flat @ weight
            parts = torch.einsum("mbpd,bpd->mbp", components, rows.view(*coefficients.shape[:2], -1))
            if bias is not None:
                constant = constant + coefficients @ bias
        parts[-1] += constant
        titles = [t.label(self.tokenizer) if not isinstance(t, Predicted)
                  else Token(int(logits[b, -1].argmax())).label(self.tokenizer) for b, t in enumerate(targets)]
        return parts.unsqueeze(-1), value.unsqueeze(-1), titles

    def estimate_memory(self, module: torch.fx.GraphModule, captured: CapturedModel, ids: torch.Tensor,
                        components: int, plan: PassPlan | None = None) -> int:
        """Estimated peak bytes of one decomposed pass in this model's compute dtype, run as ``plan`` says (default:
        the dense module); see :func:`fxdepass.planning.estimate_memory`.

        >>> decomposed.estimate_memory(module, captured, ids, components=ids.shape[1] + 1)  # doctest: +SKIP
        50331648
        """
        return estimate_memory(module, captured, ids, components, plan or PassPlan(), self.dtype)

    def _plan(self, module: torch.fx.GraphModule, captured: CapturedModel, seed: Seed, ids: torch.Tensor, *,
              last_position_read: bool = False, target_rows: int = 0) -> PassPlan:
        """The plan of one pass with this model's options (:func:`fxdepass.planning.plan_pass`)."""
        return plan_pass(module, captured, ids, seed, causal=lambda: self.causal, causal_blocks=self.causal_blocks,
                         compiled=self.torch_compile, last_position_read=last_position_read, target_rows=target_rows)

    def _linear_head(self, captured: CapturedModel) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) when the logits are a plain linear map of the ``"hidden"`` readout, else ``None``."""
        where = self.locations_of(captured)
        logits, hidden = readout_nodes("logits", where)[0], readout_nodes("hidden", where)[0]
        linear = projection_args(torch.ops.aten.linear.default)  # the head is applied as ``linear``
        if logits.target is not torch.ops.aten.linear.default or logits.args[linear.features] is not hidden:
            return None
        tensors = {name: tensor for name, (_, tensor) in captured.tensors.items()}
        weight, bias = logits.args[linear.weight], linear.bias_of(logits.args)
        if weight.name not in tensors or (bias is not None and bias.name not in tensors):
            return None
        # detached: the target rows are computed outside the pass's no_grad, and need no autograd graph
        return tensors[weight.name].detach(), None if bias is None else tensors[bias.name].detach()

    def _numbers_positions_from_zero(self) -> bool:
        """Whether the model, given no ``position_ids``, numbers positions 0…n−1 as fxdepass feeds them.

        RoBERTa-style models count from the padding index instead; for them fxdepass feeds no positions
        (left-padded prompts then get the model's own numbering)."""
        ids = probe_ids(self.model, (1, 6), offset=17)
        given = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        given = {**{k: v for k, v in given.items() if k in self.input_names}, **run_options(self.model)}
        with torch.no_grad(), evaluating(self.model):
            own = self.model(**given)[0]
            fed = self.model(**given, position_ids=torch.arange(6, device=ids.device).unsqueeze(0))[0]
        return bool(torch.equal(own, fed))

    @functools.cached_property
    def causal(self) -> bool:
        """Whether the model is causal: changing the last token leaves every earlier output unchanged."""
        ids = probe_ids(self.model, (1, 8), offset=23)
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % (self.vocab_size or 2)
        with torch.no_grad(), evaluating(self.model):
            first, second = (self.model(**self._inputs(x), **run_options(self.model))[0] for x in (ids, changed))
        return bool(torch.equal(first[:, :-1], second[:, :-1]))

    def attribute_dataset(self, prompts: Sequence[Any], *, batch_size: int = 8, targets: Any = None,
                          progress: bool | None = None, **attribute_kwargs: Any) -> Iterator[Record]:
        """Attribute many prompts, ``batch_size`` at a time and batched by length, yielding one
        :class:`~fxdepass.dataset.Record` per prompt (with a progress bar on a terminal); see
        :func:`fxdepass.dataset.attribute_dataset`.

        >>> for record in decomposed.attribute_dataset(prompts, batch_size=16):          # doctest: +SKIP
        ...     print(record.prompt, record.top(3))
        """
        return attribute_dataset(self, prompts, batch_size=batch_size, targets=targets, progress=progress,
                                 **attribute_kwargs)

    def generate_attributed(self, input_ids: Any, max_new_tokens: int = 20, *, target: str = "logit",
                            **generate_kwargs: Any) -> "GeneratedAttribution":
        """Generate text (greedy unless sampling kwargs say otherwise) and attribute every generated
        token's logit (``target="logprob"``: its log-probability, normaliser frozen, fxdepass/targets.py)
        to the prompt tokens and the tokens generated before it, in one decomposed pass.

        >>> result = decomposed.generate_attributed(ids, max_new_tokens=5)           # doctest: +SKIP
        >>> result.scores(0)     # contributions to the first generated token's logit
        >>> decomposed.generate_attributed(ids, max_new_tokens=5, target="logprob").value(0)   # doctest: +SKIP
        """
        if target not in ("logit", "logprob"):
            raise InvalidInputError(f"target={target!r}; choose 'logit' or 'logprob'")
        if not callable(getattr(self.model, "generate", None)) or self.default_readout != "logits":
            raise InvalidInputError(f"generate_attributed() needs a model that generates text (a *ForCausalLM with "
                                    f"generate() and logits); {type(self.model).__name__} is not one")
        ids = self._validate_ids(self.encode(input_ids).input_ids)
        if ids.shape[0] != 1:
            raise InvalidInputError("generate_attributed() takes one prompt at a time")
        if integer(max_new_tokens, "max_new_tokens") < 1:
            raise InvalidInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        config = getattr(self.model, "generation_config", None)
        generate_kwargs.setdefault("do_sample", False)
        if getattr(config, "pad_token_id", None) is None:
            generate_kwargs.setdefault("pad_token_id", getattr(config, "eos_token_id", None) or 0)
        with torch.no_grad(), evaluating(self.model):
            sequence = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                           **generate_kwargs)
        sequence = sequence[:, : ids.shape[1] + max_new_tokens].to(ids.device)
        length = sequence.shape[1] - 1
        generated = TokenAt(tuple(sequence[0, ids.shape[1]:].tolist()))
        attribution = self.attribute(sequence[:, :-1], positions=list(range(ids.shape[1] - 1, length)),
                                     targets=[generated if target == "logit" else LogProb(generated)])
        return GeneratedAttribution(sequence, ids.shape[1], attribution)


@dataclasses.dataclass
class GeneratedAttribution:
    """Attribution of generated text: for generated token ``t`` (at ``sequence[0, prompt_length + t]``),
    the contributions of every earlier token (prompt and generated) and rest to its logit, or to its
    log-probability when generated with ``target="logprob"``."""

    sequence: torch.Tensor
    prompt_length: int
    #: read at the positions that predict each generated token, each for the token generated there
    attribution: Attribution

    @property
    def generated(self) -> torch.Tensor:
        """The generated token ids."""
        return self.sequence[0, self.prompt_length:]

    def _step(self, step: int) -> int:
        count = len(self.generated)
        if isinstance(step, bool) or not isinstance(step, int) or not -count <= step < count:
            raise InvalidInputError(f"step {step!r} is outside the {count} generated tokens")
        return step % count

    def scores(self, step: int) -> torch.Tensor:
        """Contributions to generated token ``step``'s :meth:`value`: ``[sequence length before it + 1]`` (rest last)."""
        step = self._step(step)
        position = self.prompt_length - 1 + step
        values = self.attribution.scores(position=position)
        return torch.cat((values[: position + 1], values[-1:]))

    def value(self, step: int) -> float:
        """The real value explained for generated token ``step``: its logit, or its log-probability when
        generated with ``target="logprob"``."""
        return float(self.attribution.total[0, self._step(step), 0])

    def labels(self, step: int) -> list[str]:
        """Labels of :meth:`scores`'s entries."""
        return self.attribution.labels[: self.prompt_length + self._step(step)] + ["rest"]


def compile(
    model: torch.nn.Module,
    *,
    example_inputs: Any = None,
    activation: str = "softmax",
    temperature: float = 0.1,
    attention: str = "frozen",
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    causal_blocks: int = 8,
    torch_compile: bool = False,
    cache: bool = True,
    progress: bool | None = None,
) -> DecomposedModel:
    """Compile a Hugging Face model for DePass attribution.

    ``activation`` picks how activations are allocated (``"softmax"``, ``"linear"``, ``"max"``), with
    ``temperature`` for softmax; ``dtype=torch.float64`` runs real and decomposed passes in float64.
    ``attention="frozen"`` (default, the paper's rule) credits attention only through its values;
    ``attention="routed"`` also credits components for where attention goes, by their part of the
    scores, still summing exactly (Note [Attention routing credit] in rules/attention.py; needs
    ``scaled_dot_product_attention``, the default ``attn_implementation="sdpa"``).
    ``causal_blocks`` splits token components of a causal model into that many blocks so that the
    zeros before each token's position are never computed (0 or 1: one dense block).
    ``torch_compile=True`` runs the dense generated module through ``torch.compile`` (measured in
    docs/performance.md: compiling takes minutes and did not pay off on CPU there).
    ``cache`` keeps the captured graph in a cache directory shared by processes (fxdepass/cache.py:
    ``$FXDEPASS_CACHE`` or ``~/.cache/fxdepass``; ``FXDEPASS_NO_CACHE=1`` also turns it off), so that
    compiling the same model again skips ``torch.export``; ``progress`` prints the time of each stage on
    stderr (default: when stderr is a terminal).
    The model itself is never modified.

    >>> decomposed = fxdepass.compile(model, dtype=torch.float64)              # doctest: +SKIP
    >>> decomposed.attribute(input_ids).scores()                               # doctest: +SKIP
    """
    decomposed = DecomposedModel(
        model, example_inputs=example_inputs, activation=activation, temperature=temperature, attention=attention, dtype=dtype,
        tokenizer=tokenizer, causal_blocks=causal_blocks, torch_compile=torch_compile, cache=cache, progress=progress,
    )
    decomposed.graph_module  # build now, so that a missing rule fails at compile time
    return decomposed


def _component_count(labels: list[str] | None, ids: torch.Tensor) -> int:
    """How many components a pass with these ``labels`` has, rest included (``None``, an unnamed custom seed: one
    per position and rest, a guess for the memory estimate)."""
    return len(labels) if labels else ids.shape[1] + 1


def _checked_temperature(temperature: Any, dtype: torch.dtype) -> float:
    """``temperature`` as a float, if the softmax allocation can use it in ``dtype``: both its forms scale by
    ``1/temperature`` (rules/activations.py, fxdepass/blocked.py), which must be a normal number of the dtype.

    >>> _checked_temperature(0.1, torch.float32)
    0.1
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise InvalidInputError(f"temperature must be a positive number, got {temperature!r}")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError(f"temperature must be a positive finite number, got {value}")
    if not dtype.is_floating_point:
        return value  # the dtype itself is refused where it is checked
    info = torch.finfo(dtype)
    low, high = 1 / info.max, 1 / info.tiny
    if not low <= value <= high:
        raise InvalidInputError(
            f"temperature={value:g} does not fit {str(dtype).removeprefix('torch.')}: the allocation scales by "
            f"1/temperature, which would be outside [{info.tiny:.3g}, {info.max:.3g}]; use a temperature in "
            f"[{low:.3g}, {high:.3g}]" + ("" if dtype == torch.float64 else " or dtype=torch.float64"))
    return value


def _has_submodule(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _rebind(module: torch.fx.GraphModule, path: str, tensor: torch.Tensor) -> None:
    """Make ``module``'s attribute at ``path`` (if it reads one there) ``tensor``: a parameter stays one, any
    other tensor is a buffer, as ``torch.fx.GraphModule`` keeps them."""
    owner_path, _, field = path.rpartition(".")
    if not _has_submodule(module, owner_path) or not hasattr(module.get_submodule(owner_path), field):
        return  # no node of this module reads it
    owner = module.get_submodule(owner_path)
    delattr(owner, field)
    if isinstance(tensor, torch.nn.Parameter):
        owner.register_parameter(field, tensor)
    else:
        owner.register_buffer(field, tensor)


def _check_model(model: Any) -> None:
    """Raise unless ``model`` is a ``torch.nn.Module`` whose weights hold values (not on the meta device)."""
    if not isinstance(model, torch.nn.Module):
        raise InvalidInputError(f"compile() takes a torch.nn.Module such as a Hugging Face model, got {model!r} "
                                f"({type(model).__name__})")
    meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise InvalidInputError(f"the model's weights are on the meta device (not loaded), e.g. {meta!r}; load them "
                                "(from_pretrained, or to_empty() then load_state_dict) before compiling")


def _memory_limit(limit: Any) -> float | None:
    """``attribute``'s ``memory_limit``: ``None`` (the default), or a positive number of bytes (``inf``: no limit)."""
    if limit is None:
        return None
    number = real(limit, "memory_limit (bytes)")
    if not number > 0:  # NaN too
        raise InvalidInputError(f"memory_limit must be a positive number of bytes, got {limit!r}")
    return number
