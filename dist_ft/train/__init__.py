"""The distributed trainer: Accelerate + DDP or DeepSpeed ZeRO, freeze stages, checkpoints."""
