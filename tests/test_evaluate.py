"""The faithfulness harness (fxdepass/evaluate.py): metrics with known answers, and a tiny end-to-end run."""
from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import tiny
from fxdepass import evaluate

VOCAB, TARGET, KEY = 16, 15, 4     # KEY: the position of the one token that decides the prediction


class KeyToken(torch.nn.Module):
    """Predicts TARGET (logit 4, every other token 0) at every position from where ``ids[KEY]`` has appeared."""

    def __init__(self, key: int):
        super().__init__()
        self.key = key

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        seen = (input_ids == self.key).cumsum(-1) > 0
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits[..., TARGET] = 4.0 * seen
        return SimpleNamespace(logits=logits)


def test_metric_functions() -> None:
    scores = torch.tensor([5.0, -1.0, 2.0, 2.0, 0.5, 9.0])
    assert evaluate.ranking(scores) == [2, 3, 4, 1]           # first and last excluded; ties in position order
    assert [evaluate.count(k, 10) for k in (10, 30, 100)] == [1, 3, 10]
    assert [evaluate.count(k, 4) for k in (10, 50, 60)] == [1, 2, 3]
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    assert evaluate.patch_top(ids, [4, 2]).tolist() == [10, 11, 13, 15]
    assert evaluate.recover_top(ids, [4, 2]).tolist() == [10, 12, 14, 15]
    assert evaluate.change(0.5, 0.5) == 0.0
    assert evaluate.change(0.5, 0.625) == 25.0                 # a rise counts as a change too
    assert evaluate.change(0.25, 0.875) == 100.0               # capped
    with pytest.raises(evaluate.InvalidInputError, match="no eligible token"):
        evaluate.ranking(torch.tensor([1.0, 2.0]))


def test_token_metrics_with_known_answers() -> None:
    ids = torch.arange(1, 13)                                   # 12 tokens: 10 eligible
    model = KeyToken(int(ids[KEY]))
    prompt = evaluate.Prompt(ids, TARGET, decisive=(KEY,))
    key_first, key_last = torch.zeros(12), torch.zeros(12)
    key_first[KEY], key_last[KEY] = 1.0, -1.0
    results = evaluate.evaluate_tokens(model, [prompt], {"right": lambda p: key_first, "wrong": lambda p: key_last})
    clean, without = math.exp(4) / (math.exp(4) + VOCAB - 1), 1 / VOCAB
    lost = (clean - without) / clean * 100
    right, wrong = results["right"], results["wrong"]
    # Deleting the key always loses the prediction; keeping it always keeps it exactly.
    assert right.comprehensiveness_curve == pytest.approx([lost] * 10)
    assert right.sufficiency_curve == pytest.approx([0.0] * 10)
    assert right.aopc_comprehensiveness == pytest.approx(clean - without)
    assert right.aopc_sufficiency == pytest.approx(0.0)
    assert (right.top1, right.top3) == (1.0, 1.0)
    # Ranked last, the key is deleted (kept) only when every eligible token is.
    assert wrong.comprehensiveness_curve == pytest.approx([0.0] * 9 + [lost])
    assert wrong.sufficiency_curve == pytest.approx([lost] * 9 + [0.0])
    assert wrong.comprehensiveness == pytest.approx(lost / 10)
    assert (wrong.top1, wrong.top3) == (0.0, 0.0)


@pytest.fixture(scope="module")
def run() -> tuple:
    model, decomposed = tiny.compiled()
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for length in (7, 9, 10):
        ids = torch.randint(0, 61, (length,), generator=generator)
        with torch.no_grad():
            target = int(model(ids.unsqueeze(0)).logits[0, -1].argmax())
        prompts.append(evaluate.Prompt(ids, target, decisive=(2,)))
    return model, decomposed, prompts


def test_end_to_end_tokens(run) -> None:
    pytest.importorskip("captum", reason="integrated gradients need captum")
    model, decomposed, prompts = run
    methods = evaluate.token_methods(model, {"softmax": decomposed})
    assert list(methods)[:2] == ["DePass softmax", "DePass softmax, no sink"]
    results = evaluate.evaluate_tokens(model, prompts, methods)
    assert set(results) == set(methods)
    for name, r in results.items():
        assert r.prompts == 3 and len(r.comprehensiveness_curve) == len(evaluate.PERCENTS), name
        assert all(0 <= v <= 100 for v in r.comprehensiveness_curve + r.sufficiency_curve), name
        assert r.sufficiency_curve[-1] == 0.0, name            # k = 100% keeps the whole prompt
        assert 0 <= r.top1 <= r.top3 <= 1 and r.seconds >= 0, name
    # Every method deletes every eligible token at k = 100%.
    assert len({round(r.comprehensiveness_curve[-1], 9) for r in results.values()}) == 1


def test_end_to_end_components(run) -> None:
    model, decomposed, prompts = run
    assert evaluate.answered(model, prompts) == prompts
    methods = evaluate.component_methods(model, decomposed)
    scores = methods["DePass"](prompts[0])
    assert scores["heads"].shape == (2, model.config.num_attention_heads)
    assert scores["neurons"].shape == (2, model.config.intermediate_size)
    results = evaluate.evaluate_components(model, prompts, methods, percents=(5, 100))
    totals = {"heads": 2 * model.config.num_attention_heads, "neurons": 2 * model.config.intermediate_size}
    for kind, total in totals.items():
        for name, r in results[kind].items():
            assert r.counts == {5: evaluate.count(5, total), 100: total}, (kind, name)
            assert r.most[100] == r.least[100], (kind, name)    # both zero every component
            assert all(0 <= a <= 1 for a in [*r.most.values(), *r.least.values()]), (kind, name)
    # Masking leaves the model as it was.
    assert evaluate.answered(model, prompts) == prompts


def test_importing_fxdepass_does_not_import_captum() -> None:
    code = ("import sys, fxdepass, fxdepass.evaluate\n"
            "assert 'captum' not in sys.modules and 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
