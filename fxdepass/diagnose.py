"""Diagnosis: where a decomposed pass goes wrong — the first node whose components stop summing to
its real value, or the first node whose value is not finite.  Only run when a check has failed: by the
dense module's interpreter, which holds every value whole, and where that does not reproduce the
failure by the runner that failed (fxdepass/blocked.py's), since the runners compute differently: a
value one of them gets wrong the other may get right.  That runner holds some values only in neuron
slices or component chunks, which cannot be compared with their real value, so its divergence may be
found a few nodes late."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.fx

from .errors import node_location

__all__ = ["Diagnosis", "diagnose"]


@dataclasses.dataclass
class Diagnosis:
    #: "node (location)" of the first node whose components' sum differs from its real value
    diverges: str | None = None
    #: "node (location)" of the first node whose value holds NaN or inf
    not_finite: str | None = None
    #: whether that node computes components whose real value (the model's own) is finite: the
    #: decomposition, not the model or its inputs, went wrong there
    decomposition: bool = False


def _describe(node: torch.fx.Node) -> str:
    if node.op == "get_attr":
        return f"{node.name} (the model's tensor {node.target})"
    return f"{node.name} at {node_location(node)}"


def _tensors(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a node's value (a tensor, a tuple, the blocked runner's ``Blocks``)."""
    parts = getattr(value, "parts", None)
    if parts is not None:
        value = parts
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [value] if isinstance(value, torch.Tensor) and value.is_floating_point() else []


class _Watch:
    """Mixed into a runner: checks each value it computes.  The blocked runner computes the members of a
    neuron slice or a chunk through ``call_function`` without ``run_node``, so both are watched."""

    tolerance: float
    found: Diagnosis
    env: dict[torch.fx.Node, Any]

    def run_node(self, node: torch.fx.Node) -> Any:
        self.node = node
        out = super().run_node(node)
        self._look(node, out)
        return out

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        out = super().call_function(target, args, kwargs)
        self._look(self.node, out)
        return out

    def _look(self, node: torch.fx.Node, out: Any) -> None:
        real = node.meta.get("fxdepass_real")
        real_value = self.env.get(real) if real is not None else None
        if self.found.not_finite is None and not all(bool(torch.isfinite(t).all()) for t in _tensors(out)):
            self.found.not_finite = _describe(node)
            self.found.decomposition = (isinstance(real_value, torch.Tensor)
                                        and bool(torch.isfinite(real_value).all()))
        if self.found.diverges is not None or not isinstance(real_value, torch.Tensor):
            return
        if hasattr(out, "parts"):  # blocks of components (fxdepass/blocked.py): assembled, read from their first position
            out, base = self._assemble(out, real)
            real_value = self._narrow(real, real_value, base)
        if isinstance(out, torch.Tensor) and out.shape[1:] == real_value.shape:  # not a slice or chunk of it
            scale = real_value.abs().max().clamp_min(torch.finfo(real_value.dtype).tiny)
            if float((out.sum(0) - real_value).abs().max() / scale) > self.tolerance:
                self.found.diverges = _describe(node)


@functools.cache
def _watching(runner: type[torch.fx.Interpreter]) -> type[torch.fx.Interpreter]:
    return type(f"Watching{runner.__name__}", (_Watch, runner), {})


def diagnose(module: torch.fx.GraphModule, arguments: list[torch.Tensor], tolerance: float,
             runner: type[torch.fx.Interpreter] = torch.fx.Interpreter, **options: Any) -> Diagnosis:
    """Run ``module`` with ``runner(module, **options)`` (the runner of the pass that failed; by default the
    dense module's own computation, keeping every value) checking every node; see :class:`Diagnosis`.

    >>> diagnose(decomposed.graph_module, [ids, mask, positions], 1e-9).diverges      # doctest: +SKIP
    'layers_0_mlp_act_fn_silu_c at model.layers.0.mlp.act_fn (SiLU), …'
    """
    if runner is torch.fx.Interpreter:
        options = {"garbage_collect_values": False, **options}
    checker = _watching(runner)(module, **options)
    checker.tolerance, checker.found = tolerance, Diagnosis()
    with torch.no_grad():
        checker.run(*arguments)
    return checker.found
