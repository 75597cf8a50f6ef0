"""Metrics of edited videos: Gen-1's CLIP frame and prompt consistency, structure fidelity,
warp error with exact flow, sharpness."""
