"""Networks and diffusion math of the Gen-1 video model (no I/O, no Hydra)."""
