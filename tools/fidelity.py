"""Print how closely fxdepass matches the paper's own outputs and the independent oracle.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/fidelity.py

Reads ../shared/fixtures/paper-reference (beside the clone in CI) when present.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import families  # noqa: E402
import fxdepass  # noqa: E402
from oracle_llama import depass_tokens_llama  # noqa: E402
from oracle_moe import mixtral_expert_terms  # noqa: E402
from probes import module_io  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "paper-reference"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> int:
    if FIXTURES.is_dir():
        for path in sorted(FIXTURES.glob("*.pt")):
            data = torch.load(path, weights_only=True)
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**data["config"])).double().eval()
            model.load_state_dict(data["state_dict"])
            decomposed = fxdepass.compile(model, dtype=torch.float64)
            ids = torch.as_tensor(data["input_ids"]).reshape(1, -1)
            for sink in (True, False):
                result = data["results"][f"ignore_special_token={sink}"]
                out = decomposed.attribute(ids, positions="all", targets="all", seed=fxdepass.tokens(sink=sink), readout=["logits", "layers"])
                scores = out["logits"].scores(int(result["target_token_id"]))[:-1]
                layers = out["layers"].components[:, :-1, 0].permute(0, 2, 1, 3)
                print(f"paper {path.name} sink={sink}: scores rel. error {relative(scores, result['score_fp64_convenience']):.1e}, "
                      f"all_layer rel. error {relative(layers, result['all_layer']):.1e}")
    else:
        print(f"paper fixtures not found at {FIXTURES}")
    model = families.build("llama", layers=3, seed=4)
    ids = torch.randint(0, families.VOCAB, (11,), generator=torch.Generator().manual_seed(2))
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    for sink in (True, False):
        attribution = decomposed.attribute(ids, positions="all", targets="all", seed=fxdepass.tokens(sink=sink))
        oracle = depass_tokens_llama(model, ids, sink=sink)
        print(f"oracle (tiny Llama, 3 layers) sink={sink}: logit components rel. error "
              f"{relative(attribution.components[:, 0], oracle['logits_components']):.1e}, "
              f"reconstruction error {attribution.reconstruction_error():.1e}")
    moe_fidelity()
    return 0


def moe_fidelity() -> None:
    """Mixtral's per-expert and per-expert-neuron components against the direct oracle; every MoE seed's sum."""
    model = families.build("mixtral", layers=2, seed=4)
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    ids = torch.randint(0, families.VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    moe = model.model.layers[1].mlp
    terms, _ = mixtral_expert_terms(moe, module_io(moe, lambda: model(ids))[0])
    down = moe.experts.down_proj.detach().double()
    experts = decomposed.attribute(ids, positions="all", targets="all", seed=fxdepass.neurons(1), readout="model.layers.1.mlp")
    direct = torch.stack([terms[:, e] @ down[e].T for e in range(down.shape[0])]).reshape(experts.components[:-1].shape)
    neurons = decomposed.attribute(ids, positions="all", targets="all", seed=fxdepass.neurons(1, expert=1), readout="model.layers.1.mlp")
    per_neuron = torch.einsum("ti,di->itd", terms[:, 1], down[1]).reshape(neurons.components[:-1].shape)
    print(f"mixtral (2 layers, 4 experts, top-2) per-expert components vs direct: rel. error "
          f"{relative(experts.components[:-1], direct):.1e}; expert 1's neurons: {relative(neurons.components[:-1], per_neuron):.1e}")
    for family in families.MOE:
        decomposed = fxdepass.compile(families.build(family, layers=2, seed=4), dtype=torch.float64)
        seeds = {"tokens": fxdepass.tokens(), "heads(1)": fxdepass.heads(1), "neurons(1)": fxdepass.neurons(1),
                 "neurons(1, expert=0)": fxdepass.neurons(1, expert=0), "modules(1)": fxdepass.modules(1)}
        errors = ", ".join(f"{name} {decomposed.attribute(ids, positions="all", targets="all", seed=seed).reconstruction_error():.1e}" for name, seed in seeds.items())
        print(f"{family} logits reconstruction error: {errors}")


if __name__ == "__main__":
    sys.exit(main())
