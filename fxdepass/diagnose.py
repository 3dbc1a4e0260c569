"""Diagnosis: where a decomposed pass goes wrong — the first node whose components stop summing to
its real value, or the first node whose value is not finite.  Only run when a check has failed."""
from __future__ import annotations

import dataclasses
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


def _describe(node: torch.fx.Node) -> str:
    if node.op == "get_attr":
        return f"{node.name} (the model's tensor {node.target})"
    return f"{node.name} at {node_location(node)}"


class _Checker(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, tolerance: float):
        super().__init__(module, garbage_collect_values=False)
        self.tolerance = tolerance
        self.found = Diagnosis()

    def run_node(self, node: torch.fx.Node) -> Any:
        out = super().run_node(node)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and self.found.not_finite is None:
            if not bool(torch.isfinite(out).all()):
                self.found.not_finite = _describe(node)
        real = node.meta.get("fxdepass_real")
        if real is not None and isinstance(out, torch.Tensor) and self.found.diverges is None:
            value = self.env[real]
            if isinstance(value, torch.Tensor) and out.shape[1:] == value.shape:
                scale = value.abs().max().clamp_min(torch.finfo(value.dtype).tiny)
                if float((out.sum(0) - value).abs().max() / scale) > self.tolerance:
                    self.found.diverges = _describe(node)
        return out


def diagnose(module: torch.fx.GraphModule, arguments: list[torch.Tensor], tolerance: float) -> Diagnosis:
    """Run ``module`` checking every node; see :class:`Diagnosis`.

    >>> diagnose(decomposed.graph_module, [ids, mask, positions], 1e-9).diverges      # doctest: +SKIP
    'layers_0_mlp_act_fn_silu_c at model.layers.0.mlp.act_fn (SiLU), …'
    """
    checker = _Checker(module, tolerance)
    with torch.no_grad():
        checker.run(*arguments)
    return checker.found
