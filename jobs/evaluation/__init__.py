"""eval.py's library: Gen-1's metrics on edits of held-out procedural-world clips, in modes that
compare settings, sweep guidance and fidelity, and test prompts."""
