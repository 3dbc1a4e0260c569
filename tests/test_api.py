"""The user API: batching with padding, untouched models, readable code, options and errors."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import families
import fxdepass
from conftest import load_tool, relative_error
from probes import assert_same_state, model_state


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return families.build("llama", layers=2, seed=1)


@pytest.fixture(scope="module")
def llama64(llama) -> fxdepass.DecomposedModel:
    return fxdepass.compile(llama, dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(family: str, side: str) -> None:
    decomposed = fxdepass.compile(families.build(family, seed=3), dtype=torch.float64)
    prompts = [torch.randint(0, families.VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 4)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        where = slice(7 - len(prompt), 7) if side == "left" else slice(0, len(prompt))
        ids[row, where], mask[row, where] = prompt, 1
    batched = decomposed.attribute(ids, positions="all", targets="all", attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = decomposed.attribute(prompt, positions="all", targets="all")
        n = len(prompt)
        positions = slice(7 - n, 7) if side == "left" else slice(0, n)
        components = batched.components[:, row, positions]
        mine = torch.cat((components[:-1][positions], components[-1:]))  # this prompt's tokens + rest
        assert relative_error(mine, alone.components[:, 0]) <= 1e-9
        padding = [i for i in range(7) if i not in range(7)[positions]]
        assert (components[padding] == 0).all()  # padding tokens contribute exactly nothing


@pytest.mark.parametrize("root", ["eval", "train"])
def test_model_is_untouched(llama, root: str, monkeypatch) -> None:
    """compile, attribute, ablate (the first on a plain model captures it), generate_attributed and a failed
    capture leave every module's own training flag, every hook, parameter and buffer as they were."""
    model = copy.deepcopy(llama).train(root == "train")
    model.model.layers[0].mlp.train(root != "train")           # a submodule in the other mode than the root
    model.model.layers[1].self_attn.o_proj.train(root != "train")
    model.model.layers[0].register_forward_hook(lambda *a: None)
    model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: None)
    model.model.layers[0].self_attn.register_full_backward_hook(lambda *a: None)
    model.model.norm.weight.requires_grad_(False)
    before = model_state(model)
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    assert_same_state(before, model_state(model))
    decomposed.attribute(torch.tensor([[1, 2, 3, 4]]), positions="all", targets="all")
    decomposed.attribute(torch.tensor([[5, 6, 7]]), positions="all", targets="all", seed=fxdepass.tokens(sink=False))
    decomposed.attribute(torch.tensor([[5, 6, 7], [1, 2, 3]]), readout=["logits", "layers"])   # the dense module
    assert_same_state(before, model_state(model))
    with fxdepass.ablate(decomposed, heads={0: [1]}, neurons={1: [2]}):
        pass
    with fxdepass.ablate(model, heads={1: [0]}):
        pass
    decomposed.generate_attributed(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    assert_same_state(before, model_state(model))

    def fails(exported, *args, **kwargs):
        assert not any(m.training for m in exported.modules())  # exported in eval mode
        raise RuntimeError("export failed")

    monkeypatch.setattr(torch.export, "export", fails)
    with pytest.raises(fxdepass.CaptureError, match="export failed"):
        fxdepass.compile(model)
    assert_same_state(before, model_state(model))
    other = copy.deepcopy(model)    # not yet captured for ablation
    before = model_state(other)
    with pytest.raises(fxdepass.CaptureError, match="export failed"):
        with fxdepass.ablate(other, heads={0: [1]}):
            pass
    assert_same_state(before, model_state(other))


def test_generated_code_is_readable(llama64) -> None:
    code = llama64.code
    for name in ("layers_1_mlp_down_proj_c", "layers_0_self_attn_o_proj_c", "layers_0_mlp_act_fn_silu_c", "lm_head_c"):
        assert f"{name} = " in code, name
    assert "layers_0_self_attn_q_proj_c" not in code  # queries feed only frozen probabilities
    assert "rsqrt_c" not in code                         # norm statistics are frozen
    assert isinstance(llama64.graph_module, torch.fx.GraphModule)


def test_one_compile_serves_every_length(llama64) -> None:
    for length in (2, 5, 13):
        assert llama64.attribute(torch.arange(length).unsqueeze(0) % 50, positions="all", targets="all").reconstruction_error() <= 1e-9
    assert list(llama64._captures) == [None]  # a single dynamic capture


def test_single_token_prompt(llama64) -> None:
    attribution = llama64.attribute(torch.tensor([[7]]), positions="all", targets="all")
    assert attribution.components.shape[0] == 2
    assert attribution.reconstruction_error() <= 1e-9


@pytest.mark.parametrize("activation", ["softmax", "linear", "max"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_options_stay_exact(activation: str, attention: str) -> None:
    model = families.build("llama", attention=attention, seed=2)
    decomposed = fxdepass.compile(model, activation=activation, temperature=0.5, dtype=torch.float64)
    attribution = decomposed.attribute(torch.tensor([[3, 1, 4, 1, 5, 9]]), positions="all", targets="all")
    assert attribution.reconstruction_error() <= 1e-9


def test_allocation_modes_give_different_attributions(llama) -> None:
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    scores = {mode: fxdepass.compile(llama, activation=mode, dtype=torch.float64).attribute(ids, positions="all", targets="all").scores()
              for mode in ("softmax", "linear", "max")}
    assert not torch.allclose(scores["softmax"], scores["linear"])
    assert not torch.allclose(scores["softmax"], scores["max"])


def test_eager_and_sdpa_attention_agree() -> None:
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    results = [fxdepass.compile(families.build("qwen2", attention=a, seed=5), dtype=torch.float64).attribute(ids, positions="all", targets="all")
               for a in ("sdpa", "eager")]
    assert relative_error(results[0].components, results[1].components) <= 1e-9


def test_scores_labels_and_targets(llama64) -> None:
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    attribution = llama64.attribute(ids, targets=[7])
    assert attribution.labels == ["tok 0 '3'", "tok 1 '1'", "tok 2 '4'", "tok 3 '1'", "tok 4 '5'", "rest"]
    scores = attribution.scores()
    assert attribution.components.shape[-1] == 1 and attribution.targets == [fxdepass.targets.Token(7)]  # only that head row
    torch.testing.assert_close(scores.sum(), attribution.total[0, -1, 0])
    full = llama64.attribute(ids, positions="all", targets="all")
    torch.testing.assert_close(full.scores().sum(), full.total[0, -1].max())
    torch.testing.assert_close(full.scores(7), scores)
    assert [label for label, _ in attribution.top(2)] == [attribution.labels[i] for i in scores.abs().argsort(descending=True)[:2]]


def test_float32_default_dtype(llama) -> None:
    attribution = fxdepass.compile(llama).attribute(torch.tensor([[3, 1, 4, 1, 5]]), positions="all", targets="all")
    assert attribution.components.dtype == torch.float32
    assert attribution.reconstruction_error() <= 1e-4


@pytest.mark.filterwarnings("error")
def test_results_carry_no_autograd_graph(llama) -> None:
    # the model's parameters require grad; the target rows read the live head weight after the pass
    assert all(p.requires_grad for p in llama.parameters())
    for target in (None, 7, fxdepass.logprob(7)):
        attribution = fxdepass.compile(llama).attribute(torch.tensor([[3, 1, 4, 1, 5]]), targets=target)
        assert not attribution.components.requires_grad and not attribution.total.requires_grad
        assert attribution.reconstruction_error() <= 1e-4


def test_encoder_reads_out_last_hidden_state() -> None:
    model = families.build("bert", seed=1)
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    ids = torch.tensor([[2, 7, 1, 8, 2, 8]])
    attribution = decomposed.attribute(ids, positions="all", targets="all", readout="hidden")
    assert attribution.reconstruction_error() <= 1e-9
    with torch.no_grad():
        reference = model(input_ids=ids).last_hidden_state
    assert relative_error(attribution.total, reference.double()) <= 1e-5
    with pytest.raises(fxdepass.InvalidReadoutError, match="readout='hidden'"):
        decomposed.attribute(ids, positions="all", targets="all")


def test_bad_inputs_raise_clear_errors(llama64) -> None:
    with pytest.raises(fxdepass.InvalidInputError, match="input_ids must lie in"):
        llama64.attribute(torch.tensor([[1, 2, 999]]), positions="all", targets="all")
    with pytest.raises(fxdepass.InvalidInputError, match="non-empty"):
        llama64.attribute(torch.zeros(1, 0, dtype=torch.long), positions="all", targets="all")
    with pytest.raises(fxdepass.InvalidInputError, match="integer token ids"):
        llama64.attribute(torch.ones(1, 3), positions="all", targets="all")
    with pytest.raises(fxdepass.InvalidInputError, match="attention_mask shape"):
        llama64.attribute(torch.tensor([[1, 2, 3]]), positions="all", targets="all", attention_mask=torch.ones(1, 4))
    with pytest.raises(fxdepass.InvalidReadoutError, match="unknown readout"):
        llama64.attribute(torch.tensor([[1, 2, 3]]), positions="all", targets="all", readout="nope")
    with pytest.raises(fxdepass.InvalidInputError, match="outside the vocabulary"):
        llama64.attribute(torch.tensor([[1, 2, 3]]), positions="all", targets="all").scores(target=10_000)
    with pytest.raises(fxdepass.InvalidInputError, match="activation="):
        fxdepass.compile(families.build("llama"), activation="mean")
    assert issubclass(fxdepass.InvalidInputError, fxdepass.FxDePassError)


class _Atan(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.atan(x)


def test_unsupported_op_is_reported_at_compile_time() -> None:
    model = families.build("llama", seed=0)
    model.model.layers[1].mlp.act_fn = _Atan()
    with pytest.raises(fxdepass.UnsupportedOpError) as error:
        fxdepass.compile(model)
    message = str(error.value)
    assert "aten.atan.default" in message
    assert "model.layers.1.mlp.act_fn" in message
    assert "return torch.atan(x)" in message          # the source line
    assert "register_rule" in message and "deflinear" in message


READS = {"target row": dict(targets=[1]), "every logit, last position": dict(targets="all"),
         "every logit, every position": dict(targets="all", positions="all"), "target rows, every position": dict(positions="all"),
         "log-probability, every position": dict(targets=fxdepass.logprob(1), positions="all")}


@functools.cache
def _compiled_for_memory(family: str, attention: str) -> fxdepass.DecomposedModel:
    """One compiled model per family and attention policy, shared by the reads (each read builds its own module)."""
    return fxdepass.compile(families.build(family, layers=2), attention=attention)


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("family, seed, attention", [("llama", fxdepass.tokens(), "frozen"), ("llama", fxdepass.heads(1), "frozen"),
                                                     ("gpt2", fxdepass.tokens(), "frozen"), ("mixtral", fxdepass.tokens(), "frozen"),
                                                     ("llama", fxdepass.tokens(), "routed"), ("mixtral", fxdepass.tokens(), "routed")])
def test_memory_estimate_is_near_the_measured_peak(family: str, seed: object, attention: str, read: str) -> None:
    """The guard's estimate, made before the pass, against the allocator's peak during it, for each way of
    reading the logits: not below 3/4 of it (the guard would let a run through that does not fit) nor above
    3 times (it would refuse runs that fit; tiny models' peaks are dominated by
    small fixed costs, so 64 KiB of them are allowed beyond the 3/4; before, reading the last position only left the estimate at
    every position's, and every logit at every position was 0.66× the peak on SmolLM2; attention="routed"
    fell far below the 3/4 before its score parts were counted)."""
    ids = torch.randint(0, families.VOCAB, (1, 64), generator=torch.Generator().manual_seed(1))
    decomposed = _compiled_for_memory(family, attention)
    estimate = decomposed.attribute(ids, seed=seed, **READS[read]).memory_estimate
    peak = load_tool("bench").allocator_peak(lambda: decomposed.attribute(ids, seed=seed, **READS[read]))
    assert 0.75 * peak - 64 * 1024 <= estimate <= 3 * peak, (estimate, peak)


@pytest.mark.parametrize("read", READS)
def test_memory_estimate_on_smollm2(smollm2_float64, read: str) -> None:
    """The same on the real model (49k vocabulary, 30 layers): within 0.8–1.5× of the allocator's peak."""
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(40))
    estimate = smollm2_float64.attribute(ids, **READS[read]).memory_estimate
    peak = load_tool("bench").allocator_peak(lambda: smollm2_float64.attribute(ids, **READS[read]))
    assert 0.8 * peak <= estimate <= 1.5 * peak, (estimate, peak)


def test_memory_estimate_leaves_out_data_dependent_sizes() -> None:
    """JetMoE's experts run on as many rows as routing sends them, a size the export leaves symbolic
    (unbacked): the memory estimate skips those values instead of failing, and the attribution is exact."""
    transformers = pytest.importorskip("transformers")
    config = transformers.JetMoeConfig(vocab_size=families.VOCAB, hidden_size=32, intermediate_size=48, kv_channels=8,
                                       num_key_value_heads=2, num_local_experts=4, num_hidden_layers=2)
    torch.manual_seed(0)
    decomposed = fxdepass.compile(transformers.JetMoeForCausalLM(config).eval(), dtype=torch.float64)
    ids = torch.randint(0, families.VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    captured = next(iter(decomposed._captures.values()))
    module = decomposed._module(captured, fxdepass.tokens(), ("logits",))[0]
    values = [n.meta.get("val") for n in module.graph.nodes]
    assert any(free_unbacked_symbols(v) for v in values if isinstance(v, torch.Tensor))  # the data-dependent size
    assert decomposed.estimate_memory(module, captured, ids, ids.shape[1] + 1) > 0
    assert decomposed.attribute(ids, positions="all", targets="all").reconstruction_error() <= 1e-9
