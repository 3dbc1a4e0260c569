"""Attribution graphs (issue 5): edge weights add up exactly, agree with direct computations, and pruning keeps
what it says."""
from __future__ import annotations

import pytest
import torch

import families
from probes import module_io
import fxdepass
import tiny
from fxdepass.graph import build_graph, embedding_target, keep_fraction, seed_graph

IDS = tiny.IDS
#: Hugging Face's float64 forward rounds inside RMSNorm through float32 (SPEC §5)
HF_FORWARD = 1e-6


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, fxdepass.DecomposedModel]:
    """No biases anywhere, so the token stage has an empty rest; eager attention gives the probabilities."""
    return tiny.compiled()


@pytest.fixture(scope="module")
def graphs(llama) -> tuple[object, object]:
    _, decomposed = llama
    return build_graph(decomposed, IDS, node_threshold=1.0, edge_threshold=1.0), build_graph(decomposed, IDS)


def _into_target(graph, stage: int) -> float:
    return sum(w for s, _, w in graph.in_edges("target", data="weight") if graph.nodes[s]["stage"] == stage)


def test_edges_into_the_logit_add_up_to_the_real_logit(llama, graphs) -> None:
    model, decomposed = llama
    with torch.no_grad():
        logits = model(IDS).logits[0, -1]
    target = int(logits.argmax())
    exact = float(decomposed.attribute(IDS, positions="all", targets="all").total[0, -1, target])        # the same precision policy
    for graph in graphs:
        info = graph.graph
        assert info["target_token"] == target and info["readout"] == "logits"
        assert abs(info["value"] - exact) <= 1e-12 * abs(exact)
        assert abs(info["value"] - float(logits[target])) <= HF_FORWARD * abs(exact)
        assert len(info["stages"]) == 2 * 2 + 1
        for number, stage in enumerate(info["stages"]):
            assert _into_target(graph, number) == pytest.approx(stage["kept"], abs=1e-12)
            assert stage["kept"] + stage["pruned"] + stage["rest"] == pytest.approx(exact, rel=1e-9, abs=1e-12)
    full, pruned = graphs
    assert all(stage["pruned"] == 0.0 for stage in full.graph["stages"])
    assert full.graph["explained_fraction"] == pytest.approx(1.0) and full.graph["influence_fraction"] == pytest.approx(1.0)
    assert abs(full.graph["stages"][0]["rest"]) <= 1e-12                 # no biases: the tokens explain everything
    assert pruned.number_of_nodes() < full.number_of_nodes()


def test_tokens_split_every_node_exactly(graphs) -> None:
    """With no biases, each node's incoming token edges add up to its contribution (the token stage has no rest)."""
    full, _ = graphs
    internal = [n for n, kind in full.nodes(data="kind") if kind in ("head", "mlp")]
    # Every node of layer 0; of the last layer only those at the last position (others cannot reach it).
    last = {full.nodes[n]["position"] for n in internal if full.nodes[n]["layer"] == 1}
    assert len(internal) == (4 + 1) * IDS.shape[1] + (4 + 1) and last == {IDS.shape[1] - 1}
    for node in internal:
        from_tokens = sum(w for s, _, w in full.in_edges(node, data="weight") if full.nodes[s]["kind"] == "token")
        contribution = full.nodes[node]["contribution"]
        assert from_tokens == pytest.approx(contribution, rel=1e-9, abs=1e-13)


def test_first_layer_head_edges_equal_a_direct_computation(llama, graphs) -> None:
    """Token q's share of head h's output at p in layer 0: P[h, p, q] · W_O,h W_V,h norm(x_q), projected on the output."""
    model, _ = llama
    full, _ = graphs
    layer = model.model.layers[0]
    with torch.no_grad():
        probabilities = model(IDS, output_attentions=True).attentions[0][0]   # [heads, query, key]
    x, _ = module_io(layer.input_layernorm, lambda: model(IDS))
    x = x[0]
    norm = layer.input_layernorm
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    size = model.config.hidden_size // heads
    with torch.no_grad():
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
        values = (normed @ layer.self_attn.v_proj.weight.T).view(len(x), kv, size)
        out_weights = layer.self_attn.o_proj.weight.detach()
    for h in range(heads):
        out_weight = out_weights[:, h * size:(h + 1) * size]
        for p in range(len(x)):
            parts = probabilities[h, p, :, None] * (values[:, h // (heads // kv)] @ out_weight.T)   # [q, D]
            output = parts.sum(0)
            shares = parts @ output / output.dot(output)
            node = f"L0H{h}@{p}"
            contribution = full.nodes[node]["contribution"]
            assert full.nodes[node]["activation"] == pytest.approx(float(output.norm()), rel=HF_FORWARD)
            for q in range(len(x)):
                weight = full.edges[f"tok{q}", node]["weight"] if full.has_edge(f"tok{q}", node) else 0.0
                assert weight == pytest.approx(contribution * float(shares[q]), rel=1e-5, abs=1e-9)


def test_last_mlp_contribution_is_its_direct_logit_effect(llama, graphs) -> None:
    model, _ = llama
    full, _ = graphs
    _, mlp_out = module_io(model.model.layers[-1].mlp, lambda: model(IDS))
    final, _ = module_io(model.model.norm, lambda: model(IDS))
    norm = model.model.norm
    with torch.no_grad():
        scale = torch.rsqrt(final[0, -1].pow(2).mean() + norm.variance_epsilon) * norm.weight
        unembed = scale * model.lm_head.weight[full.graph["target_token"]]
    direct = float(mlp_out[0, -1] @ unembed)
    last = IDS.shape[1] - 1
    magnitude = float(mlp_out[0, -1].norm() * unembed.norm())
    assert full.nodes[f"L1MLP@{last}"]["contribution"] == pytest.approx(direct, abs=HF_FORWARD * magnitude)
    assert full.edges[f"L1MLP@{last}", "target"]["weight"] == full.nodes[f"L1MLP@{last}"]["contribution"]


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95])
def test_pruning_keeps_the_stated_fraction(llama, threshold: float) -> None:
    _, decomposed = llama
    graph = build_graph(decomposed, IDS, node_threshold=threshold, edge_threshold=1.0)
    assert graph.graph["influence_fraction"] >= threshold - 1e-12
    kept = [d["contribution"] for _, d in graph.nodes(data=True) if d["kind"] in ("head", "mlp")]
    full = build_graph(decomposed, IDS, node_threshold=1.0, edge_threshold=1.0)
    everything = [d["contribution"] for _, d in full.nodes(data=True) if d["kind"] in ("head", "mlp")]
    assert sum(map(abs, kept)) / sum(map(abs, everything)) == pytest.approx(graph.graph["influence_fraction"])


def test_pruned_graph_keeps_tokens_and_target_and_drops_orphans(graphs) -> None:
    _, pruned = graphs
    kinds = [kind for _, kind in pruned.nodes(data="kind")]
    assert kinds.count("token") == IDS.shape[1] and kinds.count("target") == 1
    for node, kind in pruned.nodes(data="kind"):
        if kind in ("head", "mlp"):
            assert pruned.out_degree(node) > 0
    stages = pruned.graph["stages"]
    unexplained = sum(stage["pruned"] for stage in stages) / (len(stages) * pruned.graph["value"])
    assert pruned.graph["explained_fraction"] == pytest.approx(1.0 - unexplained)
    assert 0.5 < pruned.graph["explained_fraction"] < 1.5
    influences = sorted((d["influence"], abs(d["contribution"])) for _, d in pruned.nodes(data=True) if d["kind"] == "head")
    assert [c for _, c in influences] == sorted((c for _, c in influences), reverse=True)   # cumulative: smaller is stronger


def test_keep_fraction_and_argument_errors(llama) -> None:
    assert keep_fraction(torch.tensor([1.0, 5.0, 3.0, 1.0]), 0.8).tolist() == [False, True, True, False]
    assert keep_fraction(torch.tensor([1.0, 0.0, 2.0]), 1.0).tolist() == [True, False, True]
    assert not keep_fraction(torch.zeros(3), 0.5).any()
    _, decomposed = llama
    with pytest.raises(fxdepass.InvalidInputError, match="one prompt"):
        build_graph(decomposed, IDS.expand(2, -1))
    with pytest.raises(fxdepass.InvalidInputError, match=r"\[0, 1\]"):
        build_graph(decomposed, IDS, node_threshold=1.5)
    with pytest.raises(fxdepass.InvalidInputError, match="not one token"):
        build_graph(decomposed, IDS, target="blue")
    with pytest.raises(fxdepass.InvalidInputError, match="outside the vocabulary"):
        build_graph(decomposed, IDS, target=1000)
    assert build_graph(decomposed, IDS, target="w7").graph["target_token"] == 7
    other = build_graph(decomposed, IDS, target=7, node_threshold=1.0, edge_threshold=1.0)
    assert other.graph["target"] == "logit 'w7'"
    assert other.graph["value"] == pytest.approx(float(decomposed.attribute(IDS, positions="all", targets="all").total[0, -1, 7]), rel=1e-12)


def test_seed_graph_of_heads_matches_scores(llama) -> None:
    model, decomposed = llama
    seed = fxdepass.heads(-1)
    attribution = decomposed.attribute(IDS, positions="all", targets="all", seed=seed)
    target = fxdepass.graph.resolve_target(decomposed, attribution.total[0], None)
    graph = seed_graph(attribution, seed, target, layers=2, activations=fxdepass.graph.seed_activations(decomposed, IDS, seed))
    scores = attribution.scores()
    heads = [d for _, d in graph.nodes(data=True) if d["kind"] == "head"]
    assert [d["index"] for d in heads] == list(range(4)) and {d["layer"] for d in heads} == {1}
    assert [d["contribution"] for d in heads] == pytest.approx(scores[:-1].tolist(), rel=1e-12)
    assert graph.graph["rest"] == pytest.approx(float(scores[-1]))
    assert graph.graph["value"] == pytest.approx(float(attribution.total[0, -1, target.token]), rel=1e-12)


def test_encoder_graph_explains_the_pooled_embedding() -> None:
    model = families.build("bert", layers=2, seed=2).double()
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    graph = build_graph(decomposed, IDS, node_threshold=1.0, edge_threshold=1.0)
    with torch.no_grad():
        pooled = model(IDS).last_hidden_state[0].mean(0)
    assert graph.graph["readout"] == "hidden" and graph.graph["target"] == "embedding length"
    assert graph.graph["value"] == pytest.approx(float(pooled.norm()), rel=HF_FORWARD)
    for stage in graph.graph["stages"]:
        assert stage["kept"] + stage["rest"] == pytest.approx(graph.graph["value"], rel=1e-9)
    other = torch.randn(model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cosine = build_graph(decomposed, IDS, other).graph["value"]
    assert cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(pooled, other, dim=0)), rel=HF_FORWARD)
    assert embedding_target(torch.tensor([[3.0, 0.0], [3.0, 8.0]])).label == "embedding length"


@pytest.mark.parametrize("family", ["gpt2", "opt", "mixtral", "qwen2_moe"])
def test_flattened_projections_give_exact_graphs(family: str) -> None:
    """GPT-2 (Conv1D: addmm with a [in, out] weight) and OPT flatten batch and positions before their linear maps;
    in MoE models (kept in float32: no float64 grouped kernel) the MLP node is the whole expert block."""
    model = families.build(family, layers=2, seed=5)
    model = model if family in families.MOE else model.double()
    decomposed = fxdepass.compile(model, dtype=torch.float64)
    graph = build_graph(decomposed, IDS, node_threshold=1.0, edge_threshold=1.0)
    for stage in graph.graph["stages"]:
        assert stage["kept"] + stage["rest"] == pytest.approx(graph.graph["value"], rel=1e-9)
    if family == "gpt2":
        projection = model.transformer.h[0].attn.c_proj
        x, _ = module_io(projection, lambda: model(IDS))
        size = x.shape[-1] // model.config.n_head
        weight = projection.weight.detach()
        for h in range(model.config.n_head):
            direct = (x[0, :, h * size:(h + 1) * size] @ weight[h * size:(h + 1) * size]).norm(dim=-1)
            for p in range(IDS.shape[1]):
                if graph.has_node(f"L0H{h}@{p}"):
                    assert graph.nodes[f"L0H{h}@{p}"]["activation"] == pytest.approx(float(direct[p]), rel=HF_FORWARD)


def _reference_stage(decomposed, model, kind: str, layer: int, target: int) -> tuple[torch.Tensor, dict]:
    """One stage's own pass through the public API: a custom seed splitting the stage's value (heads by head and
    position, the MLP output by position), reading the target and every later stage's value."""
    heads, length = model.config.num_attention_heads, IDS.shape[1]
    layers = model.config.num_hidden_layers

    def by_position(value: torch.Tensor) -> torch.Tensor:                 # [1, N, F] → [N, 1, N, F]
        return torch.stack([value * (torch.arange(length) == p).to(value.dtype)[None, :, None] for p in range(length)])

    def by_head_and_position(value: torch.Tensor) -> torch.Tensor:        # head-major, as the graph's node ids
        width = value.shape[-1] // heads
        masks = [(torch.arange(value.shape[-1]) // width == h).to(value.dtype) for h in range(heads)]
        return torch.cat([by_position(value * m) for m in masks])

    if kind == "attention":
        seed = fxdepass.custom(f"model.layers.{layer}.self_attn.o_proj", where="input", split=by_head_and_position)
    else:
        seed = fxdepass.custom(f"model.layers.{layer}.mlp", where="output", split=by_position)
    later = [(t, k) for t in range(layers) for k in ("attention", "mlp")]
    later = later[later.index((layer, kind)) + 1:]
    names = [f"layer {t} {'heads' if k == 'attention' else 'mlp'}" for t, k in later]
    found = decomposed.attribute(IDS, seed=seed, readout=["logits", *names], targets=target, positions="all", strict=True)
    return found["logits"].scores(), {stage: found[name] for stage, name in zip(later, names)}


def _outputs(model, kind: str, layer: int, value: torch.Tensor) -> torch.Tensor:
    """What each node of a stage writes into the residual stream, ``[..., nodes, D]``, from its value ``[..., N, F]``."""
    if kind == "mlp":
        return value
    weight = model.model.layers[layer].self_attn.o_proj.weight.detach()         # [D, H·dh]
    heads = model.config.num_attention_heads
    width = weight.shape[1] // heads
    per_head = [value[..., h * width:(h + 1) * width] @ weight[:, h * width:(h + 1) * width].T for h in range(heads)]
    return torch.cat(per_head, dim=-2)


def _node_id(kind: str, layer: int, index: int) -> str:
    length = IDS.shape[1]
    return f"L{layer}MLP@{index}" if kind == "mlp" else f"L{layer}H{index // length}@{index % length}"


def test_batched_stages_equal_one_pass_per_stage(llama, graphs) -> None:
    """Note [Stages in a batch]: the graph's stages share batched passes; every contribution and edge equals what
    one pass per stage, through the public API with custom seeds, gives (float64, 1e-12 of the largest weight)."""
    model, decomposed = llama
    full, _ = graphs
    target = full.graph["target_token"]
    scale = max(abs(w) for _, _, w in full.edges(data="weight"))
    checked = 0
    for layer in range(model.config.num_hidden_layers):
        for kind in ("attention", "mlp"):
            scores, later = _reference_stage(decomposed, model, kind, layer, target)
            for index, contribution in enumerate(scores[:-1].tolist()):
                node = _node_id(kind, layer, index)
                if not full.has_node(node):
                    assert abs(contribution) <= 1e-12 * scale
                    continue
                assert abs(full.nodes[node]["contribution"] - contribution) <= 1e-12 * scale
                for (t, k), result in later.items():
                    real = _outputs(model, k, t, result.total[0])                                  # [nodes, D]
                    parts = _outputs(model, k, t, result.components[index, 0])
                    shares = (parts * real).sum(-1) / (real * real).sum(-1)
                    for j, share in enumerate(shares.tolist()):
                        other = _node_id(k, t, j)
                        if full.has_node(other):
                            expected = share * full.nodes[other]["contribution"]
                            actual = full.edges[node, other]["weight"] if full.has_edge(node, other) else 0.0
                            assert abs(actual - expected) <= 1e-12 * scale, (node, other)
                            checked += 1
    assert checked > 300


def test_the_memory_guard_sees_every_pass_and_refused_batches_split(llama, graphs, monkeypatch) -> None:
    """Every pass goes through ``attribute`` (its memory guard): refusing every batch of more than one prompt leaves
    one pass per stage, and the same graph."""
    _, decomposed = llama
    full, _ = graphs
    attribute, batches = type(decomposed).attribute, []

    def refusing(self, input_ids, **kwargs):
        batches.append((len(input_ids), type(kwargs.get("seed")).__name__))
        if len(input_ids) > 1:
            raise fxdepass.OutOfMemoryEstimateError("refused for the test")
        return attribute(self, input_ids, **kwargs)

    monkeypatch.setattr(type(decomposed), "attribute", refusing)
    alone = build_graph(decomposed, IDS, node_threshold=1.0, edge_threshold=1.0)
    assert batches.count((2, "_Stages")) == 2 and batches.count((1, "_Stages")) == 2 * 2    # refused, then alone
    assert set(alone.edges) == set(full.edges)
    scale = max(abs(w) for _, _, w in full.edges(data="weight"))
    assert max(abs(w - full.edges[e]["weight"]) for e, w in _weights(alone).items()) <= 1e-12 * scale
    monkeypatch.setattr(type(decomposed), "attribute", attribute)
    monkeypatch.setattr(fxdepass.planning, "available_memory", lambda device: 1024)
    with pytest.raises(fxdepass.OutOfMemoryEstimateError):
        build_graph(decomposed, IDS)


def _weights(graph) -> dict:
    return {(s, t): w for s, t, w in graph.edges(data="weight")}
