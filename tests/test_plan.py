"""``wmss plan``: model-state figures against DeepSpeed's estimators, activations, the CLI."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from wmss_ray.config.loading import config_from_dict, load_config
from wmss_ray.plan import (
    GiB,
    ModelShape,
    activation_bytes,
    model_shape,
    model_state_bytes,
    parse_memory,
    phase_bytes,
)

REPO = Path(__file__).resolve().parents[1]
QWEN3_4B = {  # Qwen3-4B's config.json shape (no weights needed)
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
}


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


def test_pool_actor_holds_the_weak_model_sharded_and_the_cli_prints_it(tmp_path, capsys):
    from wmss_ray.cli.main import main
    from wmss_ray.plan import OVERHEAD_BYTES, pool_actor_bytes

    s = ModelShape("m", 10**9, 10**8, 2048, 24, 16, 8, 128, 8192, 151936, True)
    mix = {"mode": "frozen", "placement": "pool", "chunk_mb": 148.375}  # 256 tokens at V = 151,936
    base = {"data": {"max_seq_len": 1024}, "training": {"micro_batch_size": 2}}
    one = pool_actor_bytes(config_from_dict({**base, "mix": {**mix, "pool": {"gpus_per_actor": 1}}}), s)
    four = pool_actor_bytes(config_from_dict({**base, "mix": {**mix, "pool": {"gpus_per_actor": 1, "shards": 4}}}), s)
    assert one["params"] == 2 * 10**9 and one["zero3_gather"] == 0  # bf16 on GPU actors, a full copy
    assert four["params"] == one["params"] / 4 and four["zero3_gather"] == 4 * 10**8
    assert one["logits_chunk"] == (2 + 4) * 256 * 151936 and one["overhead"] == OVERHEAD_BYTES
    assert one["activations"] == activation_bytes(s, 2048, 1024, 2, 2, checkpointing=False, eager=False, trained=False)
    cpu = pool_actor_bytes(config_from_dict({**base, "mix": mix}), s)
    assert cpu["params"] == 4 * 10**9 and cpu["overhead"] == 0  # fp32 CPU actors: host memory
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    cfg = REPO / "configs" / "qwen3-4b-math.yaml"
    sets = ["--set", f"models.base={tmp_path}", "--set", "mix.mode=frozen", "--set", "mix.placement=pool",
            "--set", "mix.pool.gpus_per_actor=0.5", "--set", "mix.pool.shards=2"]
    assert main(["plan", str(cfg), *sets, "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "wmss (frozen, pool)" in out and "1 replica(s) x 2 shard(s), 0.5 GPU each, bfloat16" in out
    assert "GiB per GPU, 2 actors sharing it" in out and "the pool fits in 80.0 GiB" in out
    assert main(["plan", str(cfg), "--set", f"models.base={tmp_path}"]) == 0
    assert "weak pool" not in capsys.readouterr().out  # colocated: no pool lines


def test_activation_formula_and_checkpointing():
    s = ModelShape("qwen3-4b", 4_022_468_096, 388_956_160, 2560, 36, 32, 8, 128, 9728, 151936, True)
    e = 4 * 2560 + 2 * 4096 + 2 * 1024 + 4 * 9728 + (4096 + 1024)  # per token per layer
    tokens = 2 * 4096
    plain = activation_bytes(s, tokens, 4096, 2, 2, checkpointing=False, eager=False)
    ckpt = activation_bytes(s, tokens, 4096, 2, 2, checkpointing=True, eager=False)
    assert plain == 36 * e * tokens * 2
    assert ckpt == (36 * 2560 + e) * tokens * 2 and ckpt < plain / 10
    frozen = activation_bytes(s, tokens, 4096, 2, 2, checkpointing=False, eager=False, trained=False)
    assert frozen == e * tokens * 2
    eager = activation_bytes(s, tokens, 4096, 2, 2, checkpointing=False, eager=True)
    assert eager == plain + 36 * 2 * 32 * 4096**2 * 2 * 2


def test_shape_of_a_model_directory_matches_its_real_parameter_count(tmp_path):
    from wmss_ray.config.schema import DemoModelConfig
    from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
    from wmss_ray.models.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer()
    for tie in (False, True):
        model = build_tiny_model(DemoModelConfig(arch="qwen3", tie_word_embeddings=tie), tok, 0)
        path = save_pretrained_model(model, tok, tmp_path / f"m{tie}")
        shape = model_shape(path, config_from_dict({}))
        assert shape.params == sum(p.numel() for p in model.parameters())  # tied weight counted once
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        assert shape.largest_layer_params == largest == 128 * 384  # an MLP projection, above V x D here
        assert shape.qk_norm and shape.layers == 4 and shape.vocab == len(tok)


def test_shape_of_a_model_in_object_storage_reads_only_its_config(tmp_path, s3_server, monkeypatch):
    from wmss_ray.config.schema import DemoModelConfig
    from wmss_ray.io import storage
    from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
    from wmss_ray.models.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer()
    model = build_tiny_model(DemoModelConfig(arch="qwen3"), tok, 0)
    local = save_pretrained_model(model, tok, tmp_path / "m")
    uri = f"s3://{s3_server['bucket']}/unit/plan-model"
    storage.upload_dir(str(local), uri)
    fetched: list[str] = []
    real_download = storage.download_dir

    def download_and_record(src, dst, keep=None):
        real_download(src, dst, keep)
        fetched.extend(os.listdir(dst))

    monkeypatch.setattr(storage, "download_dir", download_and_record)
    shape = model_shape(uri, config_from_dict({}))
    assert shape.params == model_shape(str(local), config_from_dict({})).params
    assert fetched == ["config.json"]  # no weights copied for a plan
    with pytest.raises(FileNotFoundError, match="no config.json in model directory s3://"):
        model_shape(f"s3://{s3_server['bucket']}/unit/no-such-model", config_from_dict({}))


def test_parse_memory():
    assert parse_memory("80GiB") == 80 * GiB and parse_memory("80GB") == 80e9
    assert parse_memory("141G") == 141 * GiB and parse_memory("81920MiB") == 80 * GiB
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_memory("lots")


def test_cli_plan_qwen3_4b_says_what_to_change(tmp_path, capsys):
    from wmss_ray.cli.main import main

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    cfg = REPO / "configs" / "qwen3-4b-math.yaml"
    off = ["--set", "training.gradient_checkpointing=false"]
    assert main(["plan", str(cfg), "--set", f"models.base={tmp_path}", *off, "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "4.02 B params" in out and "does NOT fit in 80.0 GiB" in out
    first = out.split("apply in order until it does:")[1].strip().splitlines()[0]
    assert "training.gradient_checkpointing=true" in first and "(fits)" in first
    assert main(["plan", str(cfg), "--set", f"models.base={tmp_path}", "--gpu-memory", "80GiB"]) == 0
    assert "fits in 80.0 GiB" in capsys.readouterr().out  # the shipped config checkpoints
    assert main(["plan", str(cfg), "--set", f"models.base={tmp_path}", *off, "--gpu-memory", "16GiB"]) == 0
    steps = capsys.readouterr().out.split("apply in order until it does:")[1].strip().splitlines()
    assert "gradient_checkpointing" in steps[0] and "still short" in steps[0]
    assert "offload_optimizer" in steps[1] and "(fits)" in steps[-1]
    assert main(["plan", str(cfg), "--gpu-memory", "80 furlongs", "--set", f"models.base={tmp_path}"]) == 2


def test_plan_demo_config_runs_without_model_files(capsys):
    from wmss_ray.cli.main import main

    assert main(["plan", str(REPO / "configs" / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "demo llama" in out and "total" in out and "fp32" in out
    assert load_config(REPO / "configs" / "demo.yaml").scaling.use_gpu is False


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


def test_plan_warns_when_pool_shards_hold_a_weak_model_that_fits_one_gpu(tmp_path, capsys):
    from wmss_ray.cli.main import main

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    cfg = REPO / "configs" / "qwen3-4b-math.yaml"
    sets = ["--set", f"models.base={tmp_path}", "--set", "mix.mode=frozen", "--set", "mix.placement=pool",
            "--set", "mix.pool.gpus_per_actor=1", "--set", "mix.pool.shards=4"]  # k8s/overlays/gpu-pool
    assert main(["plan", str(cfg), *sets, "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "warning: one copy of the weak model fits on one GPU" in out
    assert "--set mix.pool.replicas=4 --set mix.pool.shards=1" in out
    # a GPU too small for one copy (4B in bf16 is ~8 GB of weights): sharding is the answer, no warning
    assert main(["plan", str(cfg), *sets, "--gpu-memory", "8GiB"]) == 0
    assert "warning: one copy" not in capsys.readouterr().out
