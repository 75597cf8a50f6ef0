"""Conditioning encoders loaded from Stable Diffusion checkpoints' own keys."""
