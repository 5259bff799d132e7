"""The cost columns of a study arm: optimizer updates, supervised and input tokens, training FLOPs,
wall time, GPU-hours and peak memory of the arm's training phase, from what the phase wrote.

FLOPs: ``tokens x model_flops_per_token(N, L, H, d, T, trained, frozen)``
(``training/controls.py``, the GPU check's formula), ``T`` the phase's mean row length (input
tokens / rows trained), ``N`` the parameters in the arm's exported model (the safetensors headers:
nothing is loaded), and ``trained, frozen`` by the arm's kind: SFT (1, 0), frozen WMSS (1, 1),
joint (2, 0), the uniform fake weak side (1, 0). The scoring pass the WMSS arms need for their
curriculum (two forwards over the corpus, shared by every WMSS arm of a seed) is not in it: the
matched-FLOPs arm matches the training phases, as the issue defines it.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_params(model_dir: str) -> int:
    """Parameters stored in ``model_dir``'s safetensors files (each tensor once: a tied embedding is
    stored once), read from the files' headers only (8 bytes of length, then a JSON header)."""
    index = storage.join(model_dir, SAFETENSORS_INDEX)
    if storage.exists(index):
        files = sorted(set(json.loads(storage.read_text(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    total = 0
    for name in files:
        with storage.open_input(storage.join(model_dir, name)) as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= int(d)
                total += count
    return total


def model_shape(model_dir: str) -> dict[str, int]:
    """``{n_params, layers, heads, head_dim}`` of the model exported in ``model_dir``."""
    c = json.loads(storage.read_text(storage.join(model_dir, "config.json")))
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    return {"n_params": safetensors_params(model_dir), "layers": int(c["num_hidden_layers"]), "heads": heads,
            "head_dim": head_dim}


def training_flops(shape: dict[str, int], tokens: float, rows: float, trained: int, frozen: int) -> float:
    """FLOPs of a phase that trained ``tokens`` input tokens in ``rows`` rows (see the module doc)."""
    from wmss_ray.training.controls import model_flops_per_token

    if not rows or not tokens:
        return 0.0
    per_token = model_flops_per_token(shape["n_params"], shape["layers"], shape["heads"], shape["head_dim"],
                                      tokens / rows, trained, frozen)
    return float(tokens) * per_token


def arm_costs(cfg: WMSSConfig, run: Any) -> dict[str, Any]:
    """The cost columns of arm ``run`` (a ``study.arms.ArmRun``) trained with ``cfg``."""
    from wmss_ray.io.manifest import read_manifest
    from wmss_ray.stages.timings import phase_resources
    from wmss_ray.training.controls import trained_and_frozen
    from wmss_ray.training.costs import phase_costs

    costs = dict(phase_costs(run.phase_dir))
    man = read_manifest(run.phase_dir)
    model_dir = ((man.outputs if man is not None else None) or {}).get("model_dir")
    kind = "wmss" if run.phase.startswith("wmss_") else "sft"
    trained, frozen = trained_and_frozen(kind, cfg.mix.mode, cfg.mix.weak_source)
    rows = (costs.get("updates") or 0) * cfg.global_batch()
    costs["flops"] = (training_flops(model_shape(model_dir), costs.get("tokens") or 0, rows, trained, frozen)
                      if model_dir else None)
    gpus = phase_resources(run.phase, cfg.to_dict()).get("GPU", 0.0)
    costs["gpu_hours"] = costs["seconds"] * gpus / 3600.0 if costs.get("seconds") is not None else None
    return costs
