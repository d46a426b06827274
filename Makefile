# Shortcuts for the README's commands.
.PHONY: install demo test data

install:
	pip install -e ".[dev]"

demo: install
	accelerate launch --config_file accelerate_config.yaml training/train_ldm.py

test: install
	pytest

data:
	python -m ldm.synthetic data/shapes --num_images 512
