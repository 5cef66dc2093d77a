"""The `cnnlab` command. Every config field is a flag, accepted as `--key value` and `--key=value`
(booleans also as `--key`, `--key=True`, `--key false`), so a W&B agent can drive `cnnlab train`."""

from __future__ import annotations

import argparse
import difflib
import errno
import inspect
import os
import signal
import sys
from typing import Any, Sequence

from . import __version__, api, arguments, whole_job
from .commands import COMMANDS
from .config import FIELDS, describe
from .errors import CnnlabError, ConfigError
from .options import Common, common_flags
from .sweeps.workers import WORKER_COMMAND


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (kill, a closed terminal, a batch system's time limit), raised where the process is so
    that it ends the way Ctrl-C does: the decode workers ended, half-written files removed, the run resumable."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# what `cnnlab info` needs: the architecture, not the training
MODEL_KEYS = ("image_size", "model", "weights", "filters", "filter_org", "kernel_size", "conv1_stride", "conv1_init",
              "conv_init", "activation", "batch_norm", "dropout", "dense_units", "global_pool")


def _add_config_flags(p: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    g = p.add_argument_group("config (YAML keys and sweep parameters have the same names)")
    for name, f in FIELDS.items():
        if only is not None and name not in only:
            continue
        default = f.default
        help_text = f"{f.metadata['help']} [{describe(name)}; default {default!r}]".replace("%", "%%")
        if isinstance(default, bool) or "true" in f.metadata.get("aliases", {}):  # `--compile` alone: true
            metavar = "BOOL" if isinstance(default, bool) else "MODE"
            g.add_argument(f"--{name}", nargs="?", const="true", default=None, metavar=metavar, help=help_text)
        else:
            g.add_argument(f"--{name}", default=None, metavar=type(default).__name__.upper(), help=help_text)


CHECKPOINT_HELP = "a run folder (runs/<name>: its best.pt) or a checkpoint file (best.pt, last.pt)"
MODEL_HELP = CHECKPOINT_HELP + ", or a model.onnx that cnnlab export wrote"


def duration(text: str) -> str:
    """--budget's value, checked when the flags are read (the API parses it again, as it does from Python)."""
    from .budget import parse_duration

    try:
        parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def keyword_flag(parser: argparse.ArgumentParser, name: str, function: Any, help: str, **options: Any) -> None:
    """--NAME for the keyword NAME of the Python API's `function`, with its default: each default declared once, in
    the signature both doors call, and shown in --help from there."""
    default = inspect.signature(function).parameters[name].default
    parser.add_argument(f"--{name}", default=default, help=f"{help} [default: {default}]", **options)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cnnlab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="{" + ",".join(c for c, (_, about) in COMMANDS.items() if about) + "}")

    p = sub.add_parser("train", help=COMMANDS["train"][1], allow_abbrev=False, parents=[common_flags("quiet")])
    p.add_argument("--config", help="YAML file of config keys; flags given here win")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
    _add_config_flags(p)

    p = sub.add_parser("lr-find", help=COMMANDS["lr-find"][1], allow_abbrev=False, parents=[common_flags("quiet")])
    p.add_argument("--config", help="YAML file of config keys; flags given here win")
    keyword_flag(p, "start", api.lr_find, "the first learning rate", type=float)
    keyword_flag(p, "end", api.lr_find, "the last learning rate", type=float)
    keyword_flag(p, "steps", api.lr_find, "training steps (batches)", type=_at_least_5)
    _add_config_flags(p)

    p = sub.add_parser("info", help=COMMANDS["info"][1], allow_abbrev=False)
    p.add_argument("--config", help="YAML file of config keys (only the model's are used); flags given here win")
    p.add_argument("--num_classes", type=_at_least_2, help="classes of the output layer [default: those of --data, else 10]")
    p.add_argument("--data", help="data root: its train/ class folders set the number of classes")
    _add_config_flags(p, MODEL_KEYS)

    p = sub.add_parser("env", help=COMMANDS["env"][1], allow_abbrev=False, parents=[common_flags("device", "cache_dir")])
    p.add_argument("--precision", default="auto", choices=FIELDS["precision"].metadata["choices"],
                   help="the precision setting whose meaning on the device is shown [default: auto]")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo-data", help=COMMANDS["demo-data"][1], allow_abbrev=False)
    p.add_argument("root", nargs="?", default="data/demo", help="where train/ and val/ go [default: data/demo]")
    p.add_argument("--train_per_class", type=positive_int, default=100, help="training images per class [default: 100]")
    p.add_argument("--val_per_class", type=positive_int, default=30, help="test images per class, in val/ [default: 30]")
    p.add_argument("--seed", type=whole_number, default=0, help="seed of the shapes, colours and noise [default: 0]")

    p = sub.add_parser("download", help=COMMANDS["download"][1], allow_abbrev=False)
    p.add_argument("dataset", help="inaturalist-12k")
    p.add_argument("dest", nargs="?", default="data", help="folder that receives the archive and its contents [default: data]")
    p.add_argument("--url", help="download from here instead of the data set's usual address")
    p.add_argument("--sha256", help="expected SHA-256 of the archive")

    p = sub.add_parser("check", help=COMMANDS["check"][1], allow_abbrev=False, parents=[common_flags("cache_dir", "quiet")])
    p.add_argument("root", help="the data folder: ROOT/train/<class>/* and ROOT/val/<class>/*")
    p.add_argument("--out", help="folder for check.json, check.md, counts.png, sizes.png [default: check/<ROOT's name>]")

    p = sub.add_parser("models", help=COMMANDS["models"][1])
    p.add_argument("--grep", metavar="WORD", help="only names containing WORD (case-insensitive)")

    p = sub.add_parser("sweep", help=COMMANDS["sweep"][1], allow_abbrev=False, parents=[common_flags("storage", "quiet")])
    p.add_argument("sweep_file", help="a W&B sweep YAML (method, metric, parameters, early_terminate, run_cap)")
    p.add_argument("--count", type=positive_int, help="trials this process runs (default: until run_cap or the grid is done)")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine sharing the study [default: 1]")
    keyword_flag(p, "sweeps_dir", api.sweep, "where sweep folders go")
    keyword_flag(p, "sampler_seed", api.sweep, "seed of the sampler", type=whole_number)
    p.add_argument("--config", help="YAML of base config keys for every trial")
    keyword_flag(p, "verify", api.sweep, "then train the top K configurations again with 3 new seeds each: the "
                 "winner is the best mean, tested against each runner-up", type=whole_number, metavar="K")
    keyword_flag(p, "budget", api.sweep, "the whole sweep planned to end by then: 90s, 20m, 2h (the sweep file's "
                 "budget key sets it too); a rerun goes on with the time that remains", type=duration,
                 metavar="DURATION")
    _add_config_flags(p)

    sub.add_parser(WORKER_COMMAND, allow_abbrev=False)  # no help: a launcher's child (its job comes on stdin)

    p = sub.add_parser("sweep-report", help=COMMANDS["sweep-report"][1], allow_abbrev=False,
                       parents=[common_flags("storage")])
    p.add_argument("folder", help="the sweep folder, sweeps/<name>")

    p = sub.add_parser("compare", help=COMMANDS["compare"][1], allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="run folders")
    keyword_flag(p, "out", api.compare, "folder for compare.md and compare.png")

    _add_report_commands(sub)
    _add_model_commands(sub)
    return parser


def _add_report_commands(sub: Any) -> None:
    """The commands that gather runs into one report: report, and assignment (the whole job, ending in one)."""
    p = sub.add_parser("report", help=COMMANDS["report"][1], allow_abbrev=False)
    p.add_argument("paths", nargs="+", help="run, sweep, compare or check folders, or folders holding them (an "
                   "assignment's output)")
    keyword_flag(p, "out", api.report, "folder for index.html and its figures")

    p = sub.add_parser("assignment", help=COMMANDS["assignment"][1], allow_abbrev=False,
                       parents=[common_flags("device", "cache_dir", "storage", "wandb", "quiet")])
    p.add_argument("--data", required=True, help="the data folder: ROOT/train/<class>/* and ROOT/val/<class>/* (the test set)")
    keyword_flag(p, "out", whole_job.assignment, "folder for everything it writes; rerun to resume")
    quick, full = whole_job.QUICK, whole_job.FULL
    p.add_argument("--quick", action="store_true", help=f"{quick.trials} Part A trials on {quick.image_size} px images; "
                   f"Part B {quick.strategies[0]} ({quick.epochs_head} epochs) and {', '.join(quick.strategies[1:])} "
                   f"({quick.epochs_other} epochs): minutes on 2 CPU cores on ../shared/data/grocery")
    p.add_argument("--sweep", dest="sweep_file", help="Part A's sweep file [default: cnnlab's sweeps/partA.yaml]")
    p.add_argument("--trials", type=positive_int, help=f"Part A trials to finish [default: {quick.trials} with --quick, "
                   "else the sweep file's run_cap]")
    p.add_argument("--image_size", type=positive_int, help=f"Part A's image size [default: {quick.image_size} with "
                   f"--quick, else {full.image_size}]")
    keyword_flag(p, "model", whole_job.assignment, "Part B's pretrained model")
    p.add_argument("--weights", help="Part B's weights: a file (.safetensors, .pth) or a name such as DEFAULT "
                   "(downloaded); without it Part B is skipped")
    p.add_argument("--strategies", help=f"Part B's strategies, comma-separated [default: {','.join(quick.strategies)} "
                   f"with --quick, else {','.join(full.strategies)}]")
    p.add_argument("--verify", type=whole_number, metavar="K", help="Part A's top K configurations trained again with 3 "
                   "new seeds each, the best mean taken [default: 3; with --quick 0: the best trial as it is]")
    keyword_flag(p, "workers", whole_job.assignment, "Part A sweep processes on this machine; on a machine with "
                 "several GPUs worker i uses GPU i mod n", type=positive_int)
    keyword_flag(p, "budget", whole_job.assignment, "the whole job planned to end by then, report written: 90s, 20m, "
                 "2h (the plan is printed first; a rerun goes on with the time that remains)", type=duration,
                 metavar="DURATION")


def _add_model_commands(sub: Any) -> None:
    """The commands that take a trained model: evaluate, predict, export, explain."""
    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"][1], allow_abbrev=False,
                       parents=[common_flags("device", "cache_dir", "quiet")])
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--data", help="data root; its val/ folder is the test set (default: the data the run trained on)")
    keyword_flag(p, "top", api.Run.evaluate, "k of the top-k accuracy", type=positive_int)
    p.add_argument("--out", help="output folder (default: next to the checkpoint, eval/)")
    keyword_flag(p, "seed", api.Run.evaluate, "seed of the prediction grid's sample", type=whole_number)

    p = sub.add_parser("predict", help=COMMANDS["predict"][1], allow_abbrev=False, parents=[common_flags("device")])
    p.add_argument("checkpoint", help=MODEL_HELP)
    p.add_argument("images", nargs="+", help="image files (any format PIL reads) or folders of them (recursively)")
    keyword_flag(p, "top", api.Run.predict, "classes shown per image", type=positive_int)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("export", help=COMMANDS["export"][1], allow_abbrev=False, parents=[common_flags("device")])
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    keyword_flag(p, "format", api.Run.export, "the file's format", choices=("onnx", "torchscript"))
    p.add_argument("--out", help="the file to write [default: model.onnx or model.torchscript.pt beside the checkpoint]")

    p = sub.add_parser("explain", help=COMMANDS["explain"][1], allow_abbrev=False,
                       parents=[common_flags("device", "cache_dir", "quiet")])
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--data", help="data root; its val/ test images are the ones explained (default: the data the run "
                                  "trained on)")
    keyword_flag(p, "neurons", api.Run.explain, "last-conv channels to show", type=positive_int)
    keyword_flag(p, "per_neuron", api.Run.explain, "top-exciting test images per neuron", type=positive_int)
    p.add_argument("--out", help="output folder (default: next to the checkpoint, explain/)")
    keyword_flag(p, "seed", api.Run.explain, "seed of the Grad-CAM sample", type=whole_number)


# The machine, not cnnlab, ran out of something: one line, not a traceback (files are written atomically).
RESOURCE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE}
# A path the user gave (or one below it) cannot be used: one line naming it and what to do.
PATH_ERRORS = {
    errno.EACCES: "check its permissions, or choose another folder (--out, --cache_dir, --sweeps_dir)",
    errno.EPERM: "check its permissions, or choose another folder (--out, --cache_dir, --sweeps_dir)",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away, or choose another path",
    errno.EEXIST: "a file stands where a folder is needed: move it away, or choose another path",
    errno.EISDIR: "a folder stands where a file is needed: give the file, or choose another path",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter one",
}


def main(argv: Sequence[str] | None = None) -> int:
    before = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:  # not where the caller chose otherwise (nohup: SIGHUP ignored)
            before[signum] = signal.signal(signum, _terminate)
    try:
        return run(argv)
    finally:  # called from Python (a test, a notebook): its handlers as they were
        for signum, handler in before.items():
            signal.signal(signum, handler)


def ensure_standard_streams() -> None:
    """Work without a stderr (or stdout, stdin): `cnnlab ... 2>&-` starts Python with sys.stderr None, where every
    message and progress bar failed and the run ended with exit 1 and no word. A closed descriptor 0-2 gets
    /dev/null, so no file opened later takes its number (a warning written to fd 2 would land inside a checkpoint);
    messages meant for the missing stream are dropped, and stdout stays clean for a pipe."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    return _int_at_least(text, 1)


def whole_number(text: str) -> int:
    """An argparse type: a whole number of at least 0 (seeds)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    """A flag's text as the API's argument: the same rule (arguments.whole_number), in argparse's words."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    try:
        return arguments.whole_number("value", value, least)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{value} is below {least}") from None


def _at_least_5(text: str) -> int:
    return _int_at_least(text, 5)


def _at_least_2(text: str) -> int:
    """An argparse type: a number of classes (a classifier tells two apart at least)."""
    return _int_at_least(text, 2)


def configure_threads() -> None:
    """$CNNLAB_THREADS, set by a parent that runs several sweep processes on one machine (or by hand)."""
    threads = os.environ.get("CNNLAB_THREADS", "").strip()
    if not threads:
        return
    try:
        n = int(threads)
    except ValueError:
        n = 0
    if not 1 <= n <= 4096:
        raise CnnlabError(f"$CNNLAB_THREADS={threads!r}: expected a whole number of threads from 1 to 4096 (or unset "
                          "it: one thread per core)")
    if "torch" in sys.modules:  # already running (cnnlab.cli.main called from Python): set now
        sys.modules["torch"].set_num_threads(n)
    else:  # read by torch when it starts: a command that needs no torch (--help, a refusal) never imports it
        os.environ["OMP_NUM_THREADS"] = str(n)


def run(argv: Sequence[str] | None = None) -> int:
    ensure_standard_streams()
    for stream in (sys.stdout, sys.stderr):  # a Latin-1 file name is printed as its own bytes, as `ls` prints it;
        if hasattr(stream, "reconfigure"):  # each line lands in a redirected log as it is written, not at exit
            stream.reconfigure(errors="surrogateescape", line_buffering=True)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.argv = None if argv is None else list(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        if flag.lstrip("-") in FIELDS:  # a real config key this command does not take (a training key given to info)
            hint = f": cnnlab {args.command} does not use it (see cnnlab {args.command} --help)"
        else:
            close = difflib.get_close_matches(flag.lstrip("-"), list(FIELDS), n=1)
            hint = f"; did you mean --{close[0]}?" if close else f"; see cnnlab {args.command} --help"
        print(f"cnnlab {args.command}: error: unknown option {flag}{hint}", file=sys.stderr)
        return 2
    try:
        configure_threads()
        return COMMANDS[args.command][0](args, Common.from_args(args))  # the shared options, read once
    except CnnlabError as e:
        print(f"cnnlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"\ncnnlab {args.command}: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"\ncnnlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cnnlab evaluate ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if e.errno in PATH_ERRORS:
            where = f"{e.filename}: " if e.filename else ""
            print(f"cnnlab {args.command}: error: {where}{e.strerror}: {PATH_ERRORS[e.errno]}", file=sys.stderr)
            return 2
        if e.errno not in RESOURCE_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"cnnlab {args.command}: error: {e.strerror}{where}: free some disk space or memory, or check the "
              "folder's permissions, then run again (finished work is kept)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
