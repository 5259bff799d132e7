"""``wmss plan``'s figures (``wmss_ray.plan.memory``): model states against DeepSpeed's estimators,
the weak model by mode, placement and source, the loss and pool buffers, in-run validation,
checkpoint staging, LoRA. Activations (``plan/activations.py``) against real models:
tests/test_plan_activations.py. The report, shapes and the CLI: tests/test_plan.py."""

from __future__ import annotations

import json
import re

import pytest

from tests.plan_shapes import QWEN3_4B, S4B
from wmss_ray.config.loading import config_from_dict
from wmss_ray.plan import (
    GiB,
    ModelShape,
    model_state_bytes,
    phase_bytes,
    pool_actor_bytes,
    staging_bytes,
    validation_peak,
)


def _ds_rows(capsys, fn, *args, **kwargs) -> dict[str, float]:
    """Run a DeepSpeed ``*_all_cold`` estimator; its printed table as {options: per-GPU GiB}."""
    fn(*args, **kwargs)
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"\s*([0-9.]+)GB \|\s*([0-9.]+)GB \| (.+)", line)
        if m:
            # DeepSpeed formats the device enum as "OffloadDeviceEnum.cpu" on Python 3.11
            rows[m.group(3).replace(" ", "").replace("OffloadDeviceEnum.", "")] = float(m.group(2))
    assert rows, "DeepSpeed's estimator printed no table"
    return rows


def _ours(p, ll, stage, off_opt, off_par, world) -> float:
    b = model_state_bytes(p, ll, half=True, trained=True, stage=stage, offload_optimizer=off_opt,
                          offload_params=off_par, world=world)
    return sum(b.values()) + (4 * ll if stage == 3 else 0)


GPU16 = {"scaling": {"num_workers": 16, "use_gpu": True}, "evaluation": {"gpus_per_actor": 1},
         "training": {"zero_stage": 3, "micro_batch_size": 2}, "data": {"max_seq_len": 4096}}


def _cfg(**sections):
    """GPU16 with ``sections`` merged in section by section."""
    data = json.loads(json.dumps(GPU16))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


@pytest.mark.parametrize("nodes,per_node", [(1, 1), (1, 8), (2, 8)])
def test_model_states_match_deepspeed_estimators(capsys, nodes, per_node):
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    p, ll, world = 4_022_468_096, 388_956_160, nodes * per_node  # Qwen3-4B: total, embedding
    # exact, from the functions that return bytes
    for off in (False, True):
        _, gpu = estimate_zero2_model_states_mem_needs(p, per_node, nodes, cpu_offload=off)
        assert _ours(p, ll, 2, off, False, world) == pytest.approx(gpu, abs=1)
    for off_opt, off_par in ((False, False), (True, False), (True, True)):
        _, gpu, _ = estimate_zero3_model_states_mem_needs(p, ll, per_node, nodes, cpu_offload=off_opt,
                                                          cpu_offload_params=off_par)
        assert _ours(p, ll, 3, off_opt, off_par, world) == pytest.approx(gpu, abs=1)
    # and the printed *_all_cold tables (2 decimals of GB = GiB there)
    z2 = _ds_rows(capsys, estimate_zero2_model_states_mem_needs_all_cold, p, per_node, nodes)
    assert z2["offload_optimizer=cpu"] == pytest.approx(_ours(p, ll, 2, True, False, world) / GiB, abs=0.006)
    assert z2["offload_optimizer=none"] == pytest.approx(_ours(p, ll, 2, False, False, world) / GiB, abs=0.006)
    z3 = _ds_rows(capsys, estimate_zero3_model_states_mem_needs_all_cold, p, ll, per_node, nodes)
    for key, (off_opt, off_par) in {"offload_param=cpu,offload_optimizer=cpu,zero_init=1": (True, True),
                                    "offload_param=none,offload_optimizer=cpu,zero_init=1": (True, False),
                                    "offload_param=none,offload_optimizer=none,zero_init=1": (False, False)}.items():
        assert z3[key] == pytest.approx(_ours(p, ll, 3, off_opt, off_par, world) / GiB, abs=0.006), key


def test_frozen_weak_has_params_only_and_pool_weak_nothing():
    s = ModelShape("m", 10**9, 10**8, 2048, 24, 16, 8, 128, 8192, 151936, True)
    base = {"scaling": {"num_workers": 8, "use_gpu": True}, "training": {"zero_stage": 3},
            "evaluation": {"gpus_per_actor": 1}}
    get = lambda mix: phase_bytes(config_from_dict({**base, "mix": mix}), "wmss", s, s)  # noqa: E731
    sft = phase_bytes(config_from_dict(base), "sft", s, s)
    joint, frozen = get({"mode": "joint"}), get({"mode": "frozen"})
    pool = get({"mode": "frozen", "placement": "pool"})  # the weak model lives on the pool's actors
    assert joint["params"] == 2 * sft["params"] and joint["optimizer"] == 2 * sft["optimizer"]
    assert frozen["params"] == 2 * sft["params"] and frozen["optimizer"] == sft["optimizer"]
    assert frozen["grads"] == sft["grads"] and frozen["activations"] < joint["activations"]
    for key in ("params", "grads", "optimizer", "activations", "loss_head_grads"):
        assert pool[key] == sft[key], key


def test_deepspeed_gradient_bucket_follows_the_built_deepspeed_config():
    """The bucket line reads the DeepSpeed config the workers build (overrides included); the
    figures are checked against real engines' buffers in tests/training/test_training_units.py."""
    s = ModelShape("m", 10**9, 10**8, 2048, 24, 16, 8, 128, 8192, 151936, True)
    gpu = {"scaling": {"num_workers": 8, "use_gpu": True}, "evaluation": {"gpus_per_actor": 1}}
    bucket = lambda training: phase_bytes(config_from_dict({**gpu, "training": training}), "sft", s, s)  # noqa: E731
    z3 = bucket({"zero_stage": 3})
    assert z3["grad_bucket"] == 5e8 * 4  # bf16 models, fp32 reduction at stage 3
    assert z3["total"] == pytest.approx(sum(v for k, v in z3.items() if k not in ("total", "activations_alt",
                                                                                   "loss_chunk_rows")))
    assert bucket({"zero_stage": 2})["grad_bucket"] == 5e8 * 2  # stage 2 stages in the model dtype
    assert bucket({"zero_stage": 1})["grad_bucket"] == 0  # DeepSpeed's BF16_Optimizer: no bucket
    small = {"zero_optimization": {"reduce_bucket_size": 10**8, "overlap_comm": True}}
    assert bucket({"zero_stage": 2, "ds_config_overrides": small})["grad_bucket"] == 2 * 10**8 * 2
    assert bucket({"zero_stage": 3, "ds_config_overrides": small})["grad_bucket"] == 10**8 * 4


def test_uniform_fake_weak_side_holds_no_weak_model_and_the_real_ones_keep_it(tmp_path):
    """``mix.weak_source: uniform`` loads no weak model (docs/CONTROLS.md): its WMSS phase costs an
    SFT phase's memory; ``entropy_matched`` and ``shuffled`` run the real frozen weak model. None of
    the fake weak sides may be told to move the weak model to the pool (colocated only: the
    suggestion made the plan fail validating its own override)."""
    from wmss_ray.plan import format_plan, train_gpu_models

    sft = phase_bytes(_cfg(), "sft", S4B, S4B)
    frozen = phase_bytes(_cfg(mix={"mode": "frozen"}), "wmss", S4B, S4B)
    uniform = phase_bytes(_cfg(mix={"mode": "frozen", "weak_source": "uniform"}), "wmss", S4B, S4B)
    for key in ("params", "grads", "optimizer", "zero3_gather", "activations", "activations_alt", "embedding_grads"):
        assert uniform[key] == sft[key], key
    assert uniform["total"] < frozen["total"]
    assert [m.shape for m in train_gpu_models(_cfg(mix={"mode": "frozen", "weak_source": "uniform"}), "wmss",
                                              S4B, S4B)] == [S4B]
    for source in ("entropy_matched", "shuffled"):
        assert phase_bytes(_cfg(mix={"mode": "frozen", "weak_source": source}), "wmss", S4B, S4B) == frozen, source
    assert staging_bytes(_cfg(mix={"mode": "frozen", "weak_source": "uniform"}), "wmss", S4B, S4B, 8) == \
        staging_bytes(_cfg(), "sft", S4B, S4B, 8)
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    models = {"demo": False, "base": str(tmp_path)}
    for source in ("uniform", "entropy_matched", "shuffled"):
        cfg = _cfg(mix={"mode": "frozen", "weak_source": source}, training={"gradient_checkpointing": False},
                   models=models, data={"train": "/d"})
        text = format_plan(cfg, 1 * GiB)  # fits nowhere: every suggestion is tried
        assert "does NOT fit" in text and "mix.placement=pool" not in text, source
        assert ("weak: none loaded" in text) == (source == "uniform"), source


def test_embedding_gradient_is_counted_where_no_other_line_holds_it():
    v_d = 151936 * 2560
    untied = ModelShape(**{**S4B.__dict__, "tied": False})
    z3 = phase_bytes(_cfg(), "sft", S4B, S4B)
    assert z3["embedding_grads"] == 2 * v_d  # tied: the head's share waits for the lookup's (bf16)
    assert phase_bytes(_cfg(), "sft", untied, untied)["embedding_grads"] == 0  # ZeRO-3: in the gathered layer
    z2 = _cfg(training={"zero_stage": 2})
    assert phase_bytes(z2, "sft", untied, untied)["embedding_grads"] == 2 * v_d  # the full gradient before the bucket
    assert phase_bytes(z2, "sft", S4B, S4B)["embedding_grads"] == 4 * v_d
    assert phase_bytes(_cfg(mix={"mode": "joint"}), "wmss", S4B, S4B)["embedding_grads"] == 4 * v_d  # both trained
    assert phase_bytes(_cfg(mix={"mode": "frozen"}), "wmss", S4B, S4B)["embedding_grads"] == 2 * v_d
    assert z3["total"] == pytest.approx(sum(v for k, v in z3.items() if k not in ("total", "activations_alt",
                                                                                   "loss_chunk_rows")))


def test_pool_temporaries_on_the_train_gpu_and_on_the_pool_actor():
    tokens, v = 2 * 4096, 151936
    pool = {"mode": "frozen", "placement": "pool", "pool": {"gpus_per_actor": 1}}
    get = lambda **p: phase_bytes(_cfg(mix={**pool, "pool": {"gpus_per_actor": 1, **p}}), "wmss", S4B, S4B)  # noqa: E731
    k64 = get()
    assert k64["pool_reply"] == tokens * (12 * 64 + 8)  # top-k fp32 + int64 ids, label and tail per position
    assert get(top_k=128)["pool_reply"] == tokens * (12 * 128 + 8)
    assert get(top_k=0)["pool_reply"] == tokens * 4 * v  # dense log-probs
    assert k64["pool_exact"] == 16 * (4 * v + 8) + 16 * (2 + 48) * v  # exact_sample 16
    assert get(exact_sample=32)["pool_exact"] == 2 * k64["pool_exact"] and get(exact_sample=0)["pool_exact"] == 0
    for other in (phase_bytes(_cfg(mix={"mode": "frozen"}), "wmss", S4B, S4B), phase_bytes(_cfg(), "sft", S4B, S4B)):
        assert other["pool_reply"] == other["pool_exact"] == 0  # no pool, no reply
    actor = pool_actor_bytes(_cfg(mix=pool), S4B)
    chunk = 2048  # mix.chunk_mb null on a GPU actor: 1188 MiB, 2,048 tokens at V = 151,936
    assert actor["topk_temps"] == 8 * chunk * v + 12 * chunk * 64
    assert actor["hidden"] == 2 * 2 * tokens * 2560 and actor["exact_rows"] == 4 * 16 * v
    dense = pool_actor_bytes(_cfg(mix={**pool, "pool": {"gpus_per_actor": 1, "top_k": 0}}), S4B)
    assert dense["topk_temps"] == 0
    assert actor["total"] == sum(x for k, x in actor.items() if k != "total")


def test_in_run_validation_holds_a_whole_model_copy_and_its_kv_cache():
    wmss = phase_bytes(_cfg(), "wmss", S4B, S4B)
    val = validation_peak(_cfg(), S4B, wmss)
    assert val["weights"] == 2 * S4B.params  # whole, in bf16, next to the ZeRO-3 partitions
    assert val["kv_cache"] == 2 * 36 * 8 * 128 * 64 * (4096 + 64) * 2  # evaluation defaults: batch 64, 64 new tokens
    bigger = validation_peak(_cfg(evaluation={"gpus_per_actor": 1, "batch_size": 128, "max_new_tokens": 1024}),
                             S4B, wmss)
    assert bigger["kv_cache"] == val["kv_cache"] * 2 * (4096 + 1024) / (4096 + 64)
    assert val["ce_logits"] == 1 * 4096 * 151936 * (2 + 4 + 4)  # one row: 4096 x V > 2**28 elements
    kept = sum(wmss[k] for k in ("params", "grads", "optimizer", "zero3_gather", "grad_bucket", "overhead"))
    assert val["total"] == kept + val["weights"] + max(val["kv_cache"] + val["prefill"],
                                                       val["ce_logits"] + val["ce_forward"])
    assert validation_peak(_cfg(tune={"eval_every": 0, "scheduler": "none"}), S4B, wmss) is None  # final only
    assert validation_peak(_cfg(tune={"seeds": 2}), S4B, wmss) is None  # seeds train in chunks, evaluated apart


def test_checkpoint_staging_per_rank_and_per_node():
    p = S4B.params
    joint = staging_bytes(_cfg(mix={"mode": "joint"}), "wmss", S4B, S4B, 8)
    assert joint["rank"] == 12 * p * 2 / 16 and joint["node"] == 8 * joint["rank"]
    assert 48e9 < joint["node"] < 48.5e9  # the ~48 GB per 8-GPU node of a 4B joint run
    assert staging_bytes(_cfg(), "sft", S4B, S4B, 8)["node"] == joint["node"] / 2
    assert staging_bytes(_cfg(mix={"mode": "frozen"}), "wmss", S4B, S4B, 8)["node"] == joint["node"] / 2  # weak excluded
    assert staging_bytes(_cfg(), "sft", S4B, S4B, 4)["node"] == joint["node"] / 4
    z2 = staging_bytes(_cfg(training={"zero_stage": 2}), "sft", S4B, S4B, 8)
    assert z2["rank"] == 12 * p / 16 + 2 * p and z2["node"] == z2["rank"] + 7 * 12 * p / 16  # rank 0: the module
    assert joint["export"] == 0  # a local run dir: the export is written in place
    remote = staging_bytes(_cfg(run={"storage": "s3://bucket/runs"}), "sft", S4B, S4B, 8)
    assert remote["export"] == 2 * p


def test_lora_adapter_count_is_what_peft_builds():
    """``lora_params`` from the shape alone equals the trainable parameters PEFT adds (all-linear
    and a name list), on a Qwen3-architecture model with q/k norms and GQA."""
    from wmss_ray.config.schema import DemoModelConfig, LoraConfig
    from wmss_ray.models.lora import attach_adapters
    from wmss_ray.models.tiny import build_tiny_model
    from wmss_ray.models.tokenizer import build_demo_tokenizer
    from wmss_ray.plan import lora_params, shape_from_model

    tok = build_demo_tokenizer()
    mc = DemoModelConfig(arch="qwen3", hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    for lora in (LoraConfig(r=4), LoraConfig(r=2, target_modules=["q_proj", "down_proj"])):
        model = build_tiny_model(mc, tok, 0)
        shape = shape_from_model(model, "tiny")
        peft_model = attach_adapters(model, lora, "tiny", None, False, False, 0)
        assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == lora_params(shape, lora)


def test_lora_plan_holds_the_base_once_and_trains_adapter_states_only():
    """4B at ZeRO-3 on 16 GPUs, r 16: the shared-base weak model costs no weights; gradients and
    optimizer states are the adapter's; a separate weak model (``models.weak``) is a second copy;
    joint trains a second adapter; checkpoints stage adapters only."""
    from wmss_ray.plan import lora_params

    lora = {"lora": {"r": 16}}
    full = phase_bytes(_cfg(mix={"mode": "frozen"}), "wmss", S4B, S4B)
    shared = phase_bytes(_cfg(mix={"mode": "frozen"}, training=lora), "wmss", S4B, S4B)
    sft = phase_bytes(_cfg(training=lora), "sft", S4B, S4B)
    a = lora_params(S4B, _cfg(training=lora).training.lora)
    assert a == 16 * 36 * (7 * 2560 + 2 * 4096 + 2 * 1024 + 3 * 9728)  # 33M: 0.8 % of the 4B
    assert shared["params"] == sft["params"] == 2 * (S4B.params + a) / 16  # one base (+ adapter), bf16, partitioned
    assert shared["optimizer"] == 12 * a / 16 and shared["grads"] == 4 * a / 16
    assert shared["loss_head_grads"] == shared["embedding_grads"] == 0  # head and embedding frozen
    assert full["params"] == 2 * 2 * S4B.params / 16 and full["optimizer"] == 12 * S4B.params / 16
    separate = phase_bytes(_cfg(mix={"mode": "frozen"}, training=lora, models={"demo": False, "base": "/m0",
                                                                               "weak": "/w"},
                                data={"train": "/d"}), "wmss", S4B, S4B)
    assert separate["params"] == shared["params"] + 2 * S4B.params / 16  # the weak model's own copy
    joint = phase_bytes(_cfg(mix={"mode": "joint"}, training=lora), "wmss", S4B, S4B)
    assert joint["params"] == shared["params"] + 2 * a / 16 and joint["optimizer"] == 2 * shared["optimizer"]
    st = staging_bytes(_cfg(mix={"mode": "frozen"}, training=lora), "wmss", S4B, S4B, 8)
    assert st["rank"] == 12 * a / 16  # the adapter's optimizer partition; the base is never checkpointed


def test_autocast_plans_fp32_weights_a_bf16_frozen_weak_and_the_weight_casts():
    """``training.autocast``: the trained model's weights, gradients and optimizer in fp32 (ZeRO's
    fp32 partition copy besides Adam's moments), no master copy at stage 0, a frozen weak model in
    bf16 below stage 3, the bf16 weight copies the forward keeps, fp32 checkpoints and exports."""
    p, world = S4B.params, 16
    for stage in (0, 2, 3):
        auto = _cfg(training={"zero_stage": stage, "autocast": True, "gradient_checkpointing": False},
                    mix={"mode": "frozen"})
        sft, wmss = phase_bytes(auto, "sft", S4B, S4B), phase_bytes(auto, "wmss", S4B, S4B)
        assert sft["params"] == 4 * p / (world if stage == 3 else 1)
        assert sft["grads"] == 4 * p / (world if stage >= 2 else 1)
        assert sft["optimizer"] == (8 * p if stage == 0 else 12 * p / world)
        weak = wmss["params"] - sft["params"]
        assert weak == (4 * p / world if stage == 3 else 2 * p)  # zero.Init builds it in fp32 at stage 3
        head, decoder = S4B.vocab * S4B.hidden, p - S4B.vocab * S4B.hidden  # tied: one [V, D] matrix
        assert sft["autocast_casts"] == 2 * decoder + 2 * head  # every layer's copy, and the head's
        assert wmss["autocast_casts"] == sft["autocast_casts"] + (2 * decoder / 36 if stage == 3 else 0)
        ckpt = phase_bytes(_cfg(training={"zero_stage": stage, "autocast": True, "gradient_checkpointing": True}),
                           "sft", S4B, S4B)
        assert ckpt["autocast_casts"] == 2 * decoder / 36 + 2 * head  # one decoder layer, recomputed
    bf16 = phase_bytes(_cfg(training={"zero_stage": 2}), "sft", S4B, S4B)
    assert bf16["autocast_casts"] == 0 and bf16["params"] == 2 * p
    z2 = _cfg(training={"zero_stage": 2, "autocast": True}, run={"storage": "s3://bucket/runs"})
    staged = staging_bytes(z2, "sft", S4B, S4B, 8)
    assert staged["rank"] == 12 * p / world + 4 * p and staged["export"] == 4 * p  # the fp32 module
