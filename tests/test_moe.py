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
    experts = Experts(5, 8, 16, std=0.3)
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


# --- families, counting sort, group-limited routing, step statistics ---
import os
import torch.distributed as dist
import torch.multiprocessing as mp

from r1_scratch.moe import (ExpertFamilies, ExpertFamily, article_families, counting_sort, moe_end_step,
                            permute_rows)


@pytest.mark.parametrize("n, n_values", [(1, 3), (50, 4), (300, 16), (64, 1)])
def test_counting_sort_is_the_stable_argsort(n, n_values):
    ids = torch.randint(0, n_values, (n,), generator=torch.Generator().manual_seed(n))
    order, inverse, counts = counting_sort(ids, n_values)
    assert torch.equal(order, ids.argsort(stable=True))
    assert torch.equal(order[inverse], torch.arange(n)) and torch.equal(counts, torch.bincount(ids, minlength=n_values))


def test_permute_rows_backward_is_the_inverse_permutation():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(6))
    torch.autograd.gradcheck(lambda t: permute_rows(t, perm, inverse), (x,))


@pytest.mark.parametrize("path", ["gather", "grouped"])
def test_article_families_equal_reference_in_outputs_and_gradients(path):
    torch.manual_seed(3)
    router, experts = Router(24, 16, 2), ExpertFamilies(article_families(40, multiple_of=4), 24, std=0.3)
    assert [f.activation for f in experts.specs] == ["swiglu", "relu2", "geglu", "gelu", "reglu"]
    x = torch.randn(90, 24)
    ref_y, ref_g = outputs_and_grads("reference", x, router, experts)
    y, g = outputs_and_grads(path, x, router, experts)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    assert len(g) == len(ref_g) == 12  # input, router weight, w_in and w_out of five families
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_families_must_add_up_and_set_the_complexity_prior():
    with pytest.raises(ValueError, match="hold 8 experts, not n_experts=16"):
        MoELayer(16, 32, 16, 2, families=[ExpertFamily("a", 8, "swiglu", 32)])
    with pytest.raises(ValueError, match="activation must be one of"):
        Experts(2, 8, 8, activation="tanh")
    layer = MoELayer(16, 32, 16, 2, families=article_families(32, 8))
    assert layer.router.complexity[:4].tolist() == [1.0] * 4 and layer.router.complexity[4:8].tolist() == [-1.0] * 4


def test_group_limited_routing_keeps_tokens_within_top_groups():
    torch.manual_seed(0)
    x = torch.randn(300, 16)
    limited = Router(16, 12, 3, score="sigmoid", n_groups=4, top_groups=2)
    groups = torch.stack([(limited(x).experts // 3 == g).any(1) for g in range(4)], 1).sum(1)
    assert groups.max() == 2
    free = Router(16, 12, 3, score="sigmoid", n_groups=4, top_groups=4)
    free.load_state_dict(limited.state_dict())
    groups_free = torch.stack([(free(x).experts // 3 == g).any(1) for g in range(4)], 1).sum(1)
    assert groups_free.max() == 3  # without the limit, some tokens do spread over three groups
    with pytest.raises(ValueError, match="n_groups=5"):
        Router(16, 12, 3, n_groups=5)


def test_step_statistics_are_the_same_whole_or_in_micro_batches():
    torch.manual_seed(0)
    layer, x = MoELayer(16, 32, 8, 2, n_shared=1), torch.randn(1, 200, 16)
    layer(x)
    whole = layer.end_step(bias_rate=0.01)
    bias = layer.router.bias.clone()
    layer.router.bias.zero_()
    for chunk in x.split(50, dim=1):
        layer(chunk)
    micro = layer.end_step(bias_rate=0.01)
    assert torch.equal(whole["load"], micro["load"]) and whole["load"].sum() == 400
    torch.testing.assert_close(layer.router.bias, bias)
    assert layer.end_step() == {}  # nothing since the last step
    layer.eval()
    layer(x)
    assert layer.end_step() == {}  # evaluation does not count


def test_moe_end_step_reports_the_worst_layer_and_drops():
    torch.manual_seed(0)
    model = torch.nn.ModuleList([MoELayer(16, 32, 4, 1, capacity_factor=0.5), MoELayer(16, 32, 4, 1)])
    x = torch.randn(1, 64, 16)
    stats = [m(x)[1] for m in model]
    imbalances = [m.end_step()["imbalance"] for m in model]
    for m in model:
        m(x)
    summary = moe_end_step(model)
    assert summary["moe_imbalance"] == pytest.approx(max(imbalances))
    assert summary["moe_dropped"] == int(stats[0]["dropped"]) > 0


def _bias_worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, 2)  # same weights on both ranks
    x = torch.randn(2, 100, 16)     # each rank sees its own half
    layer(x[rank:rank + 1])
    stats = layer.end_step(bias_rate=0.01)
    queue.put((rank, stats["load"].tolist(), layer.router.bias.tolist()))
    dist.destroy_process_group()


def test_end_step_sums_loads_over_ranks_so_every_rank_gets_the_same_bias():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_bias_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (load, bias)) for r, load, bias in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, 2)
    x = torch.randn(2, 100, 16)
    layer(x.reshape(1, 200, 16))
    expected = layer.end_step(bias_rate=0.01)
    assert results[0] == results[1]
    assert results[0][0] == expected["load"].tolist() and results[0][1] == pytest.approx(layer.router.bias.tolist())


@pytest.mark.parametrize("families", [False, True])
def test_grouped_gemm_fast_path_equals_the_fallback_in_bf16(monkeypatch, families):
    "torch._grouped_mm runs on the CPU in torch 2.11: force it where a GPU would take it, compare with the loop."
    import r1_scratch.moe as moe
    torch.manual_seed(0)
    layer = MoELayer(32, 64, n_experts=16, families=moe.article_families(64) if families else None, std=0.2)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(2, 24, 32, dtype=torch.bfloat16)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 17:] = False  # padding: fewer routed rows than tokens
    runs = {}
    for fast in (True, False):
        monkeypatch.setattr(moe, "grouped_mm_supported", lambda rows, weights: fast)
        layer.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        y, _ = layer(inputs, mask)
        y.float().square().sum().backward()
        runs[fast] = [y.float(), inputs.grad.float(), *(p.grad.float() for p in layer.experts.parameters())]
    assert len(runs[True]) == len(runs[False]) > 2
    for fast_value, fallback_value in zip(runs[True], runs[False]):  # bf16: within 1% of each tensor's scale
        assert (fast_value - fallback_value).abs().max() <= 0.01 * fallback_value.abs().max()


def test_the_grouped_gemm_capability_check_traces_inside_a_compiled_block(monkeypatch):
    "compile_blocks traces grouped_matmul: its capability check must be a constant dynamo can fold, on every GPU."
    from r1_scratch import moe
    for capability, factor in (((9, 0), 2.0), ((7, 5), 3.0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0, c=capability: c)
        torch._dynamo.reset()
        step = torch.compile(lambda x: x * (2 if moe._capable_of_grouped_mm(0) else 3), backend="eager",
                             fullgraph=True)
        assert step(torch.ones(2)).tolist() == [factor, factor]
