"""The denoiser's networks in Stable Diffusion's key layout: the UNet (optionally a video UNet
with temporal layers), its blocks and attention, and the VAE."""
