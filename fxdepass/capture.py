"""Capture: a Hugging Face model becomes a functional ATen-level ``torch.fx`` graph.

``torch.export.export(..., strict=False)`` with the cache off, then ``run_decompositions({})`` to
functionalise.  Batch and sequence length are dynamic where the model allows it, so one capture
serves every input shape; otherwise :func:`capture` is called once per shape (the caller caches).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
import time
import warnings
from typing import Any, Iterator, NamedTuple

import torch
import torch.fx
import torch.utils._pytree as pytree

from . import cache as captures
from .errors import CaptureError

__all__ = ["CapturedModel", "capture", "evaluating", "forward_hooks", "stamp", "Stamp", "model_inputs", "model_device",
           "probe_ids", "position_limit", "run_options", "cast_floats"]

#: Model inputs fxdepass passes when the model's ``forward`` accepts them.
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


@dataclasses.dataclass
class CapturedModel:
    """One captured graph and what is needed to run it outside ``torch.export``."""

    graph: torch.fx.Graph
    #: placeholder name → (attribute path in the model, tensor) for parameters, buffers and constants
    tensors: dict[str, tuple[str, torch.Tensor]]
    #: placeholder names of the inputs fxdepass feeds, in order
    inputs: list[str]
    #: output name ("logits", "last_hidden_state", …) → node
    outputs: dict[str, torch.fx.Node]
    #: symbolic (or, for a static capture, concrete) batch and sequence sizes of ``input_ids``
    batch_size: Any
    sequence_length: Any
    dynamic: bool
    #: placeholder name → :func:`stamp` of the model's parameter or buffer it was taken from (constants have none)
    stamps: dict[str, Stamp] = dataclasses.field(default_factory=dict)
    #: the model's forward hooks when it was captured (:func:`forward_hooks`): the graph runs them as they were
    hooks: dict[tuple[str, str, int], Any] = dataclasses.field(default_factory=dict)

    @property
    def batch_symbol(self) -> Any:
        """The symbol of a dynamic batch size (``None`` when the batch is static)."""
        return self.batch_size.node.expr if isinstance(self.batch_size, torch.SymInt) else None

    def axis_of(self, node: torch.fx.Node, size: Any) -> int | None:
        """The first axis of ``node``'s value whose size is ``size`` (a symbol or an int)."""
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        for axis, dim in enumerate(value.shape):
            if _same_size(dim, size):
                return axis
        return None


    def prefixed_axis_of(self, node: torch.fx.Node) -> tuple[int, int] | None:
        """``(axis, k)`` for the axis of ``node``'s value (a ``[batch, …, features]`` activation) whose
        size is the sequence length plus a constant ``k > 0``: positions the model adds of its own
        (CpmAnt's prompt tokens; Note [Positions a model adds] in fxdepass/seeds.py).  In a static
        capture that is the only axis, other than the batch's and the features', longer than the prompt."""
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.ndim < 3:
            return None
        found = []
        for axis, dim in list(enumerate(value.shape))[1:-1]:
            if isinstance(self.sequence_length, torch.SymInt) and isinstance(dim, torch.SymInt):
                added = dim.node.expr - self.sequence_length.node.expr
                if added.is_Integer and int(added) > 0:
                    found.append((axis, int(added)))
            elif not isinstance(self.sequence_length, torch.SymInt) and isinstance(dim, int) and dim > self.sequence_length:
                found.append((axis, dim - self.sequence_length))
        return found[0] if len(found) == 1 else None


class Stamp(NamedTuple):
    """What tells that a model's tensor has changed (Note [Following the live model] in fxdepass/api.py)."""

    #: the tensor object: a parameter replaced (``load_state_dict(assign=True)``, assignment) is another one
    tensor: torch.Tensor
    #: its storage: ``param.data = …`` swaps it
    storage: int
    #: its version counter: every in-place write through it, ``load_state_dict``'s copy included
    version: int
    #: shape, dtype and device, which the captured graph assumes
    layout: tuple[tuple[int, ...], torch.dtype, torch.device]

    def same(self, other: "Stamp") -> bool:
        return self.tensor is other.tensor and self[1:] == other[1:]


def stamp(tensor: torch.Tensor) -> Stamp:
    """The :class:`Stamp` of ``tensor`` now.

    >>> w = torch.zeros(2); before = stamp(w); _ = w.add_(1); stamp(w).same(before)
    False
    """
    return Stamp(tensor, tensor.data_ptr(), tensor._version, (tuple(tensor.shape), tensor.dtype, tensor.device))


def forward_hooks(model: torch.nn.Module) -> dict[tuple[str, str, int], Any]:
    """Every forward and forward-pre hook on ``model``'s modules: (module path, kind, handle id) → hook.

    >>> forward_hooks(torch.nn.Linear(2, 2))
    {}
    """
    return {(path, kind, key): hook for path, module in model.named_modules()
            for kind, hooks in (("forward", module._forward_hooks), ("forward-pre", module._forward_pre_hooks))
            for key, hook in hooks.items() if not _records_outputs(hook)}


def _records_outputs(hook: Any) -> bool:
    """Whether ``hook`` is transformers' own: a model called with ``output_attentions`` or
    ``output_hidden_states`` installs hooks that record those outputs and change nothing (the graph and the
    evaluation call the model so), and they stay on the model."""
    function = getattr(hook, "func", hook)  # functools.partial
    return getattr(function, "__module__", "").startswith("transformers.")


def _same_size(dim: Any, size: Any) -> bool:
    if isinstance(dim, torch.SymInt) != isinstance(size, torch.SymInt):
        return False
    if isinstance(dim, torch.SymInt):
        return dim.node.expr == size.node.expr
    return dim == size


def model_inputs(model: torch.nn.Module) -> tuple[str, ...]:
    """The inputs of :data:`INPUT_NAMES` that ``model.forward`` accepts."""
    parameters = inspect.signature(model.forward).parameters
    return tuple(name for name in INPUT_NAMES if name in parameters)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer): where every tensor fxdepass makes for it lives.

    >>> model_device(torch.nn.Linear(2, 2))
    device(type='cpu')
    """
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


# Note [Probe ids]
# ~~~~~~~~~~~~~~~~
# fxdepass feeds the model token ids of its own to capture it and to probe how it behaves (causal or not,
# how it numbers positions).  They are made on the model's device, so that a model elsewhere (a GPU, or
# the ``meta`` device for shape-only work) is never handed a CPU tensor, and without a random generator,
# whose numbers differ by device: a multiplicative hash (Knuth's, the multiplier a prime) spreads
# consecutive integers over the vocabulary, distinct while there are fewer of them than tokens.


def probe_ids(model: torch.nn.Module, shape: tuple[int, ...], offset: int = 1) -> torch.Tensor:
    """Token ids of ``shape`` scattered over ``model``'s vocabulary, on its device (Note [Probe ids]);
    another ``offset`` gives other ids.

    >>> probe_ids(torch.nn.Linear(2, 2), (1, 4))   # no config: a vocabulary of 2
    tensor([[1, 0, 1, 0]])
    """
    vocabulary = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    positions = torch.arange(offset, offset + math.prod(shape), device=model_device(model))
    return (positions * 2654435761 % vocabulary).view(shape)


def run_options(model: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments that turn the cache off, for every call fxdepass makes to ``model``.

    Some models (Granite-MoE) take ``use_cache`` only through ``**kwargs``; the config saying it
    has a cache is then what tells us the option is understood.

    >>> run_options(torch.nn.Linear(2, 2))
    {}
    """
    parameters = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "use_cache" in parameters or (takes_kwargs and hasattr(getattr(model, "config", None), "use_cache")):
        return {"use_cache": False}
    return {}


def position_limit(model: torch.nn.Module) -> int | None:
    """The longest prompt the model takes (``config.max_position_embeddings``), or ``None`` if it sets
    none (XLNet's ``-1`` means unlimited).

    >>> position_limit(torch.nn.Linear(2, 2)) is None
    True
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


# Note [Every module's own mode]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# fxdepass runs the model in eval mode (no dropout) but must hand it back as it came.  Saving the
# root's ``training`` and calling ``model.train(saved)`` afterwards is not that: ``train`` sets every
# submodule's flag to the root's, so a root in eval mode with one MLP in train mode would come back
# with that MLP in eval mode.  :func:`evaluating` saves each module's own flag and restores it by
# assignment (not through ``train``, which would recurse and could run a module's override again).


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the context ``model`` is in eval mode; afterwards every module has its own training flag back
    (Note [Every module's own mode]).  Every place fxdepass runs or exports the model goes through this.

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).eval(); _ = model[1].train()
    >>> with evaluating(model):
    ...     model[1].training
    False
    >>> model.training, model[1].training
    (False, True)
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


# Note [Export without autograd]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Exported with autograd on, a ``torch.no_grad()`` region inside the model (HRM runs its early
# low-level cycles without gradients) becomes a ``set_grad_enabled`` submodule, and its nodes come
# back from ``run_decompositions`` without their ``nn_module_stack``: the blocks called there could not
# be found.  fxdepass never differentiates the captured graph, so it is exported with autograd off,
# where such a region is an ordinary part of the graph.


def capture(model: torch.nn.Module, example: dict[str, torch.Tensor], *, dynamic: bool = True, cache: bool = True,
            progress: bool | None = None) -> CapturedModel:
    """Export ``model`` on the ``example`` inputs; the model is left exactly as it was.  With ``cache`` the
    program comes from, or goes to, the capture cache (fxdepass/cache.py); ``progress`` prints each stage's
    time on stderr (default: when stderr is a terminal).

    >>> captured = capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})  # doctest: +SKIP
    """
    kwargs: dict[str, Any] = {**example, **run_options(model)}
    limit = position_limit(model)
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1024)
        sequence = torch.export.Dim("sequence", min=2, max=max(limit or 4096, 3))
        shapes = {k: ({0: batch, 1: sequence} if k in example else None) for k in kwargs}
    hooks = forward_hooks(model)
    name = type(model).__name__
    # Forward hooks are traced into the graph, and code has no key (Note [What the capture cache keeps])
    entry = captures.Entry.of(model, kwargs, shapes) if captures.enabled(cache) and not hooks else None
    program = None
    if entry is not None:
        with _stage(f"reading {name}'s capture from {captures.directory()}", progress):
            program = entry.load(model)
    if program is None:
        try:
            with warnings.catch_warnings(), evaluating(model):
                warnings.simplefilter("ignore")
                with _stage(f"exporting {name}", progress), torch.no_grad():  # Note [Export without autograd]
                    program = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
                with _stage("functionalising", progress):
                    program = program.run_decompositions({})
        except Exception as error:  # torch.export raises many unrelated types
            raise CaptureError(
                f"torch.export could not capture {name}: {type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}. Things to try: "
                "load the model with attn_implementation='eager' or 'sdpa', or pass static shapes "
                "(fxdepass.compile(..., example_inputs=...) with the exact prompt shape)."
            ) from error
        if entry is not None:
            with _stage("saving the capture", progress):
                entry.store(program)
    captured = _captured(model, program, example, dynamic)
    captured.hooks = hooks
    return captured


@contextlib.contextmanager
def _stage(message: str, progress: bool | None) -> Iterator[None]:
    """``fxdepass: <message> … 4.1 s`` on stderr around a stage of compiling, when ``progress`` (``None``:
    when stderr is a terminal, so tests and pipes stay quiet)."""
    show = sys.stderr.isatty() if progress is None else progress
    started = time.perf_counter()
    if show:
        print(f"fxdepass: {message} …", end="", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        if show:
            print(f" {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def _captured(model: torch.nn.Module, program: Any, example: dict[str, torch.Tensor], dynamic: bool) -> CapturedModel:
    from torch.export.graph_signature import InputKind

    graph = program.graph_module.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    tensors: dict[str, tuple[str, torch.Tensor]] = {}
    stamps: dict[str, Stamp] = {}
    inputs: list[str] = []
    for spec in program.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensor = model.get_parameter(spec.target) if spec.kind == InputKind.PARAMETER else model.get_buffer(spec.target)
            tensors[name], stamps[name] = (spec.target, tensor), stamp(tensor)
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            tensors[name] = (spec.target, program.constants[spec.target])
        elif spec.kind == InputKind.USER_INPUT and name in example:
            inputs.append(name)
        elif placeholders[name].users:
            raise CaptureError(f"captured graph uses input {name!r} that fxdepass does not feed")
    output_node = next(n for n in graph.nodes if n.op == "output")
    structured = pytree.tree_unflatten(list(output_node.args[0]), program.call_spec.out_spec)
    outputs = {_output_name(path): node for path, node in pytree.tree_flatten_with_path(structured)[0]
               if isinstance(node, torch.fx.Node)}
    shape = placeholders["input_ids"].meta["val"].shape
    return CapturedModel(graph, tensors, inputs, outputs, shape[0], shape[1], dynamic, stamps)


def _output_name(path: tuple) -> str:
    """An output's name from its place in the model's output: ``logits``, ``mems.0`` (a tuple inside an
    output), ``0`` (a plain tuple)."""
    return ".".join(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path)


def cast_floats(graph: torch.fx.Graph, dtype: torch.dtype) -> None:
    """Make every floating dtype named in ``graph`` ``dtype``, in place; drop dtype assertions.

    This is SPEC §5's precision policy (float64 mode): casts to a lower precision (Hugging Face norms
    compute in float32) become no-ops, so the real and the decomposed computation both run in ``dtype``.
    """

    def cast(value: Any) -> Any:
        return dtype if isinstance(value, torch.dtype) and value.is_floating_point else value

    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            continue
        node.args = torch.fx.node.map_aggregate(node.args, cast)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, cast)
        # Factories that relied on the default dtype (``torch.eye(n)``) get it spelled out.
        value = node.meta.get("val")
        schema = getattr(node.target, "_schema", None)
        if (
            isinstance(value, torch.Tensor) and value.dtype.is_floating_point and schema is not None
            and any(a.name == "dtype" and a.kwarg_only for a in schema.arguments) and node.kwargs.get("dtype") is None
        ):
            node.kwargs = {**node.kwargs, "dtype": dtype}
