"""Capture: dynamic shapes when the model allows, one static capture per shape otherwise."""
from __future__ import annotations

import torch

import families
import fxdepass
from fxdepass import api
from fxdepass.capture import capture as real_capture
from fxdepass.errors import CaptureError


def test_static_fallback_caches_one_capture_per_shape(monkeypatch) -> None:
    calls = []

    def refuse_dynamic(model, example, *, dynamic=True, **options):
        calls.append(dynamic)
        if dynamic:
            raise CaptureError("pretend the model specialises its sequence length")
        return real_capture(model, example, dynamic=False, **options)

    monkeypatch.setattr(api, "capture", refuse_dynamic)
    decomposed = fxdepass.compile(families.build("llama"), dtype=torch.float64)
    for ids in ([[1, 2, 3]], [[4, 5, 6, 7]], [[8, 9, 10]]):
        assert decomposed.attribute(torch.tensor(ids), positions="all", targets="all").reconstruction_error() <= 1e-9
    assert sorted(k for k in decomposed._captures) == [(1, 3), (1, 4), (2, 8)]
    assert calls == [True, False, False, False]


def test_capture_failure_is_a_clear_error() -> None:
    class Broken(torch.nn.Module):
        config = None

        def forward(self, input_ids, attention_mask=None):
            if input_ids.sum() > 3:  # data-dependent control flow
                return input_ids * 2
            return input_ids

    try:
        fxdepass.compile(Broken(), example_inputs=torch.tensor([[1, 2]]))
    except fxdepass.CaptureError as error:
        assert "torch.export could not capture Broken" in str(error)
        assert "eager" in str(error)
    else:
        raise AssertionError("expected a CaptureError")


def test_outputs_are_named_by_their_place_in_the_model_output() -> None:
    """XLNet returns its logits beside a tuple of memories: each output is named by its path, so the
    logits are found (before, the names fell back to positions when the output had nested tuples)."""
    import transformers

    config = transformers.XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, d_inner=64, mem_len=4)
    model = transformers.XLNetLMHeadModel(config).eval()
    captured = real_capture(model, {"input_ids": torch.randint(0, 64, (1, 6))}, dynamic=False)  # XLNet specialises its shapes
    assert set(captured.outputs) == {"logits", "mems.0", "mems.1"}
