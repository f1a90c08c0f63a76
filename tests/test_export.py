"""`charlm export --onnx`: the exported one-step model run by onnxruntime gives PyTorch's
logits (1e-4, a few hundred steps, batch 1 and 3) for LSTM, GRU and RNN; the Python
program in docs/commands.md, run exactly as written, prints `charlm sample --temperature 0`'s text;
the vocabulary JSON; bad input is one line and exit 2.

Three tiny two-layer checkpoints (one per cell) are trained and exported once for the module.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TEXT, TINY, subprocess_env
from typer.testing import CliRunner

import charlm
from charlm.cli import app
from charlm.serving.onnx import start_id, state_names

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CELLS = ["lstm", "gru", "rnn"]
STEPS = 300


@pytest.fixture(scope="module")
def exported(tmp_path_factory, _one_thread) -> dict[str, tuple[Path, Path]]:
    """cell -> (checkpoint, model.onnx): 2 layers (state names h0..c1) with dropout 0.2."""
    base = tmp_path_factory.mktemp("export")
    corpus = base / "speech.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = {}
    for cell in CELLS:
        run = base / cell
        res = CliRunner().invoke(app, ["train", str(corpus), "--out", str(run), "--max-steps", "60",
                                       *TINY, "--cell", cell, "--num-layers", "2", "--dropout", "0.2"])
        assert res.exit_code == 0, res.output
        onnx = base / f"{cell}.onnx"
        res = CliRunner().invoke(app, ["export", str(run / "latest.pt"), "--onnx", str(onnx)])
        assert res.exit_code == 0, res.output
        assert res.stdout == ""
        assert res.stderr == (f"charlm: wrote {onnx} ({cell} 2x32, inputs char_id, "
                              f"{', '.join(state_names(cell, 2))}) and {onnx}.vocab.json "
                              f"({len(charlm.load(run / 'latest.pt').vocab)} characters)\n")
        out[cell] = (run / "latest.pt", onnx)
    return out


@pytest.mark.parametrize("cell", CELLS)
def test_onnx_logits_and_state_match_pytorch(exported, cell):
    ckpt, onnx = exported[cell]
    lm = charlm.load(ckpt)
    meta = json.loads(Path(f"{onnx}.vocab.json").read_text(encoding="utf-8"))
    session = ort.InferenceSession(str(onnx))
    text = TEXT[:STEPS + 40]
    for batch in (1, 3):
        # Row r reads the text from offset 13*r, so the rows differ.
        ids = torch.stack([lm.vocab.encode(text[13 * r:13 * r + STEPS]) for r in range(batch)])  # (B, T)
        with torch.no_grad():
            want, final = lm.model(ids, None)  # PyTorch's fused kernel over the whole sequence
        state = {n: np.zeros((batch, 32), np.float32) for n in meta["state_inputs"]}
        worst = 0.0
        for t in range(STEPS):
            logits, *new = session.run(None, {"char_id": ids[:, t].numpy(), **state})
            assert logits.shape == (batch, len(lm.vocab))
            worst = max(worst, float(np.abs(logits - want[:, t].numpy()).max()))
            state = dict(zip(meta["state_inputs"], new, strict=True))
        assert worst < 1e-4, worst
        h = final[0] if cell == "lstm" else final
        for layer in range(2):
            np.testing.assert_allclose(state[f"h{layer}"], h[layer].numpy(), atol=1e-4)
            if cell == "lstm":
                np.testing.assert_allclose(state[f"c{layer}"], final[1][layer].numpy(), atol=1e-4)


@pytest.mark.parametrize("cell", CELLS)
def test_vocabulary_json_and_graph_names(exported, cell):
    ckpt, onnx = exported[cell]
    lm = charlm.load(ckpt)
    meta = json.loads(Path(f"{onnx}.vocab.json").read_text(encoding="utf-8"))
    names = ["h0", "c0", "h1", "c1"] if cell == "lstm" else ["h0", "h1"]
    assert meta == {
        "format": "charlm-onnx", "version": 1, "model": onnx.name,
        "chars": list(lm.vocab.chars), "vocab_size": len(lm.vocab),
        "start_id": lm.vocab.chars.index("\n"), "cell": cell, "num_layers": 2, "hidden_size": 32,
        "input": "char_id", "state_inputs": names, "output": "logits",
        "state_outputs": [f"{n}_out" for n in names], "checkpoint": str(ckpt), "step": 60,
    }
    session = ort.InferenceSession(str(onnx))
    assert [i.name for i in session.get_inputs()] == ["char_id", *names]
    assert [o.name for o in session.get_outputs()] == ["logits", *[f"{n}_out" for n in names]]
    assert session.get_inputs()[0].type == "tensor(int64)"
    assert [i.shape[1] for i in session.get_inputs()[1:]] == [32] * len(names)
    assert not list(onnx.parent.glob(f".{onnx.name}*"))  # no temporary files left behind
    assert not Path(f"{onnx}.data").exists()  # the weights are inside the one file


def test_start_id_is_the_samplers():
    assert start_id("\n ab") == 0
    assert start_id(" \nab") == 1
    assert start_id("abc") == 0  # no newline in the vocabulary: id 0


# --- the documented program (docs/commands.md) ----------------------------------------------


def readme_program() -> str:
    reference = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    section = re.search(r"^### `charlm export.*?(?=^### |^## )", reference, re.DOTALL | re.MULTILINE)
    assert section, "docs/commands.md has no charlm export section"
    code = re.search(r"```python\n(.*?)```", section.group(0), re.DOTALL)
    assert code, "the charlm export section has no python block"
    return code.group(1)


def run_readme(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "generate.py"
    script.write_text(readme_program(), encoding="utf-8")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          check=False, env=subprocess_env(), timeout=120)


def test_readme_program_is_short_and_uses_only_onnxruntime_and_numpy():
    code = readme_program()
    assert len([line for line in code.splitlines() if line.strip()]) <= 20
    modules = {name.split()[0] for line in re.findall(r"^import (.+)$", code, re.MULTILINE)
               for name in line.split(",")} | set(re.findall(r"^from (\w+)", code, re.MULTILINE))
    assert modules == {"json", "sys", "numpy", "onnxruntime"}
    assert "charlm" not in code and "torch" not in code


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("prime", ["The state of ", ""])
def test_readme_program_greedy_equals_charlm_sample(exported, tmp_path, cell, prime):
    ckpt, onnx = exported[cell]
    res = run_readme(tmp_path, str(onnx), prime, "200", "0")
    assert res.returncode == 0, res.stderr
    want = CliRunner().invoke(app, ["sample", "-c", str(ckpt), "--temperature", "0",
                                    "--prime", prime, "--length", "200"])
    assert want.exit_code == 0, want.output
    assert res.stdout == want.stdout
    assert len(res.stdout) == len(prime) + 200 + 1


def test_readme_program_samples_at_a_temperature(exported, tmp_path):
    ckpt, onnx = exported["lstm"]
    res = run_readme(tmp_path, str(onnx), "Our economy", "300", "0.8")
    assert res.returncode == 0, res.stderr
    text = res.stdout[:-1]
    assert res.stdout.endswith("\n") and text.startswith("Our economy") and len(text) == 311
    assert set(text) <= set(charlm.load(ckpt).vocab.chars)


# --- options and bad input --------------------------------------------------------------------


def test_vocab_option_writes_the_json_there(exported, tmp_path):
    ckpt, _ = exported["gru"]
    onnx, vocab = tmp_path / "m.onnx", tmp_path / "chars.json"
    res = CliRunner().invoke(app, ["export", str(ckpt), "--onnx", str(onnx), "--vocab", str(vocab)])
    assert res.exit_code == 0, res.output
    assert json.loads(vocab.read_text(encoding="utf-8"))["model"] == "m.onnx"
    assert not Path(f"{onnx}.vocab.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chars.json", "m.onnx"]


def assert_one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_and_corrupt_checkpoints(tmp_path):
    onnx = tmp_path / "m.onnx"
    res = CliRunner().invoke(app, ["export", str(tmp_path / "none.pt"), "--onnx", str(onnx)])
    assert_one_line_error(res, "none.pt: no such checkpoint")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    res = CliRunner().invoke(app, ["export", str(bad), "--onnx", str(onnx)])
    assert_one_line_error(res, "bad.pt: not a checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_unwritable_output_paths(exported, tmp_path):
    ckpt, _ = exported["rnn"]
    afile = tmp_path / "a-file"
    afile.write_text("x", encoding="utf-8")
    for target, needle in [(tmp_path / "no" / "such" / "m.onnx", "cannot write"),
                           (afile / "m.onnx", "cannot write"),
                           (tmp_path, "is a folder")]:
        res = CliRunner().invoke(app, ["export", str(ckpt), "--onnx", str(target)])
        assert_one_line_error(res, str(target), needle)
    res = CliRunner().invoke(app, ["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx"),
                                   "--vocab", str(tmp_path / "missing" / "v.json")])
    assert_one_line_error(res, "v.json", "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing half-written


def test_missing_exporter_packages_name_the_install_command(exported, monkeypatch, tmp_path):
    ckpt, _ = exported["lstm"]
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    res = CliRunner().invoke(app, ["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx")])
    assert_one_line_error(res, "ONNX export needs onnxscript: pip install 'charlm[export]'")
    assert list(tmp_path.iterdir()) == []
