"""Independent test oracle of SPEC semantics: token-level DePass for Hugging Face Llama models.

This module is a plain, loop-per-layer implementation of the token-level decomposed forward pass
(DePass, NeurIPS 2025) as specified in SPEC section 2, written directly from the weights of a
``LlamaForCausalLM``.  It never calls the Hugging Face decoder layers' forward and shares no code
with ``fxdepass``; it exists so the test suite can compare the library against a direct reading of
the equations.

Everything is computed in float64 ("exact float64" mode): RMSNorm without a float32 cast, RoPE in
float64.

Semantics implemented (component axis first, index ``N`` is *rest*):

* seed: ``C[m, m, :] = h0[m]`` (the embedding of token ``m``), everything else (and rest) zero;
* RMSNorm: the scale ``1/rms(x)`` is taken from the real ``x`` and frozen; the weight multiplies
  every component;
* linear maps act on every component; biases (if any) go to rest;
* attention: probabilities from the real ``q``, ``k`` (causal, GQA, RoPE, scale ``1/sqrt(hd)``) are
  frozen; ``out_m = P @ v_m``;
* gated MLP ``down(silu(gate(n)) * up(n))``: ``silu(g)`` is allocated among the components present
  at each element (``g_m != 0`` exactly) by ``softmax_m(g_m / T)``; with ``sink=True`` component 0
  is excluded at every position other than 0; elements with no present component go entirely to
  rest; the up projection is frozen at its real value;
* residual additions are componentwise; the final norm uses its frozen real scale.
"""

import math
from typing import Any

import torch

DT = torch.float64


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        return 10000.0
    return float(theta)


def _weight(linear) -> torch.Tensor:
    return linear.weight.detach().to(DT)


def _bias(linear):
    b = getattr(linear, "bias", None)
    if b is None:
        return None
    return b.detach().to(DT)


def _linear_real(x: torch.Tensor, linear) -> torch.Tensor:
    """Real value: x @ W^T + b."""
    y = x @ _weight(linear).T
    b = _bias(linear)
    if b is not None:
        y = y + b
    return y


def _linear_components(c: torch.Tensor, linear) -> torch.Tensor:
    """Components [M+1, N, in] -> [M+1, N, out]; the bias goes to the last (rest) component."""
    y = c @ _weight(linear).T
    b = _bias(linear)
    if b is not None:
        y[-1] = y[-1] + b
    return y


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Frozen scale 1/rms(x) of the real x, shape [N, 1]."""
    return torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat([-x2, x1], dim=-1)


def depass_tokens_llama(
    model: Any, input_ids: torch.Tensor, *, sink: bool = True, temperature: float = 0.1
) -> dict[str, torch.Tensor]:
    """Token-level DePass of a ``LlamaForCausalLM`` on one prompt, in float64.

    Returns a dict with
      "logits"            [N, V]            real logits (oracle's own float64 forward);
      "logits_components" [N+1, N, V]       logit components (component m = token m, index N = rest);
      "layers"            [L+1, N+1, N, D]  residual-stream components, index 0 = before layer 0,
                                            index l+1 = after layer l (no final norm);
      "layers_real"       [L+1, N, D]       real residual stream at the same points;
      "hidden_components" [N+1, N, D]       components after the final norm (frozen scale);
      "scores"            [N+1]             components of the target logit at the last position;
      "target"            int               argmax of the real logits at the last position.
    """
    config = model.config
    D = config.hidden_size
    H = config.num_attention_heads
    KV = config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or D // H
    eps = float(config.rms_norm_eps)
    theta = _rope_theta(config)
    group = H // KV

    ids = input_ids.reshape(-1).long()
    N = ids.shape[0]
    M = N + 1  # number of components (N tokens + rest)
    REST = N

    with torch.no_grad():
        # ---- embeddings and seed ---------------------------------------------------------------
        emb = model.model.embed_tokens.weight.detach().to(DT)
        h = emb[ids].clone()  # [N, D] real residual stream
        C = torch.zeros(M, N, D, dtype=DT)  # components
        for m in range(N):
            C[m, m] = h[m]

        # ---- RoPE tables (float64) -------------------------------------------------------------
        inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=DT) / hd))  # [hd/2]
        pos = torch.arange(N, dtype=DT)
        freqs = torch.outer(pos, inv_freq)  # [N, hd/2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [N, hd]
        cos = angles.cos()
        sin = angles.sin()

        causal = torch.ones(N, N, dtype=torch.bool).tril()  # [query, key]
        scale = 1.0 / math.sqrt(hd)

        layers_real = [h.clone()]
        layers = [C.clone()]

        for layer in model.model.layers:
            attn = layer.self_attn
            mlp = layer.mlp

            # ================= attention block =================
            x = h
            w_in = layer.input_layernorm.weight.detach().to(DT)
            r = _rms_scale(x, eps)  # [N, 1], frozen
            a = x * r * w_in  # real normed input [N, D]
            a_c = C * r * w_in  # components [M, N, D]

            q = _linear_real(a, attn.q_proj).reshape(N, H, hd)
            k = _linear_real(a, attn.k_proj).reshape(N, KV, hd)
            v = _linear_real(a, attn.v_proj).reshape(N, KV, hd)
            v_c = _linear_components(a_c, attn.v_proj).reshape(M, N, KV, hd)

            # RoPE on the real q, k
            q = q * cos[:, None, :] + _rotate_half(q) * sin[:, None, :]
            k = k * cos[:, None, :] + _rotate_half(k) * sin[:, None, :]

            # frozen attention probabilities P[head, query, key]
            P = torch.zeros(H, N, N, dtype=DT)
            for head in range(H):
                kv_head = head // group
                s = (q[:, head, :] @ k[:, kv_head, :].T) * scale  # [N, N]
                s = s.masked_fill(~causal, float("-inf"))
                P[head] = torch.softmax(s, dim=-1)

            # real and decomposed attention outputs, per head
            o_real = torch.zeros(N, H, hd, dtype=DT)
            o_c = torch.zeros(M, N, H, hd, dtype=DT)
            for head in range(H):
                kv_head = head // group
                o_real[:, head, :] = P[head] @ v[:, kv_head, :]
                o_c[:, :, head, :] = P[head] @ v_c[:, :, kv_head, :]  # broadcast over components

            attn_out = _linear_real(o_real.reshape(N, H * hd), attn.o_proj)
            attn_out_c = _linear_components(o_c.reshape(M, N, H * hd), attn.o_proj)

            h = x + attn_out
            C = C + attn_out_c

            # ================= MLP block =================
            x = h
            w_post = layer.post_attention_layernorm.weight.detach().to(DT)
            r = _rms_scale(x, eps)
            n = x * r * w_post  # [N, D]
            n_c = C * r * w_post  # [M, N, D]

            g = _linear_real(n, mlp.gate_proj)  # [N, I]
            u = _linear_real(n, mlp.up_proj)  # [N, I], frozen
            g_c = _linear_components(n_c, mlp.gate_proj)  # [M, N, I]
            act = torch.nn.functional.silu(g)  # [N, I]

            present = g_c != 0  # [M, N, I]
            if sink:
                # component 0 keeps a share only at its own position 0
                present[0, 1:, :] = False
            logits_alloc = (g_c / temperature).masked_fill(~present, float("-inf"))
            any_present = present.any(dim=0)  # [N, I]
            # avoid NaN from softmax over all -inf: give those elements to rest
            fallback = torch.zeros_like(logits_alloc).fill_(float("-inf"))
            fallback[REST] = 0.0
            logits_alloc = torch.where(any_present[None], logits_alloc, fallback)
            weights = torch.softmax(logits_alloc, dim=0)  # [M, N, I]

            act_c = weights * act  # [M, N, I]
            hid_c = act_c * u  # [M, N, I]
            hid = act * u

            mlp_out = _linear_real(hid, mlp.down_proj)
            mlp_out_c = _linear_components(hid_c, mlp.down_proj)

            h = x + mlp_out
            C = C + mlp_out_c

            layers_real.append(h.clone())
            layers.append(C.clone())

        # ---- final norm and head ------------------------------------------------------------------
        w_f = model.model.norm.weight.detach().to(DT)
        r = _rms_scale(h, eps)
        hn = h * r * w_f
        hn_c = C * r * w_f

        logits = _linear_real(hn, model.lm_head)  # [N, V]
        logits_c = _linear_components(hn_c, model.lm_head)  # [M, N, V]

        target = int(torch.argmax(logits[-1]).item())
        scores = logits_c[:, -1, target].clone()  # [M]

    return {
        "logits": logits,
        "logits_components": logits_c,
        "layers": torch.stack(layers),
        "layers_real": torch.stack(layers_real),
        "hidden_components": hn_c,
        "scores": scores,
        "target": target,
    }
