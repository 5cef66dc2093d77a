"""A model that leaves cnnlab: ONNX through onnxruntime, and TorchScript, give the PyTorch model's logits."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime  # noqa: F401 - declared in dev: an import error fails the run, never skips the file
import pytest
import torch

import cnnlab
from cnnlab.cli import main


def eager_logits(checkpoint, arrays):
    """What cnnlab's own predict computes: the checkpoint's transform, model and TTA, in fp32."""
    from cnnlab.data import ImageTransform
    from cnnlab.evaluate import load_model, predict_logits

    loaded = load_model(checkpoint, torch.device("cpu"))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    y = torch.zeros(len(arrays), dtype=torch.long)
    return predict_logits(loaded.model, [(x, y)], ImageTransform(loaded.pre, loaded.cfg.channels_last),
                          torch.device("cpu"), None, loaded.cfg.tta)[0].numpy()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # the test's own reading
@pytest.mark.parametrize("model", [
    {"model": "smallcnn"},
    {"model": "resnet18", "weights": "random", "finetune": "head", "augment": False},  # a pretrained architecture
], ids=["smallcnn", "resnet18"])
def test_onnx_and_torchscript_logits_equal_pytorch_on_real_jpegs(tiny_data, tmp_path, model):
    from cnnlab.data.decode import load_rgb

    run = cnnlab.train(data=str(tiny_data), image_size=32, filters=8, dense_units=32, batch_size=16, epochs=1,
                       out=str(tmp_path / "runs"), cache_dir=str(tmp_path / "c"), decode_workers=1, precision="fp32",
                       name="r", log=None, **model)
    onnx_path = run.export("onnx")
    classifier = cnnlab.load(onnx_path)
    assert classifier.classes == json.loads(classifier.metadata["cnnlab.classes"]) and len(classifier.classes) == 10
    assert classifier.pre.image_size == 32 and "uint8" in classifier.metadata["cnnlab.input"]
    paths = sorted((tiny_data / "val").rglob("*.jpg"))[:7]
    arrays = [load_rgb(str(p), 32, classifier.pre.crop, classifier.pre.interpolation) for p in paths]
    want = eager_logits(run.best_checkpoint, arrays)
    assert np.abs(classifier.logits(np.stack(arrays)) - want).max() < 1e-4  # a batch of 7
    assert np.abs(classifier.logits(np.stack(arrays[:1])) - want[:1]).max() < 1e-4  # dynamic batch: 1
    ts_path = run.export("torchscript")
    extra = {"cnnlab.json": ""}
    scripted = torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["cnnlab.json"])["cnnlab.classes"] == classifier.metadata["cnnlab.classes"]
    with torch.no_grad():
        got = scripted(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert [r["top"][0]["class"] for r in classifier.predict(paths)] == [r["top"][0]["class"] for r in run.predict(paths)]


def test_cnnlab_export_and_predict_model_onnx(tiny_cfg, tiny_data, tmp_path, capsys):
    from cnnlab.training import fit

    run = fit(tiny_cfg(epochs=1, precision="fp32"), progress=False, log=lambda s: None)
    assert main(["export", str(run.run_dir), "--out", str(tmp_path / "m.onnx"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "parity: m.onnx's logits agree with PyTorch's on cpu to " in out
    photo = next((tiny_data / "val" / "circle").iterdir())
    assert main(["predict", str(tmp_path / "m.onnx"), str(photo), "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert main(["predict", str(run.run_dir), str(photo), "--json"]) == 0
    from_torch = json.loads(capsys.readouterr().out)
    assert [t["class"] for t in from_onnx[0]["top"]] == [t["class"] for t in from_torch[0]["top"]]
    assert from_onnx[0]["top"][0]["prob"] == pytest.approx(from_torch[0]["top"][0]["prob"], abs=1e-5)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["predict", str(tmp_path / "junk.onnx"), str(photo)]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_export_checks_the_file_against_the_checkpoint_and_refuses_a_wrong_one(tiny_cfg, tmp_path):
    """The parity check export runs: the file's logits against the checkpoint's in PyTorch. Another run's weights
    in the file (what a wrong export would give) are refused in one line; its own agree to rounding."""
    from cnnlab.errors import CnnlabError
    from cnnlab.export import check_parity, export_model
    from cnnlab.training import fit

    a = fit(tiny_cfg(epochs=1, name="a"), progress=False, log=lambda s: None).run_dir
    b = fit(tiny_cfg(epochs=1, name="b", seed=1), progress=False, log=lambda s: None).run_dir
    for fmt in ("onnx", "torchscript"):
        path = export_model(a / "best.pt", tmp_path / f"a.{fmt}", fmt)
        assert check_parity(path, a / "best.pt", torch.device("cpu")) < 1e-4
        with pytest.raises(CnnlabError, match=r"its logits differ from .*b/best.pt's in PyTorch on cpu by .*the export is wrong"):
            check_parity(path, b / "best.pt", torch.device("cpu"))
