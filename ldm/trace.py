"""The per-step trace of a training run, `train_log.jsonl`: two runs compared step by step.

One JSON line per optimizer step: the step's logs (loss, LR, skipped updates), a digest of the
captions this process trained on and the data-set indices of every process's samples. A resumed
run drops the lines after its checkpoint: it does those steps again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class StepTrace:
    """`add` each micro-batch, `write` at each optimizer step. Only the process with `enabled`
    (the main one) touches the file; every process may call both."""

    def __init__(self, path: str | Path, *, resumed_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled:  # a fresh run starts an empty trace; a resumed one keeps steps <= its checkpoint's
            lines = self.path.read_text().splitlines() if resumed_step is not None and self.path.exists() else []
            kept = [line for line in lines if json.loads(line)["step"] <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._reset()

    def _reset(self) -> None:
        self.samples = hashlib.sha1()

    def add(self, captions: list[str]) -> None:
        """One micro-batch: this process's captions."""
        self.samples.update(json.dumps(captions).encode())

    def write(self, step: int, logs: dict, indices: list[int]) -> None:
        """The line of optimizer step `step` with every process's sample indices; starts the next step's record."""
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, **logs, "samples": self.samples.hexdigest()[:16],
                                     "indices": indices}) + "\n")
        self._reset()
