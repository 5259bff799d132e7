"""One typed configuration for every phase of wmss-ray.

A config is built from (in order): the schema defaults, an optional YAML file, then dotted
overrides (``--set mix.lam=0.45``). The same object flows from the CLI down to the line of math
that uses it (``cfg.mix.lam`` -> ``losses.mixing.chunked_mixed_ce(..., lam=...)``).

This module is the schema (the sections live in :mod:`wmss_ray.config.sections`, re-exported
here; the tune section and ``WMSSConfig`` are defined here); :mod:`wmss_ray.config.loading`
builds it from YAML and overrides (unknown keys rejected with a did-you-mean, errors naming the key, the value and what is allowed).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from wmss_ray.config.sections import (  # re-exported: the schema has one import path
    ConfigError,
    ConfigSection,
    ControlsConfig,
    CurriculumConfig,
    DataConfig,
    DemoDataConfig,
    DemoModelConfig,
    EvaluationConfig,
    ModelsConfig,
    RunConfig,
    ScoringConfig,
    VLLMConfig,
    compile_answer_pattern,
)
from wmss_ray.config.training_sections import (
    LoraConfig,
    MixConfig,
    Phase0Config,
    ScalingConfig,
    TrainingConfig,
    WeakPoolConfig,
)

__all__ = [
    "ConfigError", "CurriculumConfig", "DataConfig", "DemoDataConfig", "DemoModelConfig", "EvaluationConfig", "LoraConfig",
    "MixConfig", "ModelsConfig", "Phase0Config", "RunConfig", "ScalingConfig", "ScoringConfig",
    "TrainingConfig", "TuneConfig", "VLLMConfig", "WMSSConfig", "WeakPoolConfig", "RENAMED_KEYS", "SPACE_KINDS",
    "compile_answer_pattern",
]

#: Keys that existed once, dotted -> (the key that replaces them, what to do). A config that still
#: sets one fails at load naming its replacement (``loading._check_unknown``).
RENAMED_KEYS: dict[str, tuple[str, str]] = {
    "mix.chunk_size": ("mix.chunk_mb", "the loss chunk is sized by its memory budget only: chunk_mb MiB of the "
                                       "[chunk, V] fp32 buffer, 4 x V bytes per answer token (e.g. 2,048 tokens "
                                       "at V = 151,936: chunk_mb 1188)"),
    "evaluation.baseline": ("evaluation.sft_continued", "the equal-compute control has one name everywhere: "
                                                         "sft_continued (phase, directory, config key)"),
}

SpaceValue = bool | int | float | str  # YAML's own types: 0.5 stays a float, "joint" a string
SPACE_KINDS = ("uniform", "loguniform", "choice", "grid")


def _check_space_entry(key: str, spec: dict[str, list[Any]]) -> None:
    """One ``tune.search_space`` entry: a known mix.* / curriculum.* key, one kind, values that
    the key's section accepts (each choice, each bound), so a bad space fails at config load."""
    if not key.startswith(("mix.", "curriculum.")):
        raise ValueError(f"'{key}': only mix.* and curriculum.* keys can be swept "
                         "(the phases before scoring are shared by all trials)")
    if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
        raise ValueError(f"'{key}': give exactly one of uniform, loguniform, choice, grid; got {spec}")
    kind, values = next(iter(spec.items()))
    if not values:
        raise ValueError(f"'{key}': {kind} needs at least one value")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                or values[0] >= values[1]:
            raise ValueError(f"'{key}': {kind} needs [low, high] (numbers) with low < high; got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"'{key}': loguniform needs low > 0; got {values}")
    section_name, *path = key.split(".")
    section_cls = {"mix": MixConfig, "curriculum": CurriculumConfig}[section_name]
    node_cls: Any = section_cls
    for part in path[:-1]:
        field = node_cls.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            raise ValueError(f"'{key}': {section_name} has no section '{part}'")
        node_cls = field.annotation
    if not path or path[-1] not in node_cls.model_fields:
        known = ", ".join(f"{section_name}.{f}" for f in section_cls.model_fields)
        raise ValueError(f"'{key}': unknown key; {section_name} has {known}")
    for value in values:  # the section's own validators judge each value (cross-section rules: at sweep start)
        data = section_cls().model_dump()
        node = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        try:
            section_cls.model_validate(data)
        except ValidationError as err:
            msg = "; ".join(e["msg"] for e in err.errors())
            raise ValueError(f"'{key}': value {value!r} is refused: {msg}") from None


class TuneConfig(ConfigSection):
    """Ray Tune sweep over WMSS-phase knobs (the upstream phases run once and are shared).

    Trials report validation accuracy and loss every ``eval_every`` optimizer steps of their WMSS
    phase (on a seeded subsample of ``eval_samples`` validation rows), so ``scheduler: asha``
    can stop the bad ones; each trial's last report uses the whole validation split.
    """

    num_samples: int = Field(8, ge=1, description="trials (for search grid: repeats of the grid)")
    seeds: int = Field(1, ge=1, description="runs of each trial's configuration, curriculum.seed = run.seed + i; "
                                            "reports their mean (and std)")
    max_concurrent: int | None = Field(
        None, ge=1, description="null: as many trials as the cluster's CPUs/GPUs hold (driver + Train workers)")
    cpus_per_trial: float = Field(0.5, gt=0, description="the trial's driver; Train workers ask for their own")
    metric: Literal["validation_accuracy", "validation_loss"] = Field(
        "validation_accuracy", description="trials are compared on the validation split, never on data.eval"
    )
    mode: Literal["max", "min"] | None = Field(None, description="null: max for accuracy, min for loss")
    search: Literal["random", "grid", "optuna"] = Field(
        "optuna", description="optuna: TPE (Ray Tune's OptunaSearch); grid: every key a grid/choice, enumerated")
    scheduler: Literal["none", "asha"] = Field("asha", description="asha: stop trials early on intermediate reports")
    eval_every: int = Field(50, ge=0, description="optimizer steps between intermediate reports (0: final only)")
    eval_samples: int = Field(128, ge=1, description="validation rows (seeded subsample) of an intermediate report")
    grace_period: int = Field(100, ge=1, description="asha: optimizer steps before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="asha: keep 1/reduction_factor of trials per rung")
    max_steps: int | None = Field(
        None, ge=1, description="asha: the top rung in optimizer steps; null: training.max_steps, else 10000")
    search_space: dict[str, dict[str, list[SpaceValue]]] = Field(
        default_factory=lambda: {"mix.lam": {"uniform": [0.3, 0.7]}, "curriculum.alpha": {"uniform": [0.0, 0.3]},
                                 "curriculum.beta": {"uniform": [0.3, 1.0]},
                                 "curriculum.gamma": {"uniform": [0.0, 0.3]}},
        description="dotted key (mix.* or curriculum.*) -> {uniform|loguniform: [low, high]} | {choice|grid: [...]}",
    )

    @field_validator("search_space")
    @classmethod
    def _check_space(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for key, spec in space.items():
            _check_space_entry(key, spec)
        return space

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric == "validation_loss" else "max")

    @model_validator(mode="after")
    def _search_and_scheduler_fit(self) -> "TuneConfig":
        kinds = {key: next(iter(spec)) for key, spec in self.search_space.items()}
        if self.search == "optuna" and "grid" in kinds.values():
            grid = [k for k, kind in kinds.items() if kind == "grid"]
            raise ValueError(f"tune.search optuna cannot enumerate a grid ({', '.join(grid)}); use choice, "
                             "or tune.search: grid")
        if self.search == "grid" and any(kind not in ("grid", "choice") for kind in kinds.values()):
            ranged = [k for k, kind in kinds.items() if kind not in ("grid", "choice")]
            raise ValueError(f"tune.search grid needs every key as grid or choice; {', '.join(ranged)} is a range")
        if self.seeds > 1 and "curriculum.seed" in self.search_space:
            raise ValueError("tune.seeds repeats each trial over curriculum.seed: do not also sweep curriculum.seed")
        if self.scheduler == "asha" and self.eval_every == 0:
            raise ValueError("tune.scheduler asha stops trials on intermediate reports: set tune.eval_every > 0 "
                             "(or tune.scheduler: none)")
        if self.scheduler == "asha" and self.grace_period < self.eval_every:
            raise ValueError(f"tune.grace_period {self.grace_period} is shorter than tune.eval_every "
                             f"{self.eval_every}: the first report would already be past the grace period")
        return self


StudyArm = Literal["sft_matched_updates", "sft_matched_flops", "sft_higher_lr", "sft_label_smoothing",
                   "wmss_uniform_weak", "wmss_entropy_matched_weak", "wmss_shuffled_weak"]


class StudyConfig(ConfigSection):
    """``wmss study``: WMSS and its control arms over independent training seeds (docs/CONTROLS.md).

    Seed ``i`` is a run of its own, ``<run>/study/seed<i>`` with ``run.train_seed = run.seed + i``
    (its own SFT, scoring, curriculum and WMSS; the demo corpus, M0 and the tokenised corpus are
    the base run's). Every arm's training phase validates every ``validate_every`` steps, and the
    study reports each arm's final model and its validation-selected peak.
    """

    seeds: int = Field(3, ge=1, description="independent training seeds (run.train_seed = run.seed + i)")
    arms: list[StudyArm] = Field(
        default_factory=lambda: list(StudyArm.__args__),
        description="the arms next to WMSS (always run): SFT arms and fake-weak WMSS arms")
    validate_every: int = Field(50, ge=1, description="optimizer steps between the validation points of every "
                                                      "arm's training phase (the validation-selected peak)")
    max_concurrent: int | None = Field(
        None, ge=1, description="runs (a seed's trunk, an arm, a seed's evaluation) side by side as Ray tasks; "
                                "null: as many as the cluster's CPUs/GPUs hold one run's Train workers")
    n_boot: int = Field(10000, ge=100, description="bootstrap resamples of the sample-level paired CIs")

    @field_validator("arms")
    @classmethod
    def _each_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"study.arms lists an arm twice: {v}")
        return v


#: Keys added after runs were made, each left out of phase fingerprints while it has its default
#: (what runs from before it behaved as): those runs keep their fingerprints and resume instead of
#: retraining after an upgrade. Set to anything else, a key is hashed like every other.
ADDED_KEYS = ("training.lora", "training.global_batch_size", "scaling.min_workers", "evaluation.engine",
              "evaluation.samples", "evaluation.temperature", "evaluation.top_p", "evaluation.sampling_seed",
              "evaluation.vllm", "data.rows_per_file", "scoring.logits_mb", "evaluation.logits_mb", "mix.weak_source",
              "mix.shuffle_bucket_rows", "training.label_smoothing", "controls", "training.max_preemption_failures",
              "run.train_seed", "study", "training.autocast")


#: How a training phase is executed, not what it computes (that is the global batch, which they
#: split): a checkpoint resumes at other values of these (``training/resize.py``,
#: ``pipeline.resumed_fingerprint``).
TRAINING_LAYOUT = ("scaling.num_workers", "scaling.min_workers", "scaling.cpus_per_worker", "scaling.gpus_per_worker",
                   "training.micro_batch_size", "training.grad_accum", "training.global_batch_size",
                   "training.zero_stage", "mix.placement")


def _pop_if(d: dict[str, Any], dotted: str, default: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        d = d.get(part) if isinstance(d, dict) else None
    if isinstance(d, dict) and leaf in d and d[leaf] == default:
        del d[leaf]


class WMSSConfig(ConfigSection):
    run: RunConfig = RunConfig()
    models: ModelsConfig = ModelsConfig()
    data: DataConfig = DataConfig()
    scoring: ScoringConfig = ScoringConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    mix: MixConfig = MixConfig()
    training: TrainingConfig = TrainingConfig()
    phase0: Phase0Config = Phase0Config()
    scaling: ScalingConfig = ScalingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    controls: ControlsConfig = ControlsConfig()
    tune: TuneConfig = TuneConfig()
    study: StudyConfig = StudyConfig()

    @model_validator(mode="after")
    def _data_for_real_models(self) -> "WMSSConfig":
        if not self.models.demo and not self.data.train:
            raise ValueError("models.demo is false, so data.train must name a corpus")
        if self.scaling.use_gpu and self.evaluation.gpus_per_actor == 0:
            raise ValueError("scaling.use_gpu is true but evaluation.gpus_per_actor is 0: evaluation would "
                             "generate on CPU; set evaluation.gpus_per_actor (e.g. 1)")
        return self

    @model_validator(mode="after")
    def _half_precision_needs_zero(self) -> "WMSSConfig":
        # models.dtype auto is bf16 on a GPU; DeepSpeed accumulates in fp32 only under ZeRO
        # (training.autocast keeps fp32 weights and gradients: any stage).
        half = self.models.dtype in ("bfloat16", "float16") or (self.models.dtype == "auto" and self.scaling.use_gpu)
        if half and self.training.zero_stage == 0 and not self.training.autocast:
            raise ValueError(
                "training.zero_stage is 0 but the models train in half precision (models.dtype "
                f"{self.models.dtype!r}, scaling.use_gpu {self.scaling.use_gpu}): gradients are "
                "accumulated in fp32 only under ZeRO; set training.zero_stage >= 1 or models.dtype: float32"
            )
        return self

    @model_validator(mode="after")
    def _autocast_computes_in_bf16(self) -> "WMSSConfig":
        t, dtype = self.training, self.models.dtype
        if not t.autocast:
            return self
        bf16 = dtype == "bfloat16" or (dtype == "auto" and self.scaling.use_gpu)
        if not bf16:
            raise ValueError(
                f"training.autocast computes in models.dtype, which is {dtype!r} (scaling.use_gpu "
                f"{self.scaling.use_gpu}; auto is float32 without a GPU): set models.dtype: bfloat16 "
                "(float16 would need a loss scaler) or training.autocast: false")
        for key, on in (("training.lora.enabled", t.lora.enabled), ("training.offload_optimizer", t.offload_optimizer),
                        ("training.offload_params", t.offload_params)):
            if on:
                raise ValueError(f"training.autocast with {key}: not supported (LoRA trains adapters on frozen "
                                 "models.dtype weights; offload is for models.dtype weights with fp32 master "
                                 "copies); set training.autocast: false")
        return self

    @model_validator(mode="after")
    def _global_batch_splits(self) -> "WMSSConfig":
        t, sc = self.training, self.scaling
        # with global_batch_size, grad_accum follows the world size: a value other than the default
        # must be the one it takes at num_workers (a saved config reads back), or it is a contradiction
        if t.global_batch_size is not None and t.grad_accum not in (1, self.grad_accum_for(sc.num_workers, check=False)):
            raise ValueError(f"training.global_batch_size {t.global_batch_size} and training.grad_accum {t.grad_accum} "
                             f"disagree (micro_batch_size {t.micro_batch_size} x {sc.num_workers} workers): set one of them")
        g, mb = self.global_batch(), t.micro_batch_size
        bad = [w for w in sc.worker_counts if g % (mb * w)]
        if bad:
            fits = [w for w in range(1, sc.num_workers + 1) if g % (mb * w) == 0]
            raise ValueError(f"the global batch {g} does not split over {bad} workers of training.micro_batch_size {mb} "
                             f"(G / (micro_batch_size x workers) must be an integer); worker counts that fit: {fits}. "
                             f"Change scaling.num_workers, training.global_batch_size or training.micro_batch_size")
        return self

    def global_batch(self) -> int:
        """G: rows per optimizer step over all workers, whatever the world size of the moment
        (``training.global_batch_size``, else ``micro_batch_size x grad_accum x num_workers``)."""
        t = self.training
        return t.global_batch_size or t.micro_batch_size * t.grad_accum * self.scaling.num_workers

    def grad_accum_for(self, world: int, check: bool = True) -> int:
        """Micro-batches per rank and step at ``world`` workers: ``G / (micro_batch_size x world)``."""
        g, mb = self.global_batch(), self.training.micro_batch_size
        if check and g % (mb * world):
            raise ValueError(f"the global batch {g} does not split over {world} workers of micro-batch {mb}")
        return max(1, g // (mb * world))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def fingerprint_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the :data:`ADDED_KEYS` that have their defaults: what phase
        fingerprints hash."""
        out, defaults = self.to_dict(), WMSSConfig().to_dict()
        for dotted in ADDED_KEYS:
            node: Any = defaults
            for part in dotted.split("."):
                node = node[part]
            _pop_if(out, dotted, node)
        return out

    def run_dict(self) -> dict[str, Any]:
        """:meth:`fingerprint_dict` without the :data:`TRAINING_LAYOUT` keys, with the global batch
        they make: what a training run computes (a direct ``train_phase`` call's fingerprint)."""
        out = self.fingerprint_dict()
        for dotted in TRAINING_LAYOUT:
            section, leaf = dotted.split(".")
            out.get(section, {}).pop(leaf, None)
        out["global_batch"] = self.global_batch()
        return out

    def config_hash(self) -> str:
        """Stable short hash of the full config (used in phase manifests)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def run_dir(self) -> str:
        return f"{self.run.storage.rstrip('/')}/{self.run.name}"

    @property
    def train_seed(self) -> int:
        """The seed of SFT's data order and of LoRA's init (``run.train_seed``, else ``run.seed``)."""
        return self.run.seed if self.run.train_seed is None else self.run.train_seed

    @property
    def curriculum_seed(self) -> int:
        """The seed of the curriculum draw and of WMSS's data order (``curriculum.seed``, else the
        training seed)."""
        return self.train_seed if self.curriculum.seed is None else self.curriculum.seed
