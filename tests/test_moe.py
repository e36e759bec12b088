"""MoE dispatch paths agree with the reference in outputs and gradients; balancing statistics are right."""
import pytest
import torch

from r1_scratch.moe import (DISPATCH, Experts, MoELayer, Router, Routing, load_balance_loss, run_dispatch,
                            sort_by_expert)


def outputs_and_grads(path, x, router, experts):
    params = [*router.parameters(), *experts.parameters()]
    for p in params:
        p.grad = None
    x = x.detach().requires_grad_()
    y = run_dispatch(path, x, router, experts)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return y.detach(), [x.grad] + [p.grad.clone() for p in params if p.grad is not None]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("path", ["gather", "grouped"])
@pytest.mark.parametrize("tokens, n_experts, top_k", [(64, 8, 2), (7, 16, 2), (33, 4, 1), (40, 6, 3)])
def test_paths_equal_reference_in_outputs_and_gradients(kind, path, tokens, n_experts, top_k):
    torch.manual_seed(tokens + n_experts)
    router, experts = Router(24, n_experts, top_k, kind=kind, hidden=32), Experts(n_experts, 24, 40, std=0.3)
    x = torch.randn(tokens, 24)
    ref_y, ref_g = outputs_and_grads("reference", x, router, experts)
    y, g = outputs_and_grads(path, x, router, experts)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_an_expert_with_no_tokens_and_sorting():
    routing = Routing(torch.tensor([[2, 0], [2, 3], [0, 2]]), torch.full((3, 2), 0.5), torch.zeros(3, 5),
                      torch.full((3, 5), 0.2))
    s = sort_by_expert(routing, 5)
    assert s.counts.tolist() == [2, 0, 3, 1, 0] and s.offsets.tolist() == [2, 2, 5, 6, 6]
    assert s.token.tolist() == [0, 2, 0, 1, 2, 1]  # stable: token order kept within an expert
    router, experts = Router(8, 5, 2), Experts(5, 8, 16, std=0.3)
    x = torch.randn(3, 8)
    for path in DISPATCH:
        torch.testing.assert_close(DISPATCH[path](x, routing, experts), DISPATCH["reference"](x, routing, experts))


def test_router_scores_in_fp32_and_gates_sum_to_one():
    router = Router(16, 8, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(torch.randn(10, 16, dtype=torch.bfloat16))
    assert r.logits.dtype == torch.float32
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(10))
    with pytest.raises(ValueError, match="top_k=9"):
        Router(16, 8, 9)


def test_balance_loss_is_one_when_uniform_and_larger_when_collapsed():
    n = 8
    uniform = Routing(torch.arange(16).view(8, 2) % n, torch.full((8, 2), 0.5), torch.zeros(8, n), torch.full((8, n), 1 / n))
    assert load_balance_loss(uniform, n).item() == pytest.approx(1.0)
    probs = torch.full((8, n), 0.01)
    probs[:, :2] = 0.47
    collapsed = Routing(torch.tensor([[0, 1]] * 8), torch.full((8, 2), 0.5), torch.zeros(8, n), probs)
    assert load_balance_loss(collapsed, n).item() == pytest.approx(n * (0.5 * 0.47 * 2), rel=1e-5)


def test_padded_tokens_are_not_routed():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, n_experts=4, top_k=2)
    x, mask = torch.randn(3, 5, 16), torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [0] * 5]).bool()
    y, aux = layer(x, mask)
    assert aux["routing"].experts.shape[0] == 7 and y[~mask].abs().sum().item() == 0
    alone, _ = layer(x[1:2, :2])
    torch.testing.assert_close(y[1:2, :2], alone)


@pytest.mark.parametrize("path", ["gather", "grouped"])
def test_deepseek_kind_paths_equal_reference(path):
    "Sigmoid scores, selection bias, modality prior and complexity: the dispatch paths still agree."
    from r1_scratch.moe import article_expert_modalities
    torch.manual_seed(3)
    router = Router(24, 16, 4, score="sigmoid", expert_modalities=article_expert_modalities(), modality_routing="prior")
    with torch.no_grad():
        router.bias.copy_(torch.randn(16) * 0.1)
        router.complexity.copy_(torch.randn(16))
    experts = Experts(16, 24, 32, std=0.3)
    x, modality, complexity = torch.randn(50, 24), torch.randint(0, 3, (50,)), torch.rand(50)

    def run(p, x):
        for q in [*router.parameters(), *experts.parameters()]:
            q.grad = None
        x = x.detach().requires_grad_()
        y = DISPATCH[p](x, router(x, modality, complexity), experts)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [y.detach(), x.grad] + [q.grad.clone() for q in [*router.parameters(), *experts.parameters()]]

    for a, b in zip(run(path, x), run("reference", x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_hard_modality_mask_only_picks_allowed_experts():
    from r1_scratch.moe import article_expert_modalities
    table = article_expert_modalities(16)
    router = Router(16, 16, 2, expert_modalities=table, modality_routing="mask")
    modality = torch.arange(300) % 3
    r = router(torch.randn(300, 16), modality)
    assert table[modality[:, None], r.experts].all()
    assert set(r.experts[modality == 1].unique().tolist()) <= set(range(12, 16))  # audio: cross-modal experts only


def test_expert_dropout_only_in_training():
    experts = Experts(2, 8, 16, std=0.3, dropout=0.3)
    x = torch.randn(32, 8)
    experts.train()
    assert not torch.allclose(experts.one(x, 1), experts.one(x, 1))
    experts.eval()
    torch.testing.assert_close(experts.one(x, 1), experts.one(x, 1))


def test_capacity_drops_are_counted_and_only_beyond_capacity():
    from r1_scratch.moe import apply_capacity
    torch.manual_seed(0)
    router = Router(16, 4, 2)
    with torch.no_grad():
        router.bias[0] = 5.0  # everyone wants expert 0
    r = router(torch.randn(40, 16))
    capped, dropped = apply_capacity(r, 4, factor=1.0)  # capacity 20 per expert
    per_expert_kept = [int(((capped.experts == e) & (capped.gates > 0)).sum()) for e in range(4)]
    assert max(per_expert_kept) <= 20 and dropped.item() == 40 - 20  # expert 0 had all 40 tokens
    assert apply_capacity(r, 4, None)[1].item() == 0


def test_load_by_modality_and_entropy():
    from r1_scratch.moe import imbalance, load_by_modality, router_entropy
    r = Routing(torch.tensor([[0, 1], [2, 3], [0, 2]]), torch.full((3, 2), 0.5), torch.zeros(3, 4), torch.full((3, 4), 0.25))
    load = load_by_modality(r, torch.tensor([0, 1, 1]), 2, 4)
    assert load.tolist() == [[1, 1, 0, 0], [1, 0, 2, 1]]
    assert router_entropy(r).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert imbalance(r, 4).item() == pytest.approx(2 / 1.5)
