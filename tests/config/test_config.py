"""The one config schema: defaults, YAML + dotted overrides, clear errors, shipped YAMLs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wmss_ray.config.loading import config_from_dict, load_config, save_config
from wmss_ray.config.schema import ConfigError, WMSSConfig

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "test-tiny.yaml", "qwen3-4b-math.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, WMSSConfig)
    # A round trip through YAML gives the same config.
    out = path.parent / f".roundtrip-{path.name}"
    try:
        save_config(cfg, out)
        assert load_config(out) == cfg
    finally:
        out.unlink(missing_ok=True)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_validates_with_lora_on(path):
    """``--set training.lora.r=8`` on every shipped config: off by default, on by one key."""
    assert load_config(path).training.lora.r == 0
    cfg = load_config(path, ["training.lora.r=8"])
    assert cfg.training.lora.enabled and cfg.training.lora.lora_alpha == 16.0


def test_demo_yaml_is_the_embedded_default():
    assert load_config(REPO / "configs" / "demo.yaml") == WMSSConfig()


def test_defaults_follow_the_paper():
    cfg = WMSSConfig()
    assert (cfg.curriculum.alpha, cfg.curriculum.beta, cfg.curriculum.gamma) == (0.1, 0.8, 0.1)
    assert cfg.mix.lam == 0.5 and cfg.mix.mode == "joint" and cfg.mix.placement == "colocated"
    assert cfg.curriculum.sample_multiplier == 1.0 and cfg.curriculum.dedup is False
    assert cfg.models.trust_remote_code is False


def test_loss_chunk_budget_has_one_default():
    """The config (torch-free) and the kernels' keyword default name the same budget."""
    from wmss_ray.losses.mixing import DEFAULT_CHUNK_MB, chunk_rows_for

    from wmss_ray.losses.mixing import GPU_CHUNK_MB

    assert WMSSConfig().mix.loss_chunk_mb(on_gpu=False) == DEFAULT_CHUNK_MB
    assert WMSSConfig().mix.loss_chunk_mb(on_gpu=True) == GPU_CHUNK_MB
    assert chunk_rows_for(10**6, 151_936, WMSSConfig().mix.loss_chunk_mb(on_gpu=True)) == 2048  # the GPU check
    assert chunk_rows_for(10**6, 151_936, DEFAULT_CHUNK_MB) == 384  # BENCHMARKS: 0.056x naive working memory


def test_dotted_override_reaches_the_field():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["mix.lam=0.45", "training.zero_stage=3", "run.name=x"])
    assert cfg.mix.lam == 0.45 and cfg.training.zero_stage == 3 and cfg.run.name == "x"


@pytest.mark.parametrize(
    "override, must_say",
    [
        (["mix.lam=0"], ["mix.lam", "0", "(0, 1]"]),
        (["mix.lam=1.5"], ["mix.lam", "1.5", "(0, 1]"]),
        (["curriculum.alpha=-0.1"], ["curriculum.alpha", "-0.1", "greater than or equal to 0"]),
        (["curriculum.alpha=0", "curriculum.beta=0", "curriculum.gamma=0"], ["all 0"]),
        (["curriculum.sample_multiplier=0"], ["curriculum.sample_multiplier", "greater than 0"]),
        (["training.zero_stage=4"], ["training.zero_stage", "4"]),
        (["mix.placement=pool"], ["frozen"]),
        (["run.storage=ftp://host/runs"], ["run.storage", "ftp://host/runs", "'ftp' is not a pyarrow filesystem"]),
        (["run.storage=s3x://b/r"], ["run.storage", "s3x://b/r", "s3://"]),
    ],
)
def test_invalid_values_name_key_value_and_allowed(override, must_say):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    for text in must_say:
        assert text in str(err.value)


def test_pool_placement_is_frozen_only_and_takes_its_own_section():
    cfg = load_config(None, ["mix.mode=frozen", "mix.placement=pool", "mix.pool.replicas=2",
                             "mix.pool.shards=2", "mix.pool.top_k=0", "mix.pool.gpus_per_actor=0.25"])
    p = cfg.mix.pool
    assert (p.replicas, p.shards, p.top_k, p.prefetch, p.gpus_per_actor) == (2, 2, 0, 2, 0.25)
    assert WMSSConfig().mix.pool.top_k == 64  # the default ships the top-64, not [N, V]
    with pytest.raises(ConfigError, match="frozen"):
        load_config(None, ["mix.mode=joint", "mix.placement=pool"])
    packed = load_config(None, ["mix.mode=frozen", "mix.placement=pool", "training.packing=true"])
    assert packed.training.packing and packed.mix.placement == "pool"  # the wire carries packed rows
    with pytest.raises(ConfigError, match="unknown key 'mix.pool_top_k'"):
        load_config(None, ["mix.pool_top_k=8"])
    with pytest.raises(ConfigError, match="mix.pool.shards"):
        load_config(None, ["mix.pool.shards=0"])


def test_fake_weak_sources_need_a_frozen_colocated_weak_side():
    for source in ("uniform", "entropy_matched", "shuffled"):
        assert load_config(None, ["mix.mode=frozen", f"mix.weak_source={source}"]).mix.weak_source == source
        for bad in (["mix.mode=joint"], ["mix.mode=frozen", "mix.placement=pool"]):
            with pytest.raises(ConfigError, match=f"mix.weak_source '{source}'.*frozen.*colocated"):
                load_config(None, [*bad, f"mix.weak_source={source}"])
    with pytest.raises(ConfigError, match="mix.weak_source"):
        load_config(None, ["mix.mode=frozen", "mix.weak_source=random"])
    with pytest.raises(ConfigError, match="mix.shuffle_bucket_rows"):
        load_config(None, ["mix.shuffle_bucket_rows=1"])
    assert WMSSConfig().mix.weak_source == "model"


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'mix.lamb'; did you mean 'mix.lam'"):
        load_config(None, ["mix.lamb=0.4"])
    with pytest.raises(ConfigError, match=r"unknown key 'trainig'; did you mean 'training'"):
        config_from_dict({"trainig": {"lr": 1.0}})


def test_a_removed_key_fails_naming_its_replacement(tmp_path):
    """Every renamed/removed key (schema.RENAMED_KEYS) fails at load with a did-you-mean naming the
    key that replaced it, from a YAML file and from an override alike; the replacement loads."""
    from wmss_ray.config.schema import RENAMED_KEYS

    assert "mix.chunk_size" in RENAMED_KEYS
    for old, (new, _why) in RENAMED_KEYS.items():
        section, key = old.split(".")
        p = tmp_path / f"{key}.yaml"
        p.write_text(f"{section}:\n  {key}: 2048\n")  # the key fails before its value is read
        with pytest.raises(ConfigError, match=rf"unknown key '{old}' \(removed\); did you mean '{new}'\?") as err:
            load_config(p)
        assert str(p) in str(err.value)
        with pytest.raises(ConfigError, match=rf"did you mean '{new}'"):
            load_config(None, [f"{old}=2048"])
        assert old.split(".")[-1] not in WMSSConfig.model_fields[section].annotation.model_fields
    with pytest.raises(ConfigError, match=r"chunk_mb MiB of the \[chunk, V\] fp32 buffer"):
        load_config(None, ["mix.chunk_size=2048"])
    assert load_config(None, ["mix.chunk_mb=1188"]).mix.chunk_mb == 1188


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("curriculum:\n  alfa: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value) and "curriculum.alpha" in str(err.value)


def test_a_renamed_key_fails_naming_its_new_name(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("evaluation:\n  baseline: false\n")
    with pytest.raises(ConfigError, match=r"unknown key 'evaluation.baseline' \(removed\); did you mean 'evaluation.sft_continued'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"did you mean 'evaluation.sft_continued'"):
        load_config(None, ["evaluation.baseline=false"])
    assert load_config(None, ["evaluation.sft_continued=false"]).evaluation.sft_continued is False


def test_bad_yaml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("mix: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_real_models_need_a_corpus_and_a_model():
    with pytest.raises(ConfigError, match="models.base"):
        load_config(None, ["models.demo=false"])
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, ["models.demo=false", "models.base=/m"])


def test_config_hash_is_stable_and_sensitive():
    a, b = WMSSConfig(), WMSSConfig()
    assert a.config_hash() == b.config_hash()
    assert load_config(None, ["mix.lam=0.4"]).config_hash() != a.config_hash()


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["mix.lam"])


def test_relative_run_storage_resolves_to_an_absolute_local_dir(tmp_path, monkeypatch):
    from wmss_ray.pipeline import RunContext

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.storage=rel/runs", "run.name=r1"])
    ctx = RunContext(cfg)
    assert ctx.run_dir == str((tmp_path / "rel" / "runs" / "r1").resolve())
    assert os.path.isabs(ctx.run_dir) and "s3:" not in ctx.run_dir


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://b/r", "file:///tmp/r", "abfs://c/r"])
def test_object_storage_uris_load_and_stay_uris(uri):
    from wmss_ray.pipeline import RunContext

    cfg = load_config(None, [f"run.storage={uri}", "run.name=r1"])
    assert cfg.run_dir() == f"{uri}/r1" and RunContext(cfg).run_dir == f"{uri}/r1"


def test_gpu_runs_need_gpus_for_evaluation():
    with pytest.raises(ConfigError, match="evaluation.gpus_per_actor"):
        config_from_dict({"scaling": {"use_gpu": True, "gpus_per_worker": 1}, "training": {"zero_stage": 2}})
    cfg = config_from_dict({"scaling": {"use_gpu": True, "gpus_per_worker": 1}, "training": {"zero_stage": 2},
                            "evaluation": {"gpus_per_actor": 1}})
    assert cfg.evaluation.gpus_per_actor == 1
    shipped = load_config(REPO / "configs" / "qwen3-4b-math.yaml")
    assert shipped.evaluation.gpus_per_actor >= 1 and shipped.evaluation.checker == "math"
    assert shipped.data.validation_fraction > 0 and shipped.evaluation.max_samples is not None


def test_validation_sources_are_exclusive():
    with pytest.raises(ConfigError, match="not both"):
        config_from_dict({"data": {"validation": "v.jsonl", "validation_fraction": 0.1}})
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        config_from_dict({"data": {"validation_fraction": 1.0}})
    with pytest.raises(ConfigError, match="data.supervise"):
        config_from_dict({"data": {"supervise": "everything"}})


def test_curriculum_seed_defaults_to_run_seed_and_tune_seeds_cannot_also_sweep_it():
    from wmss_ray.config.loading import load_config

    assert load_config(None, ["run.seed=7"]).curriculum_seed == 7
    assert load_config(None, ["run.seed=7", "curriculum.seed=9"]).curriculum_seed == 9
    with pytest.raises(ConfigError, match="do not also sweep curriculum.seed"):
        load_config(None, ["tune.seeds=2", 'tune.search_space={"curriculum.seed": {"choice": [1, 2]}}'])


def test_checkpoint_staging_dir_is_an_absolute_local_directory_and_in_no_fingerprint(tmp_path):
    from wmss_ray.pipeline import _phase_fingerprint, build_phases

    assert load_config(None).training.staging_dir is None  # the system temp dir
    assert load_config(None, ["training.staging_dir=/local/nvme"]).training.staging_dir == "/local/nvme"
    for bad in ("scratch/ckpt", "s3://bucket/staging"):
        with pytest.raises(ConfigError, match="training.staging_dir.*absolute local directory"):
            load_config(None, [f"training.staging_dir={bad}"])
    # where a checkpoint is staged does not change what a phase computes: no rerun when it moves
    prints = [{}, {}]
    for cfg, fp in zip((load_config(None), load_config(None, ["training.staging_dir=/local/nvme"])), prints):
        for phase in build_phases(cfg):
            fp[phase.name] = _phase_fingerprint(phase, cfg.to_dict(), fp)
    assert prints[0] == prints[1] and "sft" in prints[0]


def test_corpus_and_tokenizer_are_checked_before_ray(tmp_path):
    """A missing corpus or a model directory without its tokenizer: one ConfigError naming the
    key (``run_pipeline`` calls these before Ray starts)."""
    from wmss_ray.config.loading import check_corpus_paths, check_tokenizer_dir

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    train = tmp_path / "train.jsonl"
    cfg = config_from_dict({"models": {"demo": False, "base": str(model)},
                            "data": {"train": str(train), "eval": str(tmp_path / "eval.jsonl")}})
    with pytest.raises(ConfigError, match=rf"^data.train: corpus {train} does not exist"):
        check_corpus_paths(cfg)
    train.write_text("{}\n")
    with pytest.raises(ConfigError, match="^data.eval: corpus .*eval.jsonl does not exist"):
        check_corpus_paths(cfg)
    (tmp_path / "eval.jsonl").write_text("{}\n")
    check_corpus_paths(cfg)
    with pytest.raises(ConfigError, match=rf"^models.base: {model} has no tokenizer"):
        check_tokenizer_dir(cfg)
    (model / "tokenizer.json").write_text("{}")
    check_tokenizer_dir(cfg)
    check_corpus_paths(config_from_dict({}))  # the demo writes its own corpus
    check_tokenizer_dir(config_from_dict({}))


def test_num_workers_as_a_range_is_elastic_with_one_global_batch():
    """``scaling.num_workers: [min, max]`` is ``min_workers`` + ``num_workers`` (the most); the
    global batch is the same at every worker count and grad-accum follows the world size."""
    from wmss_ray.config.loading import config_from_dict

    cfg = config_from_dict({"scaling": {"num_workers": [2, 4]},
                            "training": {"micro_batch_size": 2, "global_batch_size": 24}})
    assert (cfg.scaling.min_workers, cfg.scaling.num_workers, cfg.scaling.elastic) == (2, 4, True)
    assert cfg.global_batch() == 24 and [cfg.grad_accum_for(w) for w in (2, 3, 4)] == [6, 4, 3]
    assert config_from_dict(cfg.to_dict()) == cfg  # what a run saves reads back the same
    fixed = config_from_dict({"scaling": {"num_workers": 4}, "training": {"micro_batch_size": 2, "grad_accum": 2}})
    assert not fixed.scaling.elastic and fixed.global_batch() == 16  # G from max workers when not set


@pytest.mark.parametrize("scaling, training, message", [
    ({"num_workers": [1, 4]}, {"micro_batch_size": 2, "global_batch_size": 16},
     r"global batch 16 does not split over \[3\] workers.*worker counts that fit: \[1, 2, 4\]"),
    ({"num_workers": [2, 4]}, {"micro_batch_size": 2, "grad_accum": 3},  # G = 2 x 3 x 4 = 24: 3 workers fit
     None),
    ({"num_workers": 2}, {"micro_batch_size": 2, "global_batch_size": 16, "grad_accum": 2},
     r"global_batch_size 16 and training.grad_accum 2 disagree"),
    ({"num_workers": [3, 2]}, {}, r"num_workers must be a number or \[min, max\] with 1 <= min <= max"),
    ({"num_workers": [1, 2], "min_workers": 1}, {}, r"not both"),
])
def test_a_global_batch_that_some_worker_count_cannot_split_is_refused_at_load(scaling, training, message):
    from wmss_ray.config.loading import config_from_dict
    from wmss_ray.config.sections import ConfigError

    if message is None:
        assert config_from_dict({"scaling": scaling, "training": training}).global_batch() == 24
        return
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"scaling": scaling, "training": training})
