"""`--budget`: the planner as pure functions (given measured costs, the plan fits), then real budgeted sweeps and an
assignment on synthetic photos, killed and rerun, with two workers, and refused when too small. Timing bounds here are
generous (a busy CI machine); the real figures are benchmarks/budget.py's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cnnlab.budget import (
    MIN_TRIALS,
    SAFETY,
    Costs,
    epochs_for_trial,
    next_epoch_fits,
    parse_duration,
    plan_search,
    smallest_budget,
    time_spent,
)
from cnnlab.errors import ConfigError
from cnnlab.job_budget import MARGIN, Measured, later_phases, plan_job

TINY = ["--image_size=32", "--dense_units=16", "--batch_size=32", "--decode_workers=1", "--quiet"]


# ---- pure rules -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("2h", 7200), ("1h30m", 5400), ("45", 45),
                                           ("1.5h", 5400), (" 2m 30s ", 150), (600, 600), (1.5, 1.5)])
def test_durations_are_read_in_the_units_people_write(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "2x", "-5m", "0s", "m", "1h-", True])
def test_a_bad_duration_is_refused_naming_the_key_and_the_forms(text):
    with pytest.raises(ConfigError, match=r"^budget .*(90s|positive duration)"):
        parse_duration(text)


def test_the_time_spent_counts_overlapping_sessions_once_and_gaps_not_at_all():
    assert time_spent([]) == 0
    assert time_spent([[0, 10]]) == 10
    assert time_spent([[0, 10], [5, 12]]) == 12  # two workers side by side
    assert time_spent([[0, 10], [100, 130]]) == 40  # a crash, an hour's pause, a rerun: the pause is not spent
    assert time_spent([[100, 130], [0, 10], [2, 3], [125, 140]]) == 50
    assert time_spent([[5, 5], [7, 6]]) == 0  # a session killed at its start, and a clock set back


def test_the_cost_model_fits_measured_epochs_and_never_makes_flops_cheaper():
    truth = lambda g: 2.0 + 30.0 * g
    costs = Costs([(g, truth(g)) for g in (0.05, 0.4, 1.2)], [3.0, 5.0])
    for g in (0.01, 0.5, 4.0):
        assert costs.epoch_seconds(g) == pytest.approx(truth(g))
    assert costs.setup_seconds() == 4.0 and costs.trial_seconds(0.4, 5) == pytest.approx(4 + 5 * truth(0.4))
    noisy = Costs([(0.1, 9.0), (1.0, 8.0)])  # measured noise that would make the costlier model cheaper
    assert noisy.epoch_seconds(2.0) >= noisy.epoch_seconds(0.1)
    one = Costs([(0.2, 4.0)])  # one size measured: proportional to it
    assert one.epoch_seconds(0.4) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        Costs().epoch_seconds(1.0)


def test_trials_measured_scale_the_calibration_then_replace_it():
    calibrated = Costs([(0.1, 3.0), (1.0, 12.0)])  # 2 + 10 g
    one = Costs(calibrated.points, measured=[(0.5, 14.0)])  # a real epoch took twice the calibration's 7 s
    assert one.epoch_seconds(0.5) == pytest.approx(14.0) and one.epoch_seconds(1.0) == pytest.approx(24.0)
    assert one.epoch_seconds(0.02) == pytest.approx(2 * 2.2)  # the set-up of an epoch scales too, not to zero
    truth = lambda g: 5.0 + 40.0 * g
    three = Costs(calibrated.points, measured=[(g, truth(g)) for g in (0.05, 0.3, 2.0)])
    assert three.epoch_seconds(1.0) == pytest.approx(truth(1.0))  # three sizes measured: their own line


COSTS = Costs([(0.1, 3.0), (1.0, 12.0)], [2.0])  # 2 + 10 g s per epoch, 2 s of set-up


@pytest.mark.parametrize("left", [30, 60, 240, 1000, 7200])
@pytest.mark.parametrize("workers", [1, 3])
def test_a_plan_fits_the_time_left_with_its_trials_and_keeps_the_reserve(left, workers):
    plan = plan_search(left, 5.0, COSTS, 0.5, max_epochs=7, min_epochs=2, workers=workers)
    if plan is None:  # then not even one trial of 2 epochs fits
        assert COSTS.trial_seconds(0.5, 2) * SAFETY > left - 5
        return
    per_worker = -(-plan.trials // workers)
    assert per_worker * plan.trial_seconds * SAFETY <= left - 5 + 1e-9 or plan.trials == workers
    assert plan.trial_seconds == pytest.approx(COSTS.trial_seconds(0.5, plan.epochs))
    assert 2 <= plan.epochs <= 7
    if plan.epochs < 7:  # epochs were cut only because the full ones left fewer than MIN_TRIALS
        full = COSTS.trial_seconds(0.5, 7) * SAFETY
        assert int((left - 5) // full) * workers < MIN_TRIALS
    assert plan.trials >= MIN_TRIALS or plan.epochs == 2


def test_a_trial_is_given_the_epochs_that_end_before_the_deadline_and_none_when_none_do():
    plan = plan_search(240, 2.0, COSTS, 0.5, 7, 2)
    for left in (200, 60, 30, 12, 5):
        for g in (0.1, 0.5, 2.0):
            epochs = epochs_for_trial(plan, left, 2.0, COSTS, g, 7, 2)
            if epochs:
                assert 2 <= epochs <= 7
                assert COSTS.trial_seconds(g, epochs) * SAFETY <= min(left - 2.0, plan.trial_cap) + 1e-9
            else:
                assert COSTS.trial_seconds(g, 2) * SAFETY > min(left - 2.0, plan.trial_cap)
    assert next_epoch_fits(20, 2, 10) and not next_epoch_fits(12, 2, 10)


def test_the_smallest_budget_named_holds_one_trial():
    need = smallest_budget(12.0, 2.0, COSTS, 0.1, 2)
    assert need % 10 == 0
    assert plan_search(need - 12.0, 2.0, COSTS, 0.1, 7, 2) is not None
    assert plan_search(12.0 + 2.0 - 12.0, 2.0, COSTS, 0.1, 7, 2) is None


MEASURED = Measured(small_epoch=4.0, small_forward=0.001, big_step=0.06, big_forward=0.02, big_setup=8.0,
                    train=1200, val=300, test=1500)


def test_the_job_plan_gives_the_search_what_the_later_phases_leave():
    plan = plan_job(1800, 1800, MEASURED, ["head", "partial"], (10, 2, 7), smallest_search=60)
    later = later_phases(MEASURED, ["head", "partial"], 10, 2, 7)
    assert list(plan.later) == list(later)  # the phases in the order they run
    assert sum(plan.later.values()) == pytest.approx(SAFETY * sum(later.values()))
    assert plan.search == pytest.approx(1800 - sum(plan.later.values()) - MARGIN * 1800)
    assert plan.cut == [] and plan.strategies == ["head", "partial"]
    assert len(plan.lines(0.0)) == 1 + len(later)


def test_a_tight_job_cuts_the_costliest_strategy_then_refuses_naming_a_budget_that_fits():
    full = plan_job(1800, 1800, MEASURED, ["head", "partial", "full"], (10, 2, 7), smallest_search=60)
    tight_left = (sum(full.later.values()) + 30) / (1 - MARGIN)  # with every strategy, 30 s for a search of 60 at least
    assert full.later["Part B: full"] > 60
    tight = plan_job(tight_left, tight_left, MEASURED, ["head", "partial", "full"], (10, 2, 7), smallest_search=60)
    assert len(tight.cut) == 1 and tight.strategies[0] == "head" and len(tight.strategies) == 2
    gone = tight.cut[0].split()[2]  # "Part B: <strategy> (its predicted ...)"
    assert full.later[f"Part B: {gone}"] == max(v for k, v in full.later.items() if k.startswith("Part B: "))
    assert tight.search >= 60
    with pytest.raises(ConfigError, match=r"smallest budget that fits is (\d+)m") as refused:
        plan_job(100, 100, MEASURED, ["head"], (10, 2, 7), smallest_search=60)
    minutes = int(refused.value.args[0].rsplit("is ", 1)[1].rstrip("m"))
    assert plan_job(minutes * 60, minutes * 60, MEASURED, ["head"], (10, 2, 7), smallest_search=60).search >= 60


# ---- a real budgeted sweep --------------------------------------------------------------------------------------

def sweep_file(tmp_path, **extra):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"name": "b", "method": "random", "metric": {"name": "val_acc", "goal": "maximize"},
                                    "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 2},
                                    "parameters": {"filters": {"values": [4, 8]},
                                                   "lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-2},
                                                   "epochs": {"value": 6}}, **extra}))
    return path


def sweep_cmd(path, data, tmp_path, *extra):
    return [sys.executable, "-m", "cnnlab.cli", "sweep", str(path), "--data", str(data), "--cache_dir",
            str(tmp_path / "cache"), "--sweeps_dir", str(tmp_path / "sweeps"), *TINY, *extra]


def record_of(tmp_path):
    return json.loads((tmp_path / "sweeps" / "b" / "budget.json").read_text())


@pytest.mark.slow
def test_a_budgeted_sweep_plans_ends_by_its_deadline_and_a_rerun_goes_on_with_what_remains(tiny_data, tmp_path):
    started = time.monotonic()
    done = subprocess.run(sweep_cmd(sweep_file(tmp_path), tiny_data, tmp_path, "--budget", "25s"), capture_output=True,
                          text=True, timeout=300)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "budget: calibrated in" in done.stdout and "budget 25 s" in done.stdout and "ends by" in done.stdout
    record = record_of(tmp_path)
    assert record["budget_s"] == 25 and record["sessions"] == 1
    assert record["spent_s"] <= 25 + 5  # stopped at an epoch boundary; what overruns is at most an epoch's margin
    assert wall < 25 + 40  # start-up and the last records around it, on a busy machine
    assert record["trials"]["complete"] >= 1 and record["spent"]["calibration_s"] > 0
    assert record["plan"]["epochs"] >= 1
    first_spent = record["spent_s"]
    again = subprocess.run(sweep_cmd(sweep_file(tmp_path), tiny_data, tmp_path, "--budget", "25s"), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "calibrated" not in again.stdout  # the study holds its calibration
    record = record_of(tmp_path)
    assert record["sessions"] == 2 and record["spent_s"] <= 25 + 5 + 5
    assert record["spent_s"] >= first_spent  # the first run's time still counts
    # a longer budget on the same sweep: its trials go on, with the time the first runs spent counted
    longer = subprocess.run(sweep_cmd(sweep_file(tmp_path), tiny_data, tmp_path, "--budget", "40s"),
                            capture_output=True, text=True, timeout=300)
    assert longer.returncode == 0, longer.stderr
    left = float(longer.stdout.split("budget 40 s, ", 1)[1].split(" s left", 1)[0])
    assert left <= 40 - first_spent + 1


@pytest.mark.slow
def test_a_sweep_killed_under_a_budget_counts_its_time_on_the_rerun(tiny_data, tmp_path):
    proc = subprocess.Popen(sweep_cmd(sweep_file(tmp_path), tiny_data, tmp_path, "--budget", "30s"),
                            stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the event: a trial finished, so a session with time in it is recorded
            if " complete " in line or " pruned " in line:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_record_spent = None
    import optuna

    from cnnlab.sweeps import make_storage
    from cnnlab.sweeps.budgeted import sweep_spent

    study = optuna.load_study(study_name="b", storage=make_storage(None, tmp_path / "sweeps" / "b"))
    killed_record_spent = sweep_spent(study)
    assert killed_record_spent > 0
    again = subprocess.run(sweep_cmd(sweep_file(tmp_path), tiny_data, tmp_path, "--budget", "30s"),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    left = float(again.stdout.split("budget 30 s, ", 1)[1].split(" s left", 1)[0])
    assert left <= 30 - killed_record_spent + 1
    record = record_of(tmp_path)
    assert record["sessions"] == 2 and record["spent_s"] <= 30 + 5


@pytest.mark.slow
def test_two_workers_divide_one_budget(tiny_data, tmp_path):
    started = time.monotonic()
    done = subprocess.run(sweep_cmd(sweep_file(tmp_path), tiny_data, tmp_path, "--budget", "25s", "--workers", "2"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = record_of(tmp_path)
    assert record["sessions"] == 2  # one per worker, side by side: their common time counted once
    assert record["spent_s"] <= 25 + 5 and time.monotonic() - started < 25 + 60
    assert done.stdout.count("budget: calibrated") == 1  # one worker measured the device; the other planned from it


@pytest.mark.slow
def test_a_budget_too_small_is_refused_in_one_line_naming_the_smallest_that_fits(tiny_data, tmp_path):
    done = subprocess.run(sweep_cmd(sweep_file(tmp_path), tiny_data, tmp_path, "--budget", "1s"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "smallest budget that holds one trial" in lines[0], done.stderr
    need = int(lines[0].rsplit(" is ", 1)[1].rstrip("s"))
    spent = int(lines[0].split("fits after ", 1)[1].split(" s spent", 1)[0])
    assert spent >= 1 and need > spent  # the calibration's time counted, and the budget named holds more than it


def test_a_bad_budget_is_refused_before_anything_runs(tiny_data, tmp_path):
    done = subprocess.run(sweep_cmd(sweep_file(tmp_path), tiny_data, tmp_path, "--budget", "soon"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "--budget" in done.stderr and "90s" in done.stderr
    assert not (tmp_path / "sweeps").exists()


def test_the_sweep_file_may_hold_the_budget_and_a_bad_one_is_refused_naming_it(tmp_path):
    from cnnlab.sweeps import SweepError, load_sweep

    assert load_sweep(sweep_file(tmp_path, budget="20m")).budget == 1200
    with pytest.raises(SweepError, match="budget 'later'"):
        load_sweep(sweep_file(tmp_path, budget="later"))


def test_a_trial_is_stopped_at_an_epoch_boundary_when_the_next_epoch_would_pass_the_deadline(tiny_cfg):
    """A simulated clock: the deadline comes after the second epoch; the trial stops there, its epoch written."""
    import optuna

    from cnnlab.sweeps.budgeted import Deadline
    from cnnlab.training import fit

    class Clock:
        def __init__(self):
            self.touched = 0

        def touch(self):
            self.touched += 1

        def left(self):
            return 1e9 if self.touched < 2 else 0.0

    trial = optuna.create_study().ask()
    clock = Clock()
    fitted = fit(tiny_cfg(epochs=5), callbacks=[Deadline(clock, 0.0, trial)], progress=False, log=lambda s: None)
    assert fitted.status == "stopped" and len(fitted.history) == 2
    assert trial.user_attrs["cut"] == "stopped after epoch 2 of 5: the budget's deadline"
    assert json.loads((fitted.run_dir / "summary.json").read_text())["status"] == "stopped"


def test_a_trial_far_slower_than_predicted_stops_at_its_own_share(tiny_cfg):
    """A trial may not eat the time of the trials after it: with 0 s of its own share left it stops after its
    first epoch, though the sweep's deadline is far."""
    import optuna

    from cnnlab.sweeps.budgeted import Deadline

    class FarDeadline:
        def touch(self):
            pass

        def left(self):
            return 1e9

    trial = optuna.create_study().ask()
    fitted = fit_quietly(tiny_cfg(epochs=4, name="slow"), Deadline(FarDeadline(), 0.0, trial, allotted=0.0))
    assert len(fitted.history) == 1 and trial.user_attrs["cut"] == "stopped after epoch 1 of 4: its share of the budget"
    trial = optuna.create_study().ask()
    fitted = fit_quietly(tiny_cfg(epochs=3, name="fits"), Deadline(FarDeadline(), 0.0, trial, allotted=1e9))
    assert len(fitted.history) == 3 and "cut" not in trial.user_attrs


def fit_quietly(cfg, callback):
    from cnnlab.training import fit

    return fit(cfg, callbacks=[callback], progress=False, log=lambda s: None)


# ---- the whole job ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_budgeted_assignment_prints_its_plan_ends_by_the_deadline_and_records_each_phase(tiny_data, tmp_path):
    out = tmp_path / "job"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "assignment", "--data", str(tiny_data), "--out", str(out),
                           "--quick", "--image_size", "64", "--budget", "70s", "--cache_dir", str(tmp_path / "cache"),
                           "--quiet"], capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    plan = done.stdout.split("the plan:", 1)[1]
    assert "Part A: sweep" in plan and "report" in plan and "ends about" in plan
    record = json.loads((out / "budget.json").read_text())
    assert record["budget_s"] == 70 and record["spent_s"] <= 70 * 1.10
    assert wall < 70 * 1.10 + 20
    assert set(record["planned"]) >= {"Part A: sweep", "compare", "report"}
    assert record["phases"]["Part A: sweep"]["spent_s"] > 0 and record["phases"]["report"]["state"] == "done"
    for name, phase in record["phases"].items():  # each phase planned is a step recorded, under the same name
        assert phase["planned_s"] == record["planned"].get(name)
    html = (out / "report" / "index.html").read_text()
    budget = html[html.index('<section id="budget">'):]
    budget = budget[:budget.index("</section>")]
    for name, phase in record["phases"].items():  # the report's numbers are budget.json's
        if name == "report":  # the page is written inside that step, before its time is known
            continue
        planned = f"{phase['planned_s']:.0f} s" if phase["planned_s"] is not None else "-"
        assert f"<td>{name}</td><td class=num>{planned}</td><td class=num>{phase['spent_s']:.0f} s</td>" in budget
    assert (out / "report" / "index.html").is_file()
    steps = json.loads((out / "assignment.json").read_text())
    assert steps["settings"]["budget_s"] == 70


@pytest.mark.slow
def test_an_assignment_budget_too_small_is_refused_in_one_line(tiny_data, tmp_path):
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "assignment", "--data", str(tiny_data), "--out",
                           str(tmp_path / "job"), "--quick", "--image_size", "64", "--budget", "8s", "--cache_dir",
                           str(tmp_path / "cache"), "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "smallest budget that fits is" in lines[0], done.stderr


@pytest.mark.slow
def test_two_machines_on_one_postgresql_study_share_its_budget(postgres, tiny_data, tmp_path):
    """Two sweep processes with folders of their own (two machines) join one PostgreSQL study: each plans from the
    study's shared record, and the time they ran side by side counts once."""
    import optuna

    from cnnlab.sweeps import make_storage
    from cnnlab.sweeps.budgeted import sweep_spent

    path = sweep_file(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "cnnlab.cli", "sweep", str(path), "--data", str(tiny_data),
                               "--cache_dir", str(tmp_path / f"cache-{i}"), "--sweeps_dir", str(tmp_path / f"machine-{i}"),
                               "--storage", postgres, "--budget", "20s", *TINY], stdout=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study = optuna.load_study(study_name="b", storage=make_storage(postgres, tmp_path / "machine-0"))
    sessions = [k for k in study.user_attrs if k.startswith("budget:session:")]
    assert len(sessions) == 2 and sweep_spent(study) <= 20 + 5
    assert sum(1 for t in study.get_trials() if "cost" in t.user_attrs) >= 2  # both trained, each measured
