import json

import pytest
import torch
from PIL import Image
from torch import nn

from cnnlab.cli import main
from cnnlab.evaluate import classification_metrics, wilson_interval
from cnnlab.explain import guided, guided_backprop
from cnnlab.training import fit


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.SiLU, nn.Mish])
def test_guided_backprop_equals_the_hand_computed_value(act):
    """x (two pixels) -> 1x1 conv to 2 channels (w = 2, 1) -> act -> 1x1 conv (v = 1, -0.5); the target is the
    output's spatial maximum, at pixel 0 (x = 1), where both hidden units are positive (2 and 1). The plain
    gradient there is 2*act'(2) - 0.5*act'(1) (1.5 for ReLU). Guided backprop drops the negative gradient
    (-0.5) arriving at unit 2 and the activation's derivative: 2 * 1 = 2. Pixel 1 (x = -2): gated shut, 0."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), act(), nn.Conv2d(2, 1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([2.0, 1.0]).view(2, 1, 1, 1))
        model[2].weight.copy_(torch.tensor([1.0, -0.5]).view(1, 2, 1, 1))
    x = torch.tensor([1.0, -2.0]).view(1, 1, 1, 2)
    g = guided_backprop(model, x, model[2], channel=0)
    assert torch.allclose(g, torch.tensor([2.0, 0.0]).view(1, 1, 1, 2))
    plain_x = x.clone().requires_grad_(True)
    model(plain_x)[0, 0, 0, 0].backward()
    assert not torch.allclose(plain_x.grad[0, 0, 0, 0], torch.tensor(2.0))  # guided really differs
    with guided(model):
        assert type(model[1]).__name__ == "GuidedActivation"
    assert isinstance(model[1], act)  # restored


def test_wilson_interval_and_metrics_on_known_predictions():
    lo, hi = wilson_interval(8, 10)
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    logits = torch.tensor([[3.0, 1, 0], [2, 1, 0], [0, 3, 1], [0, 1, 3], [1, 2, 0], [0, 0, 1]])
    labels = torch.tensor([0, 0, 1, 2, 2, 2])  # predictions: 0 0 1 2 1 2
    m = classification_metrics(logits, labels, ["a", "b", "c"], top_k=2)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion"] == [[2, 0, 0], [0, 1, 0], [0, 1, 2]]
    assert m["per_class"]["b"]["precision"] == 0.5 and m["per_class"]["c"]["recall"] == pytest.approx(2 / 3)
    assert m["top2_accuracy"] == pytest.approx(5 / 6)  # row 4 (true c) has c last
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 2 / 3) / 3)  # mean per-class recall, not 5/6


def test_evaluate_lists_the_mistakes_worst_first_and_draws_the_top_losses(tiny_cfg, tiny_data, tmp_path):
    import csv

    import cnnlab
    from cnnlab.training import fit

    run = fit(tiny_cfg(epochs=1), progress=False, log=lambda s: None)
    evaluation = cnnlab.load(run.run_dir).evaluate(tiny_data, cache_dir=tmp_path / "c", log=None)
    rows = list(csv.DictReader((evaluation.folder / "mistakes.csv").open()))
    wrong = round((1 - evaluation.accuracy) * evaluation["images"])
    assert len(rows) == evaluation["mistakes"] == wrong > 0
    assert all(r["true"] != r["predicted"] for r in rows)
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True) and all((tiny_data / "val").as_posix() in r["file"] for r in rows)
    assert (evaluation.folder / "top_losses.png").stat().st_size > 1000
    table = str(evaluation).splitlines()[2:-1]
    assert str(evaluation).splitlines()[-1].startswith("calibration: expected calibration error")
    recalls = [float(line.split()[2]) for line in table]
    assert recalls == sorted(recalls)  # per-class rows, worst first


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    from cnnlab.config import make_config

    tmp = tmp_path_factory.mktemp("eval")
    cfg = make_config({"data": str(tiny_data), "image_size": 32, "filters": 8, "dense_units": 32, "epochs": 2,
                       "batch_size": 16, "out": str(tmp / "runs"), "cache_dir": str(tmp / "cache"), "name": "r",
                       "decode_workers": 1, "device": "cpu", "precision": "fp32"})  # numbers compared: pinned
    fit(cfg, progress=False)
    return tmp / "runs" / "r" / "best.pt", tmp / "cache"


def test_evaluate_writes_metrics_and_figures_reproducibly(trained, tiny_data, tmp_path, capsys):
    ckpt, cache = trained
    argv = ["evaluate", str(ckpt), "--data", str(tiny_data), "--cache_dir", str(cache), "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["images"] == 40 and 0 <= m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1]
    assert sum(map(sum, m["confusion"])) == 40
    for name in ("confusion.png", "predictions.png"):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b and Image.open(tmp_path / "a" / name).size[0] > 300
    assert "test accuracy" in capsys.readouterr().out


def test_evaluate_and_explain_default_to_the_data_the_run_trained_on(trained, tiny_data, tmp_path, capsys):
    """As the Python API does: `cnnlab evaluate RUN` with no --data reads the run's own test folder; where that
    folder has gone (the run moved to another machine) one line names it and the fix."""
    import shutil

    ckpt, cache = trained
    assert main(["evaluate", str(ckpt), "--cache_dir", str(cache), "--quiet", "--out", str(tmp_path / "own")]) == 0
    assert main(["evaluate", str(ckpt), "--data", str(tiny_data), "--cache_dir", str(cache), "--quiet",
                 "--out", str(tmp_path / "given")]) == 0
    own, given = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("own", "given"))
    assert own["images"] == 40 and own["accuracy"] == given["accuracy"] and own["confusion"] == given["confusion"]
    assert main(["explain", str(ckpt), "--cache_dir", str(cache), "--neurons", "2", "--per_neuron", "1", "--quiet",
                 "--out", str(tmp_path / "explained"), "--device", "cpu"]) == 0
    assert (tmp_path / "explained" / "gradcam.png").is_file()
    moved = tmp_path / "moved"
    shutil.copytree(ckpt.parent, moved)
    (moved / "config.yaml").write_text((moved / "config.yaml").read_text().replace(str(tiny_data), "/gone/data"))
    capsys.readouterr()
    assert main(["evaluate", str(moved / "best.pt"), "--cache_dir", str(cache), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "/gone/data" in err and "--data" in err and len(err.splitlines()) == 1


def test_evaluate_refuses_other_classes(trained, tmp_path, capsys):
    from cnnlab.data.demo import make_demo_data

    other = make_demo_data(tmp_path / "other", 2, 2, min_size=40, max_size=48)
    (other / "val" / "star").rename(other / "val" / "planet")
    ckpt, cache = trained
    assert main(["evaluate", str(ckpt), "--data", str(other), "--cache_dir", str(cache), "--quiet"]) == 2
    assert "planet" in capsys.readouterr().err


def test_predict_reports_bad_files_and_predicts_the_rest(trained, tiny_data, tmp_path, capsys):
    ckpt, _ = trained
    good = sorted((tiny_data / "val" / "ring").iterdir())[0]
    grey = tmp_path / "grey.png"
    Image.open(good).convert("L").save(grey)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    code = main(["predict", str(ckpt), str(good), str(grey), str(tmp_path / "bad.jpg"), str(tmp_path / "nope.jpg"),
                 "--top", "2", "--json"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert code == 1 and [len(r.get("top", [])) for r in results] == [2, 2, 0, 0]
    assert main(["predict", str(ckpt), str(good), "--top", "10", "--json"]) == 0  # every class of the ten
    every = json.loads(capsys.readouterr().out)[0]["top"]
    assert sum(t["prob"] for t in every) == pytest.approx(1.0, abs=1e-4)  # a distribution over the classes
    assert [t["prob"] for t in every] == sorted((t["prob"] for t in every), reverse=True)
    assert [t["class"] for t in results[0]["top"]] == [t["class"] for t in every[:2]]  # the head of the full ranking,
    assert [t["prob"] for t in results[0]["top"]] == pytest.approx([t["prob"] for t in every[:2]], abs=1e-5)  # in
    # another batch (of four images, not one), so equal up to float rounding
    assert "nope.jpg: no such file" in captured.err and len(captured.err.strip().splitlines()) == 2


def test_explain_writes_filters_guided_backprop_and_gradcam(trained, tiny_data, tmp_path):
    ckpt, cache = trained
    assert main(["explain", str(ckpt), "--data", str(tiny_data), "--cache_dir", str(cache), "--neurons", "4",
                 "--out", str(tmp_path), "--quiet"]) == 0
    for name in ("filters.png", "guided_backprop.png", "gradcam.png"):
        assert Image.open(tmp_path / name).size[0] > 200
