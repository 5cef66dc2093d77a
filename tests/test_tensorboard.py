"""TensorBoard, the tracker without an account: the run folder's event files read back with TensorBoard's own
reader (`EventAccumulator`)."""

from __future__ import annotations

import pytest
import tensorboard  # noqa: F401 - declared in dev: an import error fails the run, never skips the file

import cnnlab
from cnnlab.io import read_jsonl


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow
def test_scalars_hyperparameters_and_the_evaluations_figures_reach_tensorboard(tiny_cfg):
    run = cnnlab.train(tiny_cfg(tensorboard=True, epochs=3, name="tb"), progress=False, log=None)
    evaluation = run.evaluate(progress=False, log=None, device="cpu")
    explanation = run.explain(progress=False, log=None, neurons=2, per_neuron=1)
    tb = events(run.folder / "tensorboard")
    epochs = read_jsonl(run.folder / "metrics.jsonl")
    val_acc = [(e.step, e.value) for e in tb.Scalars("val_acc")]
    assert val_acc == [(r["epoch"], pytest.approx(r["val_acc"])) for r in epochs]
    assert [e.value for e in tb.Scalars("train_loss")] == pytest.approx([r["train_loss"] for r in epochs])
    [test_acc] = tb.Scalars("test_acc")
    assert test_acc.value == pytest.approx(evaluation.accuracy) and test_acc.step == evaluation["checkpoint_epoch"]
    images = set(tb.Tags()["images"])
    assert {"test/predictions", "test/confusion", "test/reliability"} <= images
    assert {f"explain/{name}" for name in explanation.figures} <= images
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(tb.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams  # what the HPARAMS tab shows for this run
    assert hparams["filters"].number_value == 8 and hparams["activation"].string_value == run.config.activation
    best = max(tb.Scalars("hparam/best_val_acc"), key=lambda e: e.step).value
    assert best == pytest.approx(run.best_val_acc)


def test_tensorboard_is_off_unless_asked(tiny_cfg):
    run = cnnlab.train(tiny_cfg(epochs=1, name="plain"), progress=False, log=None)
    assert not (run.folder / "tensorboard").exists()
