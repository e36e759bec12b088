"""The memory planner: its arithmetic on values, its errors, and its agreement with a measured step on the CPU."""
import pytest
import torch

from r1_scratch.config import apply_overrides, get_preset
from r1_scratch.distributed import apply_activation_checkpointing
from r1_scratch.memory import (PlanError, attention_half, batch_shapes, choose_strategy, encoder_block, ffn_half,
                               measure_peak, model_sizes, plan_for, plan_memory, sample_shape, synthetic_batch)
from r1_scratch.model import R1Model

GiB = 2 ** 30


@pytest.fixture(scope="module")
def r1_22b():
    return get_preset("r1_22b")


def test_fsdp_divides_the_sharded_state_by_the_world_size_exactly(r1_22b):
    one, eight = (plan_memory(r1_22b, "fsdp", w, activation_checkpointing="full") for w in (1, 8))
    P = model_sizes(r1_22b.model)["total"]
    assert one.parts["params"] == 4 * P and one.parts["optimizer"] == 8 * P
    assert eight.parts["params"] == one.parts["params"] / 8 and eight.parts["optimizer"] == one.parts["optimizer"] / 8


def test_ddp_holds_16_bytes_a_parameter_and_its_buckets_only_across_ranks():
    cfg = get_preset("small")
    P = model_sizes(cfg.model)["total"]
    alone, four = (plan_memory(cfg, "ddp", w, precision="fp32") for w in (1, 4))
    assert alone.parts["params"] + alone.parts["optimizer"] == 12 * P and alone.parts["buckets"] == 0
    assert four.parts["buckets"] == 4 * P  # gradient_as_bucket_view=False: a second copy of the gradients


def test_offload_moves_weights_gradients_and_moments_to_the_host(r1_22b):
    on_gpu, offloaded = (plan_memory(r1_22b, "fsdp", 8, activation_checkpointing="full", cpu_offload=o)
                         for o in (False, True))
    assert offloaded.parts["params"] == offloaded.parts["optimizer"] == offloaded.parts.get("grads", 0) == 0
    assert offloaded.host == 16 * model_sizes(r1_22b.model)["total"] / 8 and on_gpu.host == 0
    assert offloaded.total < on_gpu.total


def test_checkpointing_keeps_less_activation_memory(r1_22b):
    kept = {mode: plan_memory(r1_22b, "fsdp", 8, activation_checkpointing=mode)
            for mode in ("none", "selective", "full")}
    assert kept["full"].total < kept["selective"].total < kept["none"].total
    none, full = (plan_memory(r1_22b, "fsdp", 8, 4399, mode) for mode in ("none", "full"))
    assert full.parts["activations"] < none.parts["activations"] / 10


def test_bf16_blocks_keep_less_than_fp32():
    m = get_preset("base").model
    assert attention_half(m, 2, 1024) + ffn_half(m, 2) < attention_half(m, 4, 1024) + ffn_half(m, 4)
    assert encoder_block(m, 2) < encoder_block(m, 4)


def test_settings_that_cannot_work_are_named(r1_22b):
    with pytest.raises(PlanError, match="dist.cpu_offload=True needs dist.strategy='fsdp'"):
        plan_memory(r1_22b, "ddp", 8, cpu_offload=True)
    with pytest.raises(PlanError, match="micro_batch_tokens=100 is less than one worst-case sample"):
        plan_memory(r1_22b, "fsdp", 8, micro_batch_tokens=100)
    with pytest.raises(PlanError, match="train.activation_checkpointing='some'"):
        plan_memory(r1_22b, "fsdp", 8, activation_checkpointing="some")


def test_a_plan_that_cannot_fit_says_so(r1_22b):
    assert plan_memory(r1_22b, "ddp", 8, 4399, "full").verdict(80 * GiB).startswith("does not fit")
    with pytest.raises(PlanError, match="r1_175b does not fit on 1 node.*allow more nodes"):
        plan_for(get_preset("r1_175b"), gpus=8, gpu_bytes=80 * GiB, max_nodes=1, offload=False)


def test_auto_strategy_and_the_22b_verdict(r1_22b):
    assert choose_strategy(get_preset("tiny"), 2, 80 * GiB) == "ddp"
    assert choose_strategy(r1_22b, 8, 80 * GiB) == "fsdp"
    plan = plan_for(r1_22b, gpus=8, gpu_bytes=80 * GiB)
    assert plan.settings["strategy"] == "fsdp" and plan.total <= 80 * GiB and plan.settings["nodes"] == 1


@pytest.mark.parametrize("mode", ["none", "full"])
def test_the_plan_matches_a_measured_step_on_tiny(mode):
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = apply_activation_checkpointing(R1Model(cfg.model), mode)
    measured = measure_peak(model, synthetic_batch(cfg, 4), steps=2)["peak"]
    plan = plan_memory(cfg, "ddp", 1, 4 * sample_shape(cfg).decoder, mode, precision="fp32", shape=sample_shape(cfg))
    assert abs(plan.allocated / measured - 1) < 0.1, (plan.table(), measured)


def test_the_decoder_block_formula_matches_its_saved_tensors():
    cfg = apply_overrides(get_preset("tiny"), ["model.n_dense_layers=1"])  # block 1 is MoE, block 0 dense
    torch.manual_seed(0)
    model, batch = R1Model(cfg.model), synthetic_batch(cfg, 2)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}
    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    forward = model.blocks[1].forward
    def hooked(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return forward(*args, **kwargs)
    model.blocks[1].forward = hooked
    model(batch)
    L = sample_shape(cfg).decoder
    per_token = sum(saved.values()) / (2 * L)
    assert per_token == pytest.approx(attention_half(cfg.model, 4, L) + ffn_half(cfg.model, 4), rel=0.01)


def test_the_plan_covers_every_kind_of_batch_the_loader_makes(r1_22b):
    "A budget of short clips holds six times the clips of worst-case samples: the plan is the largest kind's."
    plan = plan_memory(r1_22b, "fsdp", 8, activation_checkpointing="full")
    worst = plan_memory(r1_22b, "fsdp", 8, activation_checkpointing="full", shape=sample_shape(r1_22b))
    budget = worst.settings["micro_batch_tokens"]
    kinds = {name: plan_memory(r1_22b, "fsdp", 8, budget, "full", shape=shape).total
             for name, shape in batch_shapes(r1_22b).items()}
    assert plan.total == max(kinds.values()) > worst.total
    assert plan.settings["batch"] == max(kinds, key=kinds.get) != "worst-case samples"
    assert plan.settings["micro_batch_tokens"] == worst.settings["micro_batch_tokens"]  # the same token budget
