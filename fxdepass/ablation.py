"""Ablation: zero chosen heads' or neurons' contributions, to check component-level attributions.

Heads are the input features of a layer's attention output projection, neurons those of its MLP down
projection — the same places ``fxdepass.heads`` / ``fxdepass.neurons`` seed, found the same way.  The
zeroing is a forward pre-hook on the projection module, so no parameter is touched and leaving the
context restores the model exactly.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Mapping, Sequence

import torch

from .capture import capture, model_device, model_inputs, probe_ids
from .checks import index_groups, integer, integers
from .errors import InvalidSeedError
from .locations import Locations, module_path

__all__ = ["ablate", "locate"]

_LOCATIONS: "weakref.WeakKeyDictionary[torch.nn.Module, Locations]" = weakref.WeakKeyDictionary()


def locate(model: Any) -> tuple[torch.nn.Module, Locations]:
    """The Hugging Face model behind ``model`` (itself, or a DecomposedModel's) and its :class:`Locations`
    (captured once per model and kept while the model lives).

    >>> root, where = locate(model); where.output_projection(-1).name       # doctest: +SKIP
    """
    if hasattr(model, "locations_of") and hasattr(model, "model"):  # a DecomposedModel
        return model.model, model.locations_of(next(iter(model._captures.values())))
    if model not in _LOCATIONS:
        ids = probe_ids(model, (2, 8))
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        example = {k: v for k, v in example.items() if k in model_inputs(model)}
        _LOCATIONS[model] = Locations(capture(model, example), model)
    return model, _LOCATIONS[model]


def _chosen(chosen: Mapping[int, Sequence[int]] | None, what: str, where: Locations) -> dict[int, tuple[int, ...]]:
    """``ablate``'s ``heads`` or ``neurons``, checked: a mapping from layer (each once, negative from the end) to a
    list of integer indices, e.g. ``{0: [1, 3]}``."""
    if chosen is None:
        return {}
    if not isinstance(chosen, Mapping):
        raise InvalidSeedError(f"ablate(): {what} must map layers to lists of indices, e.g. {{0: [1, 3]}}; got {chosen!r}")
    layers = [where.layer(integer(layer, f"ablate(): a layer of {what}", InvalidSeedError)) for layer in chosen]
    index_groups([layers], None, what=f"ablate({what}=...)", unit="layer", error=InvalidSeedError)
    return {layer: integers(indices, f"ablate(): the {what} of layer {layer}", InvalidSeedError)
            for layer, indices in zip(layers, chosen.values())}


def _zero_features(features: torch.Tensor) -> Any:
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x.index_fill(-1, features.to(x.device), 0.0), *args[1:])  # a no-op but under device_map

    # DecomposedModel.attribute refuses to run while this hook is on (Note [Following the live model] in fxdepass/api.py)
    hook.fxdepass_ablation = True
    return hook


@contextlib.contextmanager
def ablate(
    model: Any,
    heads: Mapping[int, Sequence[int]] | None = None,
    neurons: Mapping[int, Sequence[int]] | None = None,
) -> Iterator[torch.nn.Module]:
    """Within the context, ``model`` runs with those heads' and neurons' contributions zeroed.

    ``model`` is a Hugging Face model or a :class:`fxdepass.DecomposedModel`; layers may be negative.

    >>> with fxdepass.ablate(model, heads={3: [0, 5]}, neurons={-1: [17]}):      # doctest: +SKIP
    ...     logits = model(input_ids).logits
    """
    module_root, where = locate(model)
    device = model_device(module_root)
    heads, neurons = _chosen(heads, "heads", where), _chosen(neurons, "neurons", where)
    plans: list[tuple[torch.fx.Node, torch.Tensor]] = []
    for layer, chosen in heads.items():
        projection = where.output_projection(layer)
        width = int(Locations.features(projection).meta["val"].shape[-1])
        count = where.num_heads
        size = width // count
        chosen, = index_groups([chosen], count, what="ablate()", unit="head", scope=f"layer {layer} has {count} heads",
                               error=InvalidSeedError)
        plans.append((projection, torch.tensor([h * size + i for h in chosen for i in range(size)], dtype=torch.long,
                                              device=device)))
    for layer, chosen in neurons.items():
        if where.experts(layer) is not None:
            raise InvalidSeedError(f"ablate(): layer {layer} is a mixture of experts; neuron ablation "
                                   "supports dense MLPs (fxdepass.neurons(layer, expert=e) attributes experts)")
        projection = where.down_projection(layer)
        width = int(Locations.features(projection).meta["val"].shape[-1])
        chosen, = index_groups([chosen], width, what="ablate()", unit="neuron",
                               scope=f"layer {layer} has {width} neurons", error=InvalidSeedError)
        plans.append((projection, torch.tensor(chosen, dtype=torch.long, device=device)))
    handles = [module_root.get_submodule(module_path(node)).register_forward_pre_hook(_zero_features(features))
               for node, features in plans]
    try:
        yield module_root
    finally:
        for handle in handles:
            handle.remove()
