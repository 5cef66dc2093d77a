from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# The suite computes on the CPU on every machine, the processes it starts too: its bit-identical assertions (a resumed
# run equal to an uninterrupted one) hold there, and CUDA's non-deterministic kernels would break them. Set before
# torch first looks for a GPU. The GPU path is tested by test_gpu.py, in processes given the machine's GPUs again.
GPUS_OF_THIS_MACHINE = os.environ.get("CUDA_VISIBLE_DEVICES")  # None: every GPU
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Under pytest-xdist (-n N) each worker shares the machine's cores with the others: one thread each, for torch here
# (read when torch starts) and for every cnnlab process a test starts.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["CNNLAB_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from cnnlab.config import make_config  # noqa: E402
from cnnlab.data.demo import make_demo_data  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OTHER_CPU_KIND = "--other-cpu-kind"


def pytest_addoption(parser) -> None:
    parser.addoption(OTHER_CPU_KIND, action="store_true",
                     help="run as the other kind of CPU than this one (native bf16 or not), for the tests marked "
                          "cpu_kind: `pytest -m cpu_kind --other-cpu-kind` covers both kinds on any machine")


def native_cpu_bf16() -> bool:
    """Whether this machine's CPU computes bf16 natively, by its own flags (whatever $CNNLAB_CPU_BF16 says)."""
    from cnnlab.hardware import flags_have_bf16

    try:
        return flags_have_bf16(set(Path("/proc/cpuinfo").read_text().split()))
    except OSError:
        return False


def pytest_configure(config) -> None:
    if config.getoption(OTHER_CPU_KIND):  # set before any test runs; every process the tests start inherits it
        os.environ["CNNLAB_CPU_BF16"] = "0" if native_cpu_bf16() else "1"


def missing_component(what: str, fix: str) -> None:
    """A real component a test needs (a PostgreSQL server, Chromium, a notebook kernel, a font) is absent: a skip on
    a developer's machine, a failure in CI, where .ci/run installs it, so a green CI never hides a skipped test."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing in CI ({fix}): its tests must run there, not skip")
    pytest.skip(f"{what} is not installed here ({fix})")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """10 classes x (16 train + 4 val) synthetic JPEGs of 40-72 px."""
    return make_demo_data(tmp_path_factory.mktemp("tiny"), train_per_class=16, val_per_class=4, seed=1,
                          min_size=40, max_size=72)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path, cache_dir):
    """A config that trains in about a second on tiny_data."""
    def make(**overrides):
        base = dict(data=str(tiny_data), image_size=32, filters=8, dense_units=32, batch_size=16, epochs=2,
                    out=str(tmp_path / "runs"), cache_dir=str(cache_dir), decode_workers=1, name="run",
                    device="cpu", precision="fp32")  # pinned: bit-identical histories on every CPU kind, never CUDA
        return make_config({**base, **overrides})
    return make


def write_bad_files(folder: Path) -> dict[str, bool]:
    """Every kind of awkward file; value: whether it should decode."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8))
    (folder / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    rgb.save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "fake.jpg").write_text("<html>404</html>")
    rgb.convert("CMYK").save(folder / "cmyk.jpg", "JPEG")
    rgb.convert("L").save(folder / "grey.jpg", "JPEG")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgb.size, 0))
    rgba.save(folder / "alpha.png")
    rgb.convert("P").save(folder / "palette.gif")
    Image.new("RGB", (6000, 4500), (200, 30, 30)).save(folder / "huge.jpg", "JPEG", quality=50)
    return {"empty.jpg": False, "truncated.jpg": False, "notes.txt": False, "fake.jpg": False, "cmyk.jpg": True,
            "grey.jpg": True, "alpha.png": True, "palette.gif": True, "huge.jpg": True}


@pytest.fixture(scope="session")
def big_photos(tmp_path_factory):
    """Enough large JPEGs that decoding them takes seconds: time to reach into the cache build."""
    return make_demo_data(tmp_path_factory.mktemp("big"), train_per_class=80, val_per_class=1, seed=3,
                          min_size=400, max_size=560)


def start_training_process(data: Path, tmp_path: Path, name: str) -> subprocess.Popen:
    """`cnnlab train` in a process of its own, building a 224 px cache with two decode workers."""
    argv = [sys.executable, "-m", "cnnlab.cli", "train", "--data", str(data), "--image_size=224", "--epochs=1",
            "--filters=4", "--dense_units=8", "--decode_workers=2", "--cache_dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "runs"), f"--name={name}", "--quiet"]
    # default actions restored in the child, as a terminal gives them: pytest started in the background by a
    # non-interactive shell (`cmd &`) ignores SIGINT, under `nohup` SIGHUP, and an ignored signal stays ignored
    # across exec (cnnlab then leaves it ignored, as it should: the test would see a run that finished)
    def default_signals() -> None:
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)

    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_signals)


def decode_workers_of(proc: subprocess.Popen, tmp_path: Path) -> list:
    import psutil

    deadline = time.time() + 60
    while time.time() < deadline:  # polling for the events: the build's file exists and its workers run
        workers = psutil.Process(proc.pid).children()
        if len(workers) >= 2 and list((tmp_path / "cache").glob("*.partial.npy")):
            return workers
        time.sleep(0.01)
    raise AssertionError("the cache build never started its workers")


@pytest.fixture
def cache_build():
    """Start a training process and wait for its cache build's decode workers (tests of signals and kills)."""
    return SimpleNamespace(start=start_training_process, workers=decode_workers_of)


def devices_recorded(out: Path) -> dict[str, set[str]]:
    """The device each step of an assignment in `out` wrote down: every trial's, verification run's and Part B run's
    config and training, Part A's model's evaluation and explanation, Part B's and the distilled student's
    evaluations."""
    import json

    import yaml

    read = lambda paths: {json.loads(p.read_text())["device"] for p in paths if p.is_file()}
    runs = [*(out / "sweeps").glob("*/trials/*"), *(out / "sweeps").glob("*/verify/*"), *(out / "runs").glob("*")]
    return {"configs": {yaml.safe_load((r / "config.yaml").read_text())["device"] for r in runs},
            "trainings": read(r / "summary.json" for r in runs),
            "evaluations": read(r / "eval" / "metrics.json" for r in runs),
            "explanations": read(r / "explain" / "explain.json" for r in runs)}


def pg_bin(name):
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture
def postgres():
    """A real PostgreSQL server on 127.0.0.1 in a temporary folder, stopped afterwards."""
    import socket
    import tempfile

    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        missing_component("PostgreSQL's server binaries", ".ci/run installs Debian's postgresql")
    import psycopg  # noqa: F401 - declared in dev: an import error fails, never skips
    root = Path(tempfile.mkdtemp(prefix="cnnlab-pg-"))
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    root.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(as_user + [initdb, "-D", str(data), "-U", "cnnlab", "--auth=trust"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(as_user + [pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                              f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql://cnnlab@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], stdout=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)
