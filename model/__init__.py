"""The Gen-1 model library: networks, diffusion math, weight files, editing and training.

Packages, bottom to top (a package imports only those listed before it):

- ``weights``: reading weight files safely, strict loading by key, the release format,
  oneDNN-prepacked inference weights calibrated per machine, atomic writes.
- ``diffusion``: noise schedule, noise, training loss, samplers, guidance, temporal windows.
- ``nets``: the denoiser's networks: SD's UNet with temporal layers, its blocks, the VAE.
- ``encoders``: what conditions the denoiser: MiDaS depth and the structure made from it,
  CLIP image/text embeddings, the text-to-image-embedding prior.
- ``metrics``: scores of edited videos (Gen-1's CLIP metrics, structure fidelity, warp error).
- ``sd``: Stable Diffusion checkpoints as users have them (single files, their yaml or their
  keys) as one image model the editing pipeline runs.
- ``editing`` and ``training``: the editing pipeline and its methods; the Lightning modules.
  Neither imports the other.

Nothing here imports ``data/`` or the entry points, and nothing reads Hydra configs.
"""
