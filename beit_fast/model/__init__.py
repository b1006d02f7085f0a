"""The BEiT model, its modules and FP8 training."""
