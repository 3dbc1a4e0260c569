"""Readouts: the values whose components an attribution returns.

* ``"logits"``: the model's logits (all positions and vocabulary entries; ``targets`` pick entries);
* ``"hidden"``: the final hidden state with the final norm applied (its scale frozen): the input of
  the language-model head, or an encoder's ``last_hidden_state``.
"""
from __future__ import annotations

import torch
import torch.fx

from .capture import CapturedModel
from .errors import InvalidReadoutError
from .seeds import module_path

__all__ = ["READOUTS", "locate_readout"]

READOUTS = ("logits", "hidden")


def _head_path(model: torch.nn.Module) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def locate_readout(readout: str, captured: CapturedModel, model: torch.nn.Module) -> torch.fx.Node:
    """The node of ``captured``'s graph holding ``readout``."""
    if readout == "logits":
        if "logits" not in captured.outputs:
            raise InvalidReadoutError(
                f"{type(model).__name__} returns no logits (its outputs: {sorted(captured.outputs)}); use readout='hidden'"
            )
        return captured.outputs["logits"]
    if readout == "hidden":
        head = _head_path(model)
        if head is not None:
            for node in captured.graph.nodes:
                if node.op == "call_function" and module_path(node) == head:
                    return node.all_input_nodes[0]
        if "last_hidden_state" in captured.outputs:
            return captured.outputs["last_hidden_state"]
        raise InvalidReadoutError(f"could not find the final hidden state of {type(model).__name__}")
    raise InvalidReadoutError(f"unknown readout {readout!r}; choose one of {READOUTS}")
