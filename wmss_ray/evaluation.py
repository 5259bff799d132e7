"""Held-out evaluation: greedy exact-match accuracy and teacher-forced answer loss.

For every eval problem (a chat row ``{"sample_id", "messages": [..., assistant], "final_answer"}``
or a prompt/response row) the model generates greedily from the chat-template prompt plus the
generation prompt, left-padded in batches, stopping at the end-of-turn/EOS token; the problem is
correct when the "#### N" in the generation matches the reference (``data.synthetic.is_correct``).
The loss is the teacher-forced cross-entropy over the answer tokens only (answer-only labels from
``data.tokenize.tokenize_example``), averaged over all answer tokens of the set (token-weighted).

Two paths give the same results: in-process (small sets) and a Ray Data actor pool (large sets or
``evaluation.num_actors > 1``). Both cut the rows into the same fixed batches of
``evaluation.batch_size`` (the Ray path ships whole batches as single Ray Data rows), so left-
padding and therefore greedy outputs do not depend on which path ran.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from wmss_ray.config import WMSSConfig
from wmss_ray.data.synthetic import extract_final_answer, is_correct
from wmss_ray.data.tokenize import IGNORE_INDEX, BadRowError, collate, tokenize_example
from wmss_ray.models.generate import greedy_generate

log = logging.getLogger("wmss_ray.evaluation")

# Teacher-forced loss materialises [rows, T, V] logits; cap that at ~1 GiB of fp32 per micro-batch
# (a 152k vocabulary at T=256 gives 6 rows), so real vocabularies do not run out of memory.
_MAX_LOGIT_ELEMS = 2**28


@dataclass
class EvalResult:
    """One model on one eval set.

    ``per_sample``: one dict per problem in eval order: ``sample_id``, ``correct`` (bool),
    ``generated`` (decoded text, stop token cut), ``predicted`` / ``reference`` (final answers,
    None when absent), ``nll`` (summed answer-token CE, None when the row could not be tokenised)
    and ``n_tokens`` (answer tokens in that sum).
    """

    name: str
    model_dir: str
    n: int
    accuracy: float
    loss: float  # token-weighted mean answer CE (nats/token); NaN when no answer token
    n_loss_tokens: int = 0
    per_sample: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("per_sample")
        return d


# ----------------------------------------------------------------------------- rows


def read_rows(path: str) -> list[dict[str, Any]]:
    """Read an eval corpus: JSONL(.gz) / JSON list / Parquet file, or an HF ``save_to_disk`` dir.

    Local paths or URIs (s3://, gs://) through pyarrow's filesystem layer.
    """
    import pyarrow.fs as pafs

    if "://" in path:
        fs, p = pafs.FileSystem.from_uri(path)
    else:
        fs, p = pafs.LocalFileSystem(), str(Path(path).resolve())
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"eval corpus not found: {path}")
    if info.type == pafs.FileType.Directory:
        from datasets import load_from_disk

        return [dict(r) for r in load_from_disk(path)]
    if p.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(p, filesystem=fs).to_pylist()
    with fs.open_input_stream(p, compression="detect") as f:
        text = f.read().decode("utf-8")
    if p.endswith(".json") and text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def normalise_eval_row(row: dict[str, Any], index: int, cfg: WMSSConfig) -> dict[str, Any]:
    """``{sample_id, prompt_messages, answer, final_answer}`` from a chat or prompt/response row.

    The answer is the last assistant message (chat) or the response column; ``final_answer`` is
    the row's own field when present, else the "#### N" parsed from the answer (None if neither).
    """
    d = cfg.data
    # data.id_column first (as data.corpus does), then the demo world's own "sample_id" field.
    sid = row.get(d.id_column) if d.id_column else row.get("sample_id")
    sid = str(sid) if sid is not None else f"eval-{index}"
    msgs = row.get(d.messages_column)
    if msgs is not None:
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError(f"eval row {sid}: no assistant message to take the answer from")
        prompt, answer = msgs[:last], msgs[last]["content"]
    elif d.prompt_column in row and d.response_column in row:
        prompt, answer = [{"role": "user", "content": str(row[d.prompt_column])}], str(row[d.response_column])
    else:
        raise ValueError(
            f"eval row {sid}: needs '{d.messages_column}' or '{d.prompt_column}'+'{d.response_column}'"
        )
    final = row.get("final_answer")
    final = str(final) if final is not None else extract_final_answer(answer)
    return {"sample_id": sid, "prompt_messages": prompt, "answer": answer, "final_answer": final}


def load_eval_rows(eval_path_or_rows: str | Sequence[dict], cfg: WMSSConfig) -> list[dict[str, Any]]:
    """Read (if a path), cap at ``cfg.evaluation.max_samples`` (first rows), normalise."""
    rows = read_rows(eval_path_or_rows) if isinstance(eval_path_or_rows, (str, Path)) else list(eval_path_or_rows)
    if cfg.evaluation.max_samples is not None:
        rows = rows[: cfg.evaluation.max_samples]
    return [normalise_eval_row(r, i, cfg) for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------- the evaluator


class Evaluator:
    """Plain class (no Ray): loads one model once, evaluates batches of normalised eval rows.

    ``__call__(rows)`` -> one per-sample dict per row (see :class:`EvalResult`). The Ray Data
    actor (:class:`_EvalActor`) wraps it unchanged.
    """

    def __init__(
        self,
        model_dir: str,
        max_new_tokens: int = 64,
        max_seq_len: int = 256,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        attn_implementation: str = "auto",
    ):
        from wmss_ray.models.loading import load_causal_lm, load_tokenizer, resolve_attn_implementation

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                    attn_implementation=resolve_attn_implementation(attn_implementation, device))
        self.model.eval()
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        self.max_new_tokens = max_new_tokens
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)

    @torch.no_grad()
    def answer_nll(self, rows: Sequence[dict]) -> list[tuple[float | None, int]]:
        """Per row: (sum of answer-token CE in nats, number of answer tokens); (None, 0) when the
        row cannot be tokenised. Position t's logits score token t+1 (labels shifted here)."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        encoded: list[dict | None] = []
        for r in rows:
            try:
                # "left": evaluation scores every row; a too-long prompt loses its oldest tokens.
                encoded.append(tokenize_example(tok, r["prompt_messages"], r["answer"], self.max_seq_len, "left"))
            except BadRowError as err:
                log.warning("eval row %s not scored for loss: %s", r["sample_id"], err)
                encoded.append(None)
        out: list[tuple[float | None, int]] = [(None, 0)] * len(rows)
        todo = [i for i, e in enumerate(encoded) if e is not None]
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        width = max((len(encoded[i]["input_ids"]) for i in todo), default=1)
        per_mb = max(1, _MAX_LOGIT_ELEMS // (width * vocab))
        for s in range(0, len(todo), per_mb):
            idx = todo[s:s + per_mb]
            batch = collate([encoded[i] for i in idx], pad)
            logits = self.model(
                input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
            ).logits.float()
            labels = batch["labels"][:, 1:].to(self.device)
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
            )  # [B, T-1]
            mask = labels != IGNORE_INDEX
            sums, counts = ce.sum(dim=1).tolist(), mask.sum(dim=1).tolist()
            for j, i in enumerate(idx):
                out[i] = (float(sums[j]), int(counts[j]))
        return out

    def __call__(self, rows: Sequence[dict]) -> list[dict[str, Any]]:
        # One call per pre-cut batch: batch_size=len(rows) keeps the padding identical on both paths.
        prompts = [r["prompt_messages"] for r in rows]
        generated = greedy_generate(
            self.model, self.tokenizer, prompts, self.max_new_tokens, batch_size=max(1, len(rows))
        )
        nll = self.answer_nll(rows)
        results = []
        for r, text, (s, c) in zip(rows, generated, nll):
            ref = r.get("final_answer")
            results.append(
                {
                    "sample_id": r["sample_id"],
                    "correct": bool(ref is not None and is_correct(text, ref)),
                    "generated": text,
                    "predicted": extract_final_answer(text),
                    "reference": ref,
                    "nll": s,
                    "n_tokens": c,
                }
            )
        return results


def _evaluator_kwargs(model_dir: str, cfg: WMSSConfig) -> dict[str, Any]:
    return {
        "model_dir": str(model_dir),
        "max_new_tokens": cfg.evaluation.max_new_tokens,
        "max_seq_len": cfg.data.max_seq_len,
        "dtype": cfg.models.dtype,
        "trust_remote_code": cfg.models.trust_remote_code,
        "attn_implementation": cfg.models.attn_implementation,
    }


class _EvalActor:
    """Ray Data callable class: one Ray Data row = one JSON-encoded batch of eval rows."""

    def __init__(self, evaluator_kwargs: dict[str, Any]):
        self.evaluator = Evaluator(**evaluator_kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: list[str] = []
        for blob in batch["chunk"]:
            rows = json.loads(blob)
            for r, res in zip(rows, self.evaluator(rows)):
                out.append(json.dumps({"idx": r["_idx"], **res}))
        return {"result": out}


def _run_ray(chunks: list[list[dict]], ev_kwargs: dict[str, Any], cfg: WMSSConfig) -> list[dict[str, Any]]:
    import ray.data

    from wmss_ray.pipeline import ensure_ray

    ensure_ray()  # joins a running cluster (ray job submit / tests) or starts a local one
    e = cfg.evaluation
    ds = ray.data.from_items([{"chunk": json.dumps(c)} for c in chunks])
    ds = ds.map_batches(
        _EvalActor,
        batch_size=1,  # one pre-cut eval batch per call: same padding as the in-process path
        compute=ray.data.ActorPoolStrategy(size=max(1, min(e.num_actors, len(chunks)))),
        fn_constructor_kwargs={"evaluator_kwargs": ev_kwargs},
        num_cpus=e.cpus_per_actor,
        num_gpus=e.gpus_per_actor,
    )
    results = [json.loads(r["result"]) for r in ds.take_all()]
    results.sort(key=lambda r: r.pop("idx"))  # Ray Data does not preserve order by default
    return results


# ----------------------------------------------------------------------------- public API


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_per_sample(result: EvalResult, out_dir: str | Path) -> Path:
    """``<out_dir>/eval_<name>.jsonl``: one JSON line per problem."""
    path = Path(out_dir) / f"eval_{_safe_name(result.name)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for r in result.per_sample:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path


def read_per_sample(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate_model(
    model_dir: str,
    eval_path_or_rows: str | Sequence[dict],
    cfg: WMSSConfig,
    name: str | None = None,
    out_dir: str | Path | None = None,
    use_ray: bool | None = None,
) -> EvalResult:
    """Evaluate one model directory on an eval corpus (path) or a list of raw eval rows.

    ``use_ray``: None picks the Ray Data actor pool when the set has more than
    ``evaluation.ray_min_rows`` rows or ``evaluation.num_actors > 1``; True/False force a path.
    With ``out_dir`` the per-sample results are written to ``<out_dir>/eval_<name>.jsonl``.
    """
    name = name or Path(str(model_dir)).name
    rows = load_eval_rows(eval_path_or_rows, cfg)
    e = cfg.evaluation
    if use_ray is None:
        use_ray = len(rows) > e.ray_min_rows or e.num_actors > 1
    ev_kwargs = _evaluator_kwargs(model_dir, cfg)
    # "_idx" restores eval order after the Ray path (Ray Data does not keep it by default).
    chunks = [
        [{**r, "_idx": i + j} for j, r in enumerate(rows[i:i + e.batch_size])]
        for i in range(0, len(rows), e.batch_size)
    ]
    if not rows:
        per_sample: list[dict[str, Any]] = []
    elif use_ray:
        per_sample = _run_ray(chunks, ev_kwargs, cfg)
    else:
        evaluator = Evaluator(**ev_kwargs)
        per_sample = [res for chunk in chunks for res in evaluator(chunk)]
    n_missing = sum(r["reference"] is None for r in per_sample)
    if n_missing:
        log.warning("%s: %d of %d eval rows have no reference final answer (counted wrong)",
                    name, n_missing, len(rows))
    tokens = sum(r["n_tokens"] for r in per_sample)
    nll = sum(r["nll"] for r in per_sample if r["nll"] is not None)
    result = EvalResult(
        name=name,
        model_dir=str(model_dir),
        n=len(per_sample),
        accuracy=(sum(r["correct"] for r in per_sample) / len(per_sample)) if per_sample else math.nan,
        loss=nll / tokens if tokens else math.nan,
        n_loss_tokens=tokens,
        per_sample=per_sample,
    )
    if out_dir is not None:
        write_per_sample(result, out_dir)
    log.info("eval %-14s n=%d accuracy=%.4f loss=%.4f", name, result.n, result.accuracy, result.loss)
    return result


def evaluate_models(
    models: dict[str, str], eval_path: str | Sequence[dict], cfg: WMSSConfig, out_dir: str | Path
) -> dict[str, EvalResult]:
    """Evaluate several models (``{name: model_dir}``) on the same problems.

    Writes ``<out_dir>/eval_<name>.jsonl`` per model and ``<out_dir>/eval_results.json``:
    ``{"models": {name: {name, model_dir, n, accuracy, loss, n_loss_tokens, per_sample_path}}}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, EvalResult] = {}
    table: dict[str, dict[str, Any]] = {}
    for name, model_dir in models.items():
        res = evaluate_model(model_dir, eval_path, cfg, name=name, out_dir=out)
        results[name] = res
        table[name] = {**res.summary(), "per_sample_path": str(out / f"eval_{_safe_name(name)}.jsonl")}
    tmp = out / "eval_results.json.tmp"
    tmp.write_text(json.dumps({"models": table}, indent=2, allow_nan=True))
    tmp.replace(out / "eval_results.json")
    return results


def results_table(results: Iterable[EvalResult]) -> dict[str, dict[str, Any]]:
    """``{name: {accuracy, loss, n, model_dir}}``: the ``models`` part of the report's input."""
    return {r.name: {"accuracy": r.accuracy, "loss": r.loss, "n": r.n, "model_dir": r.model_dir} for r in results}
