"""The equal-compute control's two names, one of each, used everywhere.

The control is SFT continued from M1 for exactly as many optimizer steps as WMSS took.
:data:`SFT_CONTINUED` is its identifier: the config key ``evaluation.sft_continued``, the
pipeline phase and its directory ``<run>/sft_continued/``, the sweep's shared control
``<run>/tune/sft_continued/``, the report's ``phases`` key and ``final.json``'s key.
:data:`SFT_CONTINUED_LABEL` is how it is shown: the evaluated model's name (``eval_SFT-continued.jsonl``),
report tables and plots, the sweep's table and page.
"""

SFT_CONTINUED = "sft_continued"
SFT_CONTINUED_LABEL = "SFT-continued"
