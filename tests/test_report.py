"""`cnnlab assignment` and `cnnlab report`: the whole job on real JPEGs, resumed after a real kill, and the report
checked in a real browser (headless Chromium: no console error, every image loaded, no request off file://, the
parallel-coordinates plot answering clicks and drags)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import devices_recorded, missing_component

import cnnlab
from cnnlab.evaluate import calibration
from cnnlab.reporting.observations import compare_claim, mean_difference, sweep_observations

SECTIONS = ("data", "cost", "sweep", "test", "explain", "partb", "curves", "repro")


def quick_job(data: Path, out: Path, cache: Path, **kw):
    return cnnlab.assignment(data, out, quick=True, trials=3, image_size=32, model="resnet18", weights="random", strategies="head",
                             cache_dir=str(cache), log=None, progress=False, **{"device": "cpu", "verify": 2, **kw})


@pytest.fixture(scope="module")
def job(tiny_data, tmp_path_factory):
    """The quick assignment on tiny real JPEGs: the shipped Part A sweep (3 trials on 32 px images, so its stride-2
    combinations are skipped), Part B head-only on ResNet-18 with random weights (no download)."""
    out = tmp_path_factory.mktemp("job") / "assignment"
    index = quick_job(tiny_data, out, out.parent / "cache")
    return out, index


def section(html: str, name: str) -> str:
    start = html.index(f'<section id="{name}">')
    return html[start:html.index("</section>", start)]


@pytest.mark.slow
def test_the_assignment_fills_every_section_of_its_report(job):
    out, index = job
    assert index == out / "report" / "index.html"
    html = index.read_text()
    for name in SECTIONS:
        assert "class=missing" not in section(html, name), name  # every section filled from real runs
    steps = json.loads((out / "assignment.json").read_text())["steps"]
    assert {s["state"] for s in steps.values()} == {"done", "trained"}
    assert "data:image/png;base64," in section(html, "test") and "reliability diagram" in section(html, "test")
    assert "most confident mistakes" in section(html, "test")
    assert "met its test folder 1 time(s) (<code>test_ledger.jsonl</code>); once, as it should" in section(html, "test")
    sweep = section(html, "sweep")
    assert "3 trial(s) trained" in sweep and "parcoords" in sweep
    assert "the winner, verified" in sweep and "Part A: verify the top 2" in steps  # verified, and the report says so
    found = json.loads((out / "sweeps" / "partA" / "verify.json").read_text())
    assert f"Part A&#x27;s model is the verified winner of sweep partA ({Path(found['model']).name})" in html
    winner = found["candidates"][0]  # the observations cite the verified numbers, not the search's single run
    observed = sweep[sweep.index("<h3>observations</h3>"):sweep.index("<h3>best trials</h3>")]
    assert (f"The winning configuration, verified: trial {winner['trial']}, val_acc {winner['mean']:.4f} ± "
            f"{winner['std']:.4f} over {len(winner['values'])} new seeds") in observed
    assert "skipped" in sweep and "stride-2 first convolution, so it needs at least 64" in sweep  # said, not trained
    assert "Grad-CAM" in section(html, "explain") and "guided back-propagation" in section(html, "explain")
    partb = section(html, "partb")
    assert "partB-head" in partb and "the scratch CNN" in partb and "95% CI" in partb
    # Part B's best run taught Part A's small CNN: the student beside them, with its teacher recorded
    assert "distilled" in partb and steps["distil Part B's best run into Part A's small CNN"]["state"] == "trained"
    assert steps["distil Part B's best run into Part A's small CNN"]["teacher"].endswith("partB-head")
    student = json.loads((out / "runs" / "distilled" / "summary.json").read_text())
    assert student["teacher"]["checkpoint"] == str((out / "runs" / "partB-head" / "best.pt").resolve())
    assert "(distilled)" not in section(html, "test")  # Part A's model is still the sweep's, not the student
    from cnnlab.run_folder import RunFolder, inside

    s, t = (RunFolder(out / "runs" / name).evaluation["accuracy"] for name in ("distilled", "partB-head"))
    b = RunFolder(inside(out / "sweeps" / "partA", found["model"])).evaluation["accuracy"]  # the scratch CNN's
    if t > b:  # the share of the gap the student closed, from the three evaluations
        assert f"closed {(s - b) / (t - b):.0%} of the test-accuracy gap" in partb
        assert f"scratch CNN ({b:.3f}) and its teacher ({t:.3f}): {s:.3f}" in partb
    else:
        assert f"whose test accuracy ({t:.3f}) is not above the scratch CNN&#x27;s ({b:.3f})" in partb
    assert "to train it again" in section(html, "repro") and "CPU flags" in section(html, "repro")
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html  # no CDN
    assert (out / "report" / "sweep-partA-parallel-coordinates.png").is_file()  # the PNG beside it


@pytest.mark.slow
def test_every_step_of_the_assignment_ran_on_the_device_it_was_given(job):
    out, _ = job
    recorded = devices_recorded(out)
    assert recorded == {"configs": {"cpu"}, "trainings": {"cpu"}, "evaluations": {"cpu"}, "explanations": {"cpu"}}
    assert len(list(out.glob("runs/*/eval/metrics.json"))) == 2 and len(list(out.glob("sweeps/partA/*/*/eval"))) == 1


@pytest.mark.slow
def test_a_rerun_redoes_nothing_that_is_complete(job, tiny_data):
    out, _ = job
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    quick_job(tiny_data, out, out.parent / "cache")
    steps = json.loads((out / "assignment.json").read_text())["steps"]
    assert all(s["state"] == "done before" for k, s in steps.items() if k not in ("compare", "report")), steps
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == before  # no checkpoint written again


@pytest.mark.slow
def test_an_assignment_killed_mid_sweep_continues_where_it_stopped(tiny_data, tmp_path):
    argv = [sys.executable, "-m", "cnnlab.cli", "assignment", "--data", str(tiny_data), "--out", str(tmp_path / "a"),
            "--quick", "--trials", "3", "--image_size", "32", "--cache_dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait for the event: the first trial finished, then kill the job for real
        if " complete " in line and line.startswith("trial"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    from cnnlab.sweeps.report import load_study
    from cnnlab.whole_job import finished_trials

    folder = tmp_path / "a" / "sweeps" / "partA"
    finished = lambda: {t.number: (t.datetime_complete, t.value) for t in load_study(folder).trials  # noqa: E731
                        if t.state.name in ("COMPLETE", "PRUNED")}
    kept = finished()
    assert len(kept) == 1
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Part B skipped: give --weights" in again.stdout
    assert finished_trials(folder) == 3
    after = finished()
    assert all(after[n] == done for n, done in kept.items())  # the first trial kept as it was,
    # never run again (a restart from scratch would complete it a second time, at a later time)
    html = (tmp_path / "a" / "report" / "index.html").read_text()
    assert "A fine-tuned pretrained model is not in the inputs" in section(html, "partb")


@pytest.mark.slow
def test_the_assignment_shares_part_a_among_worker_processes(tiny_data, tmp_path):
    from cnnlab.sweeps.report import load_study
    from cnnlab.whole_job import finished_trials

    cnnlab.assignment(tiny_data, tmp_path / "a", quick=True, trials=2, image_size=32, workers=2,
                      cache_dir=str(tmp_path / "cache"), log=None, progress=False)
    folder = tmp_path / "a" / "sweeps" / "partA"
    assert finished_trials(folder) == 2  # each of the two workers runs its share: one trial
    owners = {t.user_attrs["owner"]["worker"] for t in load_study(folder).trials if "owner" in t.user_attrs}
    assert owners == {"0", "1"}  # two processes did the trials
    assert (tmp_path / "a" / "report" / "index.html").is_file()


def test_calibration_of_a_calibrated_and_an_overconfident_model():
    rng = np.random.default_rng(0)
    n, c = 20000, 4
    confidence = rng.uniform(0.5, 1.0, n)
    labels = torch.zeros(n, dtype=torch.long)
    hit = rng.uniform(size=n) < confidence  # right exactly as often as it is confident
    pred = torch.where(torch.from_numpy(hit), 0, 1)
    probs = torch.full((n, c), 0.0, dtype=torch.float64)
    probs[torch.arange(n), pred] = torch.from_numpy(confidence)
    probs[torch.arange(n), (pred + 2) % c] = torch.from_numpy(1 - confidence)
    calibrated = calibration(probs.float(), labels)
    assert calibrated["ece"] < 0.02 and sum(b["count"] for b in calibrated["bins"]) == n
    always_sure = torch.zeros(n, c)
    always_sure[:, 0], always_sure[:, 1] = 0.95, 0.05
    half_right = torch.from_numpy(rng.integers(0, 2, n))
    assert calibration(always_sure, half_right)["ece"] == pytest.approx(0.95 - (half_right == 0).float().mean().item(), abs=1e-6)


def test_observations_claim_only_what_the_trials_support():
    rng = np.random.default_rng(1)
    rows = [{"config": {"batch_norm": bn, "lr": lr, "activation": act}, "value": 0.5 + 0.1 * bn + rng.normal(0, 0.01)}
            for bn, lr, act in zip([True, False] * 8, np.geomspace(1e-4, 1e-2, 16), ["relu", "gelu"] * 8)]
    kinds = {"batch_norm": "categorical", "lr": "numeric", "activation": "categorical"}
    claims, unclear = sweep_observations(rows, kinds, "val_acc")
    assert any(c.startswith("batch_norm = True: +0.09") and "n = 8 vs 8" in c and "also share activation = relu" in c
               for c in claims), claims
    assert not any("lr" in c for c in claims) and any(u.startswith("lr") for u in unclear)
    # activation alternates with batch norm here, so it is confounded: one claim names both (the trials cannot say which)
    assert len(claims) == 1
    noise = [{"config": {"batch_norm": bool(i % 2)}, "value": float(rng.normal(0.5, 0.05))} for i in range(12)]
    assert sweep_observations(noise, {"batch_norm": "categorical"}, "val_acc")[0] == []
    diff, lo, hi = mean_difference(np.array([1.0, 1.1, 0.9]), np.array([0.0, 0.1, -0.1]))
    assert diff == pytest.approx(1.0) and lo < 1.0 < hi and lo > 0
    a = {"accuracy": 0.9, "accuracy_ci95": [0.88, 0.92]}
    assert "do not overlap" in compare_claim("a", a, "b", {"accuracy": 0.8, "accuracy_ci95": [0.78, 0.82]})
    assert "cannot tell them apart" in compare_claim("a", a, "b", {"accuracy": 0.89, "accuracy_ci95": [0.87, 0.91]})


@pytest.mark.slow
def test_a_report_renders_run_folders_written_before_it_existed(job, tmp_path):
    """An old run folder: no provenance in summary.json, no calibration, no reliability.png, no mistakes."""
    out, _ = job
    old = tmp_path / "old-run"
    best = next(p for p in (out / "sweeps" / "partA").glob("*/*") if (p / "eval").is_dir())  # Part A's model
    shutil.copytree(best, old)
    summary = json.loads((old / "summary.json").read_text())
    del summary["provenance"]
    (old / "summary.json").write_text(json.dumps(summary))
    metrics = json.loads((old / "eval" / "metrics.json").read_text())
    for key in ("calibration", "balanced_accuracy", "checkpoint_sha256"):
        metrics.pop(key, None)
    (old / "eval" / "metrics.json").write_text(json.dumps(metrics))
    for name in ("reliability.png", "mistakes.csv", "top_losses.png"):
        (old / "eval" / name).unlink()
    shutil.rmtree(old / "explain")
    index = cnnlab.report([old], tmp_path / "rep")
    html = index.read_text()
    assert "test accuracy <b>" in section(html, "test")
    assert "Calibration (a reliability diagram) is not in the inputs" in section(html, "test")
    assert f"cnnlab explain {old} --data ROOT" in section(html, "explain")
    assert "not recorded" in section(html, "repro")
    assert "A sweep is not in the inputs" in section(html, "sweep")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_report_and_assignment_refuse_bad_input_in_one_line(tmp_path, tiny_data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for args, needle in ((["report", str(tmp_path / "nope")], "not found"),
                         (["report", str(tmp_path / "file.txt")], "is a file"),
                         (["report", str(tmp_path / "empty")], "holds no run, sweep, compare or check folder"),
                         (["assignment", "--data", str(tmp_path / "empty")], "needs train/ and val/"),
                         (["assignment", "--data", str(tiny_data), "--strategies", "head,top"], "'top' is not a strategy"),
                         (["assignment", "--data", str(tiny_data), "--sweep", str(tmp_path / "x.yaml")], "not found"),
                         (["assignment", "--data", str(tiny_data), "--workers", "999"], "cores"),
                         (["assignment", "--data", str(tiny_data), "--weights", str(tmp_path / "w.pth")], "file not found"),
                         (["assignment", "--data", str(tiny_data), "--weights", "DEFAULT", "--model", "resnet5"],
                          "model='resnet5'")):
        result = cli(*args, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr)
        assert not (tmp_path / "assignment").exists()  # refused before anything was written


# ---- in a real browser ----------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browser():
    try:
        from playwright import sync_api
    except ImportError:
        missing_component("playwright (the dev extra)", "pip install -e '.[dev]'")
    if CHROMIUM is None:
        missing_component("Chromium", ".ci/run installs Debian's chromium")
    return sync_api.sync_playwright()


def open_page(p, index: Path, width: int):
    b = p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
    page = b.new_page(viewport={"width": width, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(index.as_uri(), wait_until="load")
    return b, page, errors, requests


@pytest.mark.slow
def test_the_report_works_in_a_real_browser(job):
    _, index = job
    with browser() as p:
        for width in (1280, 400):
            b, page, errors, requests = open_page(p, index, width)
            images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth])")
            assert images and all(done and w > 0 for done, w in images), images
            assert errors == [], errors
            assert all(u.startswith(("file://", "data:")) for u in requests), [u for u in requests if not u.startswith("file")]
            assert page.evaluate("document.documentElement.scrollWidth") <= width  # wide tables and plots scroll inside
            b.close()
        b, page, errors, _ = open_page(p, index, 1280)
        axes = lambda: page.eval_on_selector_all(".pc-axis", "gs => gs.map(g => g.dataset.name)")  # noqa: E731
        first = axes()
        assert len(first) > 10 and page.locator(".pc-line").count() == 3
        page.locator(".pc-axis").first.locator(".pc-move").click()  # move the first axis right
        assert axes()[:2] == [first[1], first[0]]
        rows = lambda: page.eval_on_selector_all(".pc-table tr td:first-child", "tds => tds.map(t => t.textContent)")  # noqa: E731
        before = rows()
        column = lambda name: page.evaluate("""name => {  // the cells of the column headed `name`, top to bottom
            const heads = [...document.querySelectorAll('.pc-table th')].map(h => h.textContent.replace(/ [▲▼]$/, ''));
            const k = heads.indexOf(name);
            return [...document.querySelectorAll('.pc-table tr')].slice(1).map(r => r.cells[k].textContent); }""", name)  # noqa: E731
        metric = [float(v) for v in column("val_acc")]
        assert metric == sorted(metric, reverse=True)  # first sorted by the metric, best first
        lr_cell = lambda: [float(v) for v in column("lr")]  # noqa: E731
        page.locator(".pc-table th", has_text="lr").click()
        assert lr_cell() == sorted(lr_cell(), reverse=True)  # a click sorts by lr, largest first
        page.locator(".pc-table th", has_text="lr").click()
        assert lr_cell() == sorted(lr_cell())  # a second click turns the order round
        assert sorted(rows()) == sorted(before) and len(before) == 3 and len(set(lr_cell())) == 3
        metric = page.locator(".pc-axis[data-name='val_acc'] .pc-hit")
        metric.scroll_into_view_if_needed()  # the last axis lies to the right, in the plot's own scroll box
        box = metric.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 4)  # drag over the top of the metric's axis
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.2, steps=5)
        page.mouse.up()
        kept = int(page.locator(".pc-count").text_content().split()[0])
        # the best trial sits at the top of the metric's axis and the worst at its bottom: one kept, one out at least
        assert 1 <= kept <= 2 and len(rows()) == kept and page.locator(".pc-line.pc-out").count() == 3 - kept
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # a click clears the range
        assert page.locator(".pc-count").text_content().startswith("3 of 3")
        verified = page.locator("#sweep h3", has_text="the winner, verified")  # Part A's winner, verified over seeds
        assert verified.is_visible()
        found = json.loads((index.parents[1] / "sweeps" / "partA" / "verify.json").read_text())
        table = page.locator("#sweep h3:has-text('the winner, verified') ~ div.scroll table").first
        cells = table.locator("tr").nth(1).locator("td").all_text_contents()
        winner = found["candidates"][0]
        assert cells[1] == str(winner["trial"]) and cells[4] == f"{winner['mean']:.4f} ± {winner['std']:.4f}"
        partb = page.locator("#partb div.scroll table").first  # each run's cost per image, as its summary has it
        heads = partb.locator("th").all_text_contents()
        runs = {f.parent.name: json.loads(f.read_text()) for f in index.parents[1].rglob("summary.json")}
        shown = {}
        for row in partb.locator("tr").all()[1:]:
            cells = row.locator("td").all_text_contents()
            shown[cells[heads.index("strategy")]] = float(cells[heads.index("GFLOPs per image")])
            assert cells[heads.index("GFLOPs per image")] == f"{runs[cells[0]]['flops_per_image'] / 1e9:.3f}"
            evaluated = json.loads(next(index.parents[1].rglob(f"{cells[0]}/eval/metrics.json")).read_text())
            assert cells[heads.index("inference (ms / image)")] == f"{evaluated['inference']['ms_per_image']:.2f}"
        assert shown["distilled"] < shown["head"]  # the student costs a fraction of its teacher per image
        assert errors == []
        b.close()
