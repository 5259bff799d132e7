"""Phase 0 (demo world only): brief pre-training of the base model M0.

Single process, plain torch, no Ray: the demo tokenizer and a tiny model are built from
config and trained for ``cfg.phase0.steps`` AdamW steps on ``pretrain_texts`` (equations and
plain-format worked problems, no chat template). The result is a competent-but-weak M0: it has
learnt some arithmetic and the worked-answer style but has never seen the chat format that
SFT (phase 1) then teaches, which is the regime WMSS starts from.

Documents are packed into one token stream separated by ``<|endoftext|>``; each step reads
``batch_size`` windows of ``seq_len + 1`` tokens starting at seeded random document boundaries (inputs ``[B, S]``,
next-token targets ``[B, S]``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.data.synthetic import pretrain_texts
from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
from wmss_ray.models.tokenizer import EOT, build_demo_tokenizer
from wmss_ray.training.schedule import lr_factor, warmup_steps_for

log = logging.getLogger(__name__)


def pack_texts(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack documents into one stream: ``<|endoftext|> text <|endoftext|> text ... <|endoftext|>``.

    Returns ``(stream [N] int64, doc_starts [D] int64)``; ``doc_starts[d]`` is the index of the
    ``<|endoftext|>`` that precedes document ``d`` (a window starting there sees it whole).
    """
    eot = tokenizer.convert_tokens_to_ids(EOT)
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    starts: list[int] = []
    for ids in enc:
        starts.append(len(stream))
        stream.append(eot)
        stream.extend(ids)
    stream.append(eot)
    return torch.tensor(stream, dtype=torch.long), torch.tensor(starts, dtype=torch.long)


def _usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count, in containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS / Windows
        return max(1, os.cpu_count() or 1)


def pretrain_base(cfg: WMSSConfig, out_dir: str | Path) -> str:
    """Build, pre-train and save M0 into ``out_dir``; returns ``out_dir``.

    Also writes ``out_dir/phase0_metrics.json``: ``{"steps", "seconds", "cpu_seconds", "threads",
    "tokens_seen", "corpus_tokens", "n_params", "losses": [[step, loss], ...], "final_loss"}``.
    """
    p0, seed = cfg.phase0, cfg.run.seed
    prev_threads = torch.get_num_threads()
    # Phase 0 runs alone in its process: by default use every core, then give the setting back.
    # On a machine shared with other busy processes, intra-op threads stall each other (measured
    # 5x slower per step with 2 threads than 1 on 2 loaded cores); phase0.num_threads=1 avoids it.
    torch.set_num_threads(p0.num_threads or _usable_cpus())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _train(cfg, Path(out_dir), p0, seed)
    finally:
        torch.set_num_threads(prev_threads)


def _train(cfg: WMSSConfig, out: Path, p0, seed: int) -> str:
    start, cpu_start = time.perf_counter(), time.process_time()
    tok = build_demo_tokenizer()
    model = build_tiny_model(cfg.models.demo_model, tok, seed)
    seq_len = min(p0.seq_len, cfg.models.demo_model.max_position_embeddings)
    texts = pretrain_texts(
        cfg.data.demo.n_pretrain, seed, cfg.data.demo,
        render_chat=lambda msgs: tok.apply_chat_template(msgs, tokenize=False),
    )
    stream, doc_starts = pack_texts(tok, texts)
    # Windows start at document boundaries (never mid-question); those too close to the end
    # of the stream for a full window are dropped.
    doc_starts = doc_starts[doc_starts <= len(stream) - seq_len - 1]
    if p0.steps > 0 and len(doc_starts) == 0:
        raise ValueError(
            f"phase 0 corpus has {len(stream)} tokens, fewer than phase0.seq_len + 1 = {seq_len + 1}; "
            "raise data.demo.n_pretrain"
        )
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p0.lr, betas=(0.9, 0.95), weight_decay=p0.weight_decay)
    warmup = warmup_steps_for(p0.steps, p0.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, p0.steps, warmup, p0.min_lr_ratio))
    offsets = torch.arange(seq_len + 1)
    losses: list[list[float]] = []
    model.train()
    for step in range(p0.steps):
        starts = doc_starts[torch.randint(0, len(doc_starts), (p0.batch_size,), generator=gen)]
        window = stream[starts[:, None] + offsets]  # [B, S+1]
        logits = model(input_ids=window[:, :-1]).logits  # [B, S, V]
        # Targets are already the next tokens, so no further shift (unlike HF's labels=).
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
        opt.step()
        sched.step()
        if step % p0.log_every == 0 or step == p0.steps - 1:
            losses.append([step, round(loss.item(), 5)])
            log.info("phase0 step %d/%d loss %.4f lr %.2e", step + 1, p0.steps, loss.item(), sched.get_last_lr()[0])
    model.eval()
    save_pretrained_model(model, tok, out)
    metrics = {
        "steps": p0.steps,
        "seconds": round(time.perf_counter() - start, 2),
        # CPU seconds of this process; with one thread, close to the cost on an idle machine
        # (with more, threads spinning while they wait for each other inflate it under load).
        "cpu_seconds": round(time.process_time() - cpu_start, 2),
        "threads": torch.get_num_threads(),
        "tokens_seen": p0.steps * p0.batch_size * seq_len,
        "corpus_tokens": len(stream),
        "n_params": sum(p.numel() for p in model.parameters()),
        "losses": losses,
        "final_loss": losses[-1][1] if losses else None,
    }
    (out / "phase0_metrics.json").write_text(json.dumps(metrics, indent=1))
    return str(out)
