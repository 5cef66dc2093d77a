"""`cnnlab assignment`: the whole assignment as one resumable job, built on the public API.

    check the data -> Part A sweep -> its top configurations verified over new seeds (the full job) -> Part A's
    model evaluated on the test folder once and explained -> Part B fine-tuning strategies, each evaluated -> Part
    B's best run distilled into Part A's small CNN -> compare -> the report (report/index.html)

Every step looks at what `out` already holds and does only what is missing, so a rerun after a crash or Ctrl-C
continues where the first stopped (a sweep keeps its trials; a half-trained run resumes from its last.pt).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .api import Log, Run, SweepRun, check, compare, load, report, sweep, train
from .arguments import optional_whole_number, path_like, whole_number
from .budget import SAFETY
from .errors import CnnlabError
from .io import FolderClaim
from .job_budget import (
    COMPARE,
    DISTIL,
    EVALUATE,
    EXPLAIN,
    REPORT,
    SWEEP,
    JobClock,
    JobPlan,
    Measured,
    announce,
    distil_fixed,
    fits,
    plan_job,
    planned_after,
    smallest_search,
    strategy_step,
    verify_step,
)
from .options import Common
from .run_folder import RunFolder
from .sweeps.schema import shipped_sweep

DISTIL_SHARE = 0.25  # of a budget, at most, for the distilled student: its patient schedule is cut to fit
SHIPPED_SWEEP = "partA.yaml"  # the assignment's Part A search space, shipped with cnnlab (sweeps.shipped_sweep)


@dataclass
class Plan:
    """What the job runs; `quick` picks the smaller one (4 to 8 minutes on 2 CPU cores on ../shared grocery)."""

    trials: int | None  # Part A trials to finish (None: until the sweep file's run_cap)
    image_size: int  # Part A's images
    strategies: list[str]  # Part B
    epochs_head: int  # Part B's head-only runs: a feature store makes each epoch cheap
    epochs_other: int  # Part B's runs that train the backbone too
    verify: int = 0  # Part A's top configurations trained again with 3 seeds each (0: the best trial as it is)
    patient_student: bool = False  # the distilled student trains the patient schedule (else Part A's epochs)

    @classmethod
    def make(cls, quick: bool, trials: int | None, image_size: int | None, strategies: str | None,
             verify: int | None = None) -> "Plan":
        default = QUICK if quick else FULL
        chosen = strategies.split(",") if strategies else list(default.strategies)
        bad = [s for s in chosen if s not in ("head", "partial", "gradual", "full")]
        if bad:
            raise CnnlabError(f"--strategies {strategies}: {bad[0]!r} is not a strategy; use head, partial, gradual, full")
        return cls(trials if trials is not None else default.trials, image_size or default.image_size, chosen,
                   default.epochs_head, default.epochs_other, default.verify if verify is None else verify,
                   default.patient_student)


# The two plans (docs/report.md): --quick is sized to finish in minutes on 2 CPU cores; the full one is the
# assignment as written (the sweep file's run_cap, 128 px, all three strategies).
QUICK = Plan(trials=16, image_size=64, strategies=["head", "partial"], epochs_head=10, epochs_other=2)
FULL = Plan(trials=None, image_size=128, strategies=["head", "partial", "full"], epochs_head=15, epochs_other=8, verify=3,
            patient_student=True)


@dataclass
class Journal:
    """assignment.json: each step's state and time, and the command, rewritten after every step (and, with a
    budget, each step's time beside its planned share in budget.json)."""

    path: Path
    steps: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    clock: JobClock | None = None

    def record(self, step: str, state: str, seconds: float, **extra: Any) -> None:
        from .io import atomic_write_json

        self.steps[step] = {"state": state, "seconds": round(seconds, 1), **extra}
        atomic_write_json(self.path, {"settings": self.settings, "steps": self.steps})
        if self.clock is not None:
            self.clock.phase(step, seconds, state)


def step(journal: Journal, name: str, log: Callable[[str], None], work: Callable[[], tuple[str, dict[str, Any]]]) -> None:
    started = time.perf_counter()
    log(f"== {name}")
    state, extra = work()
    seconds = time.perf_counter() - started
    journal.record(name, state, seconds, **extra)
    log(f"== {name}: {state} ({seconds:.0f} s)")


def finished_trials(folder: Path) -> int:
    """How many of the sweep folder's trials trained to the end or were pruned (0 before the sweep began)."""
    from .sweeps import report

    if not (folder / "sweep_info.json").is_file():
        return 0
    return len(report.finished_trials(report.load_study(folder)))


def sweep_in_processes(sweep_path: Path, folder: Path, workers: int, remaining: int | None, storage: str | None,
                       base: dict[str, Any], log: Log, budget: float | None = None) -> None:
    """Part A's trials in `workers` processes sharing the study, each with its share of the `remaining` trials
    (None: until run_cap or the `budget`'s deadline, seconds for the whole sweep)."""
    from .sweeps import launch_workers, load_sweep

    each = None if remaining is None else -(-remaining // workers)
    code = launch_workers(load_sweep(sweep_path), base, folder.parent, workers, each, storage, log=log, budget=budget)
    if code:
        raise CnnlabError(f"a Part A sweep worker ended with exit code {code}: rerun the same command to continue")


def trained_or_resumed(out: Path, name: str, common: Common, **config: Any) -> tuple[Run, str]:
    """Run `name` in out/runs: left as it is when finished, resumed from its last.pt when not, else trained."""
    folder = RunFolder(out / "runs" / name)
    if folder.finished:
        return Run(folder.path), "done before"
    if folder.resumable:  # the data where it is now: the folder may have moved to another machine
        return train(resume=folder.path, progress=common.progress, log=common.say, raise_interrupt=True,
                     data=config["data"], **common.config_values()), "resumed"
    return train(out=str(out / "runs"), name=name, progress=common.progress, log=common.say, raise_interrupt=True,
                 **config), "trained"


def assignment(data: str | Path, out: str | Path = "assignment", *, quick: bool = False, sweep_file: str | Path | None = None,
               trials: int | None = None, image_size: int | None = None, model: str = "resnet50",
               weights: str | None = None, strategies: str | None = None, storage: str | None = None,
               workers: int = 1, device: str = "auto", cache_dir: str | None = None,
               progress: bool | None = None, log: Log = print, wandb: str | None = None,
               argv: list[str] | None = None, verify: int | None = None, budget: str | float | None = None) -> Path:
    """The whole assignment on `data` (ROOT/train, ROOT/val) into `out`; returns the report's index.html.

    Part A: `sweep_file` (default: the shipped sweeps/partA.yaml) for `trials` trials (quick: 16; else its run_cap) on
    `image_size` px images (quick: 64, else 128), shared through `storage` like `cnnlab sweep`; Part A's model
    (`part_a_model`: chosen by validation alone) evaluated once on ROOT/val and explained. Part B: `model` with
    `weights` (a file, or a name such as DEFAULT) fine-tuned by each of
    `strategies` (quick: head for 10 epochs and partial for 2; else head,partial,full for 15 and 8), each
    evaluated; without `weights` Part B is skipped, saying so. `workers` > 1 runs Part A's trials in that many
    `cnnlab sweep` processes sharing the study (worker i on GPU i mod n where there are n). `wandb` (offline,
    online) logs every run to Weights & Biases, Part A's trials grouped by the sweep, and the best trial's and
    Part B's evaluations and explanations into the runs they belong to. `verify` K (default: 3, with quick 0): Part
    A's top K configurations are trained again with 3 new seeds each and the best mean gives Part A's model. Part
    B's best run then teaches Part A's configuration (`distil`). `budget` ("10m", "2h", or seconds): the whole job
    planned to end by then (`job_budget`): the plan printed first, Part A's sweep given what the phases after it
    leave, a phase that no longer fits cut; `trials` then only caps the sweep."""
    from .budget import parse_duration

    seconds = parse_duration(budget) if budget is not None else None
    common = Common(device, cache_dir, progress, log, storage, wandb)  # carried whole to every step below
    log = common.say
    data, out = path_like("data", data), path_like("out", out)
    optional_whole_number("trials", trials, 1)
    optional_whole_number("image_size", image_size, 1)
    optional_whole_number("verify", verify, 0)
    whole_number("workers", workers, 1)
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        raise CnnlabError(f"{data} needs train/ and val/ folders of class folders (val/ is the test set)")
    plan = Plan.make(quick, trials, image_size, strategies, verify)
    if seconds is not None and trials is None:
        plan.trials = None  # the budget decides how many (within the sweep file's run_cap)
    sweep_path = checked_inputs(sweep_file, model, weights)
    # one job per --out: a second one at once would run the trials twice and write over the first one's steps
    with FolderClaim(out, "an assignment", "give another --out"):
        clock = JobClock.open(out, seconds) if seconds is not None else None
        try:
            return whole_job(Job(data, out, plan, sweep_path, model, weights, workers, common, argv, clock), quick)
        finally:
            if clock is not None:
                clock.close()


@dataclass
class Job:
    """One assignment's settings, carried whole through its steps."""

    data: Path
    out: Path
    plan: Plan
    sweep_path: Path
    model: str
    weights: str | None
    workers: int
    common: Common
    argv: list[str] | None
    clock: JobClock | None

    @property
    def run_config(self) -> dict[str, Any]:
        """Every run's config values, Part A's and Part B's."""
        return {"data": str(self.data.resolve()), **self.common.config_values()}


def whole_job(job: Job, quick: bool) -> Path:
    """The steps, each skipped when `out` already holds its result."""
    data, out, plan, common, log = job.data, job.out, job.plan, job.common, job.common.say
    journal = Journal(out / "assignment.json", settings={"data": str(data.resolve()), "quick": quick, **asdict(plan),
                                                         "sweep_file": str(job.sweep_path), "model": job.model,
                                                         "weights": job.weights,
                                                         "budget_s": job.clock.seconds if job.clock else None},
                      clock=job.clock)
    run_config = job.run_config

    step(journal, "check the data", log, lambda: (
        ("done before", {}) if (out / "check" / "check.json").is_file()
        else ("done", {"files": str(check(data, out=out / "check", cache_dir=common.cache_dir,
                                          progress=common.progress, log=log).files["json"])})))
    from .sweeps import load_sweep

    folder = out / "sweeps" / load_sweep(job.sweep_path).name
    base = {"image_size": plan.image_size, **run_config}
    budgeted = plan_to_budget(job, folder, base) if job.clock is not None else None

    def part_a() -> tuple[str, dict[str, Any]]:
        done = finished_trials(folder)
        remaining = None if plan.trials is None else max(0, plan.trials - done)
        if remaining == 0:
            return "done before", {"trials": done, "folder": str(folder)}
        share = budgeted.sweep_budget if budgeted is not None else None
        if job.workers > 1:
            sweep_in_processes(job.sweep_path, folder, job.workers, remaining, common.storage, base, log, share)
        else:
            sweep(job.sweep_path, count=remaining, storage=common.storage, sweeps_dir=out / "sweeps", budget=share,
                  progress=common.progress, log=log, **base)
        return "done", {"trials": finished_trials(folder), "folder": str(folder)}

    step(journal, SWEEP, log, part_a)
    best = part_a_model(SweepRun(folder, storage=common.storage), plan, journal, job)
    step(journal, EVALUATE, log, lambda: (
        ("done before", {}) if best.files.evaluated else
        ("done", {"accuracy": best.evaluate(data, **common.for_model()).accuracy})))
    step(journal, EXPLAIN, log, lambda: (
        ("done before", {}) if best.files.explained else
        ("done", {"figures": sorted(str(p) for p in best.explain(data, **common.for_model()).figures.values())})))
    finetuned = part_b(job, run_config, journal, budgeted)
    if finetuned:  # Part B's best run (by validation) taught to Part A's small CNN: its accuracy at its cost
        taught = distil(out, best, finetuned, run_config, journal, job, budgeted)
        finetuned += [taught] if taught is not None else []
    step(journal, COMPARE, log, lambda: ("done", {"table": str(compare([best, *finetuned], out / "compare")["table"])}))
    step(journal, REPORT, log, lambda: ("done", {"index": str(report([out], out / "report", argv=job.argv))}))
    return out / "report" / "index.html"


@dataclass
class Budgeted:
    """A budgeted job's plan, and the seconds Part A's sweep is given in all (what it spent before, on an earlier
    run of the job, and its share of what is left)."""

    plan: JobPlan
    sweep_budget: float
    student_epochs: int  # the patient schedule's, on this training set
    measured: Measured

    def student_epochs_that_fit(self, clock: JobClock) -> int:
        """The distilled student's epochs: the patient schedule's, or as many as end before the deadline with the
        phases after it kept (its teacher's pass and its evaluation paid first); 0: not one."""
        m = self.measured
        room = (clock.left() - planned_after(self.plan.later, DISTIL)) / SAFETY - distil_fixed(m)
        return max(0, min(self.student_epochs, int(room // m.small_epoch))) if m.small_epoch > 0 else self.student_epochs


def plan_to_budget(job: Job, folder: Path, base: dict[str, Any]) -> Budgeted:
    """Calibrate (the sweep's typical configurations, and Part B's model: its real training step and forward on
    this device), plan the phases to the deadline, print the plan and keep it in budget.json; refuse a budget that
    fits no search in one line naming the smallest that does."""
    from .config import make_config
    from .data.folders import scan_folder
    from .distill import default_epochs
    from .sweeps import load_sweep
    from .sweeps.budgeted import measure_space, sweep_spent, time_steps, trial_costs
    from .sweeps.engine import prepare_sweep, queue_lock

    clock, common, plan, log = job.clock, job.common, job.plan, job.common.say
    sweep_file = load_sweep(job.sweep_path)
    study = prepare_sweep(sweep_file, base, folder, common.storage, 0, common.bars, log)
    with queue_lock(folder):
        space = measure_space(study, sweep_file, base, folder, common.bars, log)
    costs = trial_costs(study)
    big = clock.record.get("calibration")
    if job.weights and big is None:  # its real step, at full fine-tuning (the costliest strategy's)
        timed = time_steps(make_config({**job.run_config, "model": job.model, "weights": job.weights,
                                        "finetune": "full"}), job.out / "calibration", "partB", common.bars)
        big = {"step": timed.train, "forward": timed.forward, "setup": timed.setup, "rows": list(timed.rows)}
        clock.note("calibration", big)
        log(f"budget: {job.model} measured: {timed.train * 1e3:.1f} ms per training image, {timed.forward * 1e3:.1f} ms "
            f"per image forward, set-up {timed.setup:.0f} s")
    train_rows, val_rows = space.rows
    small_epoch = costs.epoch_seconds(space.typical)
    measured = Measured(small_epoch, small_epoch / (3 * train_rows + 2 * val_rows),
                        big["step"] if big else 0.0, big["forward"] if big else 0.0, big["setup"] if big else 0.0,
                        train_rows, val_rows, len(scan_folder(job.data / "val")[1]))
    verify = (plan.verify, costs.trial_seconds(space.typical, space.max_epochs))
    # the patient schedule on this training set, or what DISTIL_SHARE of the budget holds of it
    affordable = int((DISTIL_SHARE * clock.seconds - distil_fixed(measured)) // small_epoch) if small_epoch > 0 else 10**6
    student_epochs = max(1, min(default_epochs("teacher", train_rows), affordable))
    planned = plan_job(clock.left(), clock.seconds, measured, plan.strategies if job.weights else [],
                       (plan.epochs_head, plan.epochs_other, student_epochs), smallest_search(costs, space), verify)
    clock.note("planned", {SWEEP: round(planned.search, 1), **{k: round(v, 1) for k, v in planned.later.items()}})
    clock.note("plans", {"at": time.time(), "left_s": clock.left(), "search_s": planned.search, "later": planned.later,
                         "strategies": planned.strategies, "cut": planned.cut})
    for what in planned.cut:
        clock.note("cut", what)
    announce(planned, clock, log)
    plan.strategies = planned.strategies
    return Budgeted(planned, sweep_spent(study) + planned.search, student_epochs, measured)


def checked_inputs(sweep_file: str | Path | None, model: str, weights: str | None) -> Path:
    """Part A's sweep file, and Part B's model and weights checked now, not after Part A's sweep has run for an hour."""
    sweep_path = Path(sweep_file) if sweep_file else shipped_sweep(SHIPPED_SWEEP)
    if sweep_path is None or not sweep_path.is_file():
        raise CnnlabError(f"sweep file {sweep_path} not found: give one with --sweep FILE (sweeps/partA.yaml in cnnlab's "
                          "repository is the assignment's)")
    if weights:
        from .config import make_config
        from .models import check_config, weights_file

        check_config(make_config({"model": model, "weights": weights, "finetune": "head"}))
        weights_file(weights)
    return sweep_path


def part_a_model(swept: SweepRun, plan: Plan, journal: Journal, job: Job) -> Run:
    """Part A's model: the verified winner's best run by validation accuracy (its top configurations trained again
    over seeds; resumable, a finished verification run is read back), or with verify 0 the best trial as it is (so
    too when a budget's deadline leaves no time for the verification: cut, and said)."""
    common = job.common
    log = common.say
    phase = verify_step(plan.verify)
    done = swept.verification is not None  # a verification finished on an earlier run is read back, never cut
    if plan.verify and not done and (out_of_time := cut_for_time(job, phase, after_phase=phase)) is not None:
        log(out_of_time)
        journal.record(phase, "cut: the budget's deadline", 0.0)
    elif plan.verify:
        def verify_part_a() -> tuple[str, dict[str, Any]]:
            found = swept.verify(plan.verify, device=common.device, cache_dir=common.cache_dir,
                                 progress=common.progress, log=log)
            return ("done" if found["trained_now"] else "done before"), {"winner": found["winner"],
                                                                         "model": found["model"]}

        step(journal, phase, log, verify_part_a)
        best = swept.verified
        log(f"Part A's model: {best.folder} (the verified winner's best run by validation accuracy)")
        return best
    best = swept.best
    log(f"Part A's model: {best.folder} (the best trial by validation accuracy, taken as it is)")
    return best


def cut_for_time(job: Job, phase: str, after_phase: str) -> str | None:
    """Why `phase` is cut (its predicted time no longer fits before the deadline, with the phases planned after
    it kept), recorded in budget.json; None when it fits or the job has no budget."""
    clock = job.clock
    if clock is None:
        return None
    planned = clock.record.get("planned", {})
    after = planned_after(planned, after_phase)
    if fits(clock, planned.get(phase, 0.0), after):
        return None
    why = (f"cut: {phase} (predicted {planned.get(phase, 0.0):.0f} s; {clock.left():.0f} s left, "
           f"{after:.0f} s kept for what follows)")
    clock.note("cut", why)
    return why


def distil(out: Path, student: Run, finetuned: list[Run], run_config: dict[str, Any], journal: Journal, job: Job,
           budgeted: Budgeted | None = None) -> Run | None:
    """Part A's model's config trained again as a student of Part B's best run by validation accuracy (never by
    the test folder), then evaluated: the small CNN with what the fine-tuned model knows. With a budget, cut when it
    no longer fits (None)."""
    common = job.common
    teacher = max(finetuned, key=lambda r: r.best_val_acc or 0.0)
    values = {k: v for k, v in student.config.to_dict().items() if k not in ("name", "out")}
    name = DISTIL
    if job.plan.patient_student or budgeted is not None:  # the student's own default: the patient schedule
        del values["epochs"]
    if budgeted is not None and not RunFolder(out / "runs" / "distilled").resumable:
        epochs = budgeted.student_epochs_that_fit(job.clock)
        if epochs == 0:
            why = f"cut: {DISTIL} (not one epoch of it fits in the {job.clock.left():.0f} s left)"
            job.clock.note("cut", why)
            common.say(why)
            journal.record(name, "cut: the budget's deadline", 0.0)
            return None
        if epochs < budgeted.student_epochs:
            job.clock.note("cut", f"{DISTIL}: {epochs} of the patient schedule's {budgeted.student_epochs} epochs, "
                                  "to end by the deadline")
        values["epochs"] = epochs
    done: list[Run] = []

    def work() -> tuple[str, dict[str, Any]]:
        run, state = trained_or_resumed(out, "distilled", common, **{**values, **run_config,
                                                                     "teacher": str(teacher.folder)})
        if not run.files.evaluated:
            run.evaluate(run_config["data"], **common.for_model())
        done.append(load(run.folder))
        return state, {"run": str(run.folder), "teacher": str(teacher.folder)}

    step(journal, name, common.say, work)
    return done[0]


def part_b(job: Job, run_config: dict[str, Any], journal: Journal, budgeted: Budgeted | None = None) -> list[Run]:
    """Each strategy trained (or resumed) and evaluated; [] with a message when no weights were given. With a
    budget, a strategy that no longer fits before the deadline is cut, and said."""
    from .models import default_freeze_stages

    out, plan, model, weights, log = job.out, job.plan, job.model, job.weights, job.common.say
    if not weights:
        log("Part B skipped: give --weights (a weights file, or DEFAULT to download torchvision's) to fine-tune "
            f"{model}")
        journal.record("Part B", "skipped: no --weights", 0.0)
        return []
    runs = []
    for strategy in plan.strategies:
        epochs = plan.epochs_head if strategy == "head" else plan.epochs_other
        extra = {"freeze_stages": default_freeze_stages(model)} if strategy == "partial" else {}  # all but the last
        phase = strategy_step(strategy)
        if not RunFolder(out / "runs" / f"partB-{strategy}").finished and (why := cut_for_time(job, phase, phase)):
            log(why)
            journal.record(phase, "cut: the budget's deadline", 0.0)
            continue

        def work(strategy: str = strategy, epochs: int = epochs, extra: dict[str, Any] = extra) -> tuple[str, dict[str, Any]]:
            run, state = trained_or_resumed(out, f"partB-{strategy}", job.common, model=model, weights=weights,
                                            finetune=strategy, epochs=epochs, **extra, **run_config)
            if not run.files.evaluated:
                run.evaluate(run_config["data"], **job.common.for_model())
            runs.append(load(run.folder))
            return state, {"run": str(run.folder)}

        step(journal, phase, log, work)
    return runs
