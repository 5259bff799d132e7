"""``wmss plan``: the GPU memory (and local disk) a config needs, per GPU, before anything is
launched. ``shapes`` reads a model's shape from its ``config.json``, ``memory`` turns shapes and
settings into bytes (one function per term, each formula where it is computed), ``report``
prints the table and what to change. docs/TRAINING.md, "The memory picture".

The names below are the module's interface (``wmss_ray.cli.main``, ``benchmarks/``, tests).
"""

from wmss_ray.plan.activations import activation_bytes, layer_saved_bytes  # noqa: F401
from wmss_ray.plan.memory import (  # noqa: F401 - re-exported
    COMPONENTS,
    OVERHEAD_BYTES,
    GiB,
    GpuModel,
    gradient_bucket_bytes,
    is_half,
    lora_params,
    model_state_bytes,
    phase_bytes,
    pool_actor_bytes,
    shares_base,
    staging_bytes,
    train_gpu_models,
    validation_peak,
)
from wmss_ray.plan.report import format_plan, parse_memory, suggestions  # noqa: F401
from wmss_ray.plan.shapes import ModelShape, model_shape, shape_from_model  # noqa: F401
