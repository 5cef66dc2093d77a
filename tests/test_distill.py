"""Knowledge distillation (`--teacher RUN`): a small CNN learns from a trained run's logits, computed once with the
teacher's own preprocessing; the teacher is recorded in the student's checkpoints; the student keeps its split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.cli import main
from cnnlab.config import make_config
from cnnlab.data import Batches, ImageTransform, load_images
from cnnlab.distill import DistillationLoss
from cnnlab.errors import ConfigError, DataError
from cnnlab.evaluate import load_model, predict_logits
from cnnlab.io import sha256_of
from cnnlab.models import smallcnn_cost
from cnnlab.run_folder import TEACHER_LOGITS, TEACHER_VIEWS
from cnnlab.training import fit


@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory):
    """A run that knows more than the students below: larger input (48 px, its own preprocessing), wider, longer.
    Trained once for the module: the students only read it (its folder is never written after)."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = make_config(dict(data=str(tiny_data), image_size=48, filters=16, dense_units=32, batch_size=16, epochs=6,
                           out=str(root / "runs"), cache_dir=str(root / "cache"), decode_workers=1, name="teacher",
                           device="cpu", precision="fp32"))
    return fit(cfg, progress=False, log=lambda s: None).run_dir


def teacher_term(run_dir, table, cfg, temperature=4.0):
    """The distillation term (T^2 KL(teacher || student)) of a run's best.pt over its training images."""
    loaded = load_model(run_dir / "best.pt", torch.device("cpu"))
    images = load_images(f"{cfg.data}/train", loaded.pre.image_size, cfg.cache_dir, workers=1, progress=False)
    split = json.loads((run_dir / "split.json").read_text())
    rel = [str(p.relative_to(images.root.parent)) for p in images.files]
    rows = np.asarray(sorted(rel.index(r) for r in split["train"]))
    with torch.inference_mode():
        logits, _ = predict_logits(loaded.model, Batches(images, rows, 64, torch.device("cpu"), shuffle=False),
                                   ImageTransform(loaded.pre, loaded.cfg.channels_last), torch.device("cpu"), None,
                                   loaded.cfg.tta)
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), 0.5, temperature)
    return float(loss.teacher_term(logits, torch.from_numpy(table[rows])))


def test_a_student_moves_toward_its_teacher(tiny_cfg, teacher):
    lines = []
    student = fit(tiny_cfg(name="student", teacher=str(teacher), distill_weight=0.9, epochs=4), progress=False,
                  log=lines.append).run_dir
    alone = fit(tiny_cfg(name="alone", epochs=4), progress=False, log=lambda s: None).run_dir
    untrained = fit(tiny_cfg(name="untrained", teacher=str(teacher), distill_weight=0.9, epochs=1, lr=1e-7),
                    progress=False, log=lambda s: None).run_dir
    table = np.load(student / TEACHER_LOGITS)
    cfg = tiny_cfg()
    distilled, plain, start = (teacher_term(r, table, cfg) for r in (student, alone, untrained))
    assert distilled < start and distilled < plain, (distilled, plain, start)  # the term falls, and more than without
    # the teacher's own logits: its preprocessing (48 px), each training image once, mirror-averaged (its TTA)
    loaded = load_model(teacher / "best.pt", torch.device("cpu"))
    images = load_images(f"{cfg.data}/train", 48, cfg.cache_dir, workers=1, progress=False)
    with torch.inference_mode():
        own, _ = predict_logits(loaded.model, Batches(images, images.valid, 64, torch.device("cpu"), shuffle=False),
                                ImageTransform(loaded.pre, True), torch.device("cpu"), None, True)
    assert np.allclose(table[images.valid], own.numpy(), atol=1e-5)
    assert any("its logits for 160 training images" in line for line in lines)
    record = torch.load(student / "best.pt", weights_only=True)["teacher"]
    assert record["sha256"] == sha256_of(teacher / "best.pt") and record["model"] == "smallcnn"
    assert json.loads((student / "summary.json").read_text())["teacher"] == record
    assert (student / "split.json").read_text() == (teacher / "split.json").read_text()  # the teacher's split
    # the cost per image each run records (the report's Part B table shows it), measured on its own network, equals
    # the small CNN's closed form (`smallcnn_cost`, written out from the layer sizes, not measured)
    flops = {r: json.loads((r / "summary.json").read_text())["flops_per_image"] for r in (student, teacher)}
    assert flops[student] == smallcnn_cost(tiny_cfg(name="student"), 10).flops
    assert flops[teacher] == smallcnn_cost(tiny_cfg(name="teacher", image_size=48, filters=16), 10).flops > flops[student]


@pytest.mark.cpu_kind
def test_a_resumed_student_reads_its_teachers_logits_back(tiny_cfg, teacher):
    # precision auto: a student in bf16 where the CPU computes it natively, in fp32 elsewhere (both CPU kinds in CI)
    fit(tiny_cfg(name="s", teacher=str(teacher), epochs=1, precision="auto"), progress=False, log=lambda s: None)
    kept = Path(tiny_cfg().out) / "s" / TEACHER_LOGITS
    stamp = kept.stat().st_mtime_ns
    lines = []
    fit(tiny_cfg(name="s", teacher=str(teacher), epochs=2, precision="auto"), resume=True, progress=False,
        log=lines.append)
    assert kept.stat().st_mtime_ns == stamp and not any("its logits" in line for line in lines)


def test_students_of_one_teacher_share_its_logits(tiny_cfg, teacher):
    said = {}
    for name, seed in (("first", 0), ("second", 1)):
        said[name] = []
        fit(tiny_cfg(name=name, seed=seed, teacher=str(teacher), epochs=1), progress=False, log=said[name].append)
    runs = Path(tiny_cfg().out)
    assert any("computed in" in line for line in said["first"])
    assert any("read from" in line and "beside the image cache" in line for line in said["second"])
    assert np.array_equal(np.load(runs / "first" / TEACHER_LOGITS), np.load(runs / "second" / TEACHER_LOGITS))
    [beside] = Path(tiny_cfg().cache_dir).glob("*.teacher-*.npy")
    beside.write_bytes(b"damaged")  # a damaged store is computed again, never trusted
    lines = []
    fit(tiny_cfg(name="third", teacher=str(teacher), epochs=1), progress=False, log=lines.append)
    assert any("computed in" in line for line in lines)
    assert np.array_equal(np.load(runs / "third" / TEACHER_LOGITS), np.load(runs / "first" / TEACHER_LOGITS))


def test_a_wrong_teacher_is_one_line(tiny_cfg, teacher, tiny_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="teacher='nowhere': nowhere not found; give a trained run folder"):
        fit(tiny_cfg(name="x", teacher="nowhere"), progress=False)
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    shutil.rmtree(other / "train" / "star")
    shutil.rmtree(other / "val" / "star")
    with pytest.raises(DataError, match="was trained on classes .* distil from a run on the same class folders"):
        fit(tiny_cfg(name="y", data=str(other), teacher=str(teacher)), progress=False, log=lambda s: None)
    assert main(["train", "--data", str(tiny_data), "--teacher", str(tmp_path / "none"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "none not found; give a trained run folder" in err and len(err.strip().splitlines()) == 1


class InputProbe(torch.nn.Module):
    """Stands in for the teacher's network to show what it is given: its input, flattened, as its 'logits'."""

    def forward(self, x):
        return x.flatten(1)


def views_side_by_side(run, seed, side=None):
    """Each batch's view as the student's step makes it (at `side`: progressive resizing's smaller images), as the
    online teacher is given it, and (a yardstick) the same images in views drawn by another generator."""
    aug, other = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    for x, y, seen_by_teacher in run.online_teacher.alongside(run.source.train.epoch(seed), seed, aug):
        student_view = run.source.transform(x, aug, side=side).clone()  # the trainer's next step, drawing from aug
        yield student_view, seen_by_teacher, run.source.transform(x, other, side=side).clone()


@pytest.mark.parametrize("teacher_size, student_side", [(32, None), (48, None), (32, 16)])
def test_the_online_teacher_sees_the_students_view(tiny_cfg, teacher_size, student_side):
    from cnnlab.training import prepare

    teacher = fit(tiny_cfg(name=f"t{teacher_size}", image_size=teacher_size, epochs=1), progress=False,
                  log=lambda s: None).run_dir
    run = prepare(tiny_cfg(name="student", teacher=str(teacher), distill_mode="online"), progress=False,
                  log=lambda s: None)
    try:
        run.online_teacher.loaded.model = InputProbe()
        views = list(views_side_by_side(run, seed=5, side=student_side))
    finally:
        run.claim.release()
    assert len(views) == len(run.source.train) >= 2
    near = far = 0.0
    for student_view, teacher_input, other_view in views:
        teacher_view = teacher_input.view(len(student_view), 3, teacher_size, teacher_size)
        if teacher_size == 32 and not student_side:  # the same preprocessing: the same crop, flip and colour
            assert torch.equal(teacher_view, student_view)
        down = torch.nn.functional.interpolate(teacher_view, size=student_side or 32, mode="area")
        near += float((down - student_view).abs().mean())
        far += float((down - other_view).abs().mean())
    assert near < 0.5 * far, (near, far)  # scaled down, the teacher's view is the student's, not just any view


def test_online_distillation_learns_from_the_teacher_and_resumes_exactly(tiny_cfg, teacher):
    online = dict(teacher=str(teacher), distill_mode="online", distill_weight=0.9)
    lines = []
    whole = fit(tiny_cfg(name="online", epochs=3, **online), progress=False, log=lines.append).run_dir
    assert any("run online on each training view" in line for line in lines)
    info = json.loads((whole / "teacher.json").read_text())
    assert info["mode"] == "online" and info["sha256"] == sha256_of(teacher / "best.pt")
    assert not (whole / TEACHER_LOGITS).exists()
    assert torch.load(whole / "best.pt", weights_only=True)["teacher"]["sha256"] == info["sha256"]
    fit(tiny_cfg(name="resumed", epochs=1, **online), progress=False, log=lambda s: None)
    resumed = fit(tiny_cfg(name="resumed", epochs=3, **online), resume=True, progress=False, log=lambda s: None).run_dir
    history = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    keys = ("train_loss", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in history] == [[r[k] for k in keys] for r in again]
    stored = fit(tiny_cfg(name="stored", epochs=1, teacher=str(teacher)), progress=False, log=lambda s: None).run_dir
    table = np.load(stored / TEACHER_LOGITS)  # the teacher's logits of each whole image: the yardstick for both
    alone = fit(tiny_cfg(name="alone", epochs=3), progress=False, log=lambda s: None).run_dir
    cfg = tiny_cfg()
    assert teacher_term(whole, table, cfg) < teacher_term(alone, table, cfg)


def test_online_distillation_of_a_frozen_backbone_trains_on_the_images(tiny_cfg, teacher, tmp_path):
    """Before: refused only after the feature store was built and the run folder made."""
    lines = []
    run = fit(tiny_cfg(name="frozen", model="resnet18", weights="random", finetune="head", teacher=str(teacher),
                       distill_mode="online", epochs=1), progress=False, log=lines.append).run_dir
    assert any("feature store off: with --distill_mode online" in line for line in lines)
    assert not (tmp_path / "cache" / "features").exists()  # no store was built
    assert json.loads((run / "teacher.json").read_text())["mode"] == "online"


def test_the_patient_schedule_scales_its_epochs_down_for_larger_sets():
    from cnnlab.distill import PATIENT_MAX_EPOCHS, PATIENT_PASSES, default_epochs

    assert default_epochs("", 1228) == 10  # no teacher: the plain default
    assert default_epochs("runs/t", 1228) == 150  # grocery's training images: what was measured (docs/recipe.md)
    assert default_epochs("runs/t", 200) == PATIENT_MAX_EPOCHS  # a small set is not trained for ever
    assert default_epochs("runs/t", 8000) == round(PATIENT_PASSES / 8000)  # iNaturalist-12K's ~8,000: 23 epochs
    assert default_epochs("runs/t", 10**6) == 10


def test_a_student_without_epochs_gets_the_patient_schedule_and_given_epochs_rule(teacher, tiny_data, tmp_path,
                                                                                   monkeypatch):
    import cnnlab
    from cnnlab import distill

    monkeypatch.setattr(distill, "PATIENT_PASSES", 11 * 130)  # the teacher's split: 130 training images, 11 epochs
    common = dict(data=str(tiny_data), image_size=32, filters=8, dense_units=32, batch_size=16, out=str(tmp_path),
                  cache_dir=str(tmp_path / "cache"), decode_workers=1, device="cpu", precision="fp32",
                  teacher=str(teacher), progress=False)
    said = []
    run = cnnlab.train(name="patient", log=said.append, **common)
    assert len(run.history) == 11 and run.config.epochs == 11  # config.yaml holds the epochs it trained
    assert any("patient schedule" in line and "1,430 image passes over its 130 training images" in line for line in said), said
    assert len(cnnlab.train(name="given", epochs=2, log=None, **common).history) == 2
    assert len(cnnlab.train(name="plain", log=None, **{**common, "teacher": ""}).history) == 10


def test_the_bank_of_views_holds_what_the_online_teacher_gives_on_the_same_epochs(tiny_cfg, teacher):
    """distill_mode views without mixing: round r of the bank is, batch for batch, the online teacher's logits of the
    student's views of epoch r; a student's epoch K + r replays round r."""
    from cnnlab.sources import epoch_seed
    from cnnlab.training import prepare

    def online_logits(epoch):
        run = prepare(tiny_cfg(name=f"online-{epoch}", teacher=str(teacher), distill_mode="online", crop_min=0.5),
                      progress=False, log=lambda s: None)
        try:
            seed = epoch_seed(run.cfg.seed, epoch)
            aug = torch.Generator().manual_seed(seed)
            out = []
            for x, y, logits in run.online_teacher.alongside(run.source.train.epoch(seed), seed, aug):
                run.source.transform(x, aug)  # the student's step draws next
                out.append(logits)
            return torch.stack(out).numpy()
        finally:
            run.claim.release()

    views = dict(teacher=str(teacher), distill_mode="views", distill_views=2, distill_mixup=False, crop_min=0.5)
    run = prepare(tiny_cfg(name="bank", **views), progress=False, log=lambda s: None)
    try:
        bank = run.online_teacher
        assert bank.logits.shape[:2] == (2, len(run.source.train))
        for r in (1, 2):
            assert np.allclose(bank.logits[r - 1], online_logits(r), atol=1e-5)
        assert bank.epoch_seed(0, 3) == epoch_seed(0, 1) and bank.epoch_seed(0, 4) == epoch_seed(0, 2)
        assert np.allclose(bank.labels.sum(-1), 1.0) and set(np.unique(bank.labels)) == {0.0, 1.0}  # unmixed
    finally:
        run.claim.release()


def test_with_mixup_the_teacher_sees_the_students_mixed_view_and_the_labels_are_mixed_alike(tiny_cfg):
    from cnnlab.sources import epoch_seed
    from cnnlab.training import prepare

    teacher = fit(tiny_cfg(name="t32", epochs=1), progress=False, log=lambda s: None).run_dir
    run = prepare(tiny_cfg(name="student", teacher=str(teacher), distill_mode="online", crop_min=0.5), progress=False,
                  log=lambda s: None)
    try:
        run.online_teacher.loaded.model = InputProbe()
        run.source.transform.mixup = run.online_teacher.transform.mixup = True  # as distill_mode views sets them
        seed = epoch_seed(0, 1)
        aug = torch.Generator().manual_seed(seed)
        for x, y, seen in run.online_teacher.alongside(run.source.train.epoch(seed), seed, aug):
            student_view = run.source.transform(x, aug).clone()
            assert torch.equal(seen.view_as(student_view), student_view)  # the same mixing, bit for bit
            lam, order = run.source.transform.last_mix
            assert 0 <= float(lam) <= 1 and sorted(order.tolist()) == list(range(len(y)))
    finally:
        run.claim.release()
    views = dict(teacher=str(teacher), distill_mode="views", distill_views=2, crop_min=0.5)
    run = prepare(tiny_cfg(name="mixed", **views), progress=False, log=lambda s: None)
    try:
        labels, ys = run.online_teacher.labels, run.online_teacher.ys
        assert np.allclose(labels.sum(-1), 1.0) and labels.max() <= 1.0
        own = np.take_along_axis(labels, ys[..., None].astype(np.int64), -1)[..., 0]
        assert (own >= 0).all() and len(np.unique(labels)) > 2  # mixtures, each holding its own image's class
    finally:
        run.claim.release()


def test_a_student_of_a_bank_of_views_learns_from_it_and_resumes_exactly(tiny_cfg, teacher):
    views = dict(teacher=str(teacher), distill_mode="views", distill_views=2, distill_weight=0.9, crop_min=0.5)
    lines = []
    whole = fit(tiny_cfg(name="views", epochs=4, **views), progress=False, log=lines.append).run_dir
    assert any("teacher views: 2 rounds" in line and "computed" in line for line in lines)
    assert (whole / TEACHER_VIEWS).is_file()
    fit(tiny_cfg(name="resumed", epochs=1, **views), progress=False, log=lambda s: None)
    lines = []
    resumed = fit(tiny_cfg(name="resumed", epochs=4, **views), resume=True, progress=False, log=lines.append).run_dir
    assert any("read back" in line for line in lines)
    history = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    keys = ("train_loss", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in history] == [[r[k] for k in keys] for r in again]
    stored = fit(tiny_cfg(name="stored", epochs=1, teacher=str(teacher)), progress=False, log=lambda s: None).run_dir
    table = np.load(stored / TEACHER_LOGITS)
    alone = fit(tiny_cfg(name="alone", epochs=4, crop_min=0.5), progress=False, log=lambda s: None).run_dir
    cfg = tiny_cfg()
    assert teacher_term(whole, table, cfg) < teacher_term(alone, table, cfg)
