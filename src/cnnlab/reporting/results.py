"""The report's result sections: the best model on the test folder, what it learned, Part B against scratch, every
run's learning curves and where the numbers came from."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..io import from_spreadsheet_cell
from ..run_folder import EVAL, EXPLAIN, RunFolder, again_command
from ..visualise import plot_curves
from .observations import compare_claim, interval_text
from .page import claims_list, esc, figure, missing, source, table
from .sections import eval_source, run_source


def test_section(best: RunFolder | None, why: str) -> str:
    if best is None:
        return missing("A trained model", "cnnlab train --data ROOT")
    m = best.evaluation
    if m is None:
        return f"<p>{esc(why)}</p>" + missing("Its test-folder evaluation", f"cnnlab evaluate {best.path} --data ROOT")
    per_class = sorted(m["per_class"].items(), key=lambda kv: (kv[1]["recall"], kv[0]))
    topk = next((k for k in m if k.startswith("top") and k.endswith("_accuracy")), None)
    lines = [f"<li>test accuracy <b>{interval_text(m['accuracy'], m['accuracy_ci95'])}</b> on {m['images']} images "
             "(Wilson interval)</li>"]
    if "balanced_accuracy" in m:
        lines.append(f"<li>balanced accuracy (mean per-class recall) {m['balanced_accuracy']:.3f}</li>")
    if topk:
        lines.append(f"<li>{esc(topk.replace('_', ' '))} {m[topk]:.3f}; macro F1 {m['macro_f1']:.3f}</li>")
    lines.append(test_use_line(best))
    if best.evaluation_is_stale(m):
        lines.append(f"<li class=missing>stale: evaluated best.pt of epoch {m.get('checkpoint_epoch', '?')}, but the run's best "
                     f"epoch is now {best.best_epoch}: run <code>cnnlab evaluate {esc(best.path)}</code> again</li>")
    eval_dir = best.path / EVAL
    body = (f"<p>{esc(why)}</p><ul>" + "".join(lines) + "</ul>"
            + "<details open><summary>per class (worst recall first)</summary>" + table(
                ["class", "precision", "recall", "F1", "images"],
                [[k, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]] for k, v in per_class],
                (1, 2, 3, 4)) + "</details>"
            + "<div class=grid2>" + figure(eval_dir / "confusion.png", "confusion matrix (rows: true class)")
            + calibration_block(m, eval_dir) + "</div>"
            + figure(eval_dir / "predictions.png", "test images with their predictions: three per class (green right, "
                     "red wrong)", width=620)
            + mistakes_block(eval_dir) + source(eval_source(best, m), run_source(best)))
    return body


def test_use_line(run: RunFolder) -> str:
    """How often the model met its test folder (its run folder's ledger), flagged when it trained again after."""
    ledger = run.test_ledger
    if not ledger:
        return "<li>test-folder uses: not recorded (evaluated before cnnlab kept a ledger)</li>"
    torn = sum(1 for e in ledger if e.get("unreadable"))
    text = (f"<li>this model's run met its test folder {len(ledger)} time(s) (<code>test_ledger.jsonl</code>"
            + (f", {torn} of its lines unreadable: torn by a crash or garbled, counted all the same" if torn else "") + ")"
            + ("; once, as it should" if len(ledger) == 1 else
               ": its test score was seen more than once, so treat it as less than a clean estimate") + "</li>")
    if run.trained_after_test():
        text += ("<li class=missing>flagged: best.pt changed after its test score was seen (trained again), so the "
                 "test folder may have steered it; a clean estimate needs a model never changed after its test</li>")
    return text


def calibration_block(m: dict[str, Any], eval_dir: Path) -> str:
    if "calibration" not in m:
        return missing("Calibration (a reliability diagram)", f"cnnlab evaluate {eval_dir.parent} --data ROOT (again)")
    c = m["calibration"]
    return figure(eval_dir / "reliability.png",
                  f"reliability diagram: expected calibration error {c['ece']:.3f} over 15 bins (mean confidence "
                  f"{c['mean_confidence']:.3f} against accuracy {m['accuracy']:.3f}: "
                  f"{'over' if c['mean_confidence'] > m['accuracy'] else 'under'}confident)")


def mistakes_block(eval_dir: Path, shown: int = 10) -> str:
    path = eval_dir / "mistakes.csv"
    if not path.is_file():
        return missing("The most confident mistakes", f"cnnlab evaluate {eval_dir.parent} --data ROOT (again)")
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        rows = list(csv.DictReader(fh))
    cell = from_spreadsheet_cell
    top = [[Path(cell(r["file"])).name, cell(r["true"]), cell(r["predicted"]), r["confidence"], r["loss"]]
           for r in rows[:shown]]
    return ("<h3>most confident mistakes</h3>" + figure(eval_dir / "top_losses.png", "the test images with the highest "
            "loss: true class, prediction and its confidence", width=720)
            + table(["file", "true", "predicted", "confidence", "loss"], top, (3, 4))
            + f"<p class=muted>{len(rows)} mistakes in all, highest loss first, in <code>{esc(path)}</code></p>")


def explain_section(best: RunFolder | None) -> str:
    if best is None:
        return missing("A trained model", "cnnlab train --data ROOT")
    folder = best.path / EXPLAIN
    shown = [figure(folder / "filters.png", "the first layer's filters", width=720),
             figure(folder / "guided_backprop.png", "guided back-propagation: what excites 10 neurons of the last "
                    "convolution, each on the test images it responds to most", width=760),
             figure(folder / "gradcam.png", "Grad-CAM: where the model looked for the class it predicted")]
    if not any(shown):
        return missing("Filters, guided back-propagation and Grad-CAM", f"cnnlab explain {best.path} --data ROOT")
    return "".join(shown) + source(f"<code>cnnlab explain</code>, in <code>{esc(folder)}</code>", run_source(best))


def partb_section(finetuned: list[RunFolder], scratch: RunFolder | None, out: Path) -> str:
    if not finetuned:
        return missing("A fine-tuned pretrained model", "cnnlab train --data ROOT --model resnet50 --weights DEFAULT "
                       "--finetune head")
    runs = finetuned + ([scratch] if scratch else [])
    rows = []
    for r in runs:
        m = r.evaluation
        total, trainable = r.summary.get("params"), r.summary.get("trainable_params", r.summary.get("params"))
        size = (r.summary.get("preprocess") or {}).get("image_size", r.config.image_size)
        flops = r.summary.get("flops_per_image")
        rows.append([r.name, r.config.model, r.strategy, f"{size} px", f"{trainable:,} / {total:,}" if total else "?",
                     "?" if flops is None else f"{flops / 1e9:.3f}",
                     r.summary.get("epochs_run", len(r.history)), "-" if r.best_val_acc is None else f"{r.best_val_acc:.3f}",
                     (interval_text(m["accuracy"], m["accuracy_ci95"]) + (" (stale)" if r.evaluation_is_stale(m) else ""))
                     if m else "not evaluated",
                     len(r.test_ledger) if r.test_ledger else "-",
                     f"{m['inference']['ms_per_image']:.2f}" if m and "inference" in m else "-",
                     f"{r.summary.get('setup_seconds', 0):.0f}", f"{r.summary.get('train_seconds', 0):.0f}"])
    plot = plot_curves({r.name: r.history for r in runs}, out / "partB-curves.png")
    claims = []
    base = scratch.evaluation if scratch else None
    for r in finetuned:
        m = r.evaluation
        if m and base:
            seconds = (r.summary.get("setup_seconds", 0) + r.summary.get("train_seconds", 0),
                       scratch.summary.get("setup_seconds", 0) + scratch.summary.get("train_seconds", 0))
            claims.append(compare_claim(f"{r.name} ({r.strategy})", m, f"the scratch CNN {scratch.name}", base)
                          + f"; {seconds[0]:.0f} s against {seconds[1]:.0f} s of setup and training")
    claims += [gap for r in finetuned if (gap := gap_closed(r, finetuned, scratch)) is not None]
    text = claims_list(claims) if claims else (
        "<p class=muted>Evaluate the runs on the test folder (<code>cnnlab evaluate</code>) to compare them.</p>")
    return (table(["run", "model", "strategy", "input", "trainable / total params", "GFLOPs per image", "epochs",
                   "best val acc", "test acc", "test uses", "inference (ms / image)", "setup (s)", "training (s)"], rows,
                  (5, 6, 7, 9, 10, 11, 12)) + text
            + "<p class=muted>Inference: the time of the evaluation's pass over the decoded test images per image "
              "(batches of 128, with the run's mirror averaging when it has it, on the device it ran on).</p>"
            + figure(plot, "validation accuracy per epoch, every Part B run and the scratch model")
            + source(*runs_source(runs)))


def gap_closed(student: RunFolder, runs: list[RunFolder], scratch: RunFolder | None) -> str | None:
    """How much of the test-accuracy gap between the scratch CNN and a distilled student's teacher (one of `runs`,
    by its checkpoint) the student closed: (student - scratch) / (teacher - scratch). None unless all three were
    evaluated."""
    teacher_path = (student.summary.get("teacher") or {}).get("checkpoint")
    if not teacher_path or scratch is None:
        return None
    teacher = next((r for r in runs if str((r.path / "best.pt").resolve()) == teacher_path), None)
    s, t, b = student.evaluation, teacher.evaluation if teacher else None, scratch.evaluation
    if not (s and t and b):
        return None
    gap = t["accuracy"] - b["accuracy"]
    if gap <= 0:
        return (f"{student.name} learned from {teacher.name}, whose test accuracy ({t['accuracy']:.3f}) is not above the "
                f"scratch CNN's ({b['accuracy']:.3f}): there was no gap to close")
    closed = (s["accuracy"] - b["accuracy"]) / gap
    return (f"{student.name} (the small CNN taught by {teacher.name}) closed {closed:.0%} of the test-accuracy gap "
            f"between the scratch CNN ({b['accuracy']:.3f}) and its teacher ({t['accuracy']:.3f}): "
            f"{s['accuracy']:.3f}")


def runs_source(runs: list[RunFolder]) -> list[str]:
    """The run folders, then each distinct command that wrote them (once, however many runs it wrote)."""
    commands = list(dict.fromkeys(r.summary.get("provenance", {}).get("argv", "not recorded") for r in runs))
    return (["run folders: " + ", ".join(f"<code>{esc(r.path)}</code>" for r in runs)]
            + [f"command: <code>{esc(c)}</code>" for c in commands])


def curves_section(runs: list[RunFolder], trials: list[RunFolder], out: Path) -> str:
    """Every named run's validation accuracy per epoch, with the sweep's trials as thin grey lines behind."""
    import matplotlib.pyplot as plt

    from ..visualise import save_figure

    if not runs and not trials:
        return missing("A run", "cnnlab train --data ROOT")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("val_acc", "train_loss")):
        for t in trials:
            ax.plot([r["epoch"] for r in t.history], [r[key] for r in t.history], color="#bbbbbb", lw=0.8, zorder=1)
        for r in runs:
            ax.plot([e["epoch"] for e in r.history], [e[key] for e in r.history], marker="o", ms=3, label=r.name, zorder=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if runs:
        axes[0].legend(fontsize=7)
    axes[0].set_title(f"{len(runs)} run(s)" + (f" and {len(trials)} sweep trials (grey)" if trials else ""), fontsize=9)
    return figure(save_figure(fig, out / "all-curves.png"), "validation accuracy and training loss per epoch of every run")


def precision_name(value: object) -> str:
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(value), str(value))


def reproducibility_section(runs: list[RunFolder], report_argv: str) -> str:
    rows, machine = [], None
    for r in runs:
        prov = r.summary.get("provenance")
        if not prov:
            rows.append([r.name, "not recorded", r.summary.get("torch", "?"), r.summary.get("device", "?"),
                         precision_name(r.summary.get("precision", "?")), "-", r.config.seed, "-"])
            continue
        v, machine = prov["versions"], prov["machine"]
        rows.append([r.name, v.get("cnnlab"), v.get("torch"), r.summary.get("device"), precision_name(r.summary.get("precision")),
                     v.get("timm", "-"), prov.get("seed"),
                     again_command(r.path)])  # from where the folder is now: the recorded one names where it was
    text = table(["run", "cnnlab", "torch", "device", "precision", "timm", "seed", "to train it again"], rows)
    if machine:
        text += (f"<p>machine: {esc(machine.get('cpu'))}, {esc(machine.get('cores'))} cores, CPU flags "
                 f"{esc(', '.join(machine.get('cpu_flags', [])) or 'none of note')}"
                 + (f", GPU {esc(machine['gpu'])}" if machine.get("gpu") else "") + f"; {esc(machine.get('platform'))}</p>")
    commands = sorted({r.summary.get("provenance", {}).get("argv", "") for r in runs} - {""})
    if commands:
        text += "<h3>commands that wrote these runs</h3><pre>" + esc("\n".join(commands)) + "</pre>"
    return text + f"<p class=muted>this report: <code>{esc(report_argv)}</code></p>"
