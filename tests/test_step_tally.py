"""The training step's one host read (ldm/step_tally.py), against answers worked out by hand."""

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.step_tally import StepTally


def no_gather(_):
    raise AssertionError("a single process gathers nothing")


def test_a_finite_step_reports_the_mean_loss_and_the_indices():
    tally = StepTally("cpu")
    tally.add(torch.tensor(0.5), [3, 1])
    tally.add(torch.tensor(1.5, dtype=torch.float64), [7, 2])  # a second micro-batch (gradient accumulation)
    report = tally.read(1, no_gather, torch.tensor(0.3), stop=False)
    assert report.update and report.loss == 1.0 and report.indices == [3, 1, 7, 2] and not report.stop
    again = tally.read(1, no_gather, torch.tensor(0.3), stop=True)  # read resets the tally
    assert again.loss == 0.0 and again.indices == [] and again.stop


def test_a_non_finite_loss_or_gradient_norm_skips_the_update():
    tally = StepTally("cpu")
    tally.add(torch.tensor(2.0), [0])
    tally.add(torch.tensor(float("nan")), [1])
    report = tally.read(1, no_gather, torch.tensor(0.3), stop=False)
    assert not report.update and report.loss == 2.0  # the finite micro-batch's loss
    tally.add(torch.tensor(float("inf")), [0])
    assert tally.read(1, no_gather, None, stop=False).loss == 0.0
    for norm in (float("nan"), float("inf")):
        tally.add(torch.tensor(2.0), [0])
        assert not tally.read(1, no_gather, torch.tensor(norm), stop=False).update
    tally.add(torch.tensor(2.0), [0])  # None: the norm is not a criterion (fp16's scaler, DeepSpeed)
    assert tally.read(1, no_gather, None, stop=False).update


def fake_gather(others):
    """`accelerator.gather` as seen by process 0 of len(others) + 1: its tensor, then the others'."""
    def gather(local):
        assert local.dtype == torch.float64
        return torch.cat([local, *others])
    return gather


def test_several_processes_agree_and_interleave_their_indices_by_micro_batch():
    # process 1's tally, as process 0 would receive it: micro-batches [10, 11] and [12, 13], a NaN in the second
    other = StepTally("cpu")
    other.add(torch.tensor(4.0), [10, 11])
    other.add(torch.tensor(float("nan")), [12, 13])
    sent = []
    other.read(2, lambda local: sent.append(local) or torch.cat([local, local]), None, stop=True)
    tally = StepTally("cpu")
    tally.add(torch.tensor(1.0), [0, 1])
    tally.add(torch.tensor(3.0), [2, 3])
    report = tally.read(2, fake_gather(sent), torch.tensor(0.1), stop=False)
    assert not report.update  # process 1's NaN skips the update everywhere
    assert report.stop  # process 1 was signalled
    assert report.loss == (1.0 + 3.0 + 4.0) / 3
    assert report.indices == [0, 1, 10, 11, 2, 3, 12, 13]  # micro-batch by micro-batch, process by process


def test_large_sample_indices_survive_the_gather_exactly():
    big = 2**40 + 7  # beyond float32's 2**24
    other = StepTally("cpu")
    other.add(torch.tensor(1.0), [big + 1])
    sent = []
    other.read(2, lambda local: sent.append(local) or torch.cat([local, local]), None, stop=False)
    tally = StepTally("cpu")
    tally.add(torch.tensor(1.0), [big])
    report = tally.read(2, fake_gather(sent), torch.tensor(0.0), stop=False)
    assert report.update and report.indices == [big, big + 1] and math.isclose(report.loss, 1.0)


def test_a_skipped_fp16_step_is_closed_by_the_scalers_update():
    """The loop's fp16 path: `clip_gradients` has unscaled a step whose loss is NaN; the update is
    skipped, and the grad scaler's `update()` (what the loop calls then) lowers the scale and lets
    the next step unscale again (without it, torch refuses a second `unscale_`)."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.ones(3, 2)
    scaler.scale(model(x).sum() * float("nan")).backward()
    scaler.unscale_(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    assert scaler.get_scale() == 2.0**7
    before = model.weight.detach().clone()
    scaler.scale(model(x).sum()).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.weight, before)


# --------------------------------------------------------------------------- the loop, end to end
READ_COUNTER = """
import json, os, sys, torch
import ldm.step_tally as st
ROOT = os.path.dirname(os.path.abspath(st.__file__)).rsplit(os.sep, 1)[0]
EVENTS = []
def _where():
    # the data loader itself, or the innermost function of ours on the stack (file:function)
    caller = f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(os.path.join(ROOT, "ldm")) or name.startswith(os.path.join(ROOT, "training")):
            break
        f = f.f_back
    ours = "elsewhere" if f is None else os.path.basename(f.f_code.co_filename) + ":" + f.f_code.co_name
    data_loading = os.path.join("torch", "utils", "data") in caller.f_code.co_filename
    return "torch.utils.data" if data_loading else ours
def _counted(name, orig):
    def read(self, *a, **k):
        EVENTS.append(_where())
        return orig(self, *a, **k)
    return read
for _name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
    setattr(torch.Tensor, _name, _counted(_name, getattr(torch.Tensor, _name)))
_read = st.StepTally.read
def _tally_read(self, *a, **k):
    EVENTS.append("STEP")
    return _read(self, *a, **k)
st.StepTally.read = _tally_read
import atexit
atexit.register(lambda: open(os.environ["READS_OUT"], "w").write(json.dumps(EVENTS)))
"""

# Reads of values that live on the host on any device: the data loader's shuffle, CPU-generator
# draws (caption choice, tags and dropout), the gradient-norm check `clip_gradients` makes on a
# plain CPU run only, and the step's one read.
HOST_ONLY = {"torch.utils.data", "data.py:pick_caption", "text.py:drop_captions", "captions.py:tag_captions",
             "training_run.py:clip_gradients"}


@pytest.mark.slow
def test_between_two_optimizer_steps_the_loop_reads_nothing_from_the_device(tmp_path):
    """Every tensor read (`.item()`, `.tolist()`, `bool()`, ...) made while training, attributed to
    the innermost function of ours on the stack. On a GPU each such read waits for the queue to
    empty; the loop's only one is the step's `StepTally.read` (benchmarks/gpu_suite.py counts the
    syncs themselves with torch's sync debug mode)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "reads.json"
    code = (f"import sys; sys.path.insert(0, {str(root)!r})\n{READ_COUNTER}\n"
            "import training.train_ldm as t\nt.main(sys.argv[1:])")
    args = ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "6", "--train_batch_size", "4",
            "--builtin_num_images", "24", "--validation_steps", "0", "--num_validation_images", "0",
            "--eval_images_per_case", "0", "--report_to", "none", "--caption_dropout", "0.3",
            "--gradient_accumulation_steps", "2", "--snr_gamma", "5"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "READS_OUT": str(out)}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = json.loads(out.read_text())
    marks = [i for i, e in enumerate(events) if e == "STEP"]
    assert len(marks) == 6  # one read per optimizer step (two micro-batches each)
    # from step 1's read to step 5's: the start-up before step 1 and the end of the run after the last step left out
    between = [e for a, b in zip(marks, marks[1:-1]) for e in events[a + 1:b]]
    counts = collections.Counter(e for e in between if e not in HOST_ONLY)
    assert counts == {"step_tally.py:read": 4}, counts
    assert "data.py:pick_caption" in between or "text.py:drop_captions" in between  # the counter does count
