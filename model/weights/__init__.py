"""Weight files: safe reading, strict loading by key, the release format, prepacked inference
weights and atomic writes. Imports nothing else of ``model``."""
