"""Tiny components built by the tests themselves (no hub access), shared across the suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Under pytest-xdist every worker, and every training or sampling process a test starts, gets
# its share of the cores: by default each would take all of them, and OpenMP threads that
# outnumber the cores spin against each other (8 training steps: 6 s at 1 thread, 20 s at 2,
# with the other core busy). Subprocesses inherit both variables (LDM_CPU_THREADS: the
# training scripts' --cpu_threads default, ldm/runtime.py).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _SHARE = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", _SHARE)
    os.environ.setdefault("LDM_CPU_THREADS", _SHARE)

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The longest test (every README and docs command, one after another, ~5 min) runs first: under
# pytest-xdist a worker that picks it up last keeps the run going alone while the other idles.
LONGEST_FIRST = ("tests/test_readme.py::test_every_readme_command_runs",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid not in LONGEST_FIRST)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_components():
    from ldm.models import build_components
    from ldm.presets import model_preset

    return build_components(model_preset("tiny"), seed=0)


def make_pipeline(components, sampler: str = "ddim"):
    from ldm.schedulers import make_sampler
    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline(vae=components.vae, text_encoder=components.text_encoder,
                               tokenizer=components.tokenizer, unet=components.unet,
                               scheduler=make_sampler(sampler, components.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def tiny_pipe(tiny_components):
    return make_pipeline(tiny_components)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tiny_components, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    make_pipeline(tiny_components, "dpm++").save_pretrained(folder)
    return folder
