"""``training.lora`` through the real step code (``PhaseWorker``; 2 forked ranks for the ZeRO
stages): LoRA WMSS is exact against the plain paths, step for step.

The models: M0 = the tiny base, M1 = M0 + an SFT adapter trained here for 2 steps (``sft``
fixture), so that the adapter is not the identity. WMSS iteration 1 trains M1's adapter on, with
weak M0 = the same base with the adapter switched off (no second copy); iteration 2 has weak M1
= M0 + the SFT adapter (frozen) and strong M2 = M0 + the iteration-1 adapter: two adapters on
one base.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.training.forked_ranks import train_on_forked_ranks
from tests.training.test_training_units import _run_worker, make_artifacts, tiny_cfg
from wmss_ray.io.files import read_metrics
from wmss_ray.training.dataset import epoch_sample_ids

KEYS = ("loss", "ce_strong", "grad_norm", "p_mix")


def _cfg(stage: int = 0, lam: float = 0.5, **training):
    cfg = tiny_cfg(**{"zero_stage": stage, "max_steps": 3, "lora": {"r": 4, "alpha": 8}, **training})
    cfg.mix.lam = lam
    return cfg


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Artefacts (sampled ids: every row once, so SFT and WMSS read the same epoch list) and M1."""
    root = tmp_path_factory.mktemp("lora_train")
    paths = make_artifacts(root)
    ids = epoch_sample_ids(paths["tokenized"])
    paths["sampled"] = str(root / "all.parquet")
    pq.write_table(pa.table({"sample_id": ids}), paths["sampled"])
    worker, _ = _run_worker(paths, _cfg(max_steps=2), "sft", "sft", 2, root / "sft")
    paths["m0"] = paths["strong"]
    paths["m1"] = worker.export(str(root / "sft" / "model"))
    return paths


def _iteration(art, t: int) -> dict:
    """The artefacts of WMSS iteration ``t`` (1: strong M1, weak M0; 2: strong M2, weak M1)."""
    if t == 1:
        return dict(art, strong=art["m1"], weak=art["m0"])
    return dict(art, strong=art["m2"], weak=art["m1"])


@pytest.fixture(scope="module")
def m2(art, tmp_path_factory):
    worker, _ = _run_worker(_iteration(art, 1), _cfg(), "wmss", "frozen", 2, tmp_path_factory.mktemp("m2"))
    art["m2"] = worker.export(str(tmp_path_factory.mktemp("m2_model") / "model"))
    return art


def _series(metrics: list[dict]) -> dict[str, list[float]]:
    return {k: [m[k] for m in metrics] for k in KEYS}


def _assert_same(a: list[dict], b: list[dict], rtol: float = 1e-6) -> None:
    for key, values in _series(a).items():
        other = _series(b)[key]
        assert np.allclose(values, other, rtol=rtol, atol=1e-8), (key, values, other)


def test_iteration_1_shares_the_base_and_trains_only_the_adapter(art, tmp_path, monkeypatch):
    """Weak M0 is the strong model's base with its adapter off: no weak module, only adapter
    weights trained, and the losses equal those with M0 loaded as a separate frozen model."""
    shared, metrics = _run_worker(_iteration(art, 1), _cfg(), "wmss", "frozen", 3, tmp_path / "shared")
    assert shared.spec.weak_shared and shared.spec.weak_adapter is None and shared.pair.weak is None
    assert shared.spec.strong_adapter.endswith("sft/model/adapter")
    trained = [n for n, p in shared.pair.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n and ".default." in n for n in trained)
    n_params = sum(p.numel() for p in shared.pair.parameters())
    base = sum(p.numel() for p in load_base(art).parameters())
    assert base < n_params < 1.2 * base  # one copy of the base + adapters, not two bases

    from wmss_ray.training import trainer

    real = trainer.build_spec

    def build_spec(*a, **kw):  # the same run with M0 loaded as its own frozen model
        spec = real(*a, **kw)
        spec.weak_shared = False
        return spec

    monkeypatch.setattr(trainer, "build_spec", build_spec)
    alone, ref = _run_worker(_iteration(art, 1), _cfg(), "wmss", "frozen", 3, tmp_path / "separate")
    assert alone.pair.weak is not None
    _assert_same(metrics, ref)
    assert all(m["p_mix"] != m["p_strong"] for m in metrics)  # the weak side is mixed in


def load_base(art):
    from wmss_ray.models.loading import load_causal_lm

    return load_causal_lm(art["m0"], dtype="float32")


@pytest.mark.parametrize("mode", ["frozen", "joint"])
def test_lora_wmss_at_lambda_one_equals_lora_sft(art, tmp_path, mode):
    """lambda = 1: the mixed loss is the strong CE, so WMSS on M1 (shared base; joint: with a
    trained weak adapter too) takes SFT's steps on M1's adapter exactly."""
    _, wmss = _run_worker(_iteration(art, 1), _cfg(lam=1.0), "wmss", mode, 3, tmp_path / "w")
    _, sft = _run_worker(dict(art, strong=art["m1"]), _cfg(lam=1.0), "sft", "sft", 3, tmp_path / "s")
    _assert_same(wmss, sft)


def test_zero_stages_0_2_3_give_the_same_losses_on_2_ranks(m2, tmp_path):
    """Iteration 2 (two adapters on one base, the weak one frozen) on 2 forked gloo ranks."""
    runs = {}
    for stage in (0, 2, 3):
        cfg = tiny_cfg(zero_stage=stage, max_steps=2, num_workers=2, lora={"r": 4, "alpha": 8})
        p = _iteration(m2, 2)
        res = train_on_forked_ranks(cfg, "wmss", p["strong"], p["weak"], p["tokenized"], p["sampled"],
                                    str(tmp_path / f"z{stage}"), mode="frozen")
        runs[stage] = read_metrics(res.metrics_path)
        assert len(runs[stage]) == 2
    for stage in (2, 3):
        _assert_same(runs[stage], runs[0], rtol=1e-5)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(res.model_dir)  # the ZeRO-3 export loads in plain transformers


def test_activation_checkpointing_gives_the_same_losses_with_two_trained_adapters(m2, tmp_path):
    """Joint, iteration 2: the weak adapter is trained on the shared base, so the weak forward's
    checkpointed layers are recomputed in backward; they must run with the weak adapter, not with
    the strong one that is active again by then."""
    runs, decoders = {}, {}
    for gc in (False, True):
        worker, runs[gc] = _run_worker(_iteration(m2, 2), _cfg(gradient_checkpointing=gc, weak_lr=2e-3), "wmss",
                                       "joint", 3, tmp_path / f"gc{gc}")
        decoders[gc] = worker.pair.strong.get_base_model().model
    assert decoders[True].training and decoders[True].gradient_checkpointing and not decoders[False].gradient_checkpointing
    _assert_same(runs[True], runs[False])


def test_a_resumed_run_continues_exactly_zero3(m2, tmp_path):
    """A fresh worker loading the step-1 checkpoint (adapters only: the base is frozen, rebuilt
    from its directory) takes the same steps 2-3 as the worker that never stopped."""
    cfg = _cfg(stage=3)
    p = _iteration(m2, 2)
    first, metrics = _run_worker(p, cfg, "wmss", "frozen", 1, tmp_path / "a")
    first.save(str(tmp_path / "ckpt"), step=1, samples_seen=metrics[0]["samples_seen"])
    module = torch.load(next((tmp_path / "ckpt" / "ds").glob("*model_states.pt")), weights_only=False)["module"]
    assert module and all(".lora_" in k and ".default." in k for k in module)
    uninterrupted = [first.train_step(s) for s in (1, 2)]
    second, _ = _run_worker(p, cfg, "wmss", "frozen", 0, tmp_path / "b")
    assert second.load(str(tmp_path / "ckpt")) == 1
    _assert_same([second.train_step(s) for s in (1, 2)], uninterrupted)


def test_lora_with_a_user_strong_model_of_another_tokenizer_names_the_keys_and_dirs(art, tmp_path):
    from tests.training.other_tokenizer import save_with_an_extra_token
    from wmss_ray.config.loading import config_from_dict
    from wmss_ray.models.lora import LoraConfigError
    from wmss_ray.training.trainer import check_lora_strong

    other = save_with_an_extra_token(art["weak"], tmp_path / "other_strong")
    models = {"demo": False, "base": art["m0"], "strong": str(other)}
    cfg = config_from_dict({"models": models, "data": {"train": art["tokenized"]}, "training": {"lora": {"r": 4}}})
    with pytest.raises(LoraConfigError, match=rf"training.lora is on and models.strong {other} .*differs from "
                                              rf"models.base {art['m0']}.*vocab"):
        check_lora_strong(cfg)
    check_lora_strong(config_from_dict({"models": models, "data": {"train": art["tokenized"]}}))  # LoRA off: not asked
