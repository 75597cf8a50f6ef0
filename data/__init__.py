"""Training data: video clips (decord or PyAV), image sets, the procedural world, the DataModule.

Every dataset yields samples of one format (a dict): ``frames`` (F, 3, H, W) float32 in
[-1, 1], ``caption`` (str), ``is_video`` (bool), ``key`` (str) and, where known exactly,
``depth`` (F, 1, H, W) inverse depth and ``flow`` (F - 1, 2, H, W) forward motion in pixels.
"""
