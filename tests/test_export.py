"""`charlm export --onnx`: the exported one-step model run by onnxruntime gives PyTorch's
logits (1e-4, a few hundred steps, batch 1 and 3) for LSTM, GRU and RNN; the Python
program in docs/commands.md, run exactly as written, prints `charlm sample --temperature 0`'s text;
the vocabulary JSON; bad input is one line and exit 2.

Three tiny two-layer checkpoints (one per cell) are trained and exported once for the module.

`charlm export --safetensors`: the file, read with safetensors' own API and loaded into a new
`CharRNN` (strict), gives `charlm.load`'s logits exactly, for the shared run and for a
weight-drop records model; its metadata; the program in docs/python-api.md, run as written,
prints `charlm sample --temperature 0`'s text; the flags, a missing package and unwritable
paths are one line and exit 2, and a failed write keeps the old file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT, RUN_STEPS, TEXT, TINY, one_line_error, subprocess_env, tiny_config
from typer.testing import CliRunner

import charlm
from charlm.cli import app
from charlm.config.run import ModelConfig
from charlm.model.network import CharRNN
from charlm.serving.onnx import start_id, state_names
from charlm.serving.safetensors_export import export_safetensors, tensors
from charlm.training import session

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
safe_open = pytest.importorskip("safetensors").safe_open
load_file = pytest.importorskip("safetensors.torch").load_file

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


def doc_program(page: str, section: str) -> str:
    """The first python block of the section of docs/`page` whose heading matches `section`
    (a regex; the section ends at the next heading of its level or above)."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    level = section.split(" ")[0]  # "###" or "##"
    ends = "|".join("^" + "#" * n + " " for n in range(2, len(level) + 1))
    found = re.search(rf"^{section}.*?(?={ends}|\Z)", text, re.DOTALL | re.MULTILINE)
    assert found, f"docs/{page} has no section {section!r}"
    code = re.search(r"```python\n(.*?)```", found.group(0), re.DOTALL)
    assert code, f"the section {section!r} of docs/{page} has no python block"
    return code.group(1)


def readme_program() -> str:
    return doc_program("commands.md", "### `charlm export")


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


def test_missing_and_corrupt_checkpoints(tmp_path):
    onnx = tmp_path / "m.onnx"
    res = CliRunner().invoke(app, ["export", str(tmp_path / "none.pt"), "--onnx", str(onnx)])
    one_line_error(res, "none.pt: no such checkpoint")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    res = CliRunner().invoke(app, ["export", str(bad), "--onnx", str(onnx)])
    one_line_error(res, "bad.pt: not a checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_unwritable_output_paths(exported, tmp_path):
    ckpt, _ = exported["rnn"]
    afile = tmp_path / "a-file"
    afile.write_text("x", encoding="utf-8")
    for target, needle in [(tmp_path / "no" / "such" / "m.onnx", "cannot write"),
                           (afile / "m.onnx", "cannot write"),
                           (tmp_path, "is a folder")]:
        res = CliRunner().invoke(app, ["export", str(ckpt), "--onnx", str(target)])
        one_line_error(res, str(target), needle)
    res = CliRunner().invoke(app, ["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx"),
                                   "--vocab", str(tmp_path / "missing" / "v.json")])
    one_line_error(res, "v.json", "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing half-written


def test_missing_exporter_packages_name_the_install_command(exported, monkeypatch, tmp_path):
    ckpt, _ = exported["lstm"]
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    res = CliRunner().invoke(app, ["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx")])
    one_line_error(res, "ONNX export needs onnxscript: pip install 'charlm[export]'")
    assert list(tmp_path.iterdir()) == []


# --- safetensors ------------------------------------------------------------------------------


def rebuild(path: Path) -> tuple[CharRNN, dict[str, str]]:
    """The file loaded as docs/python-api.md loads it: safetensors' API and CharRNN, no checkpoint."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model = CharRNN(ModelConfig(**json.loads(meta["model"])), len(json.loads(meta["vocab"])))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), meta


def assert_same_logits(model: CharRNN, lm: charlm.CharLM, text: str) -> None:
    """`model` gives `lm.model`'s logits and final state, bit for bit, over `text` (batch 2)."""
    ids = torch.stack([lm.vocab.encode(text), lm.vocab.encode(text[::-1])])
    with torch.no_grad():
        got, got_state = model(ids)
        want, want_state = lm.model(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_state, want_state, rtol=0, atol=0)


def test_safetensors_file_is_the_weights_charlm_samples_with(ckpt, lm, tmp_path, runner):
    out = tmp_path / "m.safetensors"
    res = runner.invoke(app, ["export", str(ckpt), "--safetensors", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    n = len(lm.model.state_dict())
    assert res.stderr == (f"charlm: wrote {out} ({n} tensors, {lm.model.num_parameters():,} parameters; "
                          f"{len(lm.vocab)} characters in its metadata)\n")
    with safe_open(str(out), framework="pt") as f:
        meta, keys = f.metadata(), sorted(f.keys())
        assert f.get_tensor("rnn.weight_hh_l0").dtype == torch.float32
    assert keys == sorted(lm.model.state_dict()) == [
        "embed.weight", "head.bias", "head.weight", "rnn.bias_hh_l0", "rnn.bias_ih_l0",
        "rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    assert meta == {
        "format": "charlm", "format_version": "1", "model": meta["model"], "vocab": meta["vocab"],
        "vocab_size": str(len(lm.vocab)), "start_id": str(lm.vocab.chars.index("\n")), "records": "",
        "checkpoint": str(ckpt), "step": str(RUN_STEPS),
    }
    assert json.loads(meta["model"]) == lm.config.to_dict()["model"]
    assert json.loads(meta["vocab"]) == lm.vocab.chars
    weights = load_file(str(out))
    for name, t in lm.model.state_dict().items():
        assert torch.equal(weights[name], t), name
    model, _ = rebuild(out)
    assert_same_logits(model, lm, TEXT[:64])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


@pytest.fixture(scope="module")
def dropped_records(tmp_path_factory, _one_thread) -> Path:
    """A 2-layer model trained with weight drop and locked dropout on records: TEXT's words, one
    per line (short records: in 100 steps the model learns to end one)."""
    base = tmp_path_factory.mktemp("dropped")
    corpus = base / "words.txt"
    corpus.write_text("\n".join(TEXT.split()) + "\n", encoding="utf-8")
    cfg = tiny_config(num_layers=2, weight_drop=0.3, locked_dropout=0.2, records="lines", max_steps=100,
                      warmup_steps=5, lr=0.02, precision="fp32")
    session.fit(cfg, [str(corpus)], base / "run")
    return base / "run" / "latest.pt"


def test_weight_drop_records_model_loads_strict_and_generates_its_records(dropped_records, tmp_path):
    lm = charlm.load(dropped_records)
    assert lm.model.cfg.weight_drop == 0.3 and lm.records == "lines"
    out = tmp_path / "r.safetensors"
    meta = export_safetensors(lm, out)
    model, read = rebuild(out)  # strict: no raw weight-drop copies, nothing missing
    assert read == meta
    assert_same_logits(model, lm, "\x02meet\x03\x02tonight")
    own = {t.untyped_storage().data_ptr() for t in lm.model.state_dict().values()}
    assert not own & {t.untyped_storage().data_ptr() for t in tensors(lm.model).values()}  # copies
    # The metadata is all a reader needs to generate a record as `charlm sample` does.
    chars = json.loads(meta["vocab"])
    start, end = json.loads(meta["record_start"]), json.loads(meta["record_end"])
    assert (meta["records"], start, end, json.loads(meta["record_separator"])) == ("lines", "\x02", "\x03", "\n")
    assert int(meta["start_id"]) == chars.index(start)
    ids, state, text = [int(meta["start_id"])], None, ""
    with torch.no_grad():
        while len(text) < 80:
            logits, state = model(torch.tensor([ids]), state)
            ids = [int(logits[0, -1].argmax())]
            if chars[ids[0]] == end:
                break
            text += chars[ids[0]]
    assert 0 < len(text) < 80  # a record that ended at its end marker
    assert text == lm.sample(temperature=0, length=80)


def test_both_flags_write_both_files_from_one_load(ckpt, lm, tmp_path, runner, monkeypatch):
    import charlm.api

    loads: list[Any] = []
    real = charlm.api.load
    monkeypatch.setattr(charlm.api, "load", lambda path, **kw: loads.append((path, kw)) or real(path, **kw))
    onnx, st = tmp_path / "m.onnx", tmp_path / "m.safetensors"
    res = runner.invoke(app, ["export", str(ckpt), "--onnx", str(onnx), "--safetensors", str(st)])
    assert res.exit_code == 0, res.output
    assert loads == [(ckpt, {})]
    lines = res.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"charlm: wrote {st} (") and lines[1].startswith(
        f"charlm: wrote {onnx} (lstm 1x32, inputs char_id, h0, c0) and {onnx}.vocab.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.vocab.json", "m.safetensors"]
    assert_same_logits(rebuild(st)[0], lm, TEXT[:40])
    assert ort.InferenceSession(str(onnx)).get_inputs()[0].name == "char_id"


def test_export_needs_onnx_or_safetensors(ckpt, tmp_path, runner):
    res = runner.invoke(app, ["export", str(ckpt)])
    one_line_error(res, "nothing to export", "--onnx FILE", "--safetensors FILE")
    res = runner.invoke(app, ["export", str(ckpt), "--safetensors", str(tmp_path / "m.st"),
                              "--vocab", str(tmp_path / "v.json")])
    one_line_error(res, "--vocab", "only with --onnx")
    same = tmp_path / "m.out"
    res = runner.invoke(app, ["export", str(ckpt), "--onnx", str(same), "--safetensors", str(same)])
    one_line_error(res, "--onnx and --safetensors", str(same))
    assert list(tmp_path.iterdir()) == []


def test_missing_safetensors_package_names_the_install_command_before_loading(ckpt, tmp_path, runner,
                                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    want = "safetensors export needs safetensors: pip install 'charlm[safetensors]'"
    res = runner.invoke(app, ["export", str(tmp_path / "none.pt"), "--safetensors", str(tmp_path / "m.st")])
    one_line_error(res, want)  # not "no such checkpoint": nothing was loaded
    res = runner.invoke(app, ["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx"),
                              "--safetensors", str(tmp_path / "m.st")])
    one_line_error(res, want)
    assert list(tmp_path.iterdir()) == []  # not the ONNX file either


def test_unwritable_safetensors_paths(ckpt, tmp_path, runner):
    afile = tmp_path / "a-file"
    afile.write_text("x", encoding="utf-8")
    for target, needle in [(tmp_path / "no" / "such" / "m.st", "No such file or directory"),
                           (afile / "m.st", "Not a directory"),
                           (tmp_path, "is a folder")]:
        res = runner.invoke(app, ["export", str(ckpt), "--safetensors", str(target)])
        one_line_error(res, str(target), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing half-written


def test_a_failed_write_keeps_the_old_file(ckpt, tmp_path, runner, monkeypatch):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"the previous export")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the disk fills up before the file is complete
    res = runner.invoke(app, ["export", str(ckpt), "--safetensors", str(out)])
    one_line_error(res, f"could not write {out}", "No space left on device")
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def api_doc_program() -> str:
    return doc_program("python-api.md", "## The safetensors export")


def test_api_doc_program_runs_on_the_export_as_charlm_samples(ckpt, lm, tmp_path, monkeypatch, capsys):
    code = api_doc_program()
    charlm_imports = set(re.findall(r"^from (charlm\S*) import", code, re.MULTILINE))
    assert charlm_imports == {"charlm.config.run", "charlm.model.network"}  # no checkpoint code
    assert "safe_open" in code and "load_file" in code and "strict=True" in code
    path = re.search(r'^path = "(.+)"$', code, re.MULTILINE)
    prime = re.search(r'^text = "(.+)"$', code, re.MULTILINE)
    assert path and prime
    monkeypatch.chdir(tmp_path)
    export_safetensors(lm, path.group(1))
    capsys.readouterr()
    ns: dict[str, Any] = {}
    exec(compile(code, "docs/python-api.md", "exec"), ns)
    greedy = prime.group(1) + lm.sample(prime=prime.group(1), length=60, temperature=0)
    assert capsys.readouterr().out == greedy + "\n"
    assert_same_logits(ns["model"], lm, TEXT[:50])
