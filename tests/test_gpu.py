"""The GPU path on a real CUDA GPU, where the machine has one: tests/gpu_checks.py run once in a process that sees
the machine's GPUs (the rest of the suite runs on the CPU), each check asserted here. Without a GPU these skip, and
what decides anything for a GPU (precision, scaler, decoder, data placement) is still tested on the CPU, in
test_devices.py, for the GPUs students and labs have."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GPUS_OF_THIS_MACHINE

from cnnlab.hardware import DeviceFacts, precision_policy

HERE = Path(__file__).resolve().parent


def with_the_gpus() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if GPUS_OF_THIS_MACHINE is not None:
        env["CUDA_VISIBLE_DEVICES"] = GPUS_OF_THIS_MACHINE
    return env


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    env = with_the_gpus()
    count = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], env=env,
                           capture_output=True, text=True, timeout=120)
    if count.stdout.strip() in ("", "0"):
        pytest.skip("no CUDA GPU on this machine: the GPU's decisions are tested without one in test_devices.py")
    out = tmp_path_factory.mktemp("gpu")
    done = subprocess.run([sys.executable, str(HERE / "gpu_checks.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu_checks.json").read_text())


def found(checks: dict, name: str) -> dict:
    assert "error" not in checks[name], checks[name].get("error")
    return checks[name]


def test_auto_takes_the_policy_s_precision_on_this_gpu(checks):
    r = found(checks, "auto_precision")
    expected = precision_policy("auto", DeviceFacts("cuda", r["gpu"], tuple(r["capability"]))).name
    assert r["policy"] == r["recorded"] == expected and r["device"] == "cuda"
    assert r["provenance_device"]["compute_capability"] == ".".join(map(str, r["capability"]))
    assert all(loss == loss and loss < 10 for loss in r["losses"])  # finite


def test_each_precision_trains_or_is_refused_as_the_policy_says(checks):
    r = found(checks, "each_precision")
    assert r["fp32"]["scale"] is None and r["fp16"]["scale"] > 0  # fp16 with its scaler, saved in last.pt
    if tuple(r["capability"]) >= (8, 0):
        assert "losses" in r["bf16"] and r["bf16"]["scale"] is None
    else:
        assert "has no bf16 arithmetic" in r["bf16"]["refused"]


def test_deterministic_runs_repeat_bit_for_bit_on_the_gpu(checks):
    assert found(checks, "deterministic_repeats")["same"]


def test_cuda_out_of_memory_is_one_message_and_the_process_trains_on(checks):
    r = found(checks, "out_of_memory")
    assert r["raised"] and "out of memory on cuda" in r["raised"] and "fits (tried)" in r["raised"]
    assert r["next_run_epochs"] == 1


def test_evaluate_explain_and_predict_run_on_the_gpu(checks):
    r = found(checks, "evaluate_explain_predict")
    assert r["eval_device"].startswith("cuda") and r["explain_device"].startswith("cuda")
    assert r["predicted"][0] == r["predicted"][1] and r["prob_difference"] < 0.05


def test_nvjpeg_decodes_like_pil(checks):
    r = found(checks, "nvjpeg_matches_pil")
    assert r["files"][0] == r["files"][1] and r["mean_abs_difference"] < 4  # IDCT and resize differences only
