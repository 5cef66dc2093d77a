"""The learning-rate range test: a curve, a suggestion by a stated rule, and the model and optimiser put back."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import cnnlab
from cnnlab.cli import main


def test_the_range_test_restores_weights_and_optimiser_bit_for_bit(tiny_cfg):
    from cnnlab.lr_range import range_test
    from cnnlab.training import prepare

    cfg = tiny_cfg(name="probe", optimizer="adamw", precision="fp32")
    run = prepare(cfg, progress=False, log=lambda s: None)
    weights = copy.deepcopy(run.model.state_dict())
    optimiser = copy.deepcopy(run.optimizer.state_dict())
    result = range_test(cfg, 1e-5, 1.0, 30, progress=False, log=lambda s: None, run=run)
    after = run.model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # bit for bit (batch-norm statistics too)
    assert run.optimizer.state_dict()["state"] == optimiser["state"] == {}
    assert [g["lr"] for g in run.optimizer.state_dict()["param_groups"]] == [g["lr"] for g in optimiser["param_groups"]]
    assert 5 <= len(result.lrs) <= 30 and min(result.lrs) <= result.steepest <= max(result.lrs)
    # by hand: the rates grow geometrically from 1e-5 to 1.0 over 30 steps; fastai's debiased moving average
    # (beta 0.9) of the raw losses; the suggestion half the rate at its lowest point, min/10 a tenth of it
    for i, lr in enumerate(result.lrs):
        assert abs(lr / (1e-5 * 1e5 ** (i / 29)) - 1) < 1e-9
    average, by_hand = 0.0, []
    for i, loss in enumerate(result.losses, start=1):
        average = 0.9 * average + 0.1 * loss
        by_hand.append(average / (1 - 0.9 ** i))
    lowest = result.lrs[by_hand.index(min(by_hand))]
    assert abs(result.suggestion - lowest / 2) < 1e-15 and abs(result.min_over_10 - lowest / 10) < 1e-15
    saved = json.loads((result.folder / "lr_find.json").read_text())
    assert saved["rule"].startswith("half the learning rate") and (result.folder / "lr_find.png").stat().st_size > 1000


@pytest.mark.cpu_kind
def test_lr_find_from_the_cli_and_python(tiny_data, tmp_path, capsys):
    common = ["--data", str(tiny_data), "--image_size=32", "--filters=4", "--dense_units=8",
              "--out", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "c"), "--quiet"]
    assert main(["lr-find", *common, "--steps", "20", "--name", "cli"]) == 0
    out = capsys.readouterr().out
    assert "suggested lr" in out and (tmp_path / "runs" / "cli" / "lr_find.png").exists()
    with pytest.raises(SystemExit) as refused:  # argparse's one line, exit 2
        main(["lr-find", *common, "--steps", "3"])
    assert refused.value.code == 2 and "--steps: 3 is below 5" in capsys.readouterr().err
    result = cnnlab.lr_find(data=str(tiny_data), image_size=32, filters=4, out=str(tmp_path / "runs"),
                            cache_dir=str(tmp_path / "c"), steps=12, log=None, progress=False)
    assert result.figure.exists() and result.suggestion > 0
