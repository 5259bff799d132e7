"""Held-out evaluation: greedy exact-match accuracy and teacher-forced answer loss.

Eval rows are read through ``data.corpus`` (the training corpus's formats, schemas, sample ids
and bad-row policy). For every eval problem (a chat row ``{"messages": [..., assistant]}`` or a
prompt/response row) the model generates greedily from the chat-template prompt plus the
generation prompt (and the template's own filler before an answer, e.g. an empty think block),
left-padded in batches, stopping at the end-of-turn/EOS token; the problem is correct when the
answer checker (``evaluation.checker``, see ``wmss_ray.stages.checkers``) finds the generation's final
answer equivalent to the reference. The checker runs in the driver, after generation. The loss
is the teacher-forced cross-entropy over the supervised tokens only (``data.supervise``; labels
from ``data.tokenize.tokenize_example``), averaged over all of them (token-weighted).
``evaluation.max_samples`` takes a seeded subsample (``run.seed``, by a hash of ``sample_id``).

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
from typing import Any, Callable, Sequence

import torch

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.data.chat_tokens import IGNORE_INDEX, BadRowError, collate, generation_prompt_ids, tokenize_example
from wmss_ray.data.corpus import iter_corpus, iter_row_records, open_corpus
from wmss_ray.data.splits import seeded_subsample
from wmss_ray.io import storage
from wmss_ray.io.files import read_jsonl, write_jsonl
from wmss_ray.models.generate import greedy_generate
from wmss_ray.stages.checkers import AnswerChecker, checker_from_config

log = logging.getLogger("wmss_ray.stages.evaluate")

# Teacher-forced loss materialises [rows, T, V] logits; cap that at ~1 GiB of fp32 per micro-batch
# (a 152k vocabulary at T=256 gives 6 rows), so real vocabularies do not run out of memory.
MAX_LOGIT_ELEMS = 2**28


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
    checker: str = ""  # the answer checker that decided ``correct``
    n_no_reference: int = 0  # rows without a reference final answer (counted wrong)
    per_sample: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("per_sample")
        return d


# ----------------------------------------------------------------------------- rows


def load_eval_rows(eval_path_or_rows: str | Path | Sequence[dict], cfg: WMSSConfig) -> list[dict[str, Any]]:
    """Eval rows ``{sample_id, prompt_messages, answer, final_answer}``, read through
    ``data.corpus``: the same formats, schemas, ``sample_id`` rule (``data.id_column``, else
    ``"<file>:<row>"``) and bad-row policy (``data.on_bad_row``) as the training corpus.

    ``final_answer`` is the reference the checker compares with: the row's
    ``data.reference_column`` when set (a row without it is an error naming file and row), else
    the final answer the checker extracts from the answer (None if none). Rows that are already
    normalised (``prompt_messages`` and ``answer``: the carved validation split) are kept as they
    are. Then ``evaluation.max_samples`` keeps a seeded subsample (``run.seed``; chosen by a hash
    of ``sample_id``, kept in file order). Under ``on_bad_row: skip`` bad rows are left out and
    counted in a warning naming the first one; under ``error`` the first one raises
    ``CorpusError``.
    """
    if isinstance(eval_path_or_rows, (str, Path)):
        records = iter_corpus(open_corpus(str(eval_path_or_rows), cfg.data), cfg.data)
    else:
        rows = list(eval_path_or_rows)
        if rows and all("prompt_messages" in r and "answer" in r for r in rows):
            # Already normalised (the carved validation split): keep them as they are.
            records = ({**r, "sample_id": str(r["sample_id"]), "reject_reason": None} for r in rows)
        else:
            records = iter_row_records(rows, cfg.data, name="eval rows")
    checker = checker_from_config(cfg)
    out: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    for rec in records:
        if rec["reject_reason"]:
            bad.append(rec)
            continue
        if cfg.data.reference_column and rec.get("reference") is None:
            raise ValueError(f"eval row {rec['sample_id']} ({rec.get('source_file')} row {rec.get('source_row')}): "
                             f"data.reference_column '{cfg.data.reference_column}' is missing")
        out.append({"sample_id": rec["sample_id"], "prompt_messages": list(rec["prompt_messages"]),
                    "answer": rec["answer"],
                    "final_answer": checker.reference(rec["answer"], rec.get("reference"))})
    if bad:
        b = bad[0]
        log.warning("eval: %d bad rows skipped (data.on_bad_row: skip); first: %s row %s: %s (%s)",
                    len(bad), b["source_file"], b["source_row"], b["reject_reason"], b["reject_detail"])
    ids = [r["sample_id"] for r in out]
    if len(set(ids)) != len(ids):  # repeated ids: subsample by position instead
        log.warning("eval rows repeat sample ids; max_samples subsamples by row position")
        ids = [f"{i}:{sid}" for i, sid in enumerate(ids)]
    return [out[i] for i in seeded_subsample(ids, cfg.evaluation.max_samples, cfg.run.seed)]


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
        supervise: str = "answer_and_eos",
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
        self.supervise = supervise
        self.device = torch.device(device)

    @torch.no_grad()
    def answer_nll(self, rows: Sequence[dict]) -> list[tuple[float | None, int]]:
        """Per row: (sum of CE in nats over the supervised tokens, their number); (None, 0) when the
        row cannot be tokenised. Position t's logits score token t+1 (labels shifted here)."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        encoded: list[dict | None] = []
        for r in rows:
            try:
                # "left": evaluation scores every row; a too-long prompt loses its oldest tokens.
                encoded.append(tokenize_example(tok, r["prompt_messages"], r["answer"], self.max_seq_len, "left",
                                                self.supervise))
            except BadRowError as err:
                log.warning("eval row %s not scored for loss: %s", r["sample_id"], err)
                encoded.append(None)
        out: list[tuple[float | None, int]] = [(None, 0)] * len(rows)
        todo = [i for i, e in enumerate(encoded) if e is not None]
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        width = max((len(encoded[i]["input_ids"]) for i in todo), default=1)
        per_mb = max(1, MAX_LOGIT_ELEMS // (width * vocab))
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
        """Per row ``{sample_id, generated, nll, n_tokens}``; the answer checker runs later, in
        the driver (``check_answers``)."""
        # One call per pre-cut batch: batch_size=len(rows) keeps the padding identical on both paths.
        prompts = [r["prompt_messages"] for r in rows]
        # The same conditioning as in training: the chat prompt + the template's filler, if any.
        prompt_id_lists = [generation_prompt_ids(self.tokenizer, r["prompt_messages"], r["answer"]) for r in rows]
        generated = greedy_generate(
            self.model, self.tokenizer, prompts, self.max_new_tokens, batch_size=max(1, len(rows)),
            prompt_id_lists=prompt_id_lists,
        )
        nll = self.answer_nll(rows)
        return [{"sample_id": r["sample_id"], "generated": text, "nll": s, "n_tokens": c}
                for r, text, (s, c) in zip(rows, generated, nll)]


def check_answers(rows: Sequence[dict], generated: Sequence[dict], checker: AnswerChecker) -> list[dict[str, Any]]:
    """Per-sample results: the evaluator's output plus ``correct``, ``predicted``, ``reference``."""
    out = []
    for r, g in zip(rows, generated):
        correct, predicted = checker.check(g["generated"], r.get("final_answer"))
        out.append({"sample_id": g["sample_id"], "correct": bool(correct), "generated": g["generated"],
                    "predicted": predicted, "reference": r.get("final_answer"), "nll": g["nll"],
                    "n_tokens": g["n_tokens"]})
    return out


def evaluator_kwargs(model_dir: str, cfg: WMSSConfig) -> dict[str, Any]:
    """:class:`Evaluator` arguments for ``model_dir`` under ``cfg`` (device: auto)."""
    return {
        "model_dir": str(model_dir),
        "max_new_tokens": cfg.evaluation.max_new_tokens,
        "max_seq_len": cfg.data.max_seq_len,
        "dtype": cfg.models.dtype,  # auto: bf16 on GPU, fp32 on CPU (models.loading.resolve_dtype)
        "trust_remote_code": cfg.models.trust_remote_code,
        "supervise": cfg.data.supervise,
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

    from wmss_ray.cluster import ensure_ray

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


def write_per_sample(result: EvalResult, out_dir: str | Path) -> str:
    """``<out_dir>/eval_<name>.jsonl``: one JSON line per problem."""
    path = storage.join(str(out_dir), f"eval_{_safe_name(result.name)}.jsonl")  # local or a URI
    write_jsonl(path, result.per_sample)
    return path


def read_per_sample(path: str | Path) -> list[dict[str, Any]]:
    """The per-sample results of one ``eval_<name>.jsonl``, in eval order."""
    return read_jsonl(str(path))


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
    ``evaluation.ray_min_rows`` rows, ``evaluation.num_actors > 1`` or ``evaluation.gpus_per_actor
    > 0`` (the driver may have no GPU); True/False force a path.
    With ``out_dir`` the per-sample results are written to ``<out_dir>/eval_<name>.jsonl``.
    """
    name = name or Path(str(model_dir)).name
    return _evaluate_rows(model_dir, load_eval_rows(eval_path_or_rows, cfg), cfg, name, out_dir, use_ray)


#: ``generate(model_dir, chunks)`` -> the :class:`Evaluator` outputs of every row of ``chunks``
#: (the pre-cut batches of :func:`eval_chunks`), in order: another way to run the evaluator
#: (a training run's ranks, ``training/validation.py``).
Generate = Callable[[str, list[list[dict[str, Any]]]], list[dict[str, Any]]]


def eval_chunks(rows: Sequence[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    """Rows cut into the evaluator's batches (``evaluation.batch_size``); each row gets ``_idx``,
    its position, which restores eval order after the Ray path (Ray Data does not keep it)."""
    return [[{**r, "_idx": i + j} for j, r in enumerate(rows[i:i + batch_size])]
            for i in range(0, len(rows), batch_size)]


def _evaluate_rows(model_dir: str, rows: list[dict[str, Any]], cfg: WMSSConfig, name: str,
                   out_dir: str | Path | None, use_ray: bool | None, generate: Generate | None = None) -> EvalResult:
    """:func:`evaluate_model` on rows already read by :func:`load_eval_rows`."""
    e = cfg.evaluation
    if use_ray is None:
        use_ray = len(rows) > e.ray_min_rows or e.num_actors > 1 or e.gpus_per_actor > 0
    ev_kwargs = evaluator_kwargs(model_dir, cfg)
    chunks = eval_chunks(rows, e.batch_size)
    checker = checker_from_config(cfg)
    if not rows:
        generated: list[dict[str, Any]] = []
    elif generate is not None:
        generated = generate(str(model_dir), chunks)
    elif use_ray:
        generated = _run_ray(chunks, ev_kwargs, cfg)
    else:
        evaluator = Evaluator(**ev_kwargs)
        generated = [res for chunk in chunks for res in evaluator(chunk)]
    per_sample = check_answers(rows, generated, checker)
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
        checker=checker.name,
        n_no_reference=n_missing,
        per_sample=per_sample,
    )
    if out_dir is not None:
        write_per_sample(result, out_dir)
    log.info("eval %-14s n=%d accuracy=%.4f loss=%.4f", name, result.n, result.accuracy, result.loss)
    return result


def eval_set_info(name: str, source: str, n: int, cfg: WMSSConfig) -> dict[str, Any]:
    """What ``eval_results.json`` says about the problems: which set, from where, how chosen."""
    return {"name": name, "source": source, "n": n, "max_samples": cfg.evaluation.max_samples,
            "subsample_seed": cfg.run.seed if cfg.evaluation.max_samples is not None else None}


def evaluate_models(
    models: dict[str, str], eval_path: str | Sequence[dict], cfg: WMSSConfig, out_dir: str | Path,
    eval_set: str = "test", generate: Generate | None = None,
) -> dict[str, EvalResult]:
    """Evaluate several models (``{name: model_dir}``) on the same problems (read once).

    ``generate`` replaces the evaluator's run (in process or Ray Data actors) by another one over
    the same pre-cut batches (a training run's ranks); checking, sums and files are the same.

    ``eval_set`` names the set the numbers come from: ``test`` (``data.eval``, read only after
    every choice is made) or ``validation`` (what selection, e.g. a tune sweep, uses).
    Writes ``<out_dir>/eval_<name>.jsonl`` per model and ``<out_dir>/eval_results.json``:
    ``{"checker": str, "eval_set": {name, source, n, max_samples, subsample_seed},
    "models": {name: {name, model_dir, n, accuracy, loss, n_loss_tokens, checker, n_no_reference,
    per_sample_path}}}``.
    """
    out = str(out_dir)  # a local path or a storage URI
    results: dict[str, EvalResult] = {}
    table: dict[str, dict[str, Any]] = {}
    rows = load_eval_rows(eval_path, cfg)  # read once for all models
    for name, model_dir in models.items():
        res = _evaluate_rows(model_dir, rows, cfg, name, out, None, generate)
        results[name] = res
        table[name] = {**res.summary(), "per_sample_path": storage.join(out, f"eval_{_safe_name(name)}.jsonl")}
    source = str(eval_path) if isinstance(eval_path, (str, Path)) else f"{len(eval_path)} rows given in memory"
    n = next(iter(results.values())).n if results else 0
    summary = {"checker": checker_from_config(cfg).name, "eval_set": eval_set_info(eval_set, source, n, cfg),
               "models": table}
    storage.write_text(storage.join(out, "eval_results.json"), json.dumps(summary, indent=2, allow_nan=True))
    return results
