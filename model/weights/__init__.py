"""Weight files: safe reading, strict loading by key, the release format, prepacked inference
weights (and which layers to prepack, calibrated per machine), atomic writes. Imports nothing
else of ``model``."""
