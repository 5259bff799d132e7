"""What ``benchmarks/gpu_check.py`` runs on: model shapes, the run configs, artifacts on disk.

Plain code, no Ray (the device machines carry no Ray): the training path is the project's own
:class:`~wmss_ray.training.worker.PhaseWorker`, the class each Ray Train worker wraps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
#: The shipped real-scale recipe; every run config of the check is this file plus overrides.
RECIPE = REPO / "configs" / "qwen3-4b-math.yaml"
#: Dense bf16 peak FLOP/s by device-name substring (H200 = H100 SXM's tensor cores).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
IGN = -100

_QWEN3 = dict(max_position_embeddings=40960, tie_word_embeddings=True)
SHAPES = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=9728, vocab_size=151936),
    # CPU smoke shapes (the figures mean nothing, every code path runs; head_dim 32: vLLM's CPU
    # attention rejects less)
    "tiny": dict(_QWEN3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=128, vocab_size=512, max_position_embeddings=512),
    "tiny-big": dict(_QWEN3, hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, intermediate_size=192, vocab_size=512, max_position_embeddings=512),
}


@dataclass
class Variant:
    """One training configuration timed by the check (``training.*`` overrides of the recipe)."""

    label: str
    mode: str  # "sft" | "frozen" | "joint"
    zero_stage: int
    checkpointing: bool
    packing: bool = True
    profile: bool = False  # also profile a few steps (torch.profiler)
    ds: tuple[str, ...] = ()  # "key.path=value" under training.ds_config_overrides (DeepSpeed's own knobs)
    attn: str = "sdpa"  # models.attn_implementation (FLASH: run only where flash-attn is installed)
    autocast: bool = False  # training.autocast: fp32 weights under bf16 autocast (the plain loop's precision)

    def overrides(self) -> list[str]:
        return [f"training.zero_stage={self.zero_stage}", f"training.gradient_checkpointing={self.checkpointing}",
                f"training.packing={self.packing}", f"mix.mode={'frozen' if self.mode == 'frozen' else 'joint'}",
                f"models.attn_implementation={self.attn}", f"training.autocast={self.autocast}",
                *(f"training.ds_config_overrides.{kv}" for kv in self.ds)]

    @property
    def knob(self) -> bool:
        """Changes one thing of a shipped step (DeepSpeed overrides, the attention kernel, autocast):
        printed against the variant it changes (``gpu_check_steps.knob_pairs``)."""
        return bool(self.ds) or self.attn != "sdpa" or self.autocast


#: DeepSpeed knobs measured against the shipped engine config (the H200 run found the step
#: host-bound: ~455 copies and 21-27 stream syncs per step). bf16 gradients: with grad_accum 1
#: nothing accumulates across micro-batches, and at ZeRO-1 DeepSpeed then runs its ZeRO optimizer
#: instead of BF16_Optimizer's per-parameter fp32 gradient copies (engine._do_optimizer_sanity_check);
#: the reduce over ranks is then bf16 too, which is why it is not the default (8 mantissa bits
#: summed over 64 ranks). Overlap: gradient reduction on a side stream into one contiguous buffer.
BF16_GRADS = ("data_types.grad_accum_dtype=bf16", "communication_data_type=bf16")
OVERLAP = ("zero_optimization.overlap_comm=true", "zero_optimization.contiguous_gradients=true")
#: flash-attention 2: packed rows through its varlen kernel with the packer's boundaries (no
#: block-diagonal mask: sdpa's packed step ran 0.80x its padded one on the H200). The GPU image
#: compiles it (Dockerfile); the device machines have none, so these variants are skipped, and said.
FLASH = "flash_attention_2"


#: The step matrix at the end-to-end shape. ZeRO-3 variants come last: DeepSpeed 0.19 keeps every
#: ZeRO-3 engine's module in a module-level list (``parameter_offload.FWD_MODULE_STACK``) after
#: ``destroy()``, so their memory is never freed in this process and would inflate later peaks.
VARIANTS = [
    Variant("sft z1", "sft", 1, False, profile=True),
    Variant("joint z1", "joint", 1, False),
    # the same full-length rows padded instead of packed: what packing's attention path costs
    Variant("sft z1 padded", "sft", 1, False, packing=False),
    Variant("sft z2", "sft", 2, False, profile=True),
    Variant("frozen z2", "frozen", 2, False),
    Variant("joint z2", "joint", 2, False),
    Variant("sft z2 ckpt", "sft", 2, True),
    Variant("frozen z2 ckpt", "frozen", 2, True),
    Variant("joint z2 ckpt", "joint", 2, True),
    # the engine's own overheads: the same SFT step with DeepSpeed's knobs turned
    Variant("sft z1 bf16 grads", "sft", 1, False, profile=True, ds=BF16_GRADS),
    Variant("sft z2 bf16 grads", "sft", 2, False, ds=BF16_GRADS),
    Variant("sft z2 overlap", "sft", 2, False, ds=OVERLAP),
    # the plain loop's precision (training.autocast): fp32 weights, gradients and AdamW, bf16 autocast
    # forward; no BF16_Optimizer master copies or per-parameter gradient copies. Stage 0 is the
    # plain loop inside DeepSpeed's engine (its ratio to the plain step is the engine's own cost).
    Variant("sft z0 autocast", "sft", 0, False, profile=True, autocast=True),
    Variant("sft z2 autocast", "sft", 2, False, autocast=True),
    Variant("joint z2 autocast", "joint", 2, False, autocast=True),
    Variant("frozen z2 ckpt autocast", "frozen", 2, True, autocast=True),
    # the attention kernel: packed rows through flash-attention's varlen kernel against sdpa's mask
    Variant("sft z1 flash", "sft", 1, False, attn=FLASH),
    Variant("joint z2 ckpt flash", "joint", 2, True, attn=FLASH),
    Variant("sft z3 ckpt", "sft", 3, True, profile=True),
    Variant("frozen z3 ckpt", "frozen", 3, True),
    Variant("joint z3 ckpt", "joint", 3, True),
]

#: The memory-and-speed shape (4B): the recipe's ZeRO-3 beside ZeRO-2, and WMSS frozen.
BIG_VARIANTS = [Variant("sft z2 ckpt", "sft", 2, True), Variant("frozen z2 ckpt", "frozen", 2, True),
                Variant("sft z3 ckpt", "sft", 3, True)]


@dataclass
class Setup:
    """Sizes and places of one check run."""

    device: torch.device
    root: str  # artifacts: models, tokenised rows
    shape: str  # the end-to-end shape
    big_shape: str  # the memory-and-speed shape
    seq_len: int
    micro_batch: int
    big_micro_batch: int
    warmup: int
    steps: int
    exact_steps: int
    loss_tokens: int
    loss_chunks: list[int]
    gen_batch: int
    gen_new_tokens: int
    variants: list[Variant] = field(default_factory=lambda: list(VARIANTS))
    big_variants: list[Variant] = field(default_factory=lambda: list(BIG_VARIANTS))
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def run_config(s: Setup, variant: Variant, micro_batch: int, grad_accum: int = 1, extra: list[str] = ()):
    """The recipe (configs/qwen3-4b-math.yaml) with this variant's knobs, validated as for a GPU run.

    On the CPU smoke run ``scaling.use_gpu`` is false and the dtype bf16 (ZeRO keeps it legal).
    """
    from wmss_ray.config.loading import load_config

    overrides = [*variant.overrides(), f"training.micro_batch_size={micro_batch}",
                 f"training.grad_accum={grad_accum}", f"data.max_seq_len={s.seq_len}", "training.warmup_ratio=0.0",
                 "training.min_lr_ratio=1.0", "training.lr=1e-4", "scaling.num_workers=1", "models.dtype=bfloat16",
                 *extra]
    if not s.on_gpu:
        overrides += ["scaling.use_gpu=false"]
    return load_config(RECIPE, overrides)


def build_model(shape: str, seed: int, device: torch.device):
    """A random-init Qwen3 causal LM of ``SHAPES[shape]`` in bf16 on ``device`` (seeded)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**SHAPES[shape], rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         use_cache=False, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    return model.to(torch.bfloat16)


def meta_model(shape: str):
    """The shape on the meta device (parameter counts, ``wmss plan`` figures; allocates nothing)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**SHAPES[shape], rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    with torch.device("meta"):
        return Qwen3ForCausalLM(config)


def save_model(shape: str, seed: int, out: str, device: torch.device) -> str:
    """Write a random model as an HF directory (safetensors) with the demo tokenizer (its pad id
    is all the worker reads; the rows below are token ids drawn below the model's vocabulary)."""
    from wmss_ray.models.tokenizer import build_demo_tokenizer

    model = build_model(shape, seed, device)
    model.save_pretrained(out)
    build_demo_tokenizer().save_pretrained(out)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def write_rows(out_dir: str, n: int, seq_len: int, vocab: int, seed: int, variable: bool) -> str:
    """``n`` tokenised rows as the tokenise stage writes them (``sample_id, input_ids, labels``).

    Fixed length (``variable`` false): every row ``seq_len`` tokens (the step matrix: no padding
    either way). Variable: lengths uniform in [seq_len/8, seq_len] (packing vs padding differ).
    The first quarter of each row is the prompt (labels -100).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(seq_len // 8, seq_len + 1)) if variable else seq_len
        ids = rng.integers(5, vocab, length).tolist()
        prompt = length // 4
        rows.append({"sample_id": f"r{i:06d}", "input_ids": ids, "labels": [IGN] * prompt + ids[prompt:]})
    os.makedirs(out_dir, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out_dir, "part-0.parquet"))
    return out_dir


def make_worker(s: Setup, variant: Variant, strong: str, weak: str | None, tokenized: str, n_steps: int,
                micro_batch: int, grad_accum: int = 1, out_dir: str | None = None, rank: int = 0, world: int = 1,
                device: torch.device | None = None):
    """The project's training rank ``rank`` of ``world`` (in this process's process group) for
    ``variant``; returns ``(worker, cfg)``."""
    import tempfile

    from wmss_ray.training.dataset import DataPlan, write_epoch_rows
    from wmss_ray.training.worker import PhaseSpec, PhaseWorker

    cfg = run_config(s, variant, micro_batch, grad_accum, extra=[f"scaling.num_workers={world}"])
    out_dir = out_dir or tempfile.mkdtemp(prefix="gpu-check-", dir=s.root)
    epoch_rows = os.path.join(out_dir, "epoch_rows.parquet")
    n = write_epoch_rows(tokenized, None, epoch_rows)
    plan = DataPlan(n, 1.0, 0, micro_batch, grad_accum, world, exact_steps=n_steps)
    phase = "sft" if variant.mode == "sft" else "wmss"
    spec = PhaseSpec(phase, variant.mode, strong, weak if variant.mode != "sft" else None, out_dir, tokenized,
                     epoch_rows, plan)
    return PhaseWorker(cfg, spec, rank, world, device or s.device), cfg


def free() -> None:
    """Collect what the caller dropped (engines hold reference cycles) and hand the cached device
    memory back, so that each variant's peak is its own."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def flops_per_token(n_params: int, shape: str, seq_len: float, trained: int, frozen: int) -> float:
    """Model FLOPs per token of ``shape`` (PaLM's MFU convention): the package's one formula,
    ``wmss_ray.training.controls.model_flops_per_token`` (the study's cost column uses it too)."""
    from wmss_ray.training.controls import model_flops_per_token

    c = SHAPES[shape]
    return model_flops_per_token(n_params, c["num_hidden_layers"], c["num_attention_heads"], c["head_dim"],
                                 seq_len, trained, frozen)
