"""The controls' names, one of each, used everywhere: the equal-compute control and the arms.

The control is SFT continued from M1 for exactly as many optimizer steps as WMSS took.
:data:`SFT_CONTINUED` is its identifier: the config key ``evaluation.sft_continued``, the
pipeline phase and its directory ``<run>/sft_continued/``, the sweep's shared control
``<run>/tune/sft_continued/``, the report's ``phases`` key and ``final.json``'s key.
:data:`SFT_CONTINUED_LABEL` is how it is shown: the evaluated model's name (``eval_SFT-continued.jsonl``),
report tables and plots, the sweep's table and page.
"""

SFT_CONTINUED = "sft_continued"
SFT_CONTINUED_LABEL = "SFT-continued"

#: The control arms (``controls.arms``, docs/CONTROLS.md): each a phase and directory
#: ``<run>/<arm>/`` continuing SFT from M1, and the label its model is shown with.
CONTROL_ARM_LABELS = {
    "sft_matched_flops": "SFT-matched-FLOPs",
    "sft_higher_lr": "SFT-higher-LR",
    "sft_label_smoothing": "SFT-label-smoothing",
}
