"""Held-out evaluation: greedy exact-match accuracy, sampled avg@k / pass@k, teacher-forced answer loss.

Eval rows are read through ``data.corpus`` (the training corpus's formats, schemas, sample ids
and bad-row policy). For every eval problem (a chat row ``{"messages": [..., assistant]}`` or a
prompt/response row) the model generates greedily from the chat-template prompt plus the
generation prompt (and the template's own filler before an answer, e.g. an empty think block),
stopping at the end-of-turn/EOS token, with the engine ``evaluation.engine`` picks (HF generate
or vLLM: ``stages/evaluator.py``); the problem is correct when the answer checker
(``evaluation.checker``, see ``wmss_ray.stages.checkers``) finds the generation's final answer
equivalent to the reference. With ``evaluation.samples = k`` the model also draws k sampled
completions per problem (``temperature``, ``top_p``, a seed), checked the same way: avg@k and
pass@k (the unbiased estimator). The checker runs in the driver, after generation. The loss is
the teacher-forced cross-entropy over the supervised tokens only (``data.supervise``; labels from
``data.chat_tokens.tokenize_example``), averaged over all of them (token-weighted).
``evaluation.max_samples`` takes a seeded subsample (``run.seed``, by a hash of ``sample_id``).

Two paths give the same results: in-process (small sets, HF engine) and a Ray Data actor pool
(large sets, ``evaluation.num_actors > 1``, GPUs, or the vLLM engine). Both cut the rows into the
same fixed batches of ``evaluation.batch_size`` (the Ray path ships whole batches as single Ray
Data rows), so HF's left-padding and therefore its greedy outputs do not depend on which path ran.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.data.corpus import iter_corpus, iter_row_records, open_corpus
from wmss_ray.data.splits import seeded_subsample
from wmss_ray.io import storage
from wmss_ray.io.files import read_jsonl, write_jsonl
from wmss_ray.stages import stats
from wmss_ray.stages.checkers import AnswerChecker, checker_from_config
from wmss_ray.stages.evaluator import Evaluator, evaluator_kwargs, resolve_engine, run_on_actors, sampling_settings

log = logging.getLogger("wmss_ray.stages.evaluate")


@dataclass
class EvalResult:
    """One model on one eval set.

    ``per_sample``: one dict per problem in eval order: ``sample_id``, ``correct`` (bool, greedy),
    ``generated`` (decoded text, stop token cut), ``predicted`` / ``reference`` (final answers,
    None when absent), ``nll`` (summed answer-token CE, None when the row could not be tokenised),
    ``n_tokens`` (answer tokens in that sum), ``reject_reason`` (None, or why the prompt was not
    generated from) and, with sampling, ``sampled`` / ``sampled_correct`` (k each).
    ``engine``: which engine generated (``hf`` or ``vllm``); ``sampling``: the sampled
    completions' settings (``evaluation.samples`` etc.); ``avg_at_k`` / ``pass_at_k``: their
    metrics; ``brier`` / ``ece`` / ``reliability``: the calibration of the greedy answer's
    confidence (:func:`answer_confidence`, ``stats.calibration``); all None without sampling.
    """

    name: str
    model_dir: str
    n: int
    accuracy: float
    loss: float  # token-weighted mean answer CE (nats/token); NaN when no answer token
    n_loss_tokens: int = 0
    checker: str = ""  # the answer checker that decided ``correct``
    n_no_reference: int = 0  # rows without a reference final answer (counted wrong)
    n_rejected: int = 0  # rows whose prompt did not fit the context (counted wrong)
    engine: str = ""
    sampling: dict[str, Any] | None = None
    avg_at_k: float | None = None
    pass_at_k: float | None = None
    brier: float | None = None  # calibration of the greedy answer's confidence (sampling only)
    ece: float | None = None
    reliability: list[dict[str, Any]] | None = None  # stats.calibration's bins
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


# ----------------------------------------------------------------------------- checking


def check_answers(rows: Sequence[dict], generated: Sequence[dict], checker: AnswerChecker) -> list[dict[str, Any]]:
    """Per-sample results: the evaluator's output plus ``correct``, ``predicted``, ``reference``;
    with sampled completions also ``sampled_correct`` (one bool per completion). A rejected row
    (``reject_reason`` set: its prompt did not fit the context) is wrong, greedy and sampled."""
    out = []
    for r, g in zip(rows, generated):
        reason = g.get("reject_reason")
        correct, predicted = (False, None) if reason else checker.check(g["generated"], r.get("final_answer"))
        row = {"sample_id": g["sample_id"], "correct": bool(correct), "generated": g["generated"],
               "predicted": predicted, "reference": r.get("final_answer"), "nll": g["nll"],
               "n_tokens": g["n_tokens"], "reject_reason": reason}
        if "sampled" in g or reason:
            checked = [checker.check(t, r.get("final_answer")) for t in g.get("sampled", [])]
            row["sampled_correct"] = [bool(ok) for ok, _ in checked]
            row["sampled"] = g.get("sampled", [])
            row["confidence"] = answer_confidence(predicted, [p for _, p in checked], checker)
        out.append(row)
    return out


def answer_confidence(greedy: str | None, sampled: Sequence[str | None], checker: AnswerChecker) -> float:
    """The model's confidence in its greedy final answer (docs/EVALUATION.md, "Calibration"): the
    share of its sampled completions whose final answer is the same answer under ``checker``; 0
    when the greedy completion has no final answer, or there are no samples."""
    if greedy is None or not sampled:
        return 0.0
    return sum(p is not None and checker.equivalent(p, greedy) for p in sampled) / len(sampled)


def sampled_metrics(per_sample: Sequence[dict], k: int) -> dict[str, float]:
    """``avg_at_k`` (mean share of correct samples) and ``pass_at_k`` (the unbiased estimator over
    the ``k`` samples per prompt; a rejected prompt counts 0) of one model's per-sample rows."""
    counts = [sum(r.get("sampled_correct") or []) for r in per_sample]
    if not counts or k < 1:
        return {}
    cal = stats.calibration([r.get("confidence", 0.0) for r in per_sample], [r["correct"] for r in per_sample])
    return {"avg_at_k": sum(c / k for c in counts) / len(counts),
            "pass_at_k": sum(stats.pass_at_k(k, c, k) for c in counts) / len(counts),
            "brier": cal["brier"], "ece": cal["ece"], "reliability": cal["bins"]}


# ----------------------------------------------------------------------------- public API


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
                   out_dir: str | Path | None, use_ray: bool | None, generate: Generate | None = None,
                   generate_engine: str = "hf") -> EvalResult:
    """:func:`evaluate_model` on rows already read by :func:`load_eval_rows`."""
    e = cfg.evaluation
    on_gpu = e.gpus_per_actor > 0 or (not use_ray and generate is None and torch_cuda_available())
    engine = generate_engine if generate is not None else resolve_engine(cfg, len(rows), on_gpu)
    if use_ray is None:
        use_ray = len(rows) > e.ray_min_rows or e.num_actors > 1 or e.gpus_per_actor > 0
    use_ray = use_ray or engine == "vllm"  # vLLM only in an actor of its own (stages/evaluator.py)
    ev_kwargs = evaluator_kwargs(model_dir, cfg, engine)
    chunks = eval_chunks(rows, e.batch_size)
    checker = checker_from_config(cfg)
    if not rows:
        generated: list[dict[str, Any]] = []
    elif generate is not None:
        generated = generate(str(model_dir), chunks)
    elif use_ray:
        generated = run_on_actors(chunks, ev_kwargs, cfg)
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
        n_rejected=sum(r["reject_reason"] is not None for r in per_sample),
        engine=engine,
        sampling=sampling_settings(cfg) if e.samples and generate is None else None,
        per_sample=per_sample,
    )
    if result.sampling:
        sampled = sampled_metrics(per_sample, e.samples)
        result.avg_at_k, result.pass_at_k = sampled.get("avg_at_k"), sampled.get("pass_at_k")
        result.brier, result.ece, result.reliability = sampled.get("brier"), sampled.get("ece"), sampled.get("reliability")
    if out_dir is not None:
        write_per_sample(result, out_dir)
    log.info("eval %-14s n=%d accuracy=%.4f loss=%.4f engine=%s", name, result.n, result.accuracy, result.loss,
             engine)
    return result


def eval_set_info(name: str, source: str, n: int, cfg: WMSSConfig) -> dict[str, Any]:
    """What ``eval_results.json`` says about the problems: which set, from where, how chosen."""
    return {"name": name, "source": source, "n": n, "max_samples": cfg.evaluation.max_samples,
            "subsample_seed": cfg.run.seed if cfg.evaluation.max_samples is not None else None}


def evaluate_models(
    models: dict[str, str], eval_path: str | Sequence[dict], cfg: WMSSConfig, out_dir: str | Path,
    eval_set: str = "test", generate: Generate | None = None, generate_engine: str = "hf",
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
        res = _evaluate_rows(model_dir, rows, cfg, name, out, None, generate, generate_engine)
        results[name] = res
        table[name] = {**res.summary(), "per_sample_path": storage.join(out, f"eval_{_safe_name(name)}.jsonl")}
    source = str(eval_path) if isinstance(eval_path, (str, Path)) else f"{len(eval_path)} rows given in memory"
    n = next(iter(results.values())).n if results else 0
    summary = {"checker": checker_from_config(cfg).name, "eval_set": eval_set_info(eval_set, source, n, cfg),
               "models": table}
    storage.write_text(storage.join(out, "eval_results.json"), json.dumps(summary, indent=2, allow_nan=True))
    return results
