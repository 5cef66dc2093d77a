"""The GPU path, checked on a real CUDA GPU: run by test_gpu.py in a process that sees the machine's GPUs (the rest
of the suite hides them), or by hand on a GPU machine:

    PYTHONPATH=src python tests/gpu_checks.py OUT_FOLDER

Each check trains, evaluates or decodes for real on cuda:0 and writes what it found to OUT_FOLDER/gpu_checks.json
(one entry per check: its findings, or the error that ended it), which the test asserts on."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cnnlab.config import make_config
from cnnlab.data import load_images
from cnnlab.data.demo import make_demo_data
from cnnlab.errors import ConfigError
from cnnlab.hardware import device_facts, precision_policy
from cnnlab.training import OutOfMemory, fit


def settings(root: Path, **overrides: Any) -> dict[str, Any]:
    return {**dict(data=str(root / "data"), image_size=32, filters=8, dense_units=32, batch_size=16, epochs=2,
                   out=str(root / "runs"), cache_dir=str(root / "cache"), decode_workers=1, device="cuda"), **overrides}


def tiny(root: Path, **overrides: Any):
    return make_config(settings(root, **overrides))


def auto_precision(root: Path) -> dict[str, Any]:
    facts = device_facts(torch.device("cuda"))
    policy = precision_policy("auto", facts)
    result = fit(tiny(root, name="auto"), progress=False, log=lambda s: None)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    return {"gpu": facts.name, "capability": list(facts.capability), "policy": policy.name, "recorded": summary["precision"],
            "device": summary["device"], "provenance_device": summary["provenance"]["device"],
            "losses": [r["train_loss"] for r in result.history]}


def each_precision(root: Path) -> dict[str, Any]:
    facts = device_facts(torch.device("cuda"))
    found: dict[str, Any] = {}
    for precision in ("fp32", "fp16", "bf16"):
        try:
            result = fit(tiny(root, name=f"p-{precision}", precision=precision), progress=False, log=lambda s: None)
            last = torch.load(result.run_dir / "last.pt", weights_only=True)
            found[precision] = {"losses": [r["train_loss"] for r in result.history],
                                "scale": (last.get("scaler") or {}).get("scale")}
        except ConfigError as e:
            found[precision] = {"refused": str(e)}
    return {"capability": list(facts.capability), **found}


def deterministic_repeats(root: Path) -> dict[str, Any]:
    histories = []
    for k in range(2):
        result = fit(tiny(root, name=f"det-{k}", deterministic=True, augment=True), progress=False, log=lambda s: None)
        histories.append([(r["train_loss"], r["val_acc"], r["val_loss"]) for r in result.history])
    return {"same": histories[0] == histories[1], "histories": histories}


def out_of_memory(root: Path) -> dict[str, Any]:
    """A memory cap on this process's CUDA allocator (torch.cuda.set_per_process_memory_fraction) and a batch far
    beyond it: the error training raises, and whether the next run in this process trains."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2 * 2**30 / total))  # 2 GiB
    try:
        fit(tiny(root, name="oom", image_size=256, filters=64, batch_size=144, epochs=1), progress=False,
            log=lambda s: None)
        return {"raised": None}
    except OutOfMemory as e:
        message = str(e)
    after = fit(tiny(root, name="after-oom", epochs=1), progress=False, log=lambda s: None)
    torch.cuda.set_per_process_memory_fraction(1.0)
    return {"raised": message, "next_run_epochs": len(after.history)}


def evaluate_explain_predict(root: Path) -> dict[str, Any]:
    import cnnlab

    run = cnnlab.train(**settings(root, name="eval"), progress=False, log=None)
    evaluation = run.evaluate(device="cuda", log=None, progress=False)
    explanation = run.explain(device="cuda", neurons=2, per_neuron=1, log=None, progress=False)
    manifest = json.loads((explanation.figures["gradcam"].parent / "explain.json").read_text())
    photo = next((root / "data" / "val" / "circle").iterdir())
    on_gpu, on_cpu = run.predict(photo, device="cuda")[0], run.predict(photo, device="cpu")[0]
    return {"eval_device": evaluation["device"], "explain_device": manifest["device"],
            "predicted": [on_gpu["top"][0]["class"], on_cpu["top"][0]["class"]],
            "prob_difference": abs(on_gpu["top"][0]["prob"] - on_cpu["top"][0]["prob"])}


def nvjpeg_matches_pil(root: Path) -> dict[str, Any]:
    pil = load_images(root / "data" / "train", 64, root / "cache-pil", workers=1, progress=False, log=lambda s: None)
    gpu = load_images(root / "data" / "train", 64, root / "cache-gpu", workers=1, progress=False,
                      decode_device=torch.device("cuda"), log=lambda s: None)
    difference = np.abs(np.asarray(pil.pixels, np.float32) - np.asarray(gpu.pixels, np.float32))
    return {"files": [len(pil.files), len(gpu.files)], "mean_abs_difference": float(difference.mean())}


CHECKS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "auto_precision": auto_precision, "each_precision": each_precision, "deterministic_repeats": deterministic_repeats,
    "out_of_memory": out_of_memory, "evaluate_explain_predict": evaluate_explain_predict,
    "nvjpeg_matches_pil": nvjpeg_matches_pil,
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    make_demo_data(out / "data", train_per_class=16, val_per_class=4, seed=1, min_size=40, max_size=72)
    results: dict[str, Any] = {"cuda": torch.cuda.is_available(),
                               "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    for name, check in CHECKS.items():
        try:
            results[name] = check(out)
        except Exception:  # noqa: BLE001 - recorded for the test to show, and the next check still runs
            results[name] = {"error": traceback.format_exc()}
        (out / "gpu_checks.json").write_text(json.dumps(results, indent=2, default=str))
        print(name, json.dumps(results[name], default=str)[:400], flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
