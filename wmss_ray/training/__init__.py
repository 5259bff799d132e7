"""Phase 1 (SFT) and phase 2B (WMSS) on Ray Train + DeepSpeed (docs/TRAINING.md): ``trainer``
(``train_phase``, the driver), ``ray_worker`` (the function Ray Train runs), ``backend`` (its
process group, set up without torch in the controller), ``rank_loop`` (one
rank's phase, plain code), ``worker`` (one rank's step), ``pair``, ``dataset``, ``packing``,
``ds_config``, ``schedule``, ``checkpointing``, ``metrics``, ``validation``."""
