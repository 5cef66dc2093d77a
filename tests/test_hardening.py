"""Reliability, round three: each test reproduces a defect seen on the main branch as a careful (or a hostile) user
would meet it (real JPEG and HEIC files, real processes, a real browser), then holds the fix."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import missing_component
from PIL import Image

import cnnlab
from cnnlab.data import scan_folder
from cnnlab.data.demo import make_demo_data


def cnnlab_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *args], capture_output=True, text=True, timeout=300, **kw)


def one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def data(tmp_path) -> Path:
    """A fresh copy of a small real-JPEG set for a test to damage: 3 classes x (8 train + 2 val)."""
    root = make_demo_data(tmp_path / "data", train_per_class=8, val_per_class=2, seed=5, min_size=40, max_size=56)
    for extra in sorted((root / "train").iterdir())[3:]:
        shutil.rmtree(extra)
        shutil.rmtree(root / "val" / extra.name)
    return root


def train_args(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(root), "--image_size=32", "--filters=4", "--dense_units=8", "--epochs=1",
            "--decode_workers=1", "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"),
            "--device=cpu", "--precision=fp32", "--quiet", *extra]


# ---- 1. nothing from a sweep runs in the report's page ---------------------------------------------------------

MARKUP = '<img src=x onerror="document.title=\'pwned\'"><b>bold</b>'


@pytest.mark.slow
def test_markup_in_a_swept_value_stays_text_in_the_report_in_a_real_browser(data, tmp_path):
    from test_report import browser, open_page

    sweep_file = tmp_path / "markup.yaml"
    sweep_file.write_text(json.dumps({"name": "markup", "method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
                                      "parameters": {"wandb_project": {"values": [MARKUP, "plain"]},
                                                     "lr": {"values": [0.002]}}}))
    cnnlab.sweep(sweep_file, data=str(data), sweeps_dir=tmp_path / "sweeps", image_size=32, filters=4, dense_units=8,
                 epochs=1, cache_dir=str(tmp_path / "cache"), device="cpu", log=None, progress=False)
    index = cnnlab.report([tmp_path / "sweeps" / "markup"], tmp_path / "report")
    html = index.read_text()
    assert MARKUP not in html and 'http-equiv="Content-Security-Policy"' in html  # escaped on the Python side
    with browser() as p:
        b, page, errors, requests = open_page(p, index, 1280)
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        assert page.locator(".pc-line").count() == 2  # the page's own script ran under its policy
        cells = page.eval_on_selector_all(".pc-table td", "tds => tds.map(t => t.textContent)")
        assert MARKUP in cells  # the value is shown, as text
        for _ in range(2):  # drawn again by sorting on the column that holds the markup
            page.locator(".pc-table th", has_text="wandb_project").click()
            assert page.evaluate("document.querySelectorAll('img[src=x], [onerror], .pc-table b').length") == 0
            assert page.title() != "pwned"
        injected = page.evaluate("""() => { const s = document.createElement('script');
            s.textContent = 'document.title = "ran"'; document.body.appendChild(s); return document.title; }""")
        assert injected != "ran"  # a script that got into the page anyway is refused by the policy
        assert dialogs == [] and all(u.startswith(("file://", "data:")) for u in requests)
        assert [e for e in errors if "Content Security Policy" not in e] == [], errors
        b.close()


# ---- 2. no class silently empty ------------------------------------------------------------------------------

def test_a_mac_zip_s_macosx_folder_is_not_a_class(data, tmp_path):
    junk = data / "train" / "__MACOSX" / "c0"
    junk.mkdir(parents=True)
    (junk / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    classes, _, _ = scan_folder(data / "train")
    assert "__MACOSX" not in classes and len(classes) == 3
    run = cnnlab.train(**dict(data=str(data), image_size=32, filters=4, dense_units=8, epochs=1, device="cpu",
                              cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"), progress=False, log=None))
    assert run.summary["classes"] == classes
    prediction = run.predict([next((data / "val" / classes[0]).iterdir())], top=3)[0]
    assert "__MACOSX" not in [t["class"] for t in prediction["top"]] and len(prediction["top"]) == 3


def test_photos_in_sub_folders_of_a_class_are_read(data, tmp_path):
    owl = sorted((data / "train").iterdir())[0]
    flat = sorted(owl.iterdir())
    (owl / "2019" / "march").mkdir(parents=True)
    for f in flat[:5]:
        f.rename(owl / "2019" / "march" / f.name)
    classes, files, labels = scan_folder(data / "train")
    assert sum(labels == classes.index(owl.name)) == len(flat)  # all eight, three flat and five two folders down
    assert sorted(f.name for f, label in zip(files, labels) if label == 0) == sorted(f.name for f in flat)
    result = cnnlab_cli(*train_args(data, tmp_path, "--name=nested"))
    assert result.returncode == 0, result.stderr
    split = json.loads((tmp_path / "runs" / "nested" / "split.json").read_text())
    assert sum(p.startswith(f"train/{owl.name}/2019/march/") for p in split["train"] + split["val"]) == 5


def heic_photos(folder: Path, count: int) -> None:
    import pillow_heif

    pillow_heif.register_heif_opener()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"IMG_{i:04}.HEIC")


def test_a_class_of_heic_photos_is_read_with_pillow_heif_and_named_without_it(data, tmp_path):
    heic_photos(data / "train" / "iphone", 8)
    (data / "val" / "iphone").mkdir()
    shutil.copy(next((data / "train" / "iphone").iterdir()), data / "val" / "iphone")
    # without the package (imports of pillow_heif fail in that process): one line naming the class, the kind, the fix
    blocked = ("import sys, runpy; sys.modules['pillow_heif'] = None; sys.argv = ['cnnlab'] + sys.argv[1:]; "
               "runpy.run_module('cnnlab.cli', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", blocked, *train_args(data, tmp_path, "--name=no-heif")],
                            capture_output=True, text=True, timeout=300)
    line = one_line_exit_2(result, "'iphone'", "no usable image", "8 HEIC", "pillow-heif")
    assert "cnnlab[heic]" in line
    # with it (installed by the dev extra): the photos are decoded and trained on
    result = cnnlab_cli(*train_args(data, tmp_path, "--name=heif"))
    assert result.returncode == 0, result.stderr
    split = json.loads((tmp_path / "runs" / "heif" / "split.json").read_text())
    assert sum(p.startswith("train/iphone/") for p in split["train"] + split["val"]) == 8
    assert not (tmp_path / "runs" / "heif" / "bad_files.txt").exists()  # written only when a file was unreadable


@pytest.mark.parametrize("damage, why", [
    ("empty", "an empty folder"),
    ("subfolders", "only sub-folders, with no file in them"),
    ("unreadable", "only unreadable files (8 JPG"),
    ("dangling", "which does not exist"),
])
def test_a_class_without_one_usable_image_is_refused_naming_it(data, tmp_path, damage, why):
    owl = data / "train" / "owl"
    if damage == "dangling":
        owl.symlink_to(tmp_path / "moved-away", target_is_directory=True)
    else:
        owl.mkdir()
    if damage == "subfolders":
        (owl / "2019" / "march").mkdir(parents=True)
    if damage == "unreadable":
        for i in range(8):
            (owl / f"{i}.jpg").write_text("<html>404 Not Found</html>")
    assert "owl" in scan_folder(data / "train")[0]  # listed, never silently dropped
    one_line_exit_2(cnnlab_cli(*train_args(data, tmp_path)), "class 'owl'", "no usable image", why)
    report = cnnlab.check(data, cache_dir=str(tmp_path / "cache"), out=tmp_path / "check", progress=False, log=None)
    notes = json.loads(report.files["json"].read_text())["notes"]
    assert any(n.startswith("train/ class 'owl' has no usable image") and why in n for n in notes), notes


def test_a_class_name_spelt_decomposed_in_train_and_composed_in_val_is_one_class(data, tmp_path):
    nfd, nfc = unicodedata.normalize("NFD", "Épervier"), unicodedata.normalize("NFC", "Épervier")
    assert nfd != nfc
    first = sorted((data / "train").iterdir())[0].name
    (data / "train" / first).rename(data / "train" / nfd)
    (data / "val" / first).rename(data / "val" / nfc)
    train_classes, val_classes = scan_folder(data / "train")[0], scan_folder(data / "val")[0]
    assert train_classes == val_classes and nfc in train_classes
    run = cnnlab.train(data=str(data), image_size=32, filters=4, dense_units=8, epochs=1, device="cpu",
                       cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"), progress=False, log=None)
    evaluation = run.evaluate(data, progress=False, log=None)
    assert evaluation["classes"] == train_classes and evaluation["images"] == 6
    assert evaluation["per_class"][nfc]["support"] == 2  # the composed val/ folder's two photos, under the one class


# ---- 3. one run folder, one writer -------------------------------------------------------------------------

def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():  # polling for the event: the first process has claimed and written its folder
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)


@contextlib.contextmanager
def paused(proc: subprocess.Popen):
    """`proc` stopped (SIGSTOP) inside the block, its claims still held: whatever the block does happens while the
    first process is mid-work, however fast it would have finished (before: a race with its remaining seconds)."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


@pytest.mark.slow
def test_a_second_run_of_the_same_name_is_refused_while_the_first_trains(big_photos, tmp_path, cache_build):
    first = cache_build.start(big_photos, tmp_path, "same")  # builds a 224 px cache: seconds to reach into
    run_dir = tmp_path / "runs" / "same"
    wait_for(run_dir / "config.yaml", first)
    with paused(first):
        second = cnnlab_cli("train", "--data", str(big_photos), "--image_size=224", "--epochs=1", "--filters=4",
                            "--dense_units=8", "--cache_dir", str(tmp_path / "cache2"), "--out",
                            str(tmp_path / "runs"), "--name=same", "--quiet")
    one_line_exit_2(second, str(run_dir), "in use by another cnnlab process", f"pid {first.pid}", "another --name")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1]  # one run's epochs, not two interleaved
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 1
    # the claim ends with its process: the same name, started again, is now refused for the run it holds
    one_line_exit_2(cnnlab_cli("train", "--data", str(big_photos), "--out", str(tmp_path / "runs"), "--name=same"),
                    "already holds a run")


@pytest.mark.slow
def test_a_claim_dies_with_its_process(data, tmp_path):
    """A run killed with -9 leaves no claim behind: --resume goes on at once."""
    argv = [sys.executable, "-m", "cnnlab.cli", *train_args(data, tmp_path, "--name=killed", "--epochs=50")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "runs" / "killed" / "last.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = cnnlab_cli("train", "--resume", str(tmp_path / "runs" / "killed"), "--epochs=2", "--quiet")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_a_second_assignment_on_the_same_out_is_refused(tiny_data, tmp_path):
    out = tmp_path / "a"
    argv = [sys.executable, "-m", "cnnlab.cli", "assignment", "--data", str(tiny_data), "--out", str(out), "--quick",
            "--trials", "2", "--image_size", "32", "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "assignment.json", first)
    with paused(first):
        second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    one_line_exit_2(second, str(out), "in use by another cnnlab process", "another --out")
    assert first.wait(timeout=600) == 0, first.stderr.read()
    from cnnlab.whole_job import finished_trials

    assert finished_trials(out / "sweeps" / "partA") == 2  # the trials asked for, not twice as many


# ---- 8. every number of the data section against check.json --------------------------------------------------

def test_the_report_s_data_section_shows_check_json_s_numbers(data, tmp_path):
    from test_report import section

    classes = sorted(p.name for p in (data / "train").iterdir())
    for f in sorted((data / "train" / classes[1]).iterdir())[:6]:
        f.unlink()  # 8, 2, 8: an imbalance of 4.0
    shutil.copy(next((data / "train" / classes[0]).iterdir()), data / "val" / classes[0] / "leaked.jpg")
    (data / "train" / classes[2] / "broken.jpg").write_text("not a photo")
    checked = cnnlab.check(data, cache_dir=str(tmp_path / "cache"), out=tmp_path / "check", progress=False, log=None)
    source = json.loads(checked.files["json"].read_text())
    assert source["imbalance_ratio"] == 4.0 and source["leaked_test_images"] == 1
    html = section(cnnlab.report([tmp_path / "check"], tmp_path / "report").read_text(), "data")
    assert f"imbalance (largest / smallest training class): {source['imbalance_ratio']:.1f}</li>" in html
    assert f"test images that copy a training image (leakage): {source['leaked_test_images']}</li>" in html
    near = ", ".join(f"{k} {len(v)}" for k, v in source["near_duplicates"].items())
    assert f"near-duplicate clusters: {near}</li>" in html and "across 1" in near
    unreadable = ", ".join(f"{s} {len(v)}" for s, v in source["unreadable"].items())
    assert f"unreadable files: {unreadable}</li>" in html and unreadable == "train 1, val 0"
    for name in classes:
        counts = "".join(f"<td class=num>{source['counts'][s][name]}</td>" for s in ("train", "val"))
        assert f"<td>{name}</td>{counts}</tr>" in html
    assert os.path.basename(str(tmp_path / "check")) in html


# ---- 4 and 5. near-duplicates: no false matches, memory linear ---------------------------------------------------

def sketches(root: Path, kind: str, per_class: int = 25, size: int = 256, seed: int = 0) -> Path:
    """Distinct line drawings on white, what sketch, document and icon sets look like: in each class a circle or a
    cross (kind 'shapes'), or three dots (kind 'dots'), each at its own place and size, 1 px lines."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 5)):
        for cls in ("circle", "cross"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                im = Image.new("RGB", (size, size), "white")
                pen = ImageDraw.Draw(im)
                if kind == "dots":
                    for x, y in rng.integers(5, size - 6, (3, 2)):
                        pen.ellipse([x - 2, y - 2, x + 2, y + 2], fill="black")
                else:
                    r = int(rng.integers(size // 16, size // 5))
                    x, y = (int(v) for v in rng.integers(r + 2, size - 2 - r, 2))
                    if cls == "circle":
                        pen.ellipse([x - r, y - r, x + r, y + r], outline="black")
                    else:
                        pen.line([x - r, y - r, x + r, y + r], fill="black")
                        pen.line([x - r, y + r, x + r, y - r], fill="black")
                im.save(folder / f"{i:03}.jpg", quality=90)
    return root


@pytest.mark.parametrize("kind", ["shapes", "dots"])
def test_distinct_sketches_on_white_are_not_near_duplicates_nor_leaked(tmp_path, kind):
    from cnnlab.data import stratified_split

    root = sketches(tmp_path / kind, kind)
    report = cnnlab.check(root, cache_dir=str(tmp_path / "cache"), out=tmp_path / "check", progress=False, log=None).report
    assert report.near == {"within_train": [], "within_val": [], "across": []} and report.leaked == 0
    lines: list[str] = []
    run = cnnlab.train(data=str(root), image_size=64, filters=4, dense_units=8, epochs=1, device="cpu", precision="fp32",
                       cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"), progress=False, log=lines.append)
    split = json.loads((run.folder / "split.json").read_text())
    labels = np.repeat([0, 1], 25)
    _, plain_val = stratified_split(labels, np.arange(50), 0.2, seed=0)
    assert len(split["val"]) == len(plain_val) == 10  # 5 a class, as without any grouping
    assert not any("near-duplicate" in line or "copies of training images" in line for line in lines), lines


def test_a_real_copy_among_sketches_is_still_found_and_a_chain_never_joins_two_classes(tmp_path):
    root = sketches(tmp_path / "s", "shapes", per_class=10)
    ink = lambda path: int((np.asarray(Image.open(path).convert("L")) < 128).sum())
    # the largest circles: a small one has too few clear edges at 32 px for its hash to count (MIN_DECIDED)
    circle = sorted((root / "train" / "circle").iterdir(), key=ink, reverse=True)
    Image.open(circle[0]).save(root / "val" / "circle" / "resaved.jpg", quality=70)  # a leak
    Image.open(circle[1]).save(root / "train" / "cross" / "mislabelled.jpg", quality=60)  # one picture, two labels
    report = cnnlab.check(root, cache_dir=str(tmp_path / "cache"), out=tmp_path / "check", progress=False, log=None).report
    assert report.leaked_files == [str(root / "val" / "circle" / "resaved.jpg")]
    assert [sorted(Path(p).name for p in g) for g in report.near["within_train"]] == [sorted([circle[1].name, "mislabelled.jpg"])]
    from cnnlab.data.check import find_near_duplicates, signatures

    # a chain a ~ b ~ c whose ends have different labels: the pairs are reported, no cluster joins the two classes
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in (circle[1], circle[1], circle[1])])
    found = find_near_duplicates(signatures(pixels), np.array([0, 0, 1]))
    assert found.ids.tolist() == [0, 0, 2] and sorted(found.cross_pairs) == [(0, 2), (1, 2)]


def test_near_duplicate_memory_stays_linear_for_8000_near_identical_frames():
    script = """
import resource, numpy as np
from cnnlab.data.check import find_near_duplicates, groups_of, signatures
rng = np.random.default_rng(0)
frame = rng.integers(20, 235, (32, 32, 3), dtype=np.uint8)
pixels = np.repeat(frame[None], 8000, axis=0)
pixels += rng.integers(0, 3, pixels.shape, dtype=np.uint8)  # sensor noise: every pair a near-duplicate
sig = signatures(pixels)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
found = find_near_duplicates(sig, np.zeros(8000, dtype=np.int64))
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(len(groups_of(found.ids)), len(groups_of(found.ids)[0]), grew // 1024)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    groups, members, grew_mb = map(int, result.stdout.split())
    assert (groups, members) == (1, 8000), result.stderr
    assert grew_mb < 400, grew_mb  # 32 M pairs: the old list of tuples took 3.2 GB


# ---- 6. every listed model works at the sizes it allows, or is refused before any work ---------------------------

@pytest.mark.parametrize("model, size, needle", [
    ("vit_b_16", 64, "takes only 224 px images, not --image_size 64"),
    ("timm/vit_tiny_patch16_224", 64, "takes only 224 px images"),
    ("inception_v3", 32, "takes at least 75 px images, not --image_size 32"),
    ("inception_v3", 64, "give --image_size 75 or more"),
])
def test_a_size_the_model_cannot_take_is_refused_before_any_work(data, tmp_path, model, size, needle):
    if model.startswith("timm/"):
        import timm  # noqa: F401 - declared in dev: an import error fails, never skips
    result = cnnlab_cli("train", "--data", str(data), "--model", model, "--weights", "random", "--finetune", "head",
                        "--image_size", str(size), "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"))
    one_line_exit_2(result, f"model='{model}'", needle)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # nothing decoded, no run folder


def test_features_past_float16_are_stored_in_float32_and_train(data, tmp_path):
    """A backbone whose features pass 65,504 (Inception v3's reach 4.9e8 at 100 px; here a tiny --std makes
    ResNet-18's do so) is stored in float32, not as inf, and never ends in 'try a lower --lr'."""
    lines: list[str] = []
    run = cnnlab.train(data=str(data), model="resnet18", weights="random", finetune="head", image_size=64,
                       std="0.00001,0.00001,0.00001", epochs=1, device="cpu", precision="bf16",
                       cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"), progress=False, log=lines.append)
    assert any("past float16's range; storing float32 instead" in line for line in lines), lines
    stored = [np.load(p, mmap_mode="r") for p in (tmp_path / "cache" / "features").glob("*.npy")]
    assert [a.dtype for a in stored] == [np.float32] and np.isfinite(stored[0]).all()
    assert np.abs(stored[0]).max() > np.finfo(np.float16).max  # what float16 would have made inf
    assert np.isfinite(run.history[0]["train_loss"])


def test_the_float32_fallback_store_keeps_to_the_size_limit(data, tmp_path):
    """The size limit was checked for the float16 store only; its float32 fallback, twice as large, was then built
    whatever its size. Here 24 images x 512 features: 24.6 kB in float16, 49.2 kB in float32, a 30 kB limit."""
    lines: list[str] = []
    run = cnnlab.train(data=str(data), model="resnet18", weights="random", finetune="head", image_size=64,
                       std="0.00001,0.00001,0.00001", epochs=1, device="cpu", precision="bf16", feature_cache_max=3e-5,
                       cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"), progress=False, log=lines.append)
    assert any("past float16's range; storing float32 instead" in line for line in lines), lines
    assert any("feature store off: in float32 it would take 0.00 GB, over the limit of 0.00 GB" in line for line in lines)
    assert not list((tmp_path / "cache" / "features").glob("*.npy"))  # nothing over the limit was written
    assert run.status == "completed" and np.isfinite(run.history[0]["train_loss"])  # trained on images instead


# ---- 7. the Python API refuses bad arguments as the CLI refuses bad flags ------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    return cnnlab.train(data=str(tiny_data), image_size=32, filters=4, dense_units=8, epochs=1, device="cpu",
                        cache_dir=str(out / "cache"), out=str(out / "runs"), progress=False, log=None)


@pytest.mark.parametrize("call, needle", [
    (lambda run, d: run.predict(d, top=-1), "top=-1: expected a whole number of at least 1"),
    (lambda run, d: run.predict(d, top=0), "top=0: expected a whole number of at least 1"),
    (lambda run, d: run.predict(d, top="3"), "top='3'"),
    (lambda run, d: list(run.predict_iter([d], batch=0)), "batch=0"),
    (lambda run, d: run.evaluate(top=0), "top=0"),
    (lambda run, d: run.explain(neurons="2"), "neurons='2': expected a whole number of at least 1"),
    (lambda run, d: run.explain(per_neuron=0), "per_neuron=0"),
    (lambda run, d: cnnlab.sweep("sweeps/partA.yaml", count="1"), "count='1': expected a whole number of at least 1"),
    (lambda run, d: cnnlab.sweep("sweeps/partA.yaml", count=0), "count=0"),
    (lambda run, d: cnnlab.sweep(42), "sweep_file=42: expected a path"),
    (lambda run, d: cnnlab.lr_find(steps="10"), "steps='10': expected a whole number of at least 5"),
    (lambda run, d: cnnlab.lr_find(steps=3), "steps=3"),
    (lambda run, d: cnnlab.lr_find(start="tiny"), "start='tiny': expected a number above 0"),
    (lambda run, d: cnnlab.train([1, 2]), "config=[1, 2]: expected a YAML file's path, a dict of Config fields"),
    (lambda run, d: cnnlab.compare(run), "runs="),
    (lambda run, d: cnnlab.check(None), "root=None: expected a path"),
    (lambda run, d: cnnlab.report([]), "paths=[]: expected a path or a list of paths"),
    (lambda run, d: cnnlab.assignment(d, trials="2"), "trials='2'"),
    (lambda run, d: cnnlab.assignment(d, workers=0), "workers=0"),
])
def test_public_functions_refuse_bad_arguments_with_a_config_error(tiny_run, tiny_data, call, needle):
    photo = next((tiny_data / "val" / "circle").iterdir())
    with pytest.raises(cnnlab.ConfigError) as caught:
        call(tiny_run, photo if "predict" in needle or "top" in needle or "batch" in needle else tiny_data)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_a_sweep_given_as_a_dict_runs_as_its_file_would(tiny_data, tmp_path):
    space = {"name": "from-dict", "method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
             "parameters": {"activation": {"values": ["relu", "gelu"]}}}
    study = cnnlab.sweep(space, data=str(tiny_data), sweeps_dir=tmp_path / "sweeps", image_size=32, filters=4,
                         dense_units=8, epochs=1, cache_dir=str(tmp_path / "cache"), device="cpu", log=None, progress=False)
    assert study.folder == tmp_path / "sweeps" / "from-dict"
    assert sorted(t["config"]["activation"] for t in study.trials) == ["gelu", "relu"]


# ---- 9. the low ones: spreadsheets, scripts ------------------------------------------------------------------------

def test_class_names_that_look_like_formulas_stay_text_in_mistakes_csv(data, tmp_path):
    import csv

    from cnnlab.io import from_spreadsheet_cell

    first, second = sorted((data / "train").iterdir())[:2]
    names = {first.name: "=SUM(A1+A2)", second.name: "+1-555 birds"}
    for split in ("train", "val"):
        for old, new in names.items():
            (data / split / old).rename(data / split / new)
    run = cnnlab.train(data=str(data), image_size=32, filters=4, dense_units=8, epochs=1, device="cpu",
                       precision="fp32",  # one model on every CPU kind: its mistakes are never a matter of rounding
                       cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"), progress=False, log=None)
    run.evaluate(data, progress=False, log=None)
    with (run.folder / "eval" / "mistakes.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows, "a one-epoch model on three classes makes mistakes"
    cells = [r[k] for r in rows for k in ("true", "predicted")]
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells), cells
    assert {from_spreadsheet_cell(c) for c in cells} <= {*names.values(), sorted((data / "train").iterdir())[-1].name}
    html = cnnlab.report([run.folder], tmp_path / "report").read_text()
    assert "+1-555 birds" in html and "=SUM(A1+A2)" in html  # the report shows the names as they are
    assert "'+1-555 birds" not in html and "'=SUM(A1+A2)" not in html  # the CSV's guard is for spreadsheets alone


def test_class_names_in_any_script_get_a_font_that_has_them_and_no_warning(tmp_path, recwarn):
    from matplotlib import font_manager, ft2font

    from cnnlab.visualise import plot_confusion

    names = ["アマガエル", "Épervier", "北极熊"]
    plot_confusion([[3, 1, 0], [0, 4, 0], [1, 0, 2]], names, tmp_path / "confusion.png")
    assert not [w for w in recwarn.list if "Glyph" in str(w.message)]  # boxes at worst, never a warning
    have = [f for f in font_manager.findSystemFonts() if ord("熊") in ft2font.FT2Font(f).get_charmap()]
    if not have:
        missing_component("a font with CJK characters", ".ci/run installs Debian's fonts-droid-fallback")
    import matplotlib.pyplot as plt

    from cnnlab.visualise import use_fonts_for_every_script

    fig, ax = plt.subplots()
    ax.set_title(names[2])
    added = use_fonts_for_every_script(fig)
    plt.close(fig)
    # a name may hold a '-', which a plain string would parse as a fontconfig pattern
    found = [font_manager.findfont(font_manager.FontProperties(family=[name])) for name in added]
    assert added and any(ord("熊") in ft2font.FT2Font(f).get_charmap() for f in found)
    assert not [name for name in added if name.startswith("Last Resort")]


def test_a_character_no_real_font_has_is_left_to_matplotlibs_own_last_resort(tmp_path):
    """matplotlib (3.10+) ends every font list with Unicode's Last Resort font, whose every glyph is a placeholder
    box: it covers all of Unicode, so it must never be picked as the font that 'has' a character. Where the checkout
    path sorts before /usr (CI's /check/...), it was picked first, and CJK class names were drawn as boxes."""
    import matplotlib.pyplot as plt

    from cnnlab.visualise import use_fonts_for_every_script

    fig, ax = plt.subplots()
    ax.set_title("\U00030000 owl")  # CJK Extension G: no font installed here or on CI has it
    assert use_fonts_for_every_script(fig) == []
    plt.close(fig)


def test_a_loss_made_nan_by_its_inputs_never_advises_a_lower_lr(data, tmp_path):
    from cnnlab.training import TrainingDiverged

    with pytest.raises(TrainingDiverged) as caught:  # a std of 1e-45 sends every normalised pixel to inf
        cnnlab.train(data=str(data), image_size=32, filters=4, dense_units=8, epochs=1, device="cpu", precision="fp32",
                     std="1e-45,1e-45,1e-45", cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"),
                     progress=False, log=None)
    assert "the inputs hold inf or nan values" in str(caught.value) and "lower --lr" not in str(caught.value)


def test_cnnlab_sweep_shares_a_study_through_cnnlab_storage_as_the_cli_does(tiny_data, tmp_path, monkeypatch):
    """One rule for the storage (sweeps.storage.storage_url): the Python API reads $CNNLAB_STORAGE as the CLI does."""
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("CNNLAB_STORAGE", url)
    space = {"name": "shared", "method": "grid", "parameters": {"activation": {"values": ["relu", "gelu"]}}}
    cnnlab.sweep(space, data=str(tiny_data), sweeps_dir=tmp_path / "sweeps", image_size=32, filters=4, dense_units=8,
                 epochs=1, cache_dir=str(tmp_path / "cache"), device="cpu", log=None, progress=False)
    assert not (tmp_path / "sweeps" / "shared" / "journal.log").exists()
    studies = optuna.get_all_study_summaries(url)
    assert [s.n_trials for s in studies] == [2]
