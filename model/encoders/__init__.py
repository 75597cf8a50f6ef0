"""Conditioning encoders, all frozen at training time: MiDaS depth and the structure input made
from it, open_clip image/text embedders, the text-to-image-embedding prior, and Stable
Diffusion's own text encoders with their tokenizer (SD 1.x CLIP ViT-L/14, SD 2.x OpenCLIP
ViT-H/14)."""
