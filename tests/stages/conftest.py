"""Scoring fixtures: a tiny weak/strong pair, a ~100-row demo corpus, its tokenised form.

The models are random-init tiny Llamas with their matrices redrawn at a larger scale, so that
entropies sit near 2 nats instead of ln(V) = 4.6 and differ between samples by ~1e-2, far more
than the 1e-5 exactness tolerance (a check on near-constant scores would prove little).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from wmss_ray.config.loading import load_config
from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
from wmss_ray.models.tokenizer import build_demo_tokenizer

N_ROWS = 100
TINY_YAML = Path(__file__).resolve().parents[2] / "configs" / "test-tiny.yaml"


def tiny_cfg(*overrides: str):
    return load_config(TINY_YAML, [f"data.demo.n_train={N_ROWS}", "data.demo.n_eval=1", *overrides])


def _spread_model(cfg, tok, seed: int, scale: float):
    model = build_tiny_model(cfg.models.demo_model, tok, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """``weak``/``strong`` model dirs (shared tokenizer), ``corpus`` (train.jsonl), ``cfg``."""
    from wmss_ray.data.synthetic import write_demo_corpus

    root = tmp_path_factory.mktemp("scoring_world")
    cfg = tiny_cfg()
    tok = build_demo_tokenizer()
    weak = save_pretrained_model(_spread_model(cfg, tok, 1, 3.0), tok, root / "weak")
    strong = save_pretrained_model(_spread_model(cfg, tok, 2, 4.0), tok, root / "strong")
    corpus = write_demo_corpus(cfg.data.demo, 0, root / "data")["train"]
    return SimpleNamespace(root=root, cfg=cfg, weak=weak, strong=strong, corpus=corpus, tok=tok)


@pytest.fixture(scope="session")
def tokenized_world(ray_cluster, tiny_world):
    """The corpus tokenised once by the Ray Data path (``tokenize_corpus``), by a pool of up to
    ``TOKENIZE_ACTORS`` actors in blocks of ``TOKENIZE_BLOCK_ROWS`` rows: the first of the two runs
    that ``test_tokenize.py`` compares, and the input of every scoring test."""
    from wmss_ray.stages.tokenize import tokenize_corpus

    return tokenize_corpus(tokenize_cfg(), tiny_world.strong, tiny_world.corpus, str(tiny_world.root / "tok"),
                           block_rows=TOKENIZE_BLOCK_ROWS)


#: Small blocks for a pool of 2 actors: many blocks in flight, finishing in any order.
TOKENIZE_ACTORS, TOKENIZE_BLOCK_ROWS = 2, 8


def tokenize_cfg():
    return tiny_cfg(f"data.tokenize_actors={TOKENIZE_ACTORS}")


@pytest.fixture(scope="session")
def reference_scores(tiny_world, tokenized_world):
    """``{sample_id: (h_weak, h_strong, n)}`` from a single-process loop: EntropyScorer, batch 1."""
    import pyarrow.parquet as pq

    from wmss_ray.stages.scorer import EntropyScorer

    scorer = EntropyScorer(tiny_world.weak, tiny_world.strong)
    rows = pq.read_table(tokenized_world.tokenized_path).to_pylist()
    out = {}
    for r in rows:
        s = scorer.score_rows([r["input_ids"]], [r["labels"]])
        out[r["sample_id"]] = (s["h_weak"][0], s["h_strong"][0], int(s["n_answer_tokens"][0]))
    return out
