"""A direct computation of a Mixtral MoE block's terms, per token, expert and neuron (the test oracle
for ``fxdepass.neurons`` on mixture-of-experts layers)."""
from __future__ import annotations

import torch


def mixtral_expert_terms(moe: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[tokens, experts, neurons]``: router weight × act(gate)·up of each expert's neurons (zero where
    the router did not choose the expert) — and the router weights ``[tokens, experts]``, in float64.

    Expert ``e``'s output is ``terms[:, e] @ moe.experts.down_proj[e].T``.
    """
    with torch.no_grad():
        return _terms(moe, x.reshape(-1, x.shape[-1]).double())


def _terms(moe: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, weights, chosen = moe.gate(x.float())
    routed = torch.zeros(x.shape[0], moe.experts.num_experts, dtype=torch.float64)
    routed.scatter_add_(1, chosen, weights.double())
    gate, up = torch.einsum("td,eid->tei", x, moe.experts.gate_up_proj.double()).chunk(2, dim=-1)
    return routed[..., None] * moe.experts.act_fn(gate) * up, routed
