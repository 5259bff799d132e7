"""Phase 1 (SFT) and phase 2B (WMSS) on Ray Train + DeepSpeed (docs/TRAINING.md): ``trainer``
(``train_phase``, the Ray edge), ``worker`` (one rank's step, plain code), ``pair``, ``dataset``,
``packing``, ``ds_config``, ``schedule``, ``checkpointing``, ``metrics``, ``validation``."""
