"""A callback that stops a run for real after a given epoch (checkpoints written, as a kill between epochs leaves
them), for the tests that resume it."""

from __future__ import annotations

from cnnlab.trainer import Callback, StopTraining


class StopAfter(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, run, record):
        if record["epoch"] == self.epoch:
            raise StopTraining()
