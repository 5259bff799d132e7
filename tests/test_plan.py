"""``wmss plan``: model shapes from a directory or object storage (``trust_remote_code`` as the
config says), the printed report and its suggestions, the CLI. The figures themselves:
tests/test_plan_memory.py and tests/test_plan_activations.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.plan_shapes import QWEN3_4B
from wmss_ray.config.loading import config_from_dict, load_config
from wmss_ray.config.schema import ConfigError
from wmss_ray.plan import (
    GiB,
    ModelShape,
    activation_bytes,
    model_shape,
    parse_memory,
)

REPO = Path(__file__).resolve().parents[1]


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
    assert "weak pool reply (top-k buffers)" in out and "weak pool exact-sample rows" in out  # on the Train GPUs
    assert "top-k temporaries" in out and "exact-sample rows" in out  # on the pool's actors
    assert main(["plan", str(cfg), "--set", f"models.base={tmp_path}"]) == 0
    assert "weak pool" not in capsys.readouterr().out  # colocated: no pool lines


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
    with pytest.raises(ConfigError, match="^models.weak: model directory s3://.* does not exist$"):
        model_shape(f"s3://{s3_server['bucket']}/unit/no-such-model", config_from_dict({}), "models.weak")


def test_plan_reads_model_configs_with_trust_remote_code_only_when_the_config_says_so(tmp_path, s3_server, monkeypatch):
    """``models.trust_remote_code`` reaches every ``AutoConfig.from_pretrained`` of ``wmss plan``,
    explicitly: left unset (None), transformers asks on a TTY whether to run a config's auto_map code."""
    import transformers

    from wmss_ray.io import storage

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(QWEN3_4B))
    uri = f"s3://{s3_server['bucket']}/unit/plan-trust"
    storage.upload_dir(str(tmp_path / "m"), uri)
    real, calls = transformers.AutoConfig.from_pretrained, []

    def recording(path, **kwargs):
        calls.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recording)
    for trust in (False, True):
        for path in (str(tmp_path / "m"), uri):
            calls.clear()
            model_shape(path, config_from_dict({"models": {"trust_remote_code": trust}}))
            assert [c.get("trust_remote_code") for c in calls] == [trust], (trust, path, calls)


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
    out = capsys.readouterr().out
    assert "fits in 80.0 GiB" in out and "in-run validation fits in 80.0 GiB" in out  # the shipped config checkpoints
    assert main(["plan", str(cfg), "--set", f"models.base={tmp_path}", *off, "--gpu-memory", "16GiB"]) == 0
    out16 = capsys.readouterr().out
    steps = out16.split("apply in order until it does:")[1].strip().split("\n\n")[0].splitlines()
    assert "gradient_checkpointing" in steps[0] and "still short" in steps[0]
    assert "in-run validation does NOT fit in 16.0 GiB" in out16 and "lower evaluation.batch_size" in out16
    # the shipped recipe is at ZeRO-2 (faster where it fits): stage 3 is the next step, then offload
    assert "training.zero_stage=3" in steps[1] and "offload_optimizer" in steps[2] and "(fits)" in steps[-1]
    assert main(["plan", str(cfg), "--gpu-memory", "80 furlongs", "--set", f"models.base={tmp_path}"]) == 2


def test_plan_demo_config_runs_without_model_files(capsys):
    from wmss_ray.cli.main import main

    assert main(["plan", str(REPO / "configs" / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "demo llama" in out and "total" in out and "fp32" in out
    assert load_config(REPO / "configs" / "demo.yaml").scaling.use_gpu is False


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


def test_cli_plan_of_the_4b_config_from_a_directory_with_only_config_json(tmp_path, capsys):
    """The issue's command, exactly: models.weak unset is the base; with models.weak set it is read too."""
    from wmss_ray.cli.main import main

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    assert os.listdir(tmp_path) == ["config.json"]
    cfg = str(REPO / "configs" / "qwen3-4b-math.yaml")
    assert main(["plan", cfg, "--set", f"models.base={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU, 16 data-parallel ranks, bf16, ZeRO-2" in out and "4.02 B params" in out
    for line in ("embedding gradient", "evaluator's model copy (whole)", "KV cache (32 x 4096+1024 tokens)", "total while validating",
                 "per node (8 ranks, --gpus-per-node 8)"):
        assert line in out, line
    node = next(line for line in out.splitlines() if line.lstrip().startswith("per node"))
    # joint at ZeRO-2: 8 of 16 ranks' optimizer partitions (12 bytes per trained parameter, 2 models)
    # plus the whole bf16 weights of both models, which rank 0 writes at ZeRO-1/2: 59.94 GiB
    p4b = 4_022_468_096
    assert float(node.split()[-1]) == pytest.approx((12 * p4b * 2 / 2 + 2 * p4b * 2) / GiB, abs=0.01)
    weak = tmp_path / "weak"
    weak.mkdir()
    (weak / "config.json").write_text(json.dumps({**QWEN3_4B, "num_hidden_layers": 18}))
    assert main(["plan", cfg, "--set", f"models.base={tmp_path}", "--set", f"models.weak={weak}"]) == 0
    assert "18 layers" in capsys.readouterr().out


@pytest.mark.parametrize("command, case", [(c, k) for c in ("plan", "run") for k in ("missing", "no_config",
                                                                                       "unreadable")]
                         + [("plan", "unknown_model_type")])
def test_a_missing_or_unreadable_model_directory_is_one_line_and_exit_2(tmp_path, capsys, command, case):
    """No transformers traceback (``Repo id must be in the form ...``), no Ray: the key and the path."""
    from wmss_ray.cli.main import main

    model = tmp_path / "Qwen3-4B-Base"
    if case != "missing":
        model.mkdir()
    if case == "unreadable":  # (root reads any file: a config.json that cannot be read as one)
        (model / "config.json").mkdir()
    if case == "unknown_model_type":  # read, but transformers cannot make a config of it
        (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    key = "models.weak" if command == "run" else "models.base"
    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text(json.dumps(QWEN3_4B))
    sets = {"models.base": str(good), "run.storage": str(tmp_path / "runs"), key: str(model)}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    assert main([command, str(REPO / "configs" / "qwen3-4b-math.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"wmss: {key}: ") and str(model) in err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_plan_prints_the_lora_line(capsys):
    from wmss_ray.plan import format_plan

    text = format_plan(load_config(REPO / "configs" / "demo.yaml", ["training.lora.r=8"]), None)
    assert "lora: r 8, alpha 16:" in text and "weak model: the strong model's base with the adapter off" in text
