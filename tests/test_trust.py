"""The decomposed pass explains the model as it is now, refuses what it cannot follow, and says where
a pass went wrong (issue 16: the model's tensors edited after compile, hooks and fxdepass.ablate,
extreme temperatures, seeds far larger than the activations)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import families
import fxdepass
import fxdepass.blocked as blocked
from conftest import relative_error

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def _edit(model: torch.nn.Module, how: str) -> None:
    """Change the model's weights (and one buffer) the way a user might."""
    weight = model.model.layers[1].mlp.down_proj.weight
    if how == "in place":
        with torch.no_grad():
            weight.mul_(10)
    elif how == "data":
        weight.data = weight.data * 10
    elif how in ("load_state_dict", "assign"):
        state = {k: v * 10 if k.endswith("mlp.down_proj.weight") else v for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=how == "assign")
    elif how == "new parameter":
        model.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(weight.detach() * 10)
    elif how == "buffer":
        model.model.rotary_emb.inv_freq.add_(1.0)


@pytest.mark.parametrize("dtype", [torch.float64, None])
@pytest.mark.parametrize("how", ["in place", "data", "load_state_dict", "assign", "new parameter", "buffer"])
def test_attribution_follows_the_live_model(how: str, dtype: torch.dtype | None) -> None:
    model = families.build("llama", layers=2, seed=4)
    decomposed = fxdepass.compile(model, dtype=dtype)
    reads = [dict(positions="all", targets="all"), dict(targets=[7]), dict(positions="all", targets="all", seed=fxdepass.heads(1))]
    before = [decomposed.attribute(IDS, **read) for read in reads]    # generated modules exist before the edit
    batched = decomposed.attribute(IDS.repeat(2, 1), positions="all", targets="all")   # and the dense one
    _edit(model, how)
    with torch.no_grad():
        real = model(IDS).logits.to(before[0].total.dtype)
    assert relative_error(before[0].total, real) > 1e-3             # the edit changes the logits
    tolerance = 1e-5 if dtype == torch.float64 else 1e-4
    for read in reads:
        after = decomposed.attribute(IDS, **read)
        expected = real if "targets" not in read or read["targets"] == "all" else real[..., -1:, 7:8]
        assert relative_error(after.total, expected) <= tolerance, read
        assert after.reconstruction_error() <= (1e-9 if dtype == torch.float64 else 1e-4)
    assert relative_error(decomposed.attribute(IDS.repeat(2, 1), positions="all", targets="all").total[:1], real) <= tolerance
    assert relative_error(batched.total[:1], before[0].total) <= tolerance


def test_changes_the_graph_cannot_follow_are_refused() -> None:
    model = families.build("llama", layers=2, seed=4)
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    decomposed.attribute(IDS)
    projection = model.model.layers[0].mlp.down_proj
    weight = projection.weight
    projection.weight = torch.nn.Parameter(torch.zeros(weight.shape[0], weight.shape[1] + 1))
    with pytest.raises(fxdepass.ModelChangedError, match=r"model\.layers\.0\.mlp\.down_proj\.weight is now \[32, 49\]"):
        decomposed.attribute(IDS)
    projection.weight = weight
    decomposed.attribute(IDS)
    float32 = fxdepass.compile(model)
    model.double()
    with pytest.raises(fxdepass.ModelChangedError, match="float64.*but was .* torch.float32 .* compile the model again"):
        float32.attribute(IDS)
    assert decomposed.attribute(IDS).reconstruction_error() <= 1e-9   # float64 mode copies, whatever the model's dtype


def test_attribute_inside_ablate_or_with_new_hooks_is_refused() -> None:
    model = families.build("llama", layers=2, seed=5)
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    plain = decomposed.attribute(IDS, positions="all", targets="all")
    with fxdepass.ablate(decomposed, heads={0: [1]}):
        with torch.no_grad():   # the model's own logits are ablated ...
            assert not torch.allclose(model(IDS).logits.double(), plain.total)
        with pytest.raises(fxdepass.ModelChangedError, match=r"inside `with fxdepass.ablate\(\.\.\.\)`.*unablated"):
            decomposed.attribute(IDS)   # ... which the decomposed pass would not be
    assert torch.equal(decomposed.attribute(IDS, positions="all", targets="all").components, plain.components)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(fxdepass.ModelChangedError, match=r"added on model\.layers\.1\.mlp \(forward\)"):
        decomposed.attribute(IDS)
    handle.remove()
    hooked = families.build("llama", layers=2, seed=5)
    handle = hooked.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out * 2)
    with_hook = fxdepass.compile(hooked, dtype=torch.float64)
    with torch.no_grad():
        real = hooked(IDS).logits.double()
    assert relative_error(with_hook.attribute(IDS, positions="all", targets="all").total, real) <= 1e-5   # the hook is captured
    handle.remove()
    with pytest.raises(fxdepass.ModelChangedError, match=r"removed from model\.layers\.1\.mlp \(forward\)"):
        with_hook.attribute(IDS)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda t: not 1e-30 <= t <= 1e30),
                 st.sampled_from([0, -1, "0.1", None, True, 1e-40, 1e39, 1e-310])),
       st.sampled_from([torch.float32, torch.float64]))
def test_unusable_temperatures_are_refused_at_compile(temperature, dtype) -> None:
    inverse = 1 / temperature if isinstance(temperature, float) and temperature > 0 else None
    info = torch.finfo(dtype)
    if inverse is not None and temperature < float("inf") and info.tiny <= inverse <= info.max:
        return  # a temperature the dtype holds: test_extreme_temperatures_stay_finite_and_exact
    with pytest.raises(fxdepass.InvalidInputError, match="temperature"):
        fxdepass.compile(MODEL, temperature=temperature, dtype=dtype)


MODEL = families.build("llama", layers=2, seed=6)


@pytest.mark.parametrize(("dtype", "temperature"), [(torch.float64, 1e-300), (torch.float64, 1e-20), (torch.float64, 1e300),
                                                    (torch.float32, 1e-20), (torch.float32, 1e-12), (torch.float32, 1e37)])
def test_extreme_temperatures_stay_finite_and_exact(dtype: torch.dtype, temperature: float) -> None:
    """The neuron-slice runner (one prompt) and the dense module (a batch) agree at any accepted temperature."""
    decomposed = fxdepass.compile(MODEL, temperature=temperature, dtype=dtype)
    sliced = decomposed.attribute(IDS, positions="all", targets="all")
    dense = decomposed.attribute(IDS.repeat(2, 1), positions="all", targets="all")
    assert sliced.reconstruction_error() <= fxdepass.planning.TOLERANCE[dtype]
    assert relative_error(sliced.components[:, 0], dense.components[:, 0]) <= (1e-9 if dtype == torch.float64 else 1e-4)


def test_a_failure_of_the_runner_is_diagnosed_by_the_runner(monkeypatch) -> None:
    """Forced to its one-pass exponent at a tiny temperature, the neuron-slice runner's allocation overflows
    (the dense module's does not): the error names that node and blames the decomposition."""
    monkeypatch.setattr(blocked, "ROUNDED_EXPONENT", float("inf"))
    decomposed = fxdepass.compile(MODEL, temperature=1e-20, dtype=torch.float64)
    assert decomposed.attribute(IDS.repeat(2, 1)).reconstruction_error() <= 1e-9   # dense: finite
    with pytest.raises(fxdepass.InvalidInputError, match=r"decomposed pass produced NaN or inf first at "
                                                         r"layers_0_mlp_act_fn_silu_c at model\.layers\.0\.mlp\.act_fn .*"
                                                         r"where the model's own value is finite"):
        decomposed.attribute(IDS)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_huge_projector_is_diagnosed_at_its_node(batch: int) -> None:
    """A 'projector' of 1e200 swamps the residual it splits: the error says where the sum breaks."""
    decomposed = fxdepass.compile(MODEL, dtype=torch.float64)
    projector = torch.zeros(MODEL.config.hidden_size, MODEL.config.hidden_size, dtype=torch.float64)
    projector[0, 0] = 1e200
    seed = fxdepass.subspace(1, [projector], check=False)
    with pytest.raises(fxdepass.FxDePassError, match=r"(first diverges|NaN or inf first) at layers_0_add_1_c at model\.layers\.0 "):
        decomposed.attribute(IDS.repeat(batch, 1), seed=seed, strict=True)
