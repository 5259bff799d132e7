"""EntropyScorer: weak and strong answer-token entropies for padded batches (no Ray here).

One pass, both models per scorer: every batch is collated once and run through the weak and the
strong model back to back, so both scores of a sample are produced together (one row out, no
join) and the tokenised corpus crosses the object store once instead of twice. The cost is the
memory of two models per scorer; see docs/SCORING.md for how this changes on GPUs.

What is scored: the answer's content tokens only. Labels are -100 on the prompt and template
filler already (``data.tokenize``); the end-of-turn token that ``data.supervise:
answer_and_eos`` trains on is excluded here too (``data.tokenize.end_of_turn_ids`` of the strong
model's tokenizer): after SFT it is near-certain, and counting it would pull every row's mean
towards 0 by a share that depends on the answer's length, not on its difficulty.

Precision: the models run in ``resolve_dtype(dtype, device)`` (fp32 on CPU, bf16 on CUDA for
"auto"); ``core.entropy.sample_entropy`` upcasts each logits chunk to fp32, so the entropy math
is fp32 whatever the model dtype.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch

from wmss_ray.data.chat_tokens import IGNORE_INDEX, collate, end_of_turn_ids
from wmss_ray.losses.chunk_ops import rows_per_forward
from wmss_ray.losses.entropy import sample_entropy

SCORE_COLUMNS = ("sample_id", "h_weak", "h_strong", "dh", "n_answer_tokens")


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class EntropyScorer:
    """Scores tokenised rows with a weak and a strong causal LM.

    Args:
        weak_model, strong_model: local HF model directories (the same path loads one model).
        device: "cpu", "cuda", "cuda:1" or "auto" (CUDA when available).
        dtype: "auto" | "float32" | "bfloat16" | "float16" (``cfg.models.dtype``).
        chunk_size: answer positions per fp32 entropy chunk (``cfg.scoring.chunk_size``).
        num_threads: torch intra-op threads on CPU (None leaves torch's default).
        max_rows_per_forward: split a batch into forwards of at most this many rows (scores do
            not depend on it); None: as many as ``logits_mb`` allows.
        logits_mb: MiB of ``[rows, positions, V]`` logits (model dtype) one forward may hold
            (``cfg.scoring.logits_mb``): a batch's forwards take ``losses.chunk_ops.rows_per_forward``
            rows of its padded width.
        attn_implementation: ``models.attn_implementation`` (resolved for ``device``).
    """

    def __init__(self, weak_model: str, strong_model: str, *, device: str = "cpu", dtype: str = "auto",
                 chunk_size: int = 256, trust_remote_code: bool = False, num_threads: int | None = None,
                 max_rows_per_forward: int | None = None, attn_implementation: str = "auto",
                 logits_mb: float = 2048.0):
        from wmss_ray.models.loading import load_causal_lm, load_tokenizer, resolve_attn_implementation, resolve_dtype

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = _pick_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.chunk_size = chunk_size
        self.max_rows = max_rows_per_forward
        self.logits_mb = logits_mb
        attn = resolve_attn_implementation(attn_implementation, self.device)
        load = lambda p: load_causal_lm(p, self.dtype, self.device, trust_remote_code, attn).eval()  # noqa: E731
        self.weak = load(weak_model)
        self.strong = self.weak if strong_model == weak_model else load(strong_model)
        self.pad_id = self.weak.config.pad_token_id or 0  # right padding: never attended to
        # weak and strong share the tokenizer (models.check_pair_compatible)
        self.unscored_ids = sorted(end_of_turn_ids(load_tokenizer(strong_model, trust_remote_code)))

    @staticmethod
    def _takes_logits_to_keep(model) -> bool:
        return "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.inference_mode()
    def model_entropy(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h [B] float32, n_answer_tokens [B] int64)`` of one model on a padded batch.

        Only the positions from the first one that predicts an answer token onwards get logits
        (``logits_to_keep``): with right padding every answer lies in that suffix, and the
        prompt's ``[T, V]`` logits (most of them for long prompts) are never materialised.
        """
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device)
        predicts = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position t predicts label t+1
        width = ids.shape[1]
        if not predicts.any():
            zeros = torch.zeros(ids.shape[0])
            return zeros, torch.zeros(ids.shape[0], dtype=torch.long)
        first = int(predicts.any(dim=0).nonzero()[0])  # earliest predicting position in the batch
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if self._takes_logits_to_keep(model):
            kwargs["logits_to_keep"] = width - first
        logits = model(**kwargs).logits  # [B, K, V], K = width - first (or width)
        keep = logits.shape[1]
        h, n = sample_entropy(logits, labels[:, width - keep:], IGNORE_INDEX, self.chunk_size, return_counts=True)
        return h.float().cpu(), n.cpu()

    def _rows_that_fit(self, rows: list[dict[str, list[int]]]) -> int:
        """Rows per forward under ``logits_mb`` at the batch's longest row (an upper bound on the
        logits each forward keeps)."""
        width = max((len(r["input_ids"]) for r in rows), default=1)
        vocab = int(self.weak.get_output_embeddings().weight.shape[0])
        return rows_per_forward(len(rows), width, vocab, self.logits_mb, torch.finfo(self.dtype).bits // 8)

    def score_rows(self, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Scores of tokenised rows: ``h_weak, h_strong, dh [N] float64, n_answer_tokens [N] int64``
        (answer content tokens: supervised labels that are not end-of-turn tokens).

        Padding never changes a score (right padding + causal attention; see core.entropy).
        """
        skip = set(self.unscored_ids)
        rows = [{"input_ids": list(i), "labels": [IGNORE_INDEX if t in skip else t for t in lab]}
                for i, lab in zip(input_ids, labels)]
        step = self.max_rows or self._rows_that_fit(rows)
        hw, hs, ns = [], [], []
        for start in range(0, len(rows), step):
            batch = collate(rows[start:start + step], pad_id=self.pad_id)
            h_w, n = self.model_entropy(self.weak, batch)
            h_s, _ = (h_w, n) if self.strong is self.weak else self.model_entropy(self.strong, batch)
            hw.append(h_w), hs.append(h_s), ns.append(n)
        if not rows:
            empty = np.zeros(0)
            return {"h_weak": empty, "h_strong": empty, "dh": empty, "n_answer_tokens": np.zeros(0, np.int64)}
        h_weak = torch.cat(hw).double().numpy()
        h_strong = torch.cat(hs).double().numpy()
        return {"h_weak": h_weak, "h_strong": h_strong, "dh": h_strong - h_weak,
                "n_answer_tokens": torch.cat(ns).numpy().astype(np.int64)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data UDF: ``{sample_id, input_ids, labels}`` -> ``{sample_id, h_weak, h_strong, dh,
        n_answer_tokens}`` (one output row per input row, same order)."""
        out = self.score_rows(batch["input_ids"], batch["labels"])
        return {"sample_id": np.asarray(batch["sample_id"]), **out}
