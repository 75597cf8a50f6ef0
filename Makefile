# Two entry points: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench tiny-world tiny-sd

$(STAMP): pyproject.toml requirements-nodeps.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) demo.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest -q

bench: setup
	for script in $(filter-out bench/__init__.py bench/common.py bench/edit_profile.py,$(wildcard bench/*.py)); do \
		$(PY) $$script || exit 1; done

# Retrain the bundled tiny world model from scratch with train.py (about 3 h on 2 CPU
# cores; see bundle/tiny_world/CARD.md). Writes into bundle/tiny_world/ and outputs/tiny_world/.
W := bundle/tiny_world
R := outputs/tiny_world
tiny-world: setup
	$(PY) train.py experiment=tiny_vae hydra.run.dir=$(R)/vae
	$(PY) release.py $(R)/vae/checkpoints/last.ckpt $(W)/vae_tiny.safetensors --component vae
	$(PY) train.py experiment=tiny_depth hydra.run.dir=$(R)/depth
	$(PY) release.py $(R)/depth/checkpoints/last.ckpt $(W)/midas_tiny.safetensors --component depth
	$(PY) train.py experiment=tiny_clip hydra.run.dir=$(R)/clip
	$(PY) release.py $(R)/clip/checkpoints/last.ckpt $(W)/clip_tiny.safetensors --component clip
	$(PY) train.py experiment=tiny_world_image
	$(PY) train.py experiment=tiny_world_video
	$(PY) train.py experiment=tiny_world_video_mixed
	$(PY) release.py $(R)/video_mixed/checkpoints/last.ckpt $(W)/gen1_tiny_world.safetensors \
		--sampling noise_correlation=1.0
	$(PY) train.py experiment=tiny_prior hydra.run.dir=$(R)/prior
	$(PY) release.py $(R)/prior/checkpoints/last.ckpt $(W)/prior_tiny.safetensors --component prior

# Retrain the bundled tiny SD (text-to-image, SD's single-file layout) with train.py (about
# 40 min on 2 CPU cores; see bundle/tiny_sd/CARD.md) and measure it.
tiny-sd: setup
	$(PY) train.py experiment=tiny_sd
	$(PY) release.py outputs/tiny_sd/checkpoints/last.ckpt bundle/tiny_sd/tiny_sd.safetensors \
		--format sd
	$(PY) bench/tiny_sd.py
