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

#: The WMSS arms with a fake weak side (``mix.weak_source``, docs/CONTROLS.md): the study's arm
#: name, the ``mix.weak_source`` it sets and its label.
FAKE_WEAK_ARMS = {
    "wmss_uniform_weak": ("uniform", "WMSS-uniform-weak"),
    "wmss_entropy_matched_weak": ("entropy_matched", "WMSS-entropy-matched-weak"),
    "wmss_shuffled_weak": ("shuffled", "WMSS-shuffled-weak"),
}

#: Every arm a study (``wmss study``, ``study.arms``) can run, in the order its table lists them,
#: with its label: WMSS itself (the reference every other arm is paired with), the SFT arms and
#: the fake-weak WMSS arms. ``sft_matched_updates`` is SFT-continued (the equal-update control).
STUDY_ARM_LABELS = {
    "wmss": "WMSS",
    "sft_matched_updates": SFT_CONTINUED_LABEL,
    **CONTROL_ARM_LABELS,
    **{arm: label for arm, (_, label) in FAKE_WEAK_ARMS.items()},
}
