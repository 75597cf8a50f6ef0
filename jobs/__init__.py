"""What the entry points run, as functions of their composed config: reading and writing
files, loading models, reporting. Imports ``model`` and ``data``; only the entry points (and
tests) import it."""
