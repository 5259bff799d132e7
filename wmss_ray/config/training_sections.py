"""The training side of the config schema: ``mix`` (and its weak pool), ``training`` (and LoRA),
``phase0``, ``scaling``; each a strict pydantic model (:mod:`wmss_ray.config.sections` has the
others and their base class; import from :mod:`wmss_ray.config.schema`, which re-exports every name).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from wmss_ray.config.sections import ConfigSection


class WeakPoolConfig(ConfigSection):
    """``mix.placement: pool``: the frozen weak model served by its own Ray actors (DESIGN.md §3).

    ``replicas`` x ``shards`` actors; a replica's ``shards`` actors hold the weak model
    ZeRO-3-sharded over their own process group (1: a plain full copy). Each answer position
    comes back as its ``top_k`` weak log-probs + ids, the label's exact log-prob and the tail
    log-mass (``top_k: 0``: dense log-probs, exact).
    """

    replicas: int = Field(1, ge=1, description="R: replicas serving different requests (least-loaded routing)")
    shards: int = Field(1, ge=1, description="S: actors per replica holding the weak model ZeRO-3-sharded, each "
                        "forwarding its own slice of every request's rows; > 1 only when one copy does not fit a GPU")
    top_k: int = Field(64, ge=0, description="weak log-probs shipped per answer position (0 = the full vocabulary, exact)")
    prefetch: int = Field(2, ge=0, description="micro-batches requested ahead of the one being computed")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0, description="fractional allowed (share GPUs with Train workers)")
    exact_sample: int = Field(16, ge=0, description="answer positions per micro-batch also sent dense (measured truncation error) on logged steps")
    error_warn: float = Field(0.01, gt=0, description="warn when the truncation error bound of a logged step exceeds this (nats/token)")
    placement_timeout_s: float = Field(60.0, gt=0, description="fail the phase when the pool cannot be placed within this time")


class MixConfig(ConfigSection):
    lam: float = Field(0.5, description="lambda in (0, 1]; 1 is plain SFT")
    mode: Literal["joint", "frozen"] = "joint"
    placement: Literal["colocated", "pool"] = "colocated"
    weak_source: Literal["model", "uniform", "entropy_matched", "shuffled"] = Field(
        "model", description="the weak side WMSS mixes in: the weak model, or a control's fake one (uniform: "
        "1/V everywhere; entropy_matched: the weak model's per-token entropy on a random token; shuffled: the "
        "weak model's logits of another row of about the same length); frozen, colocated")
    shuffle_bucket_rows: int = Field(64, ge=2, description="weak_source shuffled: rows per length bucket a row's "
                                     "partner is drawn from")
    chunk_mb: float | None = Field(
        None, gt=0, description="MiB of the loss's one [chunk, V] fp32 buffer, the one way to size the loss chunk "
                                "(and the weak pool's logits chunk): a multiple of 64 answer tokens, 4 V bytes "
                                "each. null (default): 256 on CPU (384 tokens at V = 151,936), 1188 on GPU "
                                "(2,048 tokens: 0.85x the naive loss's time on an H200, BENCHMARKS.md)"
    )
    pool: WeakPoolConfig = WeakPoolConfig()

    def loss_chunk_mb(self, on_gpu: bool) -> float:
        """``chunk_mb``, or the default of the device the loss runs on (the same numbers as
        ``losses.mixing.DEFAULT_CHUNK_MB`` / ``GPU_CHUNK_MB``: a test keeps them equal)."""
        if self.chunk_mb is not None:
            return self.chunk_mb
        return 1188.0 if on_gpu else 256.0

    @field_validator("lam")
    @classmethod
    def _lam_range(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _pool_is_frozen(self) -> "MixConfig":
        if self.placement == "pool" and self.mode != "frozen":
            raise ValueError("mix.placement 'pool' serves a frozen weak model only; set mix.mode: frozen")
        if self.weak_source != "model" and (self.mode != "frozen" or self.placement != "colocated"):
            raise ValueError(f"mix.weak_source {self.weak_source!r} is a fixed fake weak side: it needs mix.mode: frozen "
                             f"and mix.placement: colocated (got {self.mode}, {self.placement})")
        return self


class LoraConfig(ConfigSection):
    """``training.lora``: train LoRA adapters (PEFT) instead of every weight, in SFT and WMSS.

    ``r: 0`` (default) trains every weight. With ``r > 0`` each phase trains an adapter on a
    frozen base and exports the merged model (``<phase>/model``, plain safetensors) and the
    adapter (``<phase>/model/adapter``, PEFT format). When the weak model is the strong model's
    base (or that base plus an earlier adapter) the weak forward runs the same base weights
    with the adapter switched off (or switched to the weak one): no second copy (docs/TRAINING.md).
    """

    r: int = Field(0, ge=0, description="adapter rank; 0 = off (full fine-tuning)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (the update is scaled by alpha / r); "
                                "null: 2 r (scale 2 whatever the rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (the trained adapter only)")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="'all-linear': every nn.Linear of attention and MLP of any HF causal LM "
        "(the LM head excluded); or module names, each matching a module's name or its last dotted parts "
        "(e.g. [q_proj, v_proj])")

    @field_validator("target_modules")
    @classmethod
    def _names_given(cls, v):
        if isinstance(v, list) and (not v or not all(isinstance(n, str) and n.strip() for n in v)):
            raise ValueError(f"must be 'all-linear' or a non-empty list of module names, got {v!r}")
        return v

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def lora_alpha(self) -> float:
        """``alpha``, or ``2 r`` when unset."""
        return self.alpha if self.alpha is not None else 2.0 * self.r


class TrainingConfig(ConfigSection):
    """Training phases (SFT, WMSS, SFT-continued) on Ray Train + DeepSpeed.

    ``staging_dir``: where each rank writes its part of a checkpoint on its own node before
    ``ray.train.report`` uploads it to the run storage (and where an export to object storage is
    staged); null means the system temp dir (``tempfile.gettempdir()``: ``$TMPDIR``, else ``/tmp``).
    Every rank stages its ZeRO optimizer partition (12 bytes per trained parameter / world), so a
    node needs ``ranks on the node x that`` free: ``wmss plan`` prints the figure per node.
    How a run is executed, not what it computes: it is in no fingerprint.
    """

    lr: float = Field(1e-3, gt=0)
    weak_lr: float | None = Field(None, gt=0, description="joint mode: weak model lr (default: lr)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the (mixed) CE; "
                                   "the SFT label-smoothing control sets it (controls.label_smoothing)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    sft_epochs: float = Field(1.0, gt=0)
    wmss_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps per phase")
    micro_batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    global_batch_size: int | None = Field(
        None, ge=1, description="rows per optimizer step over all workers (G); grad_accum then follows the world "
        "size, G / (micro_batch_size x workers), which must be an integer for every worker count; null: "
        "micro_batch_size x grad_accum x scaling.num_workers")
    grad_clip: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    autocast: bool = Field(
        False, description="train as a plain PyTorch loop does: the trained models keep fp32 weights, gradients "
        "and optimizer states, and their forward runs under torch.autocast in models.dtype (bfloat16; "
        "DeepSpeed's torch_autocast, gradients reduced in fp32). Off: the weights are models.dtype with "
        "DeepSpeed's fp32 master copies. Allows zero_stage 0; costs 4 bytes per trained parameter of weights "
        "instead of 2 (docs/TRAINING.md, 'Precision')")
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer in backward (both models, non-reentrant): "
        "activation memory ~ one layer's instead of all layers'; ~1/3 more compute"
    )
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end)")
    checkpoints_to_keep: int = Field(
        2, ge=1, description="Ray Train checkpoints kept per phase (the newest): 2 keeps the one before the last, "
                             "to resume from when the last is damaged (a node lost mid-upload)")
    staging_dir: str | None = Field(
        None, description="local directory on every node where each rank writes its checkpoint (and, with "
        "object storage, the exported model) before it is uploaded; null: the system temp dir (TMPDIR, else "
        "/tmp). A 4B joint run at ZeRO-3 stages ~6 GB per rank, ~48 GB per 8-GPU node (wmss plan prints it): "
        "point it at a large local disk when /tmp is small")
    max_failures: int = Field(0, ge=-1)
    max_preemption_failures: int = Field(
        -1, ge=-1, description="node preemptions (a drained node: spot reclaim, pod eviction) Ray Train recovers "
        "from, counted apart from max_failures; -1: no limit. Each costs a restart from the just-in-time "
        "checkpoint saved when the drain was seen, never training progress")
    log_every: int = Field(10, ge=1)
    packing: bool = Field(
        False, description="pack each micro-batch's rows into one sequence (no padding; attention and labels "
        "never cross rows; same rows per step, same losses). Off by default because under sdpa/eager the "
        "packed mask is dense [L, L] over L = sum of the row lengths, which costs more attention than it saves "
        "on short CPU rows; on by choice with flash-attention (varlen) or long, unequal rows")
    ds_config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="deep-merged into the generated DeepSpeed config (expert knobs)"
    )
    lora: LoraConfig = LoraConfig()

    @field_validator("staging_dir")
    @classmethod
    def _staging_dir_is_local(cls, v: str | None) -> str | None:
        # tempfile writes there on each node: a URI or a path relative to a Ray worker's cwd makes no sense
        if v is not None and ("://" in v or not v.startswith("/")):
            raise ValueError(f"must be an absolute local directory (each node's own disk), got {v!r}")
        return v


class Phase0Config(ConfigSection):
    """Demo world only: brief pre-training of the base model M0."""

    steps: int = Field(300, ge=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=8, description="packed window length (capped by max_position_embeddings)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    log_every: int = Field(50, ge=1)
    num_threads: int = Field(0, ge=0, description="torch threads for phase 0; 0: every usable CPU (1 is faster on a busy machine)")


class ScalingConfig(ConfigSection):
    """``num_workers``: the Train workers (data-parallel ranks); ``[min, max]`` (stored as
    ``min_workers`` and ``num_workers`` = max) starts with what is free and resizes at restarts
    (Ray Train's elastic ``ScalingConfig(num_workers=(min, max))``; docs/TRAINING.md)."""

    num_workers: int = Field(1, ge=1)
    min_workers: int | None = Field(None, ge=1, description="elastic training: the fewest workers a run starts "
                                    "or continues with (num_workers is the most); null: exactly num_workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _workers_range(cls, data: Any) -> Any:
        # num_workers: [min, max] is the YAML spelling of min_workers + num_workers
        if isinstance(data, dict) and isinstance(data.get("num_workers"), (list, tuple)):
            pair = data["num_workers"]
            if len(pair) != 2 or not all(isinstance(v, int) for v in pair) or not 1 <= pair[0] <= pair[1]:
                raise ValueError(f"num_workers must be a number or [min, max] with 1 <= min <= max, got {list(pair)}")
            if data.get("min_workers") is not None:
                raise ValueError("give num_workers as [min, max] or min_workers, not both")
            data = {**data, "min_workers": pair[0], "num_workers": pair[1]}
        return data

    @model_validator(mode="after")
    def _min_le_max(self) -> "ScalingConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers {self.min_workers} is above num_workers {self.num_workers}")
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    @property
    def worker_counts(self) -> range:
        """Every world size a run may have: ``[min_workers, num_workers]``."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)
