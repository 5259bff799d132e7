"""The sections of the wmss-ray config schema (run, models, data, scoring, curriculum, evaluation,
controls), each a strict pydantic model; the training side (mix, LoRA, training, phase0, scaling)
is :mod:`wmss_ray.config.training_sections`; :mod:`wmss_ray.config.schema` adds the tune section and
assembles them into ``WMSSConfig`` (import from there: it re-exports every name).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wmss_ray.io.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key, value and what is allowed."""


def compile_answer_pattern(pattern: str | None) -> re.Pattern:
    """Compile ``evaluation.answer_pattern``; it must have a group (named ``answer`` or the 1st)."""
    if not pattern:
        raise ValueError("evaluation.checker 'regex' needs evaluation.answer_pattern (a regex with a group)")
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"evaluation.answer_pattern {pattern!r} is not a valid regex: {err}") from None
    if rx.groups < 1:
        raise ValueError(f"evaluation.answer_pattern {pattern!r} has no group; mark the answer "
                         "with (...) or (?P<answer>...)")
    return rx


class ConfigSection(BaseModel):
    """The base of every config section (and of the whole config): unknown keys are errors."""

    # extra="forbid": a typo in a YAML key must fail loudly, never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(ConfigSection):
    name: str = "wmss-demo"
    storage: str = "runs"  # local/shared directory or URI (s3://b/runs); the run dir is <storage>/<name>
    seed: int = 0
    train_seed: int | None = Field(
        None, description="the training seed: SFT's and WMSS's data order, the curriculum draw (unless "
                          "curriculum.seed), LoRA's init; null: run.seed. The demo corpus and M0 keep run.seed "
                          "(a study's seeds set it: docs/CONTROLS.md)")
    iterations: int = Field(1, ge=1, description="K: WMSS iterations (paper: 1)")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers (stages/trackers.py): tensorboard (the ranks' tb/), mlflow "
                    "(MLFLOW_TRACKING_URI), wandb (WANDB_MODE online|offline); credentials from the environment")

    @field_validator("trackers")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each tracker once, got {v}")
        return v

    @field_validator("storage")
    @classmethod
    def _storage_scheme_is_supported(cls, v: str) -> str:
        # A local/shared directory or a URI pyarrow opens (s3://, gs://, ...); reachability is
        # checked at the start of a run (storage.check_reachable), not at load time.
        from wmss_ray.io.storage import check_scheme

        return check_scheme(v)


class DemoModelConfig(ConfigSection):
    """Tiny models created from config for the embedded demo world."""

    arch: Literal["llama", "qwen3"] = "llama"
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(384, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(256, ge=16)
    tie_word_embeddings: bool = False


class ModelsConfig(ConfigSection):
    """Where M0 (base / first weak model) comes from.

    ``demo: true`` builds a tiny model and tokenizer locally and pre-trains it (phase 0).
    Otherwise ``base`` is a local HF causal-LM directory (safetensors). ``strong`` may be given
    to skip phase 1 (an already fine-tuned M1). ``weak``, when set, replaces M0 as the weak agent
    of the first WMSS iteration (demo or not: how the weak-strong gap is varied); it must share
    the strong model's tokenizer. Without ``base``, ``weak`` is required.
    """

    demo: bool = True
    demo_model: DemoModelConfig = DemoModelConfig()
    base: str | None = None
    strong: str | None = None
    weak: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: flash_attention_2 on a GPU when flash_attn is installed, else sdpa"
    )

    @model_validator(mode="after")
    def _need_a_model(self) -> "ModelsConfig":
        if not self.demo and not (self.base or self.strong):
            raise ValueError("models.demo is false, so models.base (or models.strong) must name a model directory")
        if not self.demo and self.strong and not (self.base or self.weak):
            raise ValueError("models.strong is given without models.base, so models.weak must name the weak model")
        return self


class DemoDataConfig(ConfigSection):
    """The built-in synthetic multi-step arithmetic task."""

    n_pretrain: int = Field(20000, ge=0)
    n_train: int = Field(10000, ge=1)
    n_eval: int = Field(300, ge=1)
    n_validation: int = Field(200, ge=0, description="validation problems drawn after the train ones (same hash split, never in train)")
    min_steps: int = Field(2, ge=1)
    max_steps: int = Field(3, ge=1)
    max_operand: int = Field(20, ge=2)
    max_multiplier: int = Field(5, ge=2, description="multiplication steps use a factor in 2..max_multiplier")
    pretrain_equation_fraction: float = Field(0.5, ge=0, le=1, description="phase 0: share of single equations")
    pretrain_chat_fraction: float = Field(0.1, ge=0, le=1, description="phase 0: share of problems in chat format")


class DataConfig(ConfigSection):
    train: str | None = None  # JSONL(.gz) / Parquet / HF save_to_disk dir; local or URI
    eval: str | None = None  # the held-out test set: read only by the eval phase, after every choice
    validation: str | None = None  # a validation corpus (what tune selects on); or validation_fraction
    validation_fraction: float = Field(
        0.0, ge=0, lt=1,
        description="carve this share of data.train (by a hash of sample_id) into the validation split",
    )
    format: Literal["auto", "jsonl", "parquet", "hf"] = "auto"
    schema_: Literal["auto", "messages", "prompt_response"] = Field("auto", alias="schema")
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    response_column: str = "response"
    id_column: str | None = None
    reference_column: str | None = Field(
        None, description="column holding the reference final answer (default: extracted from the response)"
    )
    supervise: Literal["answer_and_eos", "answer_only"] = Field(
        "answer_and_eos", description="supervised tokens: the answer and the end-of-turn token, or the answer only"
    )
    max_seq_len: int = Field(256, ge=8)
    truncation: Literal["left", "reject"] = "left"
    on_bad_row: Literal["error", "skip"] = "error"
    tokenize_actors: int = Field(1, ge=1, description="max tokenizer actors (Ray Data actor pool)")
    tokenize_cpus: float = Field(0.5, gt=0, description="logical CPUs reserved per tokenizer actor")
    rows_per_file: int = Field(8192, ge=1, description="rows per tokenised Parquet part (at least; 10^6 rows: "
                               "~122 parts); a part's row groups stay ~4 MiB, the unit a training rank reads")
    demo: DemoDataConfig = DemoDataConfig()

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataConfig":
        if self.validation and self.validation_fraction > 0:
            raise ValueError("give data.validation (a corpus) or data.validation_fraction (carved from "
                             "data.train), not both")
        return self


class ScoringConfig(ConfigSection):
    num_actors: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    chunk_size: int = Field(256, ge=1, description="positions per entropy chunk")
    logits_mb: float = Field(2048, gt=0, description="MiB of [rows, positions, V] logits (model dtype) one scoring "
                             "forward may hold; a batch is split into forwards that fit (scores do not change)")


class CurriculumConfig(ConfigSection):
    enabled: bool = True  # false: uniform sampling (the ablation)
    alpha: float = Field(0.1, ge=0)
    beta: float = Field(0.8, ge=0)
    gamma: float = Field(0.1, ge=0)
    formula: Literal["seed", "v2"] = "seed"
    normalize: Literal["per_term"] = "per_term"
    sample_multiplier: float = Field(1.0, gt=0)
    dedup: bool = False
    seed: int | None = Field(
        None, description="seed of the curriculum draw and of the WMSS phase's data order; null: run.seed "
                          "(tune.seeds repeats a trial over run.seed + i)")

    @model_validator(mode="after")
    def _not_all_zero(self) -> "CurriculumConfig":
        if self.alpha == 0 and self.beta == 0 and self.gamma == 0:
            raise ValueError("curriculum.alpha, beta and gamma are all 0; at least one must be > 0")
        return self


class VLLMConfig(ConfigSection):
    """The vLLM engine's reservations (``evaluation.engine`` vllm, or auto when it picks vLLM)."""

    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="fraction of each GPU vLLM takes "
                                          "(weights + KV cache); below the actor's GPU share when GPUs are shared")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="the KV cache on CPU, GiB")
    max_model_len: int | None = Field(None, ge=2, description="prompt + completion tokens per sequence; None: "
                                      "the model's max_position_embeddings")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (a model larger than one GPU); "
                                      "evaluation.gpus_per_actor must equal it")
    enforce_eager: bool = Field(False, description="no CUDA graphs (faster start, slower decoding); always on CPU")
    cpu_min_rows: int = Field(64, ge=0, description="engine auto picks vLLM on CPU from this many prompts "
                              "(its start-up pays off; benchmarks/generation.py)")


class EvaluationConfig(ConfigSection):
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    engine: Literal["auto", "vllm", "hf"] = Field(
        "auto", description="generation engine: auto picks vLLM when installed and generating on a GPU (or on "
        "CPU from evaluation.vllm.cpu_min_rows prompts), else hf (transformers generate)")
    samples: int = Field(0, ge=0, description="sampled completions per prompt besides the greedy one (0: "
                         "greedy only); k >= 1 reports avg@k and pass@k")
    temperature: float = Field(0.7, gt=0, description="the sampled completions' temperature (samples >= 1)")
    top_p: float = Field(0.95, gt=0, le=1, description="the sampled completions' nucleus mass (samples >= 1)")
    sampling_seed: int | None = Field(None, description="the sampled completions' seed; None: run.seed")
    vllm: VLLMConfig = VLLMConfig()
    max_samples: int | None = Field(None, ge=1, description="a seeded subsample (run.seed, by sample_id hash)")
    checker: Literal["auto", "demo", "exact", "math", "regex"] = Field(
        "auto", description="answer checker (wmss_ray.stages.checkers); auto: demo in the demo world, else math"
    )
    answer_pattern: str | None = Field(None, description="checker regex: the final answer is group 'answer' or 1")
    num_actors: int = Field(1, ge=1)
    sft_continued: bool = Field(True, description="train the equal-compute control: SFT continued from M1 for as "
                                "many steps as WMSS took (was evaluation.baseline)")
    logits_mb: float = Field(1024, gt=0, description="MiB of fp32 [rows, positions, V] logits one teacher-forced "
                             "CE forward may hold (the eval loss and in-run validation); rows per forward follow")
    ray_min_rows: int = Field(2000, ge=0, description="eval sets larger than this use the Ray Data actor pool")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    paired_bootstrap: int = Field(10000, ge=100, description="resamples for the paired bootstrap CI")

    @model_validator(mode="after")
    def _pattern_compiles(self) -> "EvaluationConfig":
        if self.checker == "regex" or self.answer_pattern is not None:
            compile_answer_pattern(self.answer_pattern)
        if self.engine == "vllm" and self.gpus_per_actor >= 1 and self.gpus_per_actor != self.vllm.tensor_parallel_size:
            raise ValueError(f"evaluation.engine vllm: evaluation.gpus_per_actor {self.gpus_per_actor:g} must equal "
                             f"evaluation.vllm.tensor_parallel_size {self.vllm.tensor_parallel_size} (one engine per "
                             "actor, one GPU per tensor-parallel rank)")
        if 0 < self.gpus_per_actor < 1 and self.vllm.gpu_memory_utilization > self.gpus_per_actor \
                and self.engine == "vllm":
            raise ValueError(f"evaluation.vllm.gpu_memory_utilization {self.vllm.gpu_memory_utilization} is more than "
                             f"the actor's GPU share evaluation.gpus_per_actor {self.gpus_per_actor}: lower it")
        if self.answer_pattern is not None and self.checker != "regex":
            raise ValueError(f"evaluation.answer_pattern is set but evaluation.checker is {self.checker!r}; "
                             "set evaluation.checker: regex")
        return self


class ControlsConfig(ConfigSection):
    """``controls``: the control arms trained besides SFT-continued (``evaluation.sft_continued``),
    each SFT continued from M1 through the same trainer (docs/CONTROLS.md).

    ``sft_matched_flops``: as many steps as the WMSS phases' FLOPs buy (a frozen weak forward is
    1/3 of a training step, a joint step 2 of them); ``sft_higher_lr``: the WMSS steps at
    ``higher_lr_factor`` x ``training.lr``; ``sft_label_smoothing``: the WMSS steps with label
    smoothing ``label_smoothing``.
    """

    arms: list[Literal["sft_matched_flops", "sft_higher_lr", "sft_label_smoothing"]] = Field(
        default_factory=list, description="control arms to train and evaluate next to WMSS")
    higher_lr_factor: float = Field(2.0, gt=0, description="sft_higher_lr: its lr is this x training.lr")
    label_smoothing: float = Field(0.1, gt=0, lt=1, description="sft_label_smoothing: its epsilon")

    @field_validator("arms")
    @classmethod
    def _each_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"controls.arms lists an arm twice: {v}")
        return v
