"""Stable Diffusion checkpoints as users have them: single ``.safetensors`` / ``.ckpt`` files in
the original (LDM) key layout, described by SD's own inference ``.yaml`` beside them or
recognised from their keys, loaded strictly into one image model that the editing pipeline
runs. Reads weight files; no Hydra, no media I/O."""
