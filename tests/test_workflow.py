"""The research workflow around ``attribute`` (issue 18): text inputs, per-prompt labels, direct contributions of
every head, results as data (dataframe, save/load, repr), plots, datasets and the prompts-file command."""
from __future__ import annotations

import torch
import pytest

import families
import fxdepass
import tiny
from fxdepass.errors import InvalidInputError, InvalidSeedError


# -- all heads of all layers: direct contributions ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2() -> tuple[torch.nn.Module, fxdepass.DecomposedModel]:
    """GPT-2: its real float64 pass casts nothing to float32 (Llama's RMSNorm does), so hooks give an exact oracle."""
    model = families.build("gpt2", layers=3, seed=2, dtype=torch.float64)
    return model, fxdepass.compile(model, dtype=torch.float64)


@torch.no_grad()
def _direct_oracle(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """What every head and every attention/MLP output writes into the residual stream at the last position, read
    through ln_f with its real scale frozen and the unembedding row of the predicted token (TransformerLens's
    direct logit attribution), from hooks on the real model."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for layer, block in enumerate(model.transformer.h):
        hooks.append(block.attn.c_proj.register_forward_pre_hook(
            lambda m, args, layer=layer: seen.__setitem__(f"z{layer}", args[0])))
        hooks.append(block.attn.register_forward_hook(
            lambda m, args, out, layer=layer: seen.__setitem__(f"L{layer} attention", out[0])))
        hooks.append(block.mlp.register_forward_hook(lambda m, args, out, layer=layer: seen.__setitem__(f"L{layer} mlp", out)))
    hooks.append(model.transformer.ln_f.register_forward_pre_hook(lambda m, args: seen.__setitem__("final", args[0])))
    try:
        logits = model(ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    target = int(logits[0, -1].argmax())
    norm = model.transformer.ln_f
    final = seen["final"][0, -1]
    sigma = (final.var(-1, unbiased=False) + norm.eps).sqrt()
    row = model.lm_head.weight[target]

    def read(value: torch.Tensor) -> torch.Tensor:  # frozen ln_f (no β: it is no source's) and the unembedding
        return ((value - value.mean(-1, keepdim=True)) / sigma * norm.weight) @ row

    heads, width = model.config.n_head, model.config.n_embd
    size = width // heads
    oracle = {}
    for layer, block in enumerate(model.transformer.h):
        z = seen[f"z{layer}"][0, -1]
        weight = block.attn.c_proj.weight                                    # Conv1D: [in, out]
        for h in range(heads):
            oracle[f"L{layer}H{h}"] = read(z[h * size:(h + 1) * size] @ weight[h * size:(h + 1) * size])
        oracle[f"L{layer} attention"] = read(seen[f"L{layer} attention"][0, -1])
        oracle[f"L{layer} mlp"] = read(seen[f"L{layer} mlp"][0, -1])
    return oracle, target


@pytest.mark.parametrize("seed, layers", [(fxdepass.heads("all"), [0, 1, 2]), (fxdepass.heads(range(1, 3)), [1, 2]),
                                          (fxdepass.modules("all"), [0, 1, 2]), (fxdepass.modules([-1]), [2])])
def test_direct_contributions_match_hooks(gpt2, seed, layers):
    model, decomposed = gpt2
    ids = torch.tensor([[5, 17, 3, 42, 8, 23]])
    oracle, target = _direct_oracle(model, ids)
    attribution = decomposed.attribute(ids, seed=seed, targets=target, strict=True)
    assert attribution.reconstruction_error() <= 1e-9
    parts = [f"L{layer}H{h}" for layer in layers for h in range(4)] if seed.__class__.__name__ == "DirectHeads" else \
        [f"L{layer} {part}" for layer in layers for part in ("attention", "mlp")]
    assert attribution.labels == parts + ["rest"]
    expected = torch.stack([oracle[p] for p in parts])
    scores = attribution.scores()[:-1]
    assert float((scores - expected).abs().max() / expected.abs().max()) <= 1e-9


def test_direct_seed_errors():
    with pytest.raises(InvalidSeedError, match="'all'"):
        fxdepass.heads("every")
    with pytest.raises(InvalidSeedError, match="at least one layer"):
        fxdepass.modules([])


# -- inputs: texts, tokenizer outputs, ids ------------------------------------------------------------------------


def test_text_inputs_equal_ids():
    _, decomposed = tiny.compiled()
    from_text = decomposed.attribute(tiny.PROMPT)
    from_ids = decomposed.attribute(tiny.IDS)
    assert torch.equal(from_text.input_ids, tiny.IDS) and torch.equal(from_text.components, from_ids.components)
    assert from_text.metadata["prompts"] == [tiny.PROMPT] and from_text.attention_mask is None
    encoding = decomposed.tokenizer([tiny.PROMPT])                    # a BatchEncoding of lists, no return_tensors
    assert torch.equal(decomposed.attribute(encoding).components, from_ids.components)
    tensors = decomposed.tokenizer([tiny.PROMPT], return_tensors="pt")
    assert torch.equal(decomposed.attribute(tensors).components, from_ids.components)
    generated = decomposed.generate_attributed("w5 w17 w3", max_new_tokens=2)
    assert generated.sequence[0, :3].tolist() == [5, 17, 3]


def test_texts_are_left_padded_and_each_gets_its_result_alone():
    _, decomposed = tiny.compiled()
    texts = ["w5 w17 w3 w42", "w8 w9"]
    batch = decomposed.attribute(texts)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert batch.input_ids[1, 2:].tolist() == [8, 9]
    alone = decomposed.attribute("w8 w9")
    # the padded prompt's token components at the last position equal the prompt's own, padding's are zero
    assert torch.allclose(batch.components[2:, 1, -1], alone.components[:, 0, -1], rtol=0, atol=1e-12)
    assert float(batch.components[:2, 1, -1].abs().max()) == 0.0


def test_input_errors_are_clear():
    _, decomposed = tiny.compiled()
    bare = fxdepass.compile(tiny.model(), dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="need a tokenizer"):
        bare.attribute("w5 w17")
    with pytest.raises(InvalidInputError, match="only strings"):
        decomposed.attribute(["w5 w17", [5, 17]])
    with pytest.raises(InvalidInputError, match="padding=True"):
        decomposed.attribute(decomposed.tokenizer(["w5 w17 w3", "w8"]))
    with pytest.raises(InvalidInputError, match="attention_mask given twice"):
        decomposed.attribute(decomposed.tokenizer(["w5 w17"], return_tensors="pt"), attention_mask=torch.ones(1, 2))


# -- labels per prompt ----------------------------------------------------------------------------------------------


def test_labels_per_prompt_in_a_padded_batch():
    _, decomposed = tiny.compiled()
    batch = decomposed.attribute(["w5 w17 w3", "w8 w9"])
    assert batch.labels_of(0) == batch.labels == ["tok 0 'w5'", "tok 1 'w17'", "tok 2 'w3'", "rest"]
    assert batch.labels_of(1) == ["tok 0 <pad>", "tok 1 'w8'", "tok 2 'w9'", "rest"]
    assert batch.labels_of(-1) == batch.labels_of(1)
    with pytest.raises(InvalidInputError, match="outside the batch of 2"):
        batch.labels_of(2)
    grouped = decomposed.attribute(["w5 w17 w3", "w8 w9"], seed=fxdepass.tokens(positions=[0, -1]))
    assert grouped.labels_of(1) == ["tok 0 <pad>", "tok 2 'w9'", "rest"]
    heads = decomposed.attribute(["w5 w17 w3", "w8 w9"], seed=fxdepass.heads(0))
    assert heads.prompt_labels is None and heads.labels_of(1) == heads.labels == [f"L0H{h}" for h in range(4)] + ["rest"]
    single = decomposed.attribute("w5 w17 w3")
    assert single.prompt_labels is None and single.labels == ["tok 0 'w5'", "tok 1 'w17'", "tok 2 'w3'", "rest"]


# -- results as data ----------------------------------------------------------------------------------------------


def _assert_same(loaded: fxdepass.Attribution, original: fxdepass.Attribution) -> None:
    import dataclasses

    for field in [f for f in dataclasses.fields(original) if f.compare]:
        a, b = getattr(loaded, field.name), getattr(original, field.name)
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), field.name
        else:
            assert a == b, field.name


@pytest.mark.parametrize("readout", ["logits", "layers"])
def test_save_load_round_trip(tmp_path, readout):
    _, decomposed = tiny.compiled()
    original = decomposed.attribute(["w5 w17 w3", "w8 w9"], readout=readout)
    path = original.save(tmp_path / "sub" / "result.safetensors")
    loaded = fxdepass.load_attribution(path)
    _assert_same(loaded, original)
    assert loaded.metadata["prompts"] == ["w5 w17 w3", "w8 w9"] and loaded.metadata["fxdepass_version"] == fxdepass.__version__
    if readout == "logits":
        assert torch.equal(loaded.scores(), original.scores()) and loaded.labels_of(1) == original.labels_of(1)
    header = path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")]
    assert b"fxdepass.attribution" in header and b"pickle" not in header


def test_load_refuses_what_is_not_an_attribution(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InvalidInputError, match="not an fxdepass attribution"):
        fxdepass.load_attribution(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(InvalidInputError, match="not a safetensors file"):
        fxdepass.load_attribution(tmp_path / "junk.safetensors")
    with pytest.raises(InvalidInputError, match="no such file"):
        fxdepass.load_attribution(tmp_path / "missing.safetensors")


def test_repr_is_short():
    _, decomposed = tiny.compiled()
    text = repr(decomposed.attribute(["w5 w17 w3", "w8 w9"]))
    lines = text.splitlines()
    assert len(lines) == 2 and len(text) < 300, text
    assert lines[0].startswith("Attribution(logits [2 prompts") and "3 components + rest" in lines[0]
    assert "reconstruction error" in lines[1]


def test_notebook_view_shows_every_prompt_and_rest():
    import html

    from fxdepass.results import SHOWN_PROMPTS

    _, decomposed = tiny.compiled()
    batch = decomposed.attribute(["w5 w17 w3", "w8 w9"])
    view = batch._repr_html_()
    scores = batch.scores()
    for p in range(2):
        assert f"prompt {p}: target" in view
        for label, value in zip(batch.labels_of(p), scores[:, p].tolist()):
            if not label.endswith("<pad>"):
                assert html.escape(f"{label}: {value:+.6g}") in view
    assert "&lt;pad&gt;" not in view                                   # padding is not shown
    many = decomposed.attribute(["w5 w17"] * (SHOWN_PROMPTS + 3))
    assert "3 more prompts are not shown" in many._repr_html_()


def test_to_dataframe_long_format():
    pytest.importorskip("pandas")
    _, decomposed = tiny.compiled()
    batch = decomposed.attribute(["w5 w17 w3", "w8 w9"])
    frame = batch.to_dataframe()
    assert list(frame.columns) == ["prompt", "component", "label", "target", "position", "score"]
    assert "tok 0 <pad>" not in set(frame.label)                      # padding is left out
    last = frame[frame.position == frame.position.max()]
    scores = batch.scores()
    for p in range(2):
        labels = [l for l in batch.labels_of(p) if not l.endswith("<pad>")]
        rows = last[last.prompt == p]
        assert list(rows.label) == labels
        kept = [i for i, l in enumerate(batch.labels_of(p)) if not l.endswith("<pad>")]
        assert rows.score.tolist() == scores[kept, p].tolist()


def test_missing_optional_library_is_named(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("no pandas")
        return real_import(name, *args, **kwargs)

    _, decomposed = tiny.compiled()
    attribution = decomposed.attribute("w5 w17 w3")
    monkeypatch.setattr(builtins, "__import__", without_pandas)
    monkeypatch.delitem(__import__("sys").modules, "pandas", raising=False)
    with pytest.raises(fxdepass.MissingDependencyError, match=r"fxdepass\[data\]"):
        attribution.to_dataframe()


# -- datasets and the resumable results file ------------------------------------------------------------------------


DATASET = ["w5 w17 w3 w42", "w8 w9", "w1 w2 w3", "w7 w7 w7 w7 w7", "w4 w40", "w11 w12 w13", "w20"]


def _prompts_file(path):
    import json

    lines = [json.dumps({"prompt": p, "target": "w3"} if i == 2 else p) for i, p in enumerate(DATASET)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dataset_records_match_single_prompts():
    _, decomposed = tiny.compiled()
    records = list(decomposed.attribute_dataset(DATASET[:4], batch_size=2))
    assert sorted(r.index for r in records) == [0, 1, 2, 3]
    assert [r.batch for r in records] == [0, 0, 1, 1]                       # batched by length: (1, 2), (0, 3)
    for record in records:
        alone = decomposed.attribute(DATASET[record.index])
        assert record.labels == alone.labels
        assert torch.allclose(record.scores(), alone.scores(), rtol=0, atol=1e-12)
        assert record.target == alone.target_labels[0] and record.reconstruction_error() <= 1e-9


def test_dataset_resumes_to_the_same_file(tmp_path, monkeypatch):
    from fxdepass.dataset import read_prompts, write_results

    _, decomposed = tiny.compiled()
    entries = read_prompts(_prompts_file(tmp_path / "prompts.jsonl"))
    whole = tmp_path / "whole.jsonl"
    assert write_results(decomposed, entries, whole, batch_size=2, progress=False) == (7, 0)

    resumed = tmp_path / "resumed.jsonl"
    real, calls = decomposed.attribute, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(decomposed, "attribute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_results(decomposed, entries, resumed, batch_size=2, progress=False)
    monkeypatch.undo()
    assert len(resumed.read_text().splitlines()) == 4                    # the two batches before the interruption
    with open(resumed, "a") as file:                                      # and a line torn by a kill while writing
        file.write('{"index": 5, "prompt": "w11 w1')
    assert write_results(decomposed, entries, resumed, batch_size=2, progress=False) == (3, 4)
    assert resumed.read_bytes() == whole.read_bytes()
    assert write_results(decomposed, entries, resumed, batch_size=2, progress=False) == (0, 7)
    assert resumed.read_bytes() == whole.read_bytes()


def test_results_lines_hold_what_a_single_attribution_gives(tmp_path):
    import json

    from fxdepass.dataset import read_prompts, write_results

    _, decomposed = tiny.compiled()
    out = tmp_path / "out.jsonl"
    write_results(decomposed, read_prompts(_prompts_file(tmp_path / "prompts.jsonl")), out, batch_size=3, progress=False)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_index = {line["index"]: line for line in lines}
    assert sorted(by_index) == list(range(7))
    line = by_index[2]
    alone = decomposed.attribute(DATASET[2], targets="w3")
    assert line["prompt"] == DATASET[2] and line["tokens"] == ["w1", "w2", "w3"] and line["target"] == alone.target_labels[0]
    assert line["labels"] == alone.labels
    assert max(abs(a - b) for a, b in zip(line["scores"], alone.scores().tolist())) <= 1e-12
    assert abs(line["logit"] - float(alone.target_values[0, -1])) <= 1e-12 and line["reconstruction_error"] <= 1e-9


def test_results_file_of_other_prompts_is_refused(tmp_path):
    from fxdepass.dataset import read_prompts, write_results

    _, decomposed = tiny.compiled()
    out = tmp_path / "out.jsonl"
    out.write_text('{"index": 0, "prompt": "something else"}\n')
    with pytest.raises(InvalidInputError, match="does not have at that line"):
        write_results(decomposed, read_prompts(_prompts_file(tmp_path / "prompts.jsonl")), out, progress=False)
    out.write_text("not json\n")
    with pytest.raises(InvalidInputError, match="not an fxdepass result line"):
        write_results(decomposed, read_prompts(_prompts_file(tmp_path / "prompts.jsonl")), out, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n')
    with pytest.raises(InvalidInputError, match='bad.jsonl:1: expected a string or an object with a "prompt"'):
        read_prompts(bad)


def test_cli_prompts_file(tmp_path, capsys):
    import json

    from fxdepass.cli import main

    directory = tiny.save(tmp_path / "model")
    prompts, out = _prompts_file(tmp_path / "prompts.jsonl"), tmp_path / "results.jsonl"
    assert main(["attribute", str(directory), "--prompts-file", str(prompts), "--out", str(out), "--batch-size", "3",
                 "--quiet"]) == 0
    assert "wrote 7 results" in capsys.readouterr().out
    assert sorted(json.loads(line)["index"] for line in out.read_text().splitlines()) == list(range(7))
    assert main(["attribute", str(directory), "--prompts-file", str(prompts), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 0 results to {out} (7 already there)"
    assert main(["attribute", str(directory), "--prompts-file", str(prompts), "--quiet"]) == 2
    assert "needs --out" in capsys.readouterr().err


# -- plots -------------------------------------------------------------------------------------------------------------


def test_plots_return_figures():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    _, decomposed = tiny.compiled()
    one = decomposed.attribute("w5 w17 w3")
    bars = one.plot()
    assert [t.get_text() for t in bars.axes[0].get_xticklabels()] == one.labels
    assert [p.get_height() for p in bars.axes[0].patches] == one.scores().tolist()
    batch = decomposed.attribute(["w5 w17 w3", "w8 w9"])
    image = batch.plot().axes[0].images[0].get_array()
    assert image.shape == (2, 4) and bool(image.mask[1, 0])               # padding is blank
    layers = fxdepass.plot_layers(decomposed, "w5 w17 w3").axes[0].images[0].get_array()
    assert torch.allclose(torch.as_tensor(layers[0]), one.scores(), rtol=0, atol=1e-12)   # top row: the scores
    # the bottom row (entering layer 0) holds, at the last position, only the last token's embedding: read by hand
    # through the final RMSNorm at its real scale and the unembedding row (the real model's norm runs in float32)
    assert float(abs(layers[-1][:2]).max()) == 0.0
    model, seen = tiny.compiled()[0], {}
    hook = model.model.norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("final", args[0][0, -1]))
    with torch.no_grad():
        model(torch.tensor([[5, 17, 3]]))
    hook.remove()
    norm = model.model.norm
    token = int(decomposed.attribute("w5 w17 w3", targets="all").total[0, -1].argmax())
    scale = (seen["final"].pow(2).mean() + norm.variance_epsilon).rsqrt()
    by_hand = float(model.lm_head.weight[token] @ (norm.weight * model.model.embed_tokens.weight[3] * scale))
    assert abs(float(layers[-1][2]) - by_hand) <= 1e-6 * abs(by_hand)


# -- the README's recipes ------------------------------------------------------------------------------------------------


def _recipes() -> str:
    """The fenced Python blocks under the README's "Recipes" heading, in order."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


@pytest.mark.skipif(not tiny.demo_exists(), reason="the demo model is not trained (python tools/train_tiny.py)")
def test_readme_recipes_run(tmp_path, monkeypatch):
    from pathlib import Path

    matplotlib = pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    matplotlib.use("Agg")
    code = _recipes()
    assert code.count("\n") > 30 and "fxdepass.diff" in code and "load_attribution" in code
    (tmp_path / "models").symlink_to(Path(tiny.DEMO).parent)              # the recipes run from the repository root
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Recipes)", "exec"), {"__name__": "recipes"})
    assert {"bob.png", "batch.png", "layers.png", "bob.safetensors", "results.jsonl"} <= {p.name for p in tmp_path.iterdir()}
