"""Tiny random-weight models of every architecture family the core supports, built from configs."""
from __future__ import annotations

from typing import Any

import torch
import transformers

VOCAB = 61

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", "gpt_neox", "phi", "opt", "bert", "mixtral", "qwen2_moe")
ENCODERS = ("bert",)
#: mixtures of experts: 4 experts, 2 per token; Qwen2-MoE adds a sigmoid-gated shared expert
MOE = ("mixtral", "qwen2_moe")


def config_for(
    family: str,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    intermediate: int = 48,
    bias: bool = True,
    attention: str = "sdpa",
) -> transformers.PretrainedConfig:
    """A small config of ``family``; ``kv_heads`` must divide ``heads``."""
    hidden = heads * head_dim
    common: dict[str, Any] = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=heads,
                                  max_position_embeddings=64, attn_implementation=attention)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=kv_heads,
                                        attention_bias=bias, mlp_bias=bias, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=kv_heads, **common)
    if family == "qwen3":
        return transformers.Qwen3Config(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=kv_heads,
                                        head_dim=head_dim, attention_bias=bias, **common)
    if family == "mistral":
        return transformers.MistralConfig(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=kv_heads,
                                          sliding_window=4, **common)
    if family == "gemma":
        return transformers.GemmaConfig(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=kv_heads,
                                        head_dim=head_dim, **common)
    if family == "gpt2":
        common.pop("max_position_embeddings")
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                                       n_inner=intermediate, attn_implementation=attention)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=hidden, intermediate_size=intermediate, rotary_pct=0.5,
                                          use_parallel_residual=True, attention_bias=bias, **common)
    if family == "phi":
        return transformers.PhiConfig(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=kv_heads,
                                      partial_rotary_factor=0.5, **common)
    if family == "opt":
        return transformers.OPTConfig(hidden_size=hidden, ffn_dim=intermediate, word_embed_proj_dim=hidden,
                                      enable_bias=bias, **common)
    # torch's grouped expert kernel needs rows of a multiple of 16 bytes: expert widths a multiple of 4
    expert_width, half_width = -(-intermediate // 4) * 4, -(-intermediate // 8) * 4
    if family == "mixtral":
        return transformers.MixtralConfig(hidden_size=hidden, intermediate_size=expert_width, num_key_value_heads=kv_heads,
                                          num_local_experts=4, num_experts_per_tok=2, **common)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(hidden_size=hidden, intermediate_size=intermediate, moe_intermediate_size=half_width,
                                           shared_expert_intermediate_size=intermediate, num_key_value_heads=kv_heads,
                                           num_experts=4, num_experts_per_tok=2, **common)
    if family == "bert":
        return transformers.BertConfig(hidden_size=hidden, intermediate_size=intermediate, **common)
    raise ValueError(family)


def build(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes: Any) -> torch.nn.Module:
    """A randomly initialised model of ``family`` in eval mode; norm weights and biases perturbed so they matter."""
    config = config_for(family, **sizes)
    torch.manual_seed(seed)
    if family in ENCODERS:
        model = transformers.AutoModel.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias") or "ln" in name.split(".")[-2:][0]:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.to(dtype).eval()
