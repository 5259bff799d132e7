"""Models: ``tokenizer`` (the demo tokenizer), ``tiny`` (tiny Llama / Qwen3 from config),
``loading`` (safe HF loading, the weak/strong pair check, export, output head),
``zero3_loading`` (built under zero.Init, weights scattered), ``generate`` (greedy decoding),
``varlen`` (packed rows' boundaries for varlen attention kernels)."""
