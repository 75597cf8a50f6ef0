"""Conditioning encoders, all frozen at training time: MiDaS depth and the structure input made
from it, open_clip image/text embedders, and the text-to-image-embedding prior."""
