"""Shared pytest set-up: CPU only, deterministic, the repository root importable."""

import torch

torch.set_num_threads(max(1, torch.get_num_threads()))
