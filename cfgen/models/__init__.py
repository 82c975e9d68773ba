"""Models: loading diffusers checkpoints by path, the noise-aware classifier, training."""
