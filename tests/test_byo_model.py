"""Bring your own model: a Qwen3-architecture model directory and a GSM8K-style corpus, not the
demo world, through every phase to the report (README "Bring your own model and data"), with LoRA
adapters (``training.lora.r``), as a user with one GPU per 4B model would train it.

The model and tokenizer are built here as standard HF directories (``Qwen3ForCausalLM`` from a
config, a byte-level BPE tokenizer with a Qwen3-style chat template whose answers carry the empty
think block, ``eos_token`` ``<|endoftext|>`` as in Qwen3 base tokenizers; ``save_pretrained``,
safetensors). The corpus has ``\\boxed{}`` answers; ``data.validation_fraction`` carves the
validation split; ``evaluation.checker: math`` judges the held-out answers.

LoRA: each training phase exports the merged model (``<phase>/model``: plain safetensors, loaded by
``AutoModelForCausalLM`` with no adapter code) and its adapter (``<phase>/model/adapter``, PEFT
format); WMSS iteration 1 continued the SFT adapter on M0 (the user's model), so the merged WMSS
model equals M0 plus its adapter loaded with ``PeftModel.from_pretrained``. (One run for both
claims: a pipeline of its own for LoRA cost the suite ~85 s for the same phases.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.qwen3_style import build_qwen3_style_tokenizer
from wmss_ray.config.loading import config_from_dict
from wmss_ray.data.chat_tokens import IGNORE_INDEX
from wmss_ray.data.splits import in_validation

pytestmark = pytest.mark.integration
N_TRAIN, N_EVAL, VAL_FRACTION = 48, 8, 0.25


def _gsm8k_rows(n: int, seed: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append({
            "id": f"{prefix}-{i}",
            "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
            "answer": f"He has {a} + {b} = {a + b} apples.\nThe answer is \\boxed{{{a + b}}}.",
        })
    return rows


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    train, evals = _gsm8k_rows(N_TRAIN, 0, "gsm"), _gsm8k_rows(N_EVAL, 1, "test")
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["question"] + "\n" + r["answer"] for r in train] + ["<think>\n\n</think>\n\n"]
    tok = build_qwen3_style_tokenizer(texts, vocab_size=300)

    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    # As in Qwen3 base checkpoints: generation stops on <|endoftext|> only (wmss adds <|im_end|>).
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = root / "Qwen3-tiny-base"
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    return root, base, train, tok


def test_bring_your_own_qwen3_model_and_gsm8k_corpus(ray_cluster, byo):
    from wmss_ray.pipeline import run_pipeline
    from wmss_ray.stages.evaluate import evaluate_models
    from wmss_ray.stages.tokenize import validation_eval_input

    root, base, train, tok = byo
    assert (base / "model.safetensors").exists() and (base / "tokenizer.json").exists()
    cfg = config_from_dict({
        "run": {"name": "byo", "storage": str(root / "runs"), "seed": 0},
        "models": {"demo": False, "base": str(base)},
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"),
                 "validation_fraction": VAL_FRACTION, "id_column": "id", "prompt_column": "question",
                 "response_column": "answer", "max_seq_len": 128},
        # no SFT-continued: the equal-compute control is the SFT trainer from M1 (the same
        # train_phase as the sft phase here, on the same tokenized corpus), proved on the tiny run
        # (test_pipeline_e2e.py) and the sweep's shared control (sweep/test_sweep.py); here it was a
        # fourth Train run and a fourth evaluated model (~15 s) for no claim about a user's model
        "evaluation": {"checker": "math", "max_new_tokens": 12, "batch_size": 8, "sft_continued": False},
        "training": {"micro_batch_size": 8, "max_steps": 2, "log_every": 1, "lora": {"r": 8}},
        "scoring": {"batch_size": 16},
        "scaling": {"num_workers": 1},
    })
    out = run_pipeline(cfg)
    assert list(out) == ["tokenize", "sft", "score_1", "curriculum_1", "wmss_1", "eval", "report"]

    # Tokenize: the validation split is carved by sample_id hash, apart from training.
    expect_val = sorted(r["id"] for r in train if in_validation(r["id"], VAL_FRACTION))
    assert 0 < len(expect_val) < N_TRAIN
    counts = json.loads((Path(cfg.run_dir()) / "tokenize" / "manifest.json").read_text())["counts"]
    assert counts["rows_in"] == N_TRAIN and counts["rows_rejected"] == 0 and counts["rows_truncated"] == 0
    assert counts["rows_validation"] == len(expect_val) and counts["rows_ok"] == N_TRAIN - len(expect_val)
    tokenized = pq.read_table(out["tokenize"]["tokenized"]).to_pylist()
    assert not {r["sample_id"] for r in tokenized} & set(expect_val)
    # Honest masks: the supervised tokens are the answer and <|im_end|>, never the think block.
    by_id = {r["id"]: r for r in train}
    for row in tokenized[:5]:
        supervised = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert tok.decode(supervised) == by_id[row["sample_id"]]["answer"] + "<|im_end|>"
        assert "<think>" in tok.decode(row["input_ids"])  # rendered, as conditioning only
    scores = pq.read_table(out["score_1"]["scores"]).to_pandas()
    assert len(scores) == counts["rows_ok"]

    # Eval on the test set, judged by math-verify; references come from the \boxed{} answers.
    summary = json.loads(Path(out["eval"]["results"]).read_text())
    assert summary["checker"] == "math" and summary["eval_set"]["name"] == "test"
    assert summary["eval_set"]["n"] == N_EVAL and summary["eval_set"]["source"] == str(root / "eval.jsonl")
    assert set(summary["models"]) == {"M0", "M1", "WMSS"}
    for m in summary["models"].values():
        assert m["n"] == N_EVAL and m["checker"] == "math" and m["n_no_reference"] == 0
        assert 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0
    per = [json.loads(line) for line in Path(summary["models"]["WMSS"]["per_sample_path"]).read_text().splitlines()]
    evals = {r["id"]: r for r in _gsm8k_rows(N_EVAL, 1, "test")}
    assert [p["reference"] for p in per] == [evals[p["sample_id"]]["answer"].split("{")[1].split("}")[0] for p in per]
    html = Path(out["report"]["report"]).read_text()
    assert "answer checker <b>math</b>" in html and "Numbers on the test set" in html
    assert f"validation split ({len(expect_val)} rows" in html

    _check_lora_exports(out, str(base))

    # What a tune trial does: evaluate on the carved validation split (not data.eval).
    val = evaluate_models({"M1": out["sft"]["model_dir"]}, validation_eval_input(cfg, out),
                          cfg, str(root / "val_eval"), eval_set="validation")["M1"]
    assert val.n == len(expect_val) and val.checker == "math" and val.n_no_reference == 0
    assert sorted(p["sample_id"] for p in val.per_sample) == expect_val


def _check_lora_exports(out: dict, m0: str) -> None:
    """Every adapter sits on M0 (the user's model); the merged WMSS model is M0 plus its adapter,
    loaded by plain transformers, and differs from M0 (the adapters trained)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for phase in ("sft", "wmss_1"):
        model_dir = Path(out[phase]["model_dir"])
        assert json.loads((model_dir / "wmss_lora.json").read_text()) == {"base": m0, "adapter": "adapter"}
        assert json.loads((model_dir / "adapter" / "adapter_config.json").read_text())["r"] == 8
    merged_dir = out["wmss_1"]["model_dir"]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)  # plain transformers
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(m0, dtype=torch.float32),
                                        f"{merged_dir}/adapter")
    ids = torch.arange(5, 25).reshape(2, 10)
    torch.testing.assert_close(merged(input_ids=ids).logits, on_base(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(m0, dtype=torch.float32)
    assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits)
