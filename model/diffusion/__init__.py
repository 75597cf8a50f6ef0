"""Diffusion math in k-diffusion's convention: SD's discrete schedule, noise, the training
loss, samplers over a denoiser of sigma, Gen-1's guidance, overlapping temporal windows."""
