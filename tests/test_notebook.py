"""`charlm.fit` in a real Jupyter kernel (nbclient runs the cells, as Jupyter does): progress
is tqdm.auto's widget, not a text bar; with quiet=True there is nothing; the result holds the
run's metrics and paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TEXT, TINY_SETTINGS

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")

WIDGET = "application/vnd.jupyter.widget-view+json"


def _run_cell(source: str, cwd: Path) -> list[dict]:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
                            ).execute()
    return [dict(o) for o in nb.cells[0].outputs]


def _fit_cell(corpus: Path, out: Path, quiet: bool) -> str:
    settings = {**TINY_SETTINGS, "max_steps": 20, "preview_length": 0, "device": "cpu"}
    return (
        "import json, os\n"
        "os.environ.update(OMP_NUM_THREADS='1', CHARLM_NO_DOWNLOAD='1')\n"
        "import charlm\n"
        "from charlm.config.run import build_config\n"
        f"cfg = build_config(None, {settings!r})\n"
        f"result = charlm.fit(cfg, [{str(corpus)!r}], {str(out)!r}, quiet={quiet})\n"
        "print(json.dumps({'steps': [m.step for m in result.metrics], 'best': str(result.best),"
        " 'report': str(result.report), 'bpc': result.best_val_bpc}))\n"
    )


@pytest.mark.parametrize("quiet", [False, True])
def test_fit_in_a_jupyter_kernel(tmp_path, quiet):
    corpus = tmp_path / "speech.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    outputs = _run_cell(_fit_cell(corpus, out, quiet), tmp_path)
    errors = [o for o in outputs if o["output_type"] == "error"]
    assert not errors, errors
    widgets = [o for o in outputs if o["output_type"] == "display_data" and WIDGET in o["data"]]
    stderr = "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == "stderr")
    printed = [o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == "stdout"]
    result = json.loads(printed[-1])
    assert result["steps"] == [10, 20]
    assert result["best"] == str(out / "best.pt") and result["report"] == str(out / "report.html")
    assert (out / "report.html").exists()
    if quiet:
        assert widgets == [] and stderr == ""
    else:
        # The training bar is a widget (as are the corpus's), and no text bar was drawn.
        assert widgets, outputs
        assert "step 10: train" in stderr and "\r" not in stderr and "it/s" not in stderr
