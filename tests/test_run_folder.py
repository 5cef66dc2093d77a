"""One reader of a run folder (`cnnlab.run_folder`): the best epoch, the kind of run, a finished run and a stale
evaluation are each decided once, and training, `cnnlab.Run`, `compare`, the report and the whole job agree on a
real trained folder."""

from __future__ import annotations

import shutil

import pytest
import yaml

import cnnlab
from cnnlab.checkpoint import load_checkpoint
from cnnlab.comparison import run_row
from cnnlab.config import make_config
from cnnlab.reporting import write_report
from cnnlab.run_folder import RunFolder, best_record, strategy_of


def record(epoch: int, acc: float, loss: float) -> dict:
    return {"epoch": epoch, "val_acc": acc, "val_loss": loss}


def test_the_best_epoch_is_trainings_rule_ties_to_the_lower_loss_then_the_earlier_epoch():
    history = [record(1, 0.5, 1.0), record(2, 0.6, 0.9), record(3, 0.6, 0.8), record(4, 0.6, 0.8), record(5, 0.55, 0.1)]
    assert best_record(history)["epoch"] == 3
    assert best_record([]) is None


def test_the_kind_of_run_is_read_from_its_config_once():
    assert strategy_of(make_config({})) == "scratch"
    assert strategy_of(make_config({"model": "resnet18", "finetune": "none"})) == "scratch"  # random init: scratch too
    assert strategy_of(make_config({"model": "resnet18", "weights": "DEFAULT", "finetune": "head"})) == "head"
    assert strategy_of(make_config({"model": "resnet18", "weights": "DEFAULT", "finetune": "partial",
                                    "freeze_stages": 2})) == "partial (freeze 2)"


@pytest.fixture
def trained(tiny_cfg, tmp_path):
    run = cnnlab.train(tiny_cfg(epochs=3), progress=False, log=None)
    run.evaluate(progress=False, log=None, device="cpu")
    return run


def test_every_reader_agrees_with_what_training_kept(trained):
    folder = RunFolder(trained.folder)
    kept = load_checkpoint(trained.folder / "best.pt", "cpu")
    assert folder.best_epoch == kept["epoch"] == trained.summary["best_epoch"] == trained.best_epoch
    assert folder.best_val_acc == trained.summary["best_val_acc"] == trained.best_val_acc
    assert folder.finished and folder.resumable and folder.strategy == "scratch" and folder.is_small_cnn
    row, history = run_row(trained.folder)
    assert row["best val_acc"] == f"{folder.best_val_acc:.4f}" and len(history) == 3
    assert not folder.evaluation_is_stale(folder.evaluation) and trained.files.evaluated


def test_an_evaluation_of_other_weights_is_stale_for_compare_the_report_and_the_whole_job(trained, tmp_path):
    """best.pt replaced after `evaluate` (here by the last epoch's weights, whose epoch number may well be the best
    one's): compare judged staleness by the epoch number and the whole job by the SHA-256, so they disagreed."""
    shutil.copyfile(trained.folder / "last.pt", trained.folder / "best.pt")
    folder = RunFolder(trained.folder)
    assert folder.evaluation_is_stale(folder.evaluation)
    assert "stale" in run_row(trained.folder)[0]["test acc"]
    assert not trained.files.evaluated
    page = write_report([trained.folder], tmp_path / "report").read_text()
    assert "stale: evaluated best.pt" in page


def test_a_run_folder_written_before_a_key_existed_reads_with_the_meaning_it_had(trained, tmp_path):
    """The report read config.yaml raw; every reader now goes through saved_config, so a key the folder predates
    reads as what it meant then (conv1_stride 1), in `cnnlab.Run`, the report and compare alike."""
    path = trained.folder / "config.yaml"
    values = yaml.safe_load(path.read_text())
    del values["conv1_stride"], values["class_weights"]
    path.write_text(yaml.safe_dump(values))
    folder = RunFolder(trained.folder)
    assert folder.config.conv1_stride == 1 and folder.config.class_weights == "none"
    assert trained.config == folder.config
    assert run_row(trained.folder)[0]["model"] == "smallcnn"
    page = write_report([trained.folder], tmp_path / "report").read_text()
    assert trained.folder.name in page


def test_a_run_killed_before_its_first_epoch_has_no_best_and_is_not_part_a_s_model(tiny_cfg, tmp_path):
    run = cnnlab.train(tiny_cfg(epochs=1, name="done"), progress=False, log=None)
    empty = run.folder.parent / "killed"
    empty.mkdir()
    shutil.copyfile(run.folder / "config.yaml", empty / "config.yaml")
    (empty / "metrics.jsonl").write_text("")
    folder = RunFolder(empty)
    assert folder.best_epoch is None and folder.best_val_acc is None and not folder.finished
    page = write_report([run.folder.parent], tmp_path / "report").read_text()
    assert "model is run done: the highest validation accuracy" in page


def test_every_test_folder_use_is_in_the_run_s_ledger_and_training_after_it_is_flagged(tiny_cfg, tiny_data, tmp_path):
    """cnnlab evaluate counts each evaluation in the run folder (test_ledger.jsonl); a run trained on after its test
    score was seen is flagged, and the report says both."""
    import cnnlab
    from cnnlab.reporting.results import test_use_line
    from cnnlab.training import fit

    result = fit(tiny_cfg(epochs=1, name="ledger"), progress=False, log=lambda s: None)
    folder = RunFolder(result.run_dir)
    assert folder.test_ledger == [] and not folder.trained_after_test()
    run = cnnlab.load(result.run_dir)
    first = run.evaluate(tiny_data, log=None, progress=False)
    ledger = folder.test_ledger
    assert len(ledger) == 1 and ledger[0]["accuracy"] == first.accuracy and ledger[0]["checkpoint"] == "best.pt"
    assert ledger[0]["sha256"] == first["checkpoint_sha256"] and ledger[0]["data"] == str(tiny_data / "val")
    assert "met its test folder 1 time(s)" in test_use_line(folder) and "flagged" not in test_use_line(folder)
    run.evaluate(tiny_data, log=None, progress=False)
    assert len(folder.test_ledger) == 2 and not folder.trained_after_test()  # seen twice, the same weights
    assert "met its test folder 2 time(s)" in test_use_line(folder) and "flagged" not in test_use_line(folder)
    other = fit(tiny_cfg(epochs=1, name="other", seed=1), progress=False, log=lambda s: None).run_dir
    (result.run_dir / "best.pt").write_bytes((other / "best.pt").read_bytes())  # best.pt changed after its test
    assert folder.trained_after_test()
    assert "flagged: best.pt changed after its test score was seen" in test_use_line(folder)
    copy = tmp_path / "elsewhere.pt"  # a checkpoint outside a run folder: no ledger to keep, nothing written
    copy.write_bytes((result.run_dir / "best.pt").read_bytes())
    cnnlab.load(copy).evaluate(tiny_data, out=tmp_path / "e", log=None, progress=False)
    assert not (tmp_path / "test_ledger.jsonl").exists()
