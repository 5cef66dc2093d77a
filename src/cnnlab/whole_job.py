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
from .errors import CnnlabError
from .io import FolderClaim
from .options import Common
from .run_folder import RunFolder
from .sweeps.schema import shipped_sweep

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

    @classmethod
    def make(cls, quick: bool, trials: int | None, image_size: int | None, strategies: str | None,
             verify: int | None = None) -> "Plan":
        default = QUICK if quick else FULL
        chosen = strategies.split(",") if strategies else list(default.strategies)
        bad = [s for s in chosen if s not in ("head", "partial", "gradual", "full")]
        if bad:
            raise CnnlabError(f"--strategies {strategies}: {bad[0]!r} is not a strategy; use head, partial, gradual, full")
        return cls(trials if trials is not None else default.trials, image_size or default.image_size, chosen,
                   default.epochs_head, default.epochs_other, default.verify if verify is None else verify)


# The two plans (docs/report.md): --quick is sized to finish in minutes on 2 CPU cores; the full one is the
# assignment as written (the sweep file's run_cap, 128 px, all three strategies).
QUICK = Plan(trials=16, image_size=64, strategies=["head", "partial"], epochs_head=10, epochs_other=2)
FULL = Plan(trials=None, image_size=128, strategies=["head", "partial", "full"], epochs_head=15, epochs_other=8, verify=3)


@dataclass
class Journal:
    """assignment.json: each step's state and time, and the command, rewritten after every step."""

    path: Path
    steps: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def record(self, step: str, state: str, seconds: float, **extra: Any) -> None:
        from .io import atomic_write_json

        self.steps[step] = {"state": state, "seconds": round(seconds, 1), **extra}
        atomic_write_json(self.path, {"settings": self.settings, "steps": self.steps})


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
                       base: dict[str, Any], log: Log) -> None:
    """Part A's trials in `workers` processes sharing the study, each with its share of the `remaining` trials
    (None: until run_cap)."""
    from .sweeps import launch_workers, load_sweep

    each = None if remaining is None else -(-remaining // workers)
    code = launch_workers(load_sweep(sweep_path), base, folder.parent, workers, each, storage, log=log)
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
               argv: list[str] | None = None, verify: int | None = None) -> Path:
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
    B's best run then teaches Part A's configuration (`distil`)."""
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
    sweep_path = checked_inputs(sweep_file, model, weights)
    # one job per --out: a second one at once would run the trials twice and write over the first one's steps
    with FolderClaim(out, "an assignment", "give another --out"):
        journal = Journal(out / "assignment.json", settings={"data": str(data.resolve()), "quick": quick, **asdict(plan),
                                                               "sweep_file": str(sweep_path), "model": model, "weights": weights})
        run_config = {"data": str(data.resolve()), **common.config_values()}  # every run's, Part A's and Part B's

        step(journal, "check the data", log, lambda: (
            ("done before", {}) if (out / "check" / "check.json").is_file()
            else ("done", {"files": str(check(data, out=out / "check", cache_dir=common.cache_dir,
                                              progress=common.progress, log=log).files["json"])})))

        def part_a() -> tuple[str, dict[str, Any]]:
            from .sweeps import load_sweep

            folder = out / "sweeps" / load_sweep(sweep_path).name
            done = finished_trials(folder)
            remaining = None if plan.trials is None else max(0, plan.trials - done)
            if remaining == 0:
                return "done before", {"trials": done, "folder": str(folder)}
            base = {"image_size": plan.image_size, **run_config}
            if workers > 1:
                sweep_in_processes(sweep_path, folder, workers, remaining, common.storage, base, log)
            else:
                sweep(sweep_path, count=remaining, storage=common.storage, sweeps_dir=out / "sweeps",
                      progress=common.progress, log=log, **base)
            return "done", {"trials": finished_trials(folder), "folder": str(folder)}

        step(journal, "Part A: sweep", log, part_a)
        folder = Path(journal.steps["Part A: sweep"]["folder"])
        best = part_a_model(SweepRun(folder, storage=common.storage), plan, journal, common)
        step(journal, "Part A: evaluate the best trial on the test folder", log, lambda: (
            ("done before", {}) if best.files.evaluated else
            ("done", {"accuracy": best.evaluate(data, **common.for_model()).accuracy})))
        step(journal, "Part A: explain it", log, lambda: (
            ("done before", {}) if best.files.explained else
            ("done", {"figures": sorted(str(p) for p in best.explain(data, **common.for_model()).figures.values())})))
        finetuned = part_b(out, plan, model, weights, run_config, journal, common)
        if finetuned:  # Part B's best run (by validation) taught to Part A's small CNN: its accuracy at its cost
            finetuned.append(distil(out, best, finetuned, run_config, journal, common))
        step(journal, "compare", log, lambda: ("done", {"table": str(compare([best, *finetuned], out / "compare")["table"])}))
        step(journal, "report", log, lambda: ("done", {"index": str(report([out], out / "report", argv=argv))}))
        return out / "report" / "index.html"


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


def part_a_model(swept: SweepRun, plan: Plan, journal: Journal, common: Common) -> Run:
    """Part A's model: the verified winner's best run by validation accuracy (its top configurations trained again
    over seeds; resumable, a finished verification run is read back), or with verify 0 the best trial as it is."""
    log = common.say
    if not plan.verify:
        best = swept.best
        log(f"Part A's model: {best.folder} (the best trial by validation accuracy, taken as it is)")
        return best

    def verify_part_a() -> tuple[str, dict[str, Any]]:
        found = swept.verify(plan.verify, device=common.device, cache_dir=common.cache_dir, progress=common.progress,
                             log=log)
        return ("done" if found["trained_now"] else "done before"), {"winner": found["winner"], "model": found["model"]}

    step(journal, f"Part A: verify the top {plan.verify}", log, verify_part_a)
    best = swept.verified
    log(f"Part A's model: {best.folder} (the verified winner's best run by validation accuracy)")
    return best


def distil(out: Path, student: Run, finetuned: list[Run], run_config: dict[str, Any], journal: Journal,
           common: Common) -> Run:
    """Part A's model's config trained again as a student of Part B's best run by validation accuracy (never by
    the test folder), then evaluated: the small CNN with what the fine-tuned model knows."""
    teacher = max(finetuned, key=lambda r: r.best_val_acc or 0.0)
    values = {k: v for k, v in student.config.to_dict().items() if k not in ("name", "out")}
    done: list[Run] = []

    def work() -> tuple[str, dict[str, Any]]:
        run, state = trained_or_resumed(out, "distilled", common, **{**values, **run_config,
                                                                     "teacher": str(teacher.folder)})
        if not run.files.evaluated:
            run.evaluate(run_config["data"], **common.for_model())
        done.append(load(run.folder))
        return state, {"run": str(run.folder), "teacher": str(teacher.folder)}

    step(journal, f"distil {teacher.folder.name} into Part A's small CNN", common.say, work)
    return done[0]


def part_b(out: Path, plan: Plan, model: str, weights: str | None, run_config: dict[str, Any], journal: Journal,
           common: Common) -> list[Run]:
    """Each strategy trained (or resumed) and evaluated; [] with a message when no weights were given."""
    from .models import default_freeze_stages

    log = common.say
    if not weights:
        log("Part B skipped: give --weights (a weights file, or DEFAULT to download torchvision's) to fine-tune "
            f"{model}")
        journal.record("Part B", "skipped: no --weights", 0.0)
        return []
    runs = []
    for strategy in plan.strategies:
        epochs = plan.epochs_head if strategy == "head" else plan.epochs_other
        extra = {"freeze_stages": default_freeze_stages(model)} if strategy == "partial" else {}  # all but the last

        def work(strategy: str = strategy, epochs: int = epochs, extra: dict[str, Any] = extra) -> tuple[str, dict[str, Any]]:
            run, state = trained_or_resumed(out, f"partB-{strategy}", common, model=model, weights=weights,
                                            finetune=strategy, epochs=epochs, **extra, **run_config)
            if not run.files.evaluated:
                run.evaluate(run_config["data"], **common.for_model())
            runs.append(load(run.folder))
            return state, {"run": str(run.folder)}

        step(journal, f"Part B: {strategy}", log, work)
    return runs
