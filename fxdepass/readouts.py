"""Readouts: the values whose components an attribution returns (SPEC §3).

* ``"logits"``: the model's logits (every position and vocabulary entry);
* ``"hidden"``: the final hidden state with the final norm applied (its scale frozen): the input of
  the language-model head, or an encoder's ``last_hidden_state``;
* ``"layers"``: the residual stream entering the first block and leaving every block (no final norm),
  stacked on a leading layer axis: ``[layers + 1, components, …]``;
* ``"layer L heads"``: the input of layer L's attention output projection (what the ``heads(L)`` seed splits);
* ``"layer L mlp"``: what layer L's MLP adds to the residual stream (the attribution graph's nodes read both);
* any module path (``DecomposedModel.locations()`` lists them): that module's output.

Several readouts come from one decomposed pass.
"""
from __future__ import annotations

import re

import torch
import torch.fx

from .errors import InvalidReadoutError, InvalidSeedError
from .locations import Locations, module_path

__all__ = ["READOUTS", "readout_nodes"]

READOUTS = ("logits", "hidden", "layers")
#: ``"layer L heads"`` and ``"layer L mlp"`` (module paths have no spaces)
_LAYER_PART = re.compile(r"layer (-?\d+) (heads|mlp)")


def _head_path(model: torch.nn.Module) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def readout_nodes(readout: str, where: Locations) -> list[torch.fx.Node]:
    """The nodes of the captured graph holding ``readout`` (one, or one per layer for ``"layers"``)."""
    captured, model = where.captured, where.model
    if not isinstance(readout, str):
        raise InvalidReadoutError(f"a readout is a name or a module path, got {readout!r}")
    if readout == "logits":
        if "logits" not in captured.outputs:
            raise InvalidReadoutError(
                f"{type(model).__name__} returns no logits (its outputs: {sorted(captured.outputs)}); use readout='hidden'"
            )
        return [captured.outputs["logits"]]
    if readout == "hidden":
        head = _head_path(model)
        if head is not None:
            for node in where.nodes:
                if module_path(node) == head:
                    return [node.all_input_nodes[0]]
        if "last_hidden_state" in captured.outputs:
            return [captured.outputs["last_hidden_state"]]
        raise InvalidReadoutError(f"could not find the final hidden state of {type(model).__name__}")
    try:
        part = _LAYER_PART.fullmatch(readout)
        if part is not None:
            layer = int(part.group(1))
            return [Locations.features(where.output_projection(layer)) if part.group(2) == "heads" else where.mlp_output(layer)]
        if readout == "layers":
            return [where.residual_entering(0)] + [where.block_output(i) for i in range(len(where.blocks))]
        return [where.module_output(readout)]
    except InvalidSeedError as error:
        raise InvalidReadoutError(f"unknown readout {readout!r}: choose one of {READOUTS} or a module path "
                                  f"from DecomposedModel.locations() ({error})") from None
