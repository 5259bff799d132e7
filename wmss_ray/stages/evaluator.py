"""The evaluator: one model, its generations (HF or vLLM engine) and its teacher-forced answer loss.

:class:`Evaluator` is a plain class (no Ray); :class:`EvalActor` is the Ray Data callable that
wraps it and :func:`run_on_actors` the actor pool. Which engine generates is decided once per
phase by :func:`resolve_engine`; both engines see the same prompt ids (the chat prompt and the
template's filler, ``data.chat_tokens.generation_prompt_ids``), stop at the same tokens and decode
the same way (``models.generate``), so their greedy completions differ only where the top two
logits tie. A prompt that leaves no room for ``max_new_tokens`` in the model's context is rejected
(counted wrong, its reason in the per-sample row) on both engines alike.

vLLM always runs in a Ray actor of its own (even for a small set): it sets its process's threads
and memory policy (``models.vllm_engine``), which the driver must not inherit.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import torch

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.data.chat_tokens import IGNORE_INDEX, BadRowError, collate, generation_prompt_ids, tokenize_example
from wmss_ray.losses.chunk_ops import rows_per_forward
from wmss_ray.models.generate import Sampling, decode, hf_generate_ids

log = logging.getLogger("wmss_ray.stages.evaluator")

#: ``reject_reason`` of a prompt with no room for ``max_new_tokens`` in the model's context.
PROMPT_TOO_LONG = "prompt_too_long"


def resolve_engine(cfg: WMSSConfig, n_prompts: int, on_gpu: bool) -> str:
    """``"vllm"`` or ``"hf"`` for ``evaluation.engine`` on ``n_prompts`` prompts.

    ``auto``: vLLM when it is installed and generation runs on a GPU, or on CPU from
    ``evaluation.vllm.cpu_min_rows`` prompts (below that its start-up costs more than it saves:
    benchmarks/generation.py); otherwise HF. ``vllm`` when it is not installed fails here, at
    once, naming what to change (never a silent fallback that would change the numbers).
    """
    from wmss_ray.models.vllm_engine import EngineError, vllm_installed

    e = cfg.evaluation
    if e.engine == "hf":
        return "hf"
    if e.engine == "vllm":
        if not vllm_installed():
            raise EngineError("evaluation.engine is vllm but vLLM is not installed here: run make install (CPU) "
                              "or install the project's vllm extra (GPU), or set evaluation.engine: hf")
        return "vllm"
    if not vllm_installed():
        return "hf"
    return "vllm" if on_gpu or n_prompts >= e.vllm.cpu_min_rows else "hf"


def sampling_settings(cfg: WMSSConfig) -> dict[str, Any]:
    """The sampled completions' settings (``evaluation.samples`` etc.), as the report shows them."""
    e = cfg.evaluation
    return {"samples": e.samples, "temperature": e.temperature, "top_p": e.top_p,
            "seed": e.sampling_seed if e.sampling_seed is not None else cfg.run.seed}


def evaluator_kwargs(model_dir: str, cfg: WMSSConfig, engine: str = "hf") -> dict[str, Any]:
    """:class:`Evaluator` arguments for ``model_dir`` under ``cfg`` (device: auto)."""
    e = cfg.evaluation
    return {
        "model_dir": str(model_dir),
        "max_new_tokens": e.max_new_tokens,
        "max_seq_len": cfg.data.max_seq_len,
        "dtype": cfg.models.dtype,  # auto: bf16 on GPU, fp32 on CPU (models.loading.resolve_dtype)
        "trust_remote_code": cfg.models.trust_remote_code,
        "supervise": cfg.data.supervise,
        "attn_implementation": cfg.models.attn_implementation,
        "engine": engine,
        "sampling": sampling_settings(cfg),
        "vllm": e.vllm.model_dump(exclude={"cpu_min_rows"}),
        "logits_mb": e.logits_mb,
    }


class Evaluator:
    """Loads one model once; ``__call__(rows)`` evaluates a batch of normalised eval rows.

    Returns one dict per row: ``sample_id``, ``generated`` (the greedy completion's text; "" when
    rejected), ``nll`` / ``n_tokens`` (the answer's summed CE and token count), ``reject_reason``
    (None, or :data:`PROMPT_TOO_LONG`) and, with ``sampling["samples"] = k >= 1``, ``sampled``: k
    sampled completions. Rows carry ``_idx`` (their position in the eval set): a batch samples
    from ``seed + its first _idx`` (the batches are the same on every path; see
    :class:`~wmss_ray.models.generate.Sampling` for how each engine spends the seed).
    """

    def __init__(self, model_dir: str, max_new_tokens: int = 64, max_seq_len: int = 256, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, supervise: str = "answer_and_eos",
                 attn_implementation: str = "auto", engine: str = "hf", sampling: dict[str, Any] | None = None,
                 vllm: dict[str, Any] | None = None, logits_mb: float = 1024.0):
        from wmss_ray.models.loading import load_causal_lm, load_tokenizer, resolve_attn_implementation

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine_name = engine
        self.vllm = None
        if engine == "vllm":  # first: a failure to start names the engine before any HF load
            from wmss_ray.models.vllm_engine import VLLMEngine, VLLMSettings

            self.vllm = VLLMEngine(model_dir, VLLMSettings(**(vllm or {})), dtype=dtype, device=device,
                                   trust_remote_code=trust_remote_code, seed=(sampling or {}).get("seed", 0))
        # The HF model scores the answers (teacher-forced CE) on both engines, and generates on hf.
        self.model = load_causal_lm(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                    attn_implementation=resolve_attn_implementation(attn_implementation, device))
        self.model.eval()
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        self.max_new_tokens = max_new_tokens
        self.max_seq_len = max_seq_len
        self.supervise = supervise
        # the teacher-forced CE holds [rows, T, V] fp32 logits: rows per forward follow this budget
        # (evaluation.logits_mb; 1 GiB at V = 152k and T = 256 is 6 rows)
        self.logits_mb = logits_mb
        self.device = torch.device(device)
        s = sampling or {}
        self.samples, self.seed = int(s.get("samples", 0)), int(s.get("seed", 0))
        self.temperature, self.top_p = float(s.get("temperature", 0.7)), float(s.get("top_p", 0.95))
        if self.vllm is not None:
            self.context = self.vllm.max_model_len
        else:
            limit = (vllm or {}).get("max_model_len")
            self.context = int(limit or getattr(self.model.config, "max_position_embeddings", 0) or 10**9)

    def _generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[list[int]]]:
        if self.vllm is not None:
            return self.vllm.generate_ids(prompt_ids, sampling)
        return hf_generate_ids(self.model, self.tokenizer, prompt_ids, sampling, batch_size=max(1, len(prompt_ids)))

    def generate(self, rows: Sequence[dict]) -> list[dict[str, Any]]:
        """Per row ``{generated, reject_reason[, sampled]}`` (see the class docstring)."""
        ids = [generation_prompt_ids(self.tokenizer, r["prompt_messages"], r["answer"]) for r in rows]
        fits = [i for i, p in enumerate(ids) if len(p) + self.max_new_tokens <= self.context]
        out: list[dict[str, Any]] = [{"generated": "", "reject_reason": PROMPT_TOO_LONG} for _ in rows]
        for i in set(range(len(rows))) - set(fits):
            log.warning("eval row %s rejected: %d prompt tokens + %d new tokens exceed the context of %d "
                        "(evaluation.vllm.max_model_len / the model's max_position_embeddings)",
                        rows[i]["sample_id"], len(ids[i]), self.max_new_tokens, self.context)
        if not fits:
            return out
        first = int(rows[0].get("_idx", 0))
        greedy = self._generate([ids[i] for i in fits], Sampling(max_new_tokens=self.max_new_tokens))
        for j, i in enumerate(fits):
            out[i] = {"generated": decode(self.tokenizer, greedy[j])[0], "reject_reason": None}
        if self.samples:
            # Seeded from the batch's first eval position: the batches are the same on every path.
            sampling = Sampling(max_new_tokens=self.max_new_tokens, n=self.samples, temperature=self.temperature,
                                top_p=self.top_p, seed=self.seed + first)
            for j, completions in enumerate(self._generate([ids[i] for i in fits], sampling)):
                out[fits[j]]["sampled"] = decode(self.tokenizer, completions)
        return out

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
        per_mb = rows_per_forward(len(todo), width, vocab, self.logits_mb)
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
        """Per row ``{sample_id, generated, reject_reason, nll, n_tokens[, sampled]}``; the answer
        checker runs later, in the driver (``evaluate.check_answers``). One call per pre-cut batch
        keeps the HF engine's padding identical on every path."""
        generated = self.generate(rows)
        nll = self.answer_nll(rows)
        return [{"sample_id": r["sample_id"], **g, "nll": s, "n_tokens": c}
                for r, g, (s, c) in zip(rows, generated, nll)]


class EvalActor:
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


def run_on_actors(chunks: list[list[dict]], ev_kwargs: dict[str, Any], cfg: WMSSConfig) -> list[dict[str, Any]]:
    """The evaluator over ``chunks`` on a Ray Data actor pool (``evaluation.num_actors`` actors, each
    with ``cpus_per_actor`` / ``gpus_per_actor``); results in eval order."""
    import ray.data

    from wmss_ray.cluster import ensure_ray

    ensure_ray()  # joins a running cluster (ray job submit / tests) or starts a local one
    e = cfg.evaluation
    ds = ray.data.from_items([{"chunk": json.dumps(c)} for c in chunks])
    ds = ds.map_batches(
        EvalActor,
        batch_size=1,  # one pre-cut eval batch per call: same padding as the in-process path
        compute=ray.data.ActorPoolStrategy(size=max(1, min(e.num_actors, len(chunks)))),
        fn_constructor_kwargs={"evaluator_kwargs": ev_kwargs},
        num_cpus=e.cpus_per_actor,
        num_gpus=e.gpus_per_actor,
    )
    results = [json.loads(r["result"]) for r in ds.take_all()]
    results.sort(key=lambda r: r.pop("idx"))  # Ray Data does not preserve order by default
    return results


def child_gpu_share(model_dir: str, device: Any, cap: float) -> float:
    """``gpu_memory_utilization`` for a vLLM engine started next to a training rank on ``device``:
    90 % of what is free now, less the evaluator's HF copy (the exported safetensors' size), as a
    fraction of the GPU, at most ``cap`` (``evaluation.vllm.gpu_memory_utilization``)."""
    from pathlib import Path

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    hf_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    return max(0.02, min(cap, (0.9 * free - hf_bytes) / total))


def run_in_child(ev_kwargs: dict[str, Any], chunks: list[list[dict]], workdir: str, device: Any = "cpu"
                 ) -> list[list[dict[str, Any]]]:
    """The evaluator over ``chunks`` in a fresh Python process (``python -m
    wmss_ray.stages.evaluator``): how a training rank generates with vLLM, which must not share the
    rank's process (it holds a process group and the training state). On a GPU the child sees only
    the rank's GPU. Returns the evaluator's output per chunk."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from wmss_ray.models.vllm_engine import EngineError

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    device = torch.device(device)
    kwargs = dict(ev_kwargs)
    if device.type == "cuda":
        visible = env.get("CUDA_VISIBLE_DEVICES")
        index = device.index if device.index is not None else torch.cuda.current_device()
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
        vllm = dict(kwargs.get("vllm") or {})
        vllm["gpu_memory_utilization"] = child_gpu_share(kwargs["model_dir"], device,
                                                         vllm.get("gpu_memory_utilization", 0.85))
        kwargs.update(vllm=vllm, device="cuda")
    else:
        kwargs["device"] = "cpu"
    (work / "in.json").write_text(json.dumps({"kwargs": kwargs, "chunks": chunks}))
    proc = subprocess.run([sys.executable, "-m", "wmss_ray.stages.evaluator", str(work / "in.json"),
                           str(work / "out.json")], env=env, capture_output=True, text=True)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        raise EngineError(f"the {kwargs.get('engine')} evaluator on {kwargs['model_dir']} failed in its own process "
                          f"(exit {proc.returncode}): {tail[0]}\n{proc.stderr[-4000:]}")
    return json.loads((work / "out.json").read_text())


def _child_main(argv: list[str]) -> None:
    """``python -m wmss_ray.stages.evaluator IN OUT``: :func:`run_in_child`'s other side."""
    from pathlib import Path

    job = json.loads(Path(argv[0]).read_text())
    evaluator = Evaluator(**job["kwargs"])
    Path(argv[1]).write_text(json.dumps([evaluator(chunk) for chunk in job["chunks"]]))


if __name__ == "__main__":
    import sys

    _child_main(sys.argv[1:])
