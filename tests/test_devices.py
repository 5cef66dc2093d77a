"""Every decision that depends on the device (precision, gradient scaler, decoder, keeping data on the GPU) as a
pure function of its properties, tested for the GPUs students and labs have without one; the fp16 path with its
gradient scaler trained for real on the CPU; `cnnlab env`; out of memory made real by a memory limit on a CPU
process, in `train` and in a sweep trial."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cnnlab.config import FIELDS
from cnnlab.environment import environment, folder_size
from cnnlab.errors import ConfigError
from cnnlab.hardware import (
    PRECISIONS,
    DeviceFacts,
    decoder_choice,
    device_facts,
    is_out_of_memory,
    keeps_on_device,
    precision_policy,
)
from cnnlab.io import read_jsonl
from cnnlab.training import StopTraining, fit

GIB = 2**30
TORCH = torch.__version__.split("+")[0]  # as the installed metadata gives it (no +cu130)
# name, compute capability and memory as torch.cuda.get_device_properties reports them on each
GPUS = {
    "P100": DeviceFacts("cuda", "Tesla P100-PCIE-16GB", (6, 0), 16 * GIB),
    "V100": DeviceFacts("cuda", "Tesla V100-SXM2-16GB", (7, 0), 16 * GIB),
    "T4": DeviceFacts("cuda", "Tesla T4", (7, 5), 15 * GIB),
    "L4": DeviceFacts("cuda", "NVIDIA L4", (8, 9), 22 * GIB),
    "A100": DeviceFacts("cuda", "NVIDIA A100-SXM4-40GB", (8, 0), 40 * GIB),
    "H100": DeviceFacts("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB),
}
CPU_BF16 = DeviceFacts("cpu", cpu_bf16=True)  # AVX512-BF16 or AMX
CPU_AVX2 = DeviceFacts("cpu", cpu_bf16=False)
MPS = DeviceFacts("mps")


@pytest.mark.parametrize(("gpu", "name", "scaler"), [
    ("P100", "fp32", False),  # no tensor cores: half precision gains little
    ("V100", "fp16", True),  # fp16 tensor cores, no bf16
    ("T4", "fp16", True),  # PyTorch's is_bf16_supported() says True here (emulation): auto must not take bf16
    ("L4", "bf16", False),
    ("A100", "bf16", False),
    ("H100", "bf16", False),
])
def test_auto_precision_on_each_gpu(gpu, name, scaler):
    policy = precision_policy("auto", GPUS[gpu])
    assert (policy.name, policy.scaler) == (name, scaler)
    assert policy.dtype == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    assert GPUS[gpu].name in policy.why and "compute capability" in policy.why  # printed at start: says why


@pytest.mark.parametrize("gpu", list(GPUS))
def test_asked_precisions_on_each_gpu(gpu):
    facts = GPUS[gpu]
    assert precision_policy("fp32", facts).dtype is None
    fp16 = precision_policy("fp16", facts)
    assert fp16.dtype == torch.float16 and fp16.scaler  # fp16 always with its scaler
    if facts.capability >= (8, 0):
        assert precision_policy("bf16", facts).dtype == torch.bfloat16 and not precision_policy("bf16", facts).scaler
    else:  # no bf16 arithmetic: refused for training, with the fix
        with pytest.raises(ConfigError, match="precision=bf16: .*has no bf16 arithmetic.*--precision fp16"):
            precision_policy("bf16", facts)
        # a checkpoint trained with bf16 on an A100 and evaluated here: auto's choice, said so
        fallback = precision_policy("bf16", facts, strict=False)
        assert fallback.name == precision_policy("auto", facts).name and "bf16 asked for" in fallback.why


def test_precision_on_cpus_and_mps():
    assert precision_policy("auto", CPU_BF16).name == "bf16"
    assert precision_policy("auto", CPU_AVX2).name == "fp32"
    assert "emulates" in precision_policy("bf16", CPU_AVX2).why  # allowed (the suite runs it), and said to be slow
    cpu_fp16 = precision_policy("fp16", CPU_AVX2)
    assert cpu_fp16.dtype == torch.float16 and cpu_fp16.scaler
    assert precision_policy("auto", MPS).name == "fp32"
    for asked in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=f"precision={asked}: cnnlab computes in fp32 on MPS"):
            precision_policy(asked, MPS)
        assert precision_policy(asked, MPS, strict=False).name == "fp32"
    with pytest.raises(ConfigError, match="precision='fp8'"):
        precision_policy("fp8", CPU_AVX2)
    assert FIELDS["precision"].metadata["choices"] == PRECISIONS  # the config's choices are the policy's


def test_the_cpu_kinds_by_their_flags_and_the_policy_each_implies(monkeypatch):
    from cnnlab.hardware import flags_have_bf16

    # flag sets as /proc/cpuinfo shows them (abridged): an AVX2-only EPYC, an AVX-512 Skylake without bf16, a Zen 4
    # or Cooper Lake with AVX512-BF16, a Sapphire Rapids with AMX
    kinds = {"avx2 fma sse4_2": False, "avx2 avx512f avx512bw avx512vl": False,
             "avx2 avx512f avx512_bf16": True, "avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8": True,
             "amx_bf16 amx_tile": True, "": False}
    for flags, native in kinds.items():
        assert flags_have_bf16(set(flags.split())) is native, flags
        assert precision_policy("auto", DeviceFacts("cpu", cpu_bf16=native)).name == ("bf16" if native else "fp32")
    for override, native in (("1", True), ("0", False)):  # the suite run as the other CPU kind
        monkeypatch.setenv("CNNLAB_CPU_BF16", override)
        assert device_facts(torch.device("cpu")) == DeviceFacts("cpu", cpu_bf16=native)
    monkeypatch.setenv("CNNLAB_CPU_BF16", "yes")
    with pytest.raises(ConfigError, match="expected 1"):
        device_facts(torch.device("cpu"))


@pytest.mark.cpu_kind
def test_the_second_pass_runs_as_the_other_kind_of_cpu(request):
    """CI runs the cpu_kind tests again with --other-cpu-kind: there precision auto must take the other branch, in
    this process and in every process a test starts."""
    from conftest import OTHER_CPU_KIND, native_cpu_bf16

    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = "avx512_bf16" in flags or "amx_bf16" in flags  # by hand, from the CPU's own flags
    assert native_cpu_bf16() is native
    seen_by_a_process = subprocess.run([sys.executable, "-c", "import torch; from cnnlab.hardware import "
                                        "device_facts; print(device_facts(torch.device('cpu')).cpu_bf16)"],
                                       capture_output=True, text=True, check=True).stdout.strip()
    if request.config.getoption(OTHER_CPU_KIND):
        assert device_facts(torch.device("cpu")).cpu_bf16 is (not native) and seen_by_a_process == str(not native)
        assert precision_policy("auto", device_facts(torch.device("cpu"))).name == ("fp32" if native else "bf16")
    elif not os.environ.get("CNNLAB_CPU_BF16"):
        assert device_facts(torch.device("cpu")).cpu_bf16 is native and seen_by_a_process == str(native)


def test_decoder_and_data_placement_by_device():
    assert decoder_choice("auto", "cuda", True) == "nvjpeg"
    assert decoder_choice("auto", "cuda", False) == "pil"  # a torchvision without its GPU decoder
    assert decoder_choice("auto", "cpu", True) == "pil" and decoder_choice("auto", "mps", True) == "pil"
    assert decoder_choice("pil", "cuda", True) == "pil"
    with pytest.raises(ConfigError, match="decoder=nvjpeg needs a CUDA device"):
        decoder_choice("nvjpeg", "cpu", True)
    with pytest.raises(ConfigError, match="no torchvision.io.decode_jpeg"):
        decoder_choice("nvjpeg", "cuda", False)
    # iNaturalist-12K's 9,999 training images at 128 px: 0.49 GB; a T4 with 14.5 GiB free keeps them, 0.9 GiB free not
    nbytes = 9999 * 128 * 128 * 3
    assert keeps_on_device(nbytes, int(14.5 * GIB)) and not keeps_on_device(nbytes, int(0.9 * GIB))


def test_out_of_memory_is_recognised_in_each_form():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    with pytest.raises(RuntimeError) as cpu:  # the CPU allocator's own error, made real by an impossible size
        torch.empty(2**62, dtype=torch.uint8)
    assert is_out_of_memory(cpu.value)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


class StopAfter:
    def __init__(self, epochs):
        self.epochs = epochs

    def on_fit_start(self, run):
        pass

    def on_epoch_end(self, run, record):
        if record["epoch"] == self.epochs:
            raise StopTraining()

    def on_fit_end(self, run):
        pass


def test_fp16_clips_the_true_gradient_not_the_scaled_one(tiny_cfg):
    """With fp16 the loss is scaled (by 65,536 at first) before backward; clipping must see the gradients unscaled,
    or a clipped step is thousands of times too short. Plain SGD without weight decay (its step is proportional to the
    gradient, unlike Adam's, and nothing else moves the weights): they move as far in fp16 as in fp32, to fp16's
    rounding (measured: 38.73 and 38.70; clipped before unscaling, 0.0006)."""
    class Moved:
        def on_fit_start(self, run):
            self.before = [p.detach().clone() for p in run.model.parameters()]

        def on_fit_end(self, run):
            self.moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(run.model.parameters(), self.before))

    moved = {}
    for precision in ("fp32", "fp16"):
        probe = Moved()
        fit(tiny_cfg(precision=precision, optimizer="sgd", lr=0.05, weight_decay=0.0, grad_clip=0.5, epochs=1,
                     name=precision),
            [probe], progress=False, log=lambda s: None)
        moved[precision] = probe.moved
    assert 0.5 < moved["fp16"] / moved["fp32"] < 2, moved


def test_fp16_with_its_gradient_scaler_trains_on_the_cpu_and_resumes_exactly(tiny_cfg):
    """The GPU's fp16 path (autocast fp16, GradScaler scaling, unscaling before clipping, skipping overflowed
    steps), run on the CPU, where both work: it learns, its scale is saved in last.pt and a resume goes on with it."""
    straight = fit(tiny_cfg(precision="fp16", grad_clip=1.0, epochs=3, name="straight"), progress=False, log=lambda s: None)
    summary = json.loads((straight.run_dir / "summary.json").read_text())
    assert summary["precision"] == "fp16" and summary["precision_policy"]["scaler"] is True
    assert summary["provenance"]["precision"] == summary["precision_policy"]  # recorded with the run's facts
    losses = [r["train_loss"] for r in straight.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    last = torch.load(straight.run_dir / "last.pt", weights_only=True)
    assert last["scaler"]["scale"] > 0  # GradScaler's state, kept for --resume
    fp32 = fit(tiny_cfg(epochs=3, name="fp32"), progress=False, log=lambda s: None).history
    assert [r["train_loss"] for r in fp32] != losses  # fp16 autocast really ran
    fit(tiny_cfg(precision="fp16", grad_clip=1.0, epochs=3, name="resumed"), [StopAfter(2)], progress=False,
        log=lambda s: None)
    stopped = torch.load(straight.run_dir.parent / "resumed" / "last.pt", weights_only=True)
    assert stopped["scaler"]["scale"] > 0
    resumed = fit(tiny_cfg(precision="fp16", grad_clip=1.0, epochs=3, name="resumed"), resume=True, progress=False,
                  log=lambda s: None).history
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in h]
    assert strip(resumed) == strip(straight.history)


@pytest.mark.cpu_kind
def test_the_policy_is_printed_at_start_and_recorded(tiny_cfg):
    lines = []
    result = fit(tiny_cfg(precision="auto", epochs=1), progress=False, log=lines.append)
    policy = precision_policy("auto", device_facts(torch.device("cpu")))
    assert policy.describe() in lines[0]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["precision"] == policy.name and summary["device"] == "cpu"
    provenance = summary["provenance"]
    assert provenance["device"] == {"name": "cpu", "type": "cpu", "native_bf16": device_facts(torch.device("cpu")).cpu_bf16}
    assert provenance["versions"]["torch"] == TORCH and provenance["decoder"] == "pil"
    assert provenance["cache"]["folder"] == tiny_cfg().cache_dir


def cnnlab(*argv: str, cwd: Path | None = None, limit: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`cnnlab` in a process of its own; `limit`: its address space capped by RLIMIT_AS, so an allocation past it fails
    as it does on a full machine. Two threads and two malloc arenas keep the address space the process needs small
    and the same on any machine."""
    def cap() -> None:
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "2"}
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap, env=env)


@pytest.mark.cpu_kind
def test_cnnlab_env_says_what_a_question_needs(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.npy").write_bytes(b"x" * 3_000_000)
    text = cnnlab("env", "--device", "cpu", "--cache_dir", str(cache))
    assert text.returncode == 0, text.stderr
    info = environment(torch.device("cpu"), "auto", cache_dir=cache)
    out = text.stdout
    assert f"torch {TORCH}" in out and f"cnnlab {info['versions']['cnnlab']}" in out
    assert f"precision: {info['precision']['name']}" in out and info["precision"]["why"] in out
    assert "decoder: pil" in out and f"cache: {cache}, 2.9 MiB in 1 files" in out
    assert ", ".join(info["machine"]["cpu_flags"]) in out
    as_json = json.loads(cnnlab("env", "--device", "cpu", "--cache_dir", str(cache), "--json").stdout)
    assert as_json["cache"] == {"folder": str(cache), "bytes": 3_000_000, "files": 1} and folder_size(cache) == (3_000_000, 1)
    assert as_json["device"]["type"] == "cpu" and as_json["versions"]["torch"] == TORCH
    fp16 = cnnlab("env", "--device", "cpu", "--precision", "fp16", "--cache_dir", str(cache))
    assert "precision: fp16 with a gradient scaler" in fp16.stdout
    if not torch.cuda.is_available():
        wrong = cnnlab("env", "--device", "cuda")
        assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "no CUDA GPU" in wrong.stderr


# A batch that cannot fit under the cap: 64 filters on 256 px images, 130 at once (the tiny set's whole training part)
TOO_BIG = ("--image_size=256", "--filters=64", "--batch_size=144")
CAP = 6 * GIB  # measured: such a run needs about 9 GiB of address space; setup and half the batch, under 6


@pytest.mark.slow
def test_out_of_memory_in_train_is_one_line_and_keeps_the_last_epoch(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), "--out", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"),
              "--device=cpu", "--precision=fp32", "--decode_workers=1", "--quiet"]
    failed = cnnlab("train", *common, *TOO_BIG, "--epochs=1", "--name=big", limit=CAP)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "out of memory on cpu: smallcnn with batch_size 144 on 256x256 images does not fit" in failed.stderr
    assert "MiB failed" in failed.stderr and "fits (tried): give --batch_size" in failed.stderr
    fits = int(failed.stderr.split("give --batch_size ")[1].split()[0].rstrip(";"))
    assert 1 <= fits < 144
    # an epoch that fitted without the cap, then the run resumed under it: the finished epoch is kept
    first = cnnlab("train", *common, *TOO_BIG, "--epochs=1", "--name=kept")
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "runs" / "kept"
    before = (run / "last.pt").read_bytes()
    resumed = cnnlab("train", "--resume", str(run), "--epochs=2", "--quiet", limit=CAP)
    assert resumed.returncode == 2 and "out of memory" in resumed.stderr, resumed.stderr[-2000:]
    assert f"{run / 'last.pt'} after epoch 1 is kept" in resumed.stderr
    assert (run / "last.pt").read_bytes() == before and [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]


@pytest.mark.slow
def test_out_of_memory_in_a_sweep_trial_fails_that_trial_and_the_sweep_goes_on(tiny_data, tmp_path):
    sweep = tmp_path / "oom.yaml"
    sweep.write_text(yaml.safe_dump({"name": "oom", "method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
                                     "parameters": {"batch_size": {"values": [144, 16]}}}))
    done = cnnlab("sweep", str(sweep), "--data", str(tiny_data), "--sweeps_dir", str(tmp_path / "sweeps"),
                  "--cache_dir", str(tmp_path / "cache"), "--image_size=256", "--filters=64", "--epochs=1", "--device=cpu",
                  "--precision=fp32", "--decode_workers=1", "--quiet", limit=CAP)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if "out of memory" in line]
    assert len(failed) == 1 and "batch_size 144 on 256x256 images" in failed[0] and "fits (tried)" in failed[0], done.stdout
    errors = list((tmp_path / "sweeps" / "oom" / "errors").iterdir())  # the failed trial's traceback, kept aside
    assert len(errors) == 1 and "OutOfMemory" in errors[0].read_text()
    completed = [json.loads(p.read_text()) for p in (tmp_path / "sweeps" / "oom" / "trials").glob("*/summary.json")]
    assert [s["status"] for s in completed] == ["completed"]
    assert yaml.safe_load(next((tmp_path / "sweeps" / "oom" / "trials").glob("*/summary.json")).with_name(
        "config.yaml").read_text())["batch_size"] == 16


def test_the_suite_and_the_processes_it_starts_compute_on_the_cpu():
    """conftest hides the machine's GPUs, so the bit-identical assertions hold on a GPU machine too (test_gpu.py
    gives them back to its own process)."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    child = json.loads(cnnlab("env", "--json").stdout)
    assert child["cuda_devices"] == 0 and child["device"]["type"] == "cpu"


def test_deterministic_sets_every_switch_both_ways(monkeypatch):
    """What --deterministic changes for a CUDA run (PyTorch's switches exist without a GPU); the next run of a sweep
    process, without it, gets them back; and the test leaves the session's environment as it found it."""
    from cnnlab.hardware import CUBLAS_WORKSPACE, configure_backends

    session = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # set, then deleted: monkeypatch records the variable's state before (a bare delenv of a variable that is absent
    # records nothing, and the one configure_backends sets leaked into the rest of the session)
    with monkeypatch.context() as patched:
        patched.setenv("CUBLAS_WORKSPACE_CONFIG", "")
        patched.delenv("CUBLAS_WORKSPACE_CONFIG")
        try:
            configure_backends(torch.device("cuda"), deterministic=True)
            assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
            assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
            configure_backends(torch.device("cuda"), deterministic=False)
            assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
            assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
            configure_backends(torch.device("cpu"), deterministic=True)  # the CPU repeats as it is: nothing set
            assert not torch.are_deterministic_algorithms_enabled()
        finally:
            torch.use_deterministic_algorithms(before[0])
            (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32) = before[1:]
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == session  # before: CUBLAS_WORKSPACE_CONFIG stayed set
