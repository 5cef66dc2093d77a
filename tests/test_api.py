"""The public Python API: what a notebook or script calls, and what the CLI's commands are built on."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cnnlab


def tiny(tiny_data, tmp_path, **kw):
    return {**dict(data=str(tiny_data), image_size=32, filters=8, dense_units=32, batch_size=16, epochs=2,
                   out=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), decode_workers=1, precision="fp32"),
            **kw}


def test_import_cnnlab_defers_torch_and_lists_its_names():
    code = "import sys, cnnlab; print('torch' in sys.modules); print(sorted(cnnlab.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "False"  # the API is imported on first use
    for name in ("train", "load", "sweep", "compare", "Run", "ConfigError"):
        assert name in out[1]
        assert callable(getattr(cnnlab, name))


def test_train_evaluate_predict_explain_from_python(tiny_data, tmp_path):
    run = cnnlab.train(**tiny(tiny_data, tmp_path, name="api"), log=None)
    assert run.status == "completed" and run.folder == tmp_path / "runs" / "api"
    assert [r["epoch"] for r in run.history] == [1, 2]
    import torch

    best = torch.load(run.folder / "best.pt", weights_only=True)  # the checkpoint's own record of its epoch
    assert run.best_val_acc == run.history[best["epoch"] - 1]["val_acc"] == best["best_val_acc"]
    assert run.config.filters == 8
    evaluation = run.evaluate(log=None)
    # the test accuracy against another path to it: each test file predicted on its own, its folder the truth
    files = sorted((tiny_data / "val").rglob("*.jpg"))
    predicted = run.predict(files, top=1)
    hits = sum(p["top"][0]["class"] == f.parent.name for p, f in zip(predicted, files))
    assert evaluation["images"] == len(files) == 40 and evaluation.accuracy == hits / 40
    assert "test accuracy" in str(evaluation) and "<img" in evaluation._repr_html_()
    photo = next((tiny_data / "val" / "circle").iterdir())
    as_file, as_image, as_array = run.predict([photo, Image.open(photo), np.asarray(Image.open(photo).convert("RGB"))])
    assert as_file["top"][0]["class"] == as_image["top"][0]["class"] == as_array["top"][0]["class"]
    assert as_file["top"][0]["prob"] == pytest.approx(as_image["top"][0]["prob"], abs=0.02)  # JPEG draft mode
    assert run.predict(photo, top=2)[0]["top"].__len__() == 2
    assert "error" in run.predict([np.zeros((4, 4, 5), np.uint8)])[0]  # a bad array is one error entry
    explanation = run.explain(neurons=2, per_neuron=1, log=None)
    assert all(p.exists() for p in explanation.figures.values())
    fig = run.plot()
    assert type(fig).__name__ == "Figure"
    assert "val_acc" in run._repr_html_()
    again = cnnlab.load(run.folder)
    assert again.history == run.history and cnnlab.load(run.folder / "last.pt").best_checkpoint.name == "last.pt"


def test_bad_keywords_raise_the_cli_s_errors(tiny_data, tmp_path):
    with pytest.raises(cnnlab.ConfigError, match="activation='swish': expected one of"):
        cnnlab.train(**tiny(tiny_data, tmp_path), activation="swish")
    with pytest.raises(cnnlab.ConfigError, match="unknown key 'epoch'"):
        cnnlab.train(**tiny(tiny_data, tmp_path), epoch=3)
    with pytest.raises(cnnlab.DataError):
        cnnlab.train(**{**tiny(tiny_data, tmp_path), "data": str(tmp_path / "none")})


def test_a_keyboard_interrupt_ends_training_with_the_run_resumable(tiny_data, tmp_path):
    from cnnlab.trainer import Callback

    class StopButton(Callback):  # what a notebook's stop button does: KeyboardInterrupt in the running cell
        def on_epoch_end(self, run, record):
            if record["epoch"] == 1:
                raise KeyboardInterrupt

    run = cnnlab.train(**tiny(tiny_data, tmp_path, name="stopped", epochs=3), callbacks=[StopButton()], log=None)
    assert run.status == "interrupted" and len(run.history) == 1 and (run.folder / "last.pt").exists()
    resumed = cnnlab.train(resume=run.folder, log=None)
    assert resumed.status == "completed" and [r["epoch"] for r in resumed.history] == [1, 2, 3]
    with pytest.raises(KeyboardInterrupt):
        cnnlab.train(**tiny(tiny_data, tmp_path, name="cli", epochs=2), callbacks=[StopButton()], log=None,
                     raise_interrupt=True)


def test_sweep_and_compare_from_python(tiny_data, tmp_path):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "py", "method": "grid", "parameters": {
        "dense_units": {"values": [8, 16]}, "epochs": {"value": 1}}}))
    base = tiny(tiny_data, tmp_path)
    base.pop("out")
    swept = cnnlab.sweep(path, sweeps_dir=tmp_path / "sw", log=None, **base)
    assert swept.result.complete == 2 and len(swept.trials) == 2
    assert isinstance(swept.best, cnnlab.Run) and swept.best.history
    assert swept.report().name == "index.html"
    table = cnnlab.compare([t["run_dir"] for t in swept.trials], tmp_path / "cmp")
    assert table["plot"].exists() and "trial-0000" in table["markdown"]


def test_no_submodule_shadows_a_public_name():
    """Importing cnnlab.X sets the package's attribute X: a module named like a function (train, sweep, ...)
    would replace that function once anything imported it."""
    import importlib
    import pkgutil
    import types

    for info in pkgutil.walk_packages(cnnlab.__path__, "cnnlab."):
        importlib.import_module(info.name)
    for name in cnnlab.__all__:
        assert not isinstance(getattr(cnnlab, name), types.ModuleType), name
