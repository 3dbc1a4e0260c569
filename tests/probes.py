"""Reading a model's intermediate values for direct computations in tests and tools."""
from __future__ import annotations

from typing import Any, Callable

import torch


def module_io(module: torch.nn.Module, run: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, output)`` of ``module`` during ``run()`` (its last call), without gradients.

    >>> x, y = module_io(model.model.layers[0].mlp, lambda: model(ids))     # doctest: +SKIP
    """
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen["x"], seen["y"]
