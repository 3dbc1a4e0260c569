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


#: a module's hook dicts: forward, forward-pre (with and without kwargs), backward, backward-pre, state-dict
HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
         "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
         "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def model_state(model: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """Everything about ``model`` fxdepass must leave as it found it: per module its training flag and hooks,
    per parameter and buffer the tensor object, its storage, version counter, dtype, device and
    ``requires_grad``, and the config; and a copy of every value.  Compare two with :func:`assert_same_state`.

    >>> before = model_state(model); fxdepass.compile(model); assert_same_state(before, model_state(model))  # doctest: +SKIP
    """
    facts: dict = {}
    for path, module in model.named_modules(remove_duplicate=False):
        facts[path, "training"] = module.training
        for kind in HOOKS:
            facts[path, kind] = dict(getattr(module, kind, {}))
    values = {}
    for kind, named in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            facts[name, kind] = (id(tensor), tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device,
                                 tensor.requires_grad)
            values[name] = tensor.detach().clone()
    config = getattr(model, "config", None)
    facts["config"] = config.to_dict() if config is not None else None
    return facts, values


def assert_same_state(before: tuple[dict, dict[str, torch.Tensor]], after: tuple[dict, dict[str, torch.Tensor]]) -> None:
    """Assert two :func:`model_state` snapshots are the same, naming the first difference."""
    assert before[0].keys() == after[0].keys()
    for key, fact in before[0].items():
        assert after[0][key] == fact, (key, fact, after[0][key])
    for name, value in before[1].items():
        assert torch.equal(after[1][name], value), name
