"""examples/assignment.ipynb runs from top to bottom in a real Python kernel (nbclient), without an error."""

from __future__ import annotations

from pathlib import Path

import ipykernel  # noqa: F401 - declared in dev: an import error fails the run, never skips the file
import nbclient
import nbformat
import pytest
from conftest import missing_component

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "assignment.ipynb"


@pytest.mark.slow
def test_the_example_notebook_runs_without_an_error(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import NoSuchKernel

    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except (NoSuchKernel, RuntimeError) as e:  # a kernel that cannot start: a skip on a laptop, a failure in CI
        started = any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
        if "kernel" in str(e).lower() and not started:
            missing_component("a Python kernel for the notebook", f"ipykernel; it said: {e}")
        raise
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    outputs = {i: c.outputs for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    html = [o for outs in outputs.values() for o in outs if "text/html" in o.get("data", {})]
    assert any("val_acc" in o["data"]["text/html"] for o in html)  # the run's own HTML view
    assert any("<img" in o["data"]["text/html"] for o in html)  # figures shown inline
    assert any("image/png" in o.get("data", {}) for outs in outputs.values() for o in outs)  # run.plot()'s Figure
    assert (tmp_path / "data" / "notebook-demo" / "train").is_dir() and list((tmp_path / "runs").iterdir())
    page = (tmp_path / "report-demo" / "index.html").read_text()  # cnnlab.report from the notebook
    assert '<section id="partb">' in page and "parcoords" in page
    assert list((tmp_path / "cache").glob("*.npy"))  # the kernel decoded into the cache it was given, not ~/.cache


def test_a_kernel_is_a_notebook_and_a_process_that_imported_ipykernel_is_not(tmp_path):
    """Progress bars and inline figures follow `options.in_notebook`. It was `'ipykernel' in sys.modules`, which
    the test process itself meets once a notebook test has run: an in-process `cnnlab.cli.main` then drew bars into
    captured stderr, and its one-line error became three lines."""
    import subprocess
    import sys

    probe = "from cnnlab.options import in_notebook; print(in_notebook())"
    plain = subprocess.run([sys.executable, "-c", "import ipykernel; " + probe], capture_output=True, text=True,
                           timeout=120)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(probe)])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (plain.stdout.strip(), nb.cells[0].outputs[0]["text"].strip()) == ("False", "True")


@pytest.mark.slow
def test_the_colab_notebook_runs_on_the_cpu_with_demo_data_for_the_download(tmp_path, monkeypatch):
    """examples/colab.ipynb as a student runs it on a GPU, executed here on the CPU: no install (not on Colab), demo
    data in place of iNaturalist-12K's download (CNNLAB_NOTEBOOK_DEMO), W&B offline; the whole job, its report
    zipped and its best model exported and run by onnxruntime."""
    nb = nbformat.read(NOTEBOOK.with_name("colab.ipynb"), as_version=4)
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CNNLAB_NOTEBOOK_DEMO", "1")
    monkeypatch.setenv("WANDB_SILENT", "true")
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "precision: " in text and "decoder: " in text  # cnnlab env's screen, in the notebook
    assert "on cpu: test accuracy" in text  # the best trial's evaluation, read from its run folder
    assert (tmp_path / "assignment" / "report" / "index.html").is_file() and (tmp_path / "assignment-report.zip").is_file()
    assert list((tmp_path / "assignment" / "sweeps" / "partA" / "trials").glob("*/model.onnx"))
    assert list(tmp_path.glob("assignment/**/wandb/offline-run-*"))  # the runs were logged to W&B, offline, in their folders
    result = nb.cells[-1].outputs[-1]["data"]["text/plain"]
    assert "'class'" in result and "'prob'" in result  # onnxruntime's prediction of a test image
