"""Write videos and images into WebDataset tar shards: ``python shard.py videos.root=DIR
[images.root=DIR] output=DIR [encode=true model=...] [trainer=...]``.

Composes ``configs/shard.yaml``, then ``jobs.shards``: the files of a folder or manifest go
into ``<kind>-RRR-NNNNN.tar`` shards with an index (``videos.json``, ``images.json``) that
``data=shards`` reads. ``encode=true`` stores the frozen encoders' outputs instead of the
files (``data=shards_encoded``). It runs as a Lightning predict job, so ``trainer=ddp`` on
N nodes shards a large dataset on a cluster. A config that cannot work is one line on
stderr and exit status 1.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from jobs.overrides import SHARD_PATHS, quote_path_overrides
from jobs.shards import run
from jobs.training import config_error_line


@hydra.main(version_base="1.3", config_path="configs", config_name="shard")
def main(cfg: DictConfig) -> None:
    """Write the shards ``cfg`` describes; a config error is one line and exit status 1."""
    try:
        run(cfg)
    except Exception as err:
        line = config_error_line(err)
        if line is None:
            raise
        print(f"shard.py: error: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.argv = quote_path_overrides(sys.argv, SHARD_PATHS)  # file names as typed in a shell
    main()
