"""The data plan (epoch order as a pure function of seed and epoch), the per-rank row reader and
epoch list, and the DeepSpeed config's batch geometry and fp32 accumulation; no Ray, no model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.training.test_training_units import make_artifacts, step_indices, tiny_cfg
from wmss_ray.config.loading import config_from_dict
from wmss_ray.training.dataset import DataPlan, ReadAhead, RowReader, epoch_sample_ids, write_epoch_rows
from wmss_ray.training.ds_config import build_ds_config


def test_plan_is_deterministic_and_covers_epochs():
    plan = DataPlan(n_per_epoch=10, epochs=2.0, seed=3, micro_batch_size=2, grad_accum=1, world_size=2)
    assert plan.global_batch == 4 and plan.total_steps == 5  # ceil(10 * 2 / 4)
    stream = np.concatenate([step_indices(plan, s) for s in range(5)])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    again = DataPlan(10, 2.0, 3, 2, 1, 2)
    assert all((step_indices(again, s) == step_indices(plan, s)).all() for s in range(5))
    # micro-batches of (accum a, rank r) tile the step's global batch
    tiles = np.concatenate([plan.micro_batch(2, 0, r) for r in range(2)])
    assert (tiles == step_indices(plan, 2)).all()
    assert not (step_indices(DataPlan(10, 2.0, 4, 2, 1, 2), 0) == step_indices(plan, 0)).all()


def test_plan_step_count_caps_and_fractions():
    assert DataPlan(10, 1.0, 0, 4, 1, 1).total_steps == 3  # partial last batch wraps into epoch 2
    assert DataPlan(10, 0.5, 0, 4, 1, 1).total_steps == 2
    assert DataPlan(100, 1.0, 0, 4, 1, 1, max_steps=7).total_steps == 7
    assert DataPlan(10, 1.0, 0, 4, 1, 1, max_steps=7, exact_steps=11).total_steps == 11
    plan = DataPlan(10, 1.0, 0, 2, 2, 2)
    assert (plan.rank_step(1, 1) == np.concatenate([plan.micro_batch(1, a, 1) for a in range(2)])).all()


def test_a_plan_on_another_world_size_trains_the_same_rows_at_every_step():
    """64 workers x grad-accum 2 x micro-batch 4 (G = 512) continued on 32 workers: grad-accum 4,
    the same 512 rows at every step, the same steps; 48 workers cannot split 512 rows of 4."""
    plan = DataPlan(n_per_epoch=5000, epochs=1.5, seed=7, micro_batch_size=4, grad_accum=2, world_size=64)
    half = plan.for_world(32)
    assert (half.grad_accum, half.global_batch, half.total_steps) == (4, 512, plan.total_steps)
    for step in (0, 9, plan.total_steps - 1):  # the last crosses into epoch 2
        rows = lambda p: np.sort(np.concatenate([p.rank_step(step, r) for r in range(p.world_size)]))  # noqa: E731
        assert (rows(half) == rows(plan)).all() and (rows(plan) == np.sort(step_indices(plan, step))).all()
    assert plan.for_world(64) is plan
    with pytest.raises(ValueError, match="global batch 512 .* does not split over 48 workers of micro-batch 4"):
        plan.for_world(48)


def test_ds_config_batch_geometry_zero_and_overrides():
    cfg = tiny_cfg(zero_stage=3, offload_params=True, offload_optimizer=True, grad_accum=4)
    ds = build_ds_config(cfg.training, world_size=8, dtype=torch.bfloat16, on_gpu=True)
    assert ds["train_batch_size"] == 2 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["pin_memory"]
    assert z["stage3_param_persistence_threshold"] == 0  # deep-merged override
    with pytest.raises(ValueError, match="zero_stage: 3"):
        build_ds_config(tiny_cfg(zero_stage=2, offload_params=True).training, 1, torch.float32, False)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ds_config_half_precision_accumulates_and_reduces_in_fp32(stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = build_ds_config(tiny_cfg(zero_stage=stage).training, world_size=1, dtype=torch.bfloat16, on_gpu=True)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    parsed = DeepSpeedConfig(ds)  # DeepSpeed's own parser reads the keys we meant
    assert parsed.grad_accum_dtype == "fp32" and parsed.communication_data_type == torch.float32
    assert parsed.bfloat16_config.enabled
    fp32 = build_ds_config(tiny_cfg(zero_stage=stage).training, world_size=1, dtype=torch.float32, on_gpu=False)
    assert "data_types" not in fp32 and "communication_data_type" not in fp32
    assert DeepSpeedConfig(fp32).grad_accum_dtype is None


def test_half_precision_without_zero_fails_loudly():
    with pytest.raises(ValueError, match="training.zero_stage: 0"):
        build_ds_config(tiny_cfg(zero_stage=0).training, 1, torch.bfloat16, True)
    from wmss_ray.config.schema import ConfigError

    with pytest.raises(ConfigError, match="training.zero_stage is 0"):
        config_from_dict({"scaling": {"use_gpu": True}, "evaluation": {"gpus_per_actor": 1}})
    with pytest.raises(ConfigError, match="training.zero_stage is 0"):
        config_from_dict({"models": {"dtype": "bfloat16"}})
    assert config_from_dict({"scaling": {"use_gpu": True}, "training": {"zero_stage": 1},
                             "evaluation": {"gpus_per_actor": 1}}).training.zero_stage == 1


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_ds_config_autocast_keeps_fp32_weights_gradients_and_reductions(stage):
    """``training.autocast``: DeepSpeed's torch_autocast in bf16, no bf16 weights, and no module
    whose gradients DeepSpeed would reduce (or ZeRO-3 gather) in bf16; any stage, stage 0 too."""
    from deepspeed.runtime.config import DeepSpeedConfig

    training = tiny_cfg(zero_stage=stage, autocast=False).training.model_copy(update={"autocast": True})
    ds = build_ds_config(training, world_size=1, dtype=torch.bfloat16, on_gpu=True)
    parsed = DeepSpeedConfig(ds)  # DeepSpeed's own parser reads the keys we meant (in this 1-process world)
    assert parsed.torch_autocast_enabled and parsed.torch_autocast_dtype == torch.bfloat16
    assert parsed.torch_autocast_lower_precision_safe_modules == []
    assert not parsed.bfloat16_config.enabled and not ds.get("fp16", {}).get("enabled")
    assert parsed.grad_accum_dtype is None and parsed.communication_data_type is None  # the weights' fp32
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 2 * 2
    with pytest.raises(ValueError, match="training.autocast computes in bfloat16"):
        build_ds_config(training, 1, torch.float32, False)


@pytest.mark.parametrize("overrides, refused", [
    ({"models": {"dtype": "float32"}}, "models.dtype, which is 'float32'"),
    ({}, "auto is float32 without a GPU"),
    ({"models": {"dtype": "float16"}}, "float16 would need a loss scaler"),
    ({"models": {"dtype": "bfloat16"}, "training": {"lora": {"enabled": True}}}, "training.lora.enabled"),
    ({"models": {"dtype": "bfloat16"}, "training": {"zero_stage": 2, "offload_optimizer": True}},
     "training.offload_optimizer"),
])
def test_autocast_that_cannot_be_honoured_is_refused(overrides, refused):
    from wmss_ray.config.schema import ConfigError

    data = {**overrides, "training": {"autocast": True, **overrides.get("training", {})}}
    with pytest.raises(ConfigError, match=refused):
        config_from_dict(data)


def test_autocast_allows_zero_stage_0_in_bf16():
    cfg = config_from_dict({"models": {"dtype": "bfloat16"}, "training": {"autocast": True}})
    assert cfg.training.zero_stage == 0 and cfg.training.autocast
    gpu = config_from_dict({"scaling": {"use_gpu": True}, "evaluation": {"gpus_per_actor": 1},
                            "training": {"autocast": True}})  # models.dtype auto: bf16 on a GPU
    assert gpu.training.autocast


def test_row_reader_reads_rows_by_global_number_across_files_and_row_groups(tmp_path):
    """Rows come back as written, in the order asked, whichever file and row group hold them;
    only the row groups needed are read; the epoch list maps sample ids to those row numbers."""
    rng = np.random.default_rng(0)
    rows = [{"sample_id": f"s{i:03d}", "input_ids": rng.integers(1, 50, n).tolist()}
            for i, n in enumerate(rng.integers(1, 9, 23))]
    for r in rows:
        r["labels"] = [-100] + r["input_ids"][1:]
    (tmp_path / "tok").mkdir()
    order = rng.permutation(23)  # files hold the ids out of order
    pq.write_table(pa.Table.from_pylist([rows[i] for i in order[:10]]), tmp_path / "tok" / "a.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist([rows[i] for i in order[10:]]), tmp_path / "tok" / "b.parquet", row_group_size=4)
    reader = RowReader(str(tmp_path / "tok"), cache_bytes=0)
    assert reader.num_rows == 23 and len(reader._groups) == 4 + 4
    want = [22, 0, 5, 5, 11]
    got = reader.rows(want)
    for g, w in zip(got, want):
        r = rows[order[w]]
        assert g["input_ids"].tolist() == r["input_ids"] and g["labels"].tolist() == r["labels"]
    assert reader.groups_read == 4  # rows 22 / 0 / 5 / 11 live in 4 row groups, each read once
    n = write_epoch_rows(str(tmp_path / "tok"), None, str(tmp_path / "epoch.parquet"))
    epoch = pq.read_table(tmp_path / "epoch.parquet")
    assert n == 23 and epoch["sample_id"].to_pylist() == sorted(r["sample_id"] for r in rows)
    for sid, row in zip(epoch["sample_id"].to_pylist(), epoch["row"].to_pylist()):
        assert reader.rows([row])[0]["input_ids"].tolist() == next(r for r in rows if r["sample_id"] == sid)["input_ids"]
    with pytest.raises(IndexError, match="out of range"):
        reader.rows([23])


def test_row_reader_and_epoch_list_errors_name_the_problem(tmp_path):
    paths = make_artifacts(tmp_path, n_rows=6)
    with pytest.raises(ValueError, match="not in"):
        pq.write_table(pa.table({"sample_id": ["zzz"]}), tmp_path / "bad.parquet")
        epoch_sample_ids(paths["tokenized"], str(tmp_path / "bad.parquet"))
    pq.write_table(pa.table({"sample_id": ["a", "a"], "input_ids": [[1], [2]], "labels": [[1], [2]]}),
                   tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="duplicate"):
        epoch_sample_ids(str(tmp_path / "dup.parquet"))
    pq.write_table(pa.table({"sample_id": ["a", "b"], "input_ids": [[1, 2], [2, 3]], "labels": [[1, 2], [2]]}),
                   tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match=r"ragged.parquet, row 1: input_ids and labels"):
        RowReader(str(tmp_path / "ragged.parquet")).rows([0])


def test_read_ahead_reads_the_next_step_in_the_background_one_read_at_a_time():
    """Each call returns read(step); step + 1 is read in the background thread (never past
    end_step); a repeated, skipped (resume) or out-of-order step is read in the caller's thread;
    reads never overlap (a RowReader is not thread-safe); a read-ahead's error is raised for its step."""
    import threading

    log, busy = [], threading.Lock()

    def read(step):
        assert busy.acquire(blocking=False), "two reads at once"
        try:
            if step == 7:
                raise ValueError("part-0.parquet, row 3: bad row")
            log.append((step, threading.current_thread() is threading.main_thread()))
            return [step] * 3
        finally:
            busy.release()

    ahead = ReadAhead(read, end_step=8)
    assert [ahead(s) for s in (2, 3, 4)] == [[2] * 3, [3] * 3, [4] * 3]  # a resume at step 2
    assert ahead(4) == [4] * 3 and ahead(5) == [5] * 3  # a repeat keeps step 5's read-ahead
    assert ahead(1) == [1] * 3 and ahead(2) == [2] * 3  # backwards: read here, then ahead again
    assert ahead.hits == 4  # 3, 4, 5 and 2
    ahead(6)  # a jump: read here; starts step 7's read, which fails
    with pytest.raises(ValueError, match="row 3: bad row"):
        ahead(7)
    # caller-thread reads: the resume (2), the repeat (4), the jumps back (1) and forward (6);
    # ahead: 3, 4, 5, then 6 (unused: step 1 came next), 2 and 3 (unused: step 6 came next)
    assert [s for s, main in log if main] == [2, 4, 1, 6]
    assert sorted(s for s, main in log if not main) == [2, 3, 3, 4, 5, 6]
    assert all(s < 8 for s, _ in log)  # never past end_step


def test_worker_reads_ahead_the_rows_a_synchronous_read_gives_and_resumes_at_any_step(tmp_path):
    """PhaseWorker.micro_batches: the read-ahead rows equal a synchronous read of the plan's rows
    at every step, from a fresh start and from a resume at step k (the first call reads k)."""
    from wmss_ray.data.chat_tokens import collate
    from wmss_ray.training.trainer import build_spec
    from wmss_ray.training.worker import PhaseWorker, init_single_process

    art = make_artifacts(tmp_path / "art")
    init_single_process()
    cfg = tiny_cfg(max_steps=6, micro_batch_size=3)
    spec = build_spec(cfg, "sft", art["strong"], None, art["tokenized"], None, str(tmp_path / "out"), "sft")
    reader = RowReader(art["tokenized"])

    def synchronous(w, step):
        rows, mb = reader.rows(w.epoch_rows[spec.plan.rank_step(step, 0)]), spec.plan.micro_batch_size
        return [collate(rows[a * mb:(a + 1) * mb], w.pad_id) for a in range(spec.plan.grad_accum)]

    for start in (0, 4):  # a fresh run, and a run resumed at step 4
        w = PhaseWorker(cfg, spec, 0, 1, torch.device("cpu"))
        for step in range(start, spec.end_step):
            got, want = w.micro_batches(step), synchronous(w, step)
            assert len(got) == len(want) == spec.plan.grad_accum
            for g, x in zip(got, want):
                assert g.keys() == x.keys() and all(torch.equal(g[k], x[k]) for k in g), (start, step)
        assert w.step_rows.hits == spec.end_step - start - 1  # every step after the first was read ahead
