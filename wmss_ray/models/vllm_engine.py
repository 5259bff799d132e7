"""The vLLM engine: the same prompts, stops and :class:`~wmss_ray.models.generate.Sampling` as the
HF engine, at serving speed.

The engine runs in the process that builds it (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the
``uni`` executor at tensor parallel size 1): no spawned engine-core and worker processes (they
cost ~25 s of start-up on a 2-core machine and need a ``__main__`` guard), so build it only in a
process of its own, a Ray actor (``stages/evaluate.py`` does): vLLM sets that process's thread
count and, on CPU, its memory policy. At tensor parallel size > 1 vLLM starts one worker process
per GPU of the actor (its ``mp`` executor).

Prompts are token ids (rendered by this project, as for HF), completions come back as token ids
(``detokenize=False``) cut after the first stop token and decoded by the caller with the HF
tokenizer, so both engines' strings are made the same way.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

from wmss_ray.models.generate import Sampling, cut_at_stop, stop_token_ids


class EngineError(RuntimeError):
    """An engine that cannot run this model here: the message names the engine, the model
    directory and what to change."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class VLLMSettings:
    """What the engine reserves and how far it reads (``evaluation.vllm`` in the config).

    ``max_model_len``: prompt + completion tokens per sequence (None: the model's
    ``max_position_embeddings``); ``gpu_memory_utilization``: the fraction of the GPU vLLM may take
    (weights + KV cache); ``cpu_kv_cache_gib``: the KV cache on CPU; ``tensor_parallel_size``: GPUs
    per engine; ``enforce_eager``: no CUDA graphs / torch.compile (faster start, slower decode).
    """

    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: float = 1.0
    tensor_parallel_size: int = 1
    enforce_eager: bool = False


def _hint(device: str) -> str:
    mem = "evaluation.vllm.gpu_memory_utilization" if device == "cuda" else "evaluation.vllm.cpu_kv_cache_gib"
    return (f"set evaluation.engine: hf (runs any model); if memory ran out, raise {mem} or lower "
            "evaluation.vllm.max_model_len")


class VLLMEngine:
    """One vLLM engine over one model directory (built once, used for every batch of a phase)."""

    def __init__(self, model_dir: str, settings: VLLMSettings, *, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, seed: int = 0):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_dir, self.device = str(model_dir), device
        if not vllm_installed():
            raise EngineError(f"evaluation.engine vllm: vLLM is not installed in this environment (model "
                              f"{model_dir}); install the project with make install (CPU) or the vllm extra "
                              "(GPU), or set evaluation.engine: hf")
        # In this process (see the module docstring); on CPU leave thread placement to the OS (vLLM
        # would pin this actor's threads to cores other actors may also be pinned to).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import LLM

        if dtype == "auto":  # the project's rule (models.loading.resolve_dtype): bf16 on GPU, fp32 on CPU
            dtype = "bfloat16" if device == "cuda" else "float32"
        kwargs = dict(model=self.model_dir, tokenizer=self.model_dir, dtype=dtype, seed=seed,
                      max_model_len=settings.max_model_len, tensor_parallel_size=settings.tensor_parallel_size,
                      enforce_eager=settings.enforce_eager or device == "cpu", trust_remote_code=trust_remote_code,
                      generation_config="vllm",  # ignore the model's sampling defaults (top_k, penalties)
                      disable_log_stats=True)
        # tp 1: the engine in this process; tp > 1: one worker process per GPU of this actor (mp:
        # the actor already holds the GPUs; the ray executor would ask Ray for them a second time).
        kwargs["distributed_executor_backend"] = "uni" if settings.tensor_parallel_size == 1 else "mp"
        if device == "cpu":
            kwargs["kv_cache_memory_bytes"] = int(settings.cpu_kv_cache_gib * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        tok = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        self.stops = stop_token_ids(GenerationConfig.from_pretrained(self.model_dir), tok)
        try:
            self.llm = LLM(**kwargs)
            self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
            # One token now: kernels that reject this model (e.g. the CPU attention at head_dim < 32)
            # fail at the first forward, and that must be here, not halfway through the phase.
            self.generate_ids([[tok.eos_token_id or 0]], Sampling(max_new_tokens=1))
        except Exception as err:  # vLLM raises many types (ValueError, RuntimeError, OOM): name ours
            raise EngineError(f"evaluation.engine vllm could not start on {self.model_dir} ({device}): "
                              f"{type(err).__name__}: {err}. To fix: {_hint(device)}") from err

    def generate_ids(self, prompt_id_lists: Sequence[Sequence[int]], sampling: Sampling) -> list[list[list[int]]]:
        """Completions as token ids, ``[prompt][sample]``, each cut after its first stop token.

        Prompt ``i`` samples with seed ``sampling.seed + i`` (reproducible whatever the batching).
        Every prompt must fit: ``len(prompt) + sampling.max_new_tokens <= self.max_model_len``
        (the evaluator rejects longer ones before they get here).
        """
        from vllm import SamplingParams

        too_long = [i for i, p in enumerate(prompt_id_lists) if len(p) + sampling.max_new_tokens > self.max_model_len]
        if too_long:
            raise ValueError(f"prompts {too_long[:5]} do not fit max_model_len {self.max_model_len}")
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=-1,
                                 seed=None if sampling.greedy else sampling.seed + i,
                                 max_tokens=sampling.max_new_tokens, stop_token_ids=self.stops,
                                 detokenize=False, skip_special_tokens=True)
                  for i in range(len(prompt_id_lists))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_id_lists], params, use_tqdm=False)
        return [[cut_at_stop(c.token_ids, self.stops) for c in sorted(o.outputs, key=lambda c: c.index)]
                for o in outs]
