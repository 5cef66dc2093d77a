"""`--verify K`: the sweep's top K configurations trained again with 3 new seeds each, the winner chosen by mean
validation accuracy and tested against each runner-up; the model for the test folder chosen by validation only."""

from __future__ import annotations

import json

import yaml

import cnnlab
from cnnlab.cli import main
from cnnlab.run_folder import RunFolder
from cnnlab.sweeps.verify import paired_test


def sweep_file(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({"name": "small", "method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
                                    "parameters": {"filters": {"values": [4, 8, 12]}, "epochs": {"value": 2}}}))
    return path


def test_verify_trains_the_top_two_with_three_seeds_and_picks_the_best_mean(tiny_data, tmp_path, capsys):
    code = main(["sweep", str(sweep_file(tmp_path)), "--data", str(tiny_data), "--sweeps_dir", str(tmp_path / "sweeps"),
                 "--image_size=32", "--dense_units=16", "--batch_size=32", "--cache_dir", str(tmp_path / "cache"),
                 "--decode_workers=1", "--device=cpu", "--precision=fp32", "--quiet", "--verify", "2"])
    assert code == 0
    out = capsys.readouterr().out
    swept = cnnlab.SweepRun(tmp_path / "sweeps" / "small")
    found = swept.verification
    trials = sorted((t for t in swept.trials if t["state"] == "complete"), key=lambda t: (-t["value"], t["number"]))
    assert sorted(c["trial"] for c in found["candidates"]) == sorted(t["number"] for t in trials[:2])  # the top two
    folder = tmp_path / "sweeps" / "small"  # verify.json's paths are of the sweep folder, wherever it is moved
    for c in found["candidates"]:
        assert c["seeds"] == [1, 2, 3] and len(c["runs"]) == 3  # each configuration with 3 new seeds
        assert all(r.startswith("verify/") for r in c["runs"]) and c["trial_run"].startswith("trials/")
        runs = [RunFolder(folder / r) for r in c["runs"]]
        assert [r.config.seed for r in runs] == [1, 2, 3] and all(r.finished for r in runs)
        trial_cfg = RunFolder(folder / c["trial_run"]).config
        assert all(r.config.filters == trial_cfg.filters and r.config.epochs == 2 for r in runs)  # the same config
        assert c["values"] == [max(e["val_acc"] for e in r.history) for r in runs]  # read from the runs themselves
        assert abs(c["mean"] - (c["values"][0] + c["values"][1] + c["values"][2]) / 3) < 1e-12
    means = {c["trial"]: c["mean"] for c in found["candidates"]}
    assert found["winner"] == max(means, key=lambda t: (means[t], -t))  # the best mean of validation accuracy
    runner_up = found["candidates"][1]
    # by hand: the paired t statistic over the 3 seeds and its two-sided p-value on 2 degrees of freedom, whose t
    # distribution has the closed form P(|T| > t) = 1 - t / sqrt(t^2 + 2)
    d = [a - b for a, b in zip(found["candidates"][0]["values"], runner_up["values"])]
    mean_d = sum(d) / 3
    sd = (sum((x - mean_d) ** 2 for x in d) / 2) ** 0.5
    expected = (1.0 if mean_d == 0 else 0.0) if sd < 1e-9 else 1 - abs(mean_d / (sd / 3 ** 0.5)) / (
        (mean_d / (sd / 3 ** 0.5)) ** 2 + 2) ** 0.5
    assert abs(runner_up["versus_winner"]["p_value"] - expected) < 1e-9
    winner = found["candidates"][0]
    chosen = max(zip(winner["values"] + [winner["search_value"]], winner["runs"] + [winner["trial_run"]]))[1]
    assert found["model"] == chosen and swept.verified.folder == folder / chosen
    assert "verified: trial" in out and (tmp_path / "sweeps" / "small" / "verify.md").read_text().count("| ") > 3
    # again: every verification run is finished, so nothing is trained twice
    stamps = {r: (folder / r / "best.pt").stat().st_mtime_ns for c in found["candidates"] for r in c["runs"]}
    again = swept.verify(2, log=None)
    assert again["winner"] == found["winner"]
    assert {r: (folder / r / "best.pt").stat().st_mtime_ns for r in stamps} == stamps


def test_the_paired_test_against_a_hand_computed_value():
    # differences 0.10, 0.15, 0.05: mean 0.1, sd 0.05, t = 0.1 / (0.05 / sqrt 3) = sqrt 12 on 2 degrees of freedom,
    # two-sided p = 1 - sqrt(12) / sqrt(14) = 0.0741799...
    assert abs(paired_test([0.5, 0.6, 0.7], [0.4, 0.45, 0.65]) - (1 - (12 / 14) ** 0.5)) < 1e-9


def test_the_paired_test_says_noise_from_a_real_difference():
    assert paired_test([0.80, 0.82, 0.81], [0.70, 0.71, 0.69]) < 0.05  # consistently ahead, seed by seed
    assert paired_test([0.80, 0.70, 0.90], [0.79, 0.72, 0.88]) > 0.5  # ahead on average, by less than the spread
    assert paired_test([0.8, 0.8, 0.8], [0.8, 0.8, 0.8]) == 1.0
    assert json.dumps(paired_test([0.8, 0.7], [0.6, 0.5])) == "0.0"  # the same lead on every seed: no spread
