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
                out = decomposed.attribute(ids, seed=fxdepass.tokens(sink=sink), readout=["logits", "layers"])
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
        attribution = decomposed.attribute(ids, seed=fxdepass.tokens(sink=sink))
        oracle = depass_tokens_llama(model, ids, sink=sink)
        print(f"oracle (tiny Llama, 3 layers) sink={sink}: logit components rel. error "
              f"{relative(attribution.components[:, 0], oracle['logits_components']):.1e}, "
              f"reconstruction error {attribution.reconstruction_error():.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
