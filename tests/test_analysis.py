"""The analysis: which nodes carry components and with which flavour (fxdepass.analysis Note [Flavours])."""
from __future__ import annotations

import math

import torch

import families
import fxdepass
from fxdepass.analysis import ACTIVATION, FROZEN, LINEAR, PRODUCT, analyse


def _analyse(fn, *shapes):
    class Wrapper(torch.nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    program = torch.export.export(Wrapper(), tuple(torch.randn(*s) for s in shapes)).run_decompositions({})
    graph = program.graph_module.graph
    x = next(n for n in graph.nodes if n.op == "placeholder")
    out = next(n for n in graph.nodes if n.op == "output").args[0][0]
    analysis = analyse(graph, [x], [out])
    flavour = {str(n.target).split(".")[1]: analysis.info[n].flavour for n in analysis.info if n.op == "call_function"}
    return analysis, flavour, out


def test_rmsnorm_statistics_are_frozen():
    analysis, flavour, out = _analyse(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * 2.0, (3, 4))
    assert flavour["pow"] != LINEAR and flavour["rsqrt"] == FROZEN and flavour["mean"] == FROZEN
    assert analysis.info[out].flavour == LINEAR
    assert {str(n.target) for n in analysis.needed if n.op == "call_function"} == {"aten.mul.Tensor"}


def test_gelu_tanh_spelled_out_is_one_activation():
    def gelu_new(z):
        return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3.0))))

    analysis, flavour, out = _analyse(lambda x: gelu_new(x @ torch.ones(4, 4)), (3, 4))
    assert analysis.info[out].flavour == ACTIVATION
    root = analysis.info[out].root
    assert str(root.target) == "aten.mm.default" or str(root.target).startswith("aten.matmul")
    needed = {str(n.target) for n in analysis.needed if n.op == "call_function"}
    assert "aten.tanh.default" not in needed and "aten.pow.Tensor_Scalar" not in needed
    assert len(analysis.needed) == 3  # seed, the matmul, the activation's output


def test_silu_spelled_out_is_an_activation_but_a_sigmoid_gate_is_frozen():
    _, _, out = _analyse(lambda x: x * torch.sigmoid(x), (3, 4))
    analysis, flavour, gated = _analyse(lambda x: torch.sigmoid(x.sum(-1, keepdim=True)) * (x @ torch.ones(4, 4)), (3, 4))
    assert analysis.info[gated].flavour == LINEAR
    assert flavour["sigmoid"] != ACTIVATION
    assert not any(str(n.target) == "aten.sigmoid.default" for n in analysis.needed)


def test_gated_product_allocates_on_the_activation_side():
    analysis, _, out = _analyse(lambda x: torch.nn.functional.silu(x @ torch.ones(4, 5)) * (x @ torch.ones(4, 5)), (3, 4))
    info = analysis.info[out]
    assert info.flavour == LINEAR and len(info.component_args) == 1
    (position,) = info.component_args
    assert str(out.args[position].target) == "aten.silu.default"


def test_product_of_two_linear_values_is_symmetric():
    analysis, _, out = _analyse(lambda x: (x @ torch.ones(4, 5)) * (x @ torch.full((4, 5), 2.0)), (3, 4))
    assert analysis.info[out].flavour == PRODUCT


def test_queries_and_keys_are_never_decomposed():
    decomposed = fxdepass.compile(families.build("llama", attention="eager"), dtype=torch.float64)
    code = decomposed.code
    assert "softmax_c" not in code and "q_proj_c" not in code and "k_proj_c" not in code
    assert "v_proj_c" in code


def test_gpt2_allocates_its_composite_gelu_once_per_layer():
    model = families.build("gpt2", layers=3)
    code = fxdepass.compile(model, dtype=torch.float64).code
    assert code.count("rules_activations_allocate(") == 3
    assert "tanh_c" not in code and "pow_c" not in code


def test_product_of_two_decomposed_values_uses_the_symmetric_split():
    class Square(torch.nn.Module):
        def forward(self, x):
            return (x @ torch.eye(x.shape[-1])) * x

    model = families.build("llama", layers=1)
    model.model.layers[0].mlp.act_fn = Square()
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    assert decomposed.code.count("rules_products_symmetric_product(") >= 1
    assert decomposed.attribute(torch.tensor([[1, 2, 3, 4]]), positions="all", targets="all").reconstruction_error() <= 1e-9
