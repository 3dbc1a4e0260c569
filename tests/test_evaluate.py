"""The faithfulness harness (fxdepass/evaluate.py): metrics with hand-computed answers, the shared DePass pass
against direct attribution, batched masking against fxdepass.ablate, and a tiny end-to-end run."""
from __future__ import annotations

import inspect
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import fxdepass
import tiny
from conftest import load_tool
from fxdepass import evaluate

VOCAB, TARGET, FOIL, KEY = 16, 15, 3, 4     # KEY: the position of the one token that decides the prediction


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
    prompt = evaluate.Prompt(ids, TARGET, decisive=(KEY,), foil=FOIL)
    key_first, key_last = torch.zeros(12), torch.zeros(12)
    key_first[KEY], key_last[KEY] = 1.0, -1.0
    results = evaluate.evaluate_tokens(model, [prompt], {"right": lambda p: key_first, "wrong": lambda p: key_last})
    clean, without = math.exp(4) / (math.exp(4) + VOCAB - 1), 1 / VOCAB
    lost = (clean - without) / clean * 100
    right, wrong = results["right"], results["wrong"]
    # Deleting the key always loses the prediction; keeping it always keeps it exactly.
    assert right.comprehensiveness_curve == pytest.approx([lost] * 10)
    assert right.sufficiency_curve == pytest.approx([0.0] * 10)
    assert right.mean("AOPC comprehensiveness") == pytest.approx(clean - without)
    assert right.mean("AOPC sufficiency") == pytest.approx(0.0)
    assert (right.mean("top-1 hit"), right.mean("top-3 hit")) == (1.0, 1.0)
    for n in (1, 2, 3):
        assert right.mean(f"deletion Δp, top {n}") == pytest.approx(clean - without)
        assert right.mean(f"deletion Δlogit-diff, top {n}") == pytest.approx(4.0)      # 4 − 0
        assert right.mean(f"insertion p, top {n}") == pytest.approx(clean)
        assert right.mean(f"insertion logit-diff, top {n}") == pytest.approx(4.0)
    # Ranked last, the key is deleted (kept) only when every eligible token is.
    assert wrong.comprehensiveness_curve == pytest.approx([0.0] * 9 + [lost])
    assert wrong.sufficiency_curve == pytest.approx([lost] * 9 + [0.0])
    assert wrong.comprehensiveness == pytest.approx(lost / 10)
    assert (wrong.mean("top-1 hit"), wrong.mean("top-3 hit")) == (0.0, 0.0)
    for n in (1, 2, 3):
        assert wrong.mean(f"deletion Δp, top {n}") == pytest.approx(0.0)
        assert wrong.mean(f"deletion Δlogit-diff, top {n}") == pytest.approx(0.0)
        assert wrong.mean(f"insertion p, top {n}") == pytest.approx(without)
        assert wrong.mean(f"insertion logit-diff, top {n}") == pytest.approx(0.0)


def test_foil_defaults_to_the_runner_up() -> None:
    ids = torch.arange(1, 13)
    model = KeyToken(int(ids[KEY]))
    # Every other logit is 0: the runner-up is the first of them, token 0.
    assert evaluate.with_foils(model, [evaluate.Prompt(ids, TARGET)])[0].foil == 0
    assert evaluate.with_foils(model, [evaluate.Prompt(ids, TARGET, foil=FOIL)])[0].foil == FOIL


def test_bootstrap_intervals() -> None:
    assert evaluate.interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    # Two prompts: a resample's mean is 0, 5 or 10 with probabilities ¼, ½, ¼, so the 95% interval is [0, 10].
    assert evaluate.interval([0.0, 10.0]) == (0.0, 10.0)
    low, high = evaluate.interval([float(v) for v in range(100)])
    assert 40 < low < 49.5 < high < 59                          # around the mean 49.5, standard error 2.9
    # Paired: a constant difference is certain however noisy each method is alone.
    noisy = [0.0, 10.0, 3.0, 7.0]
    assert evaluate.versus([v + 1 for v in noisy], noisy, higher_is_better=True) == (1.0, 1.0, 1.0, 1)
    assert evaluate.versus([v + 1 for v in noisy], noisy, higher_is_better=False)[3] == -1
    assert evaluate.versus([1.0, -1.0, 1.0, -1.0], [0.0] * 4, higher_is_better=True)[3] == 0
    with pytest.raises(evaluate.InvalidInputError, match="pairs prompts"):
        evaluate.versus([1.0], [1.0, 2.0], higher_is_better=True)


@pytest.fixture(scope="module")
def run() -> tuple:
    model, decomposed = tiny.compiled()
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for length in (7, 9, 9, 10):
        ids = torch.randint(0, 61, (length,), generator=generator)
        with torch.no_grad():
            target = int(model(ids.unsqueeze(0)).logits[0, -1].argmax())
        prompts.append(evaluate.Prompt(ids, target, decisive=(2,)))
    return model, decomposed, evaluate.with_foils(model, prompts)


def test_one_pass_gives_each_target_kind_exactly(run) -> None:
    """The harness reads every target kind from one hidden-state pass (Note [One pass, every target kind]):
    the same numbers as attributing each target directly."""
    model, decomposed, prompts = run
    kinds = {"logit": lambda p: p.target, "log-prob": lambda p: fxdepass.logprob(p.target),
             "contrastive": lambda p: fxdepass.diff(p.target, p.foil)}
    methods = evaluate.depass_tokens(decomposed)
    for prompt in prompts[:2]:
        for kind, spec in kinds.items():
            direct = decomposed.attribute(prompt.ids.unsqueeze(0), targets=spec(prompt)).scores()[:-1]
            torch.testing.assert_close(methods[kind](prompt), direct.float(), rtol=1e-6, atol=1e-6)  # float32 scores
    # Heads: a batch of the two prompts of length 9, every layer.
    same_length = prompts[1:3]
    scored = evaluate.depass_components(decomposed, parts=("heads",))
    for kind, spec in kinds.items():
        for prompt, scores in zip(same_length, scored[kind](same_length)):
            for layer in range(2):
                direct = decomposed.attribute(prompt.ids.unsqueeze(0), seed=fxdepass.heads(layer),
                                              targets=spec(prompt)).scores()[:-1]
                torch.testing.assert_close(scores["heads"][layer], direct.float(), rtol=1e-6, atol=1e-6)


def test_masked_rows_match_ablate(run) -> None:
    model, _, prompts = run
    ids = prompts[0].ids
    layers, count = 2, model.config.num_attention_heads
    plans = [{}, {0: [1]}, {1: [0, 2]}, {0: [0], 1: [count - 1]}]
    heads = torch.zeros(len(plans), layers, count, dtype=torch.bool)
    for row, plan in enumerate(plans):
        for layer, chosen in plan.items():
            heads[row, layer, chosen] = True
    neurons = torch.zeros(len(plans), layers, model.config.intermediate_size, dtype=torch.bool)
    neurons[2, 0, [3, 5]] = True
    logits = evaluate.masked_predictions(model, ids, {"heads": heads, "neurons": neurons}, batch=3)
    for row, plan in enumerate(plans):
        with fxdepass.ablate(model, heads=plan, neurons={0: [3, 5]} if row == 2 else None):
            expected = model(ids.unsqueeze(0)).logits[0, -1].float()
        torch.testing.assert_close(logits[row], expected)
    assert not any(m._forward_pre_hooks for m in model.modules())        # the hooks are gone


def test_component_measures_with_known_rankings(run) -> None:
    """A method that ranks one head first: masking its top 1 zeroes that head, its bottom 1 the last head."""
    model, _, prompts = run
    count = model.config.num_attention_heads
    first, last = (1, 2), (0, 0)          # (layer, head) ranked first; ranked last

    def method(batch):
        scores = []
        for _ in batch:
            heads = torch.arange(2 * count, 0, -1, dtype=torch.float).view(2, count) + 100   # all distinct, ≥ 100
            heads[first], heads[last] = 1000.0, 0.0
            scores.append({"heads": heads})
        return scores

    results = evaluate.evaluate_components(model, prompts, {"one head": method}, percents=(1,))["heads"]["one head"]
    assert results.counts == {1: 1}
    for index, prompt in enumerate(prompts):
        for plan, measure in ((first, "top"), (last, "bottom")):
            with fxdepass.ablate(model, heads={plan[0]: [plan[1]]}), torch.no_grad():
                logits = model(prompt.ids.unsqueeze(0)).logits[0, -1]
            assert results.values[f"accuracy, {measure} 1% masked"][index] == float(int(logits.argmax()) == prompt.target)
        with torch.no_grad():
            clean = model(prompt.ids.unsqueeze(0)).logits[0, -1]
        with fxdepass.ablate(model, heads={first[0]: [first[1]]}), torch.no_grad():
            masked = model(prompt.ids.unsqueeze(0)).logits[0, -1]
        drop = (clean[prompt.target] - clean[prompt.foil]) - (masked[prompt.target] - masked[prompt.foil])
        # the harness reads logits in float32
        assert results.values["Δlogit-diff, top 1% masked"][index] == pytest.approx(float(drop), abs=1e-5)


def test_end_to_end_tokens(run) -> None:
    pytest.importorskip("captum", reason="integrated gradients need captum")
    model, decomposed, prompts = run
    methods = evaluate.token_methods(model, {"DePass": decomposed})
    assert list(methods)[:3] == ["DePass logit", "DePass log-prob", "DePass contrastive"]
    results = evaluate.evaluate_tokens(model, prompts, methods)
    assert set(results) == set(methods)
    for name, r in results.items():
        assert r.prompts == 4 and len(r.comprehensiveness_curve) == len(evaluate.PERCENTS), name
        assert set(r.values) == set(evaluate.TOKEN_MEASURES), name
        assert all(len(v) == 4 for v in r.values.values()), name
        assert all(0 <= v <= 100 for v in r.comprehensiveness_curve + r.sufficiency_curve), name
        assert r.sufficiency_curve[-1] == 0.0, name            # k = 100% keeps the whole prompt
        low, high = r.interval("comprehensiveness")
        assert low <= r.comprehensiveness <= high, name
    # Every method deletes every eligible token at k = 100%.
    assert len({round(r.comprehensiveness_curve[-1], 9) for r in results.values()}) == 1


def test_end_to_end_components(run) -> None:
    model, decomposed, prompts = run
    assert evaluate.answered(model, prompts) == prompts
    methods = evaluate.component_methods(model, {"DePass": decomposed})
    scores = methods["DePass contrastive"](prompts)
    assert scores[0]["heads"].shape == (2, model.config.num_attention_heads)
    assert scores[0]["neurons"].shape == (2, model.config.intermediate_size)
    results = evaluate.evaluate_components(model, prompts, methods, percents=(5, 100))
    totals = {"heads": 2 * model.config.num_attention_heads, "neurons": 2 * model.config.intermediate_size}
    for kind, total in totals.items():
        for name, r in results[kind].items():
            assert r.counts == {5: evaluate.count(5, total), 100: total}, (kind, name)
            # both zero every component
            assert r.values["accuracy, top 100% masked"] == r.values["accuracy, bottom 100% masked"], (kind, name)
            assert all(a in (0.0, 1.0) for m, v in r.values.items() if m.startswith("accuracy") for a in v)
    # Masking leaves the model as it was.
    assert evaluate.answered(model, prompts) == prompts


def test_routed_variant_is_compiled_or_reported() -> None:
    model, _ = tiny.compiled()
    compiled, unavailable = evaluate.depass_variants(model, dtype=torch.float64)
    assert "DePass" in compiled
    if "attention" in inspect.signature(fxdepass.compile).parameters:
        assert "DePass routed" in compiled or "not available for this model" in unavailable["DePass routed"]
    else:
        assert unavailable == {"DePass routed": "not available in this build (fxdepass.compile has no attention= option)"}


def test_quick_run_of_the_tool(monkeypatch, capsys) -> None:
    """``tools/evaluate.py --quick`` on one toy task: every DePass variant (routed included: the toy model
    loads with sdpa) and every baseline at both levels, intervals around their means, the report printed
    and docs/faithfulness.md untouched."""
    pytest.importorskip("captum", reason="integrated gradients need captum")
    pytest.importorskip("matplotlib", reason="the tool plots the removal curves")
    tool = load_tool("evaluate")
    docs = tool.DOCS / "faithfulness.md"
    before = docs.read_bytes() if docs.exists() else None
    seen = []
    run_all = tool.run_all
    monkeypatch.setattr(tool, "run_all", lambda *args: seen.extend(run_all(*args)) or seen)
    tool.main(["--quick", "--tasks", "kv-recall", "--workers", "1"])
    printed = capsys.readouterr().out
    assert (docs.read_bytes() if docs.exists() else None) == before
    [result] = seen
    assert result.unavailable == {}
    depass = [f"DePass {v}{k}" for v in ("", "routed ") for k in evaluate.TARGET_KINDS]
    depass += ["DePass linear-allocation logit", "DePass max-allocation logit"]
    baselines = ["integrated gradients", "random"]
    assert set(depass + baselines) <= set(result.tokens)
    assert set(result.components) == {"heads", "neurons"}
    assert 0 < result.used <= tool.QUICK_PROMPTS
    levels = [result.tokens] + list(result.components.values())
    for results in levels:
        for name, r in results.items():
            assert r.prompts == result.used, name
            for measure, values in r.values.items():
                assert len(values) == result.used, (name, measure)
                low, high = r.interval(measure)
                assert low - 1e-12 <= r.mean(measure) <= high + 1e-12, (name, measure)
    for name, r in result.tokens.items():
        assert r.sufficiency_curve[-1] == 0.0, name                # k = 100% keeps the whole prompt
    for name in depass + ["DePass routed contrastive"]:
        assert f"| {name} |" in printed, name
    assert "## toy: key-value recall" in printed and "### Heads: masking" in printed


def test_importing_fxdepass_does_not_import_captum() -> None:
    code = ("import sys, fxdepass, fxdepass.evaluate\n"
            "assert 'captum' not in sys.modules and 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
