"""`charlm inspect` and `charlm eval --by-char`: surprisal, predictions, states, units, page.

Known answers: the replayed states equal PyTorch's own LSTM / GRU / RNN output; the
per-character bits are -log2 of the model's softmax and average to what `charlm eval`
reports; the unit finder finds a planted unit and nothing in noise; the page embeds those
same numbers, renders in a real browser, and shows the five predictions on hover.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from browser import CHROMIUM, HEADLESS, WebDriver, needs_chromium, needs_webdriver
from conftest import TEXT, one_line_error, tiny_flags
from typer.testing import CliRunner

import charlm
from charlm.analysis.inspection import KINDS, trace_states
from charlm.analysis.unit_finder import PROPERTIES, UnitMatch, correlations, find_units, text_properties
from charlm.cli import app
from charlm.config.run import ModelConfig
from charlm.model.network import CharRNN
from charlm.storage import checkpoint

# A corpus with quotes, brackets and numbers, so the page has every property to look for.
CORPUS = TEXT + 'He said "we will build (and we did) 1,250 homes" in 1945.\n' * 20
# Two layers, so that layer numbers are tested too.
FLAGS = [*tiny_flags(num_layers=2, hidden_size=16), "--no-planner", "--no-preview", "--quiet"]
STEPS = 25
HIDDEN, LAYERS = 16, 2
# A short text (one eval row) with an unknown character in the middle and at the start.
SHORT = '€Our economy is growing "fast" (in 1945, 12.5 percent) and our schools… are improving.\n' * 4


def invoke(*args: Any):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory, _one_thread) -> Path:
    """A tiny 2-layer LSTM run, shared by the tests that only read it."""
    base = tmp_path_factory.mktemp("inspect")
    corpus = base / "speech.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    res = invoke("train", corpus, "--out", base / "run", "--max-steps", STEPS, *FLAGS)
    assert res.exit_code == 0, res.output
    return base / "run"


@pytest.fixture(scope="module")
def short_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text(SHORT, encoding="utf-8")
    return path


def page_json(html: str) -> dict[str, Any]:
    """The data object a page embeds."""
    m = re.search(r'<script type="application/json" id="charlm-data">(.*?)</script>', html, re.DOTALL)
    assert m, "no data block"
    return json.loads(m.group(1))


def page_states(data: dict[str, Any]) -> dict[tuple[int, str], np.ndarray]:
    """The page's quantized states, decoded as the page's script decodes them."""
    codes = np.frombuffer(zlib.decompress(base64.b64decode(data["states"])), dtype=np.uint8)
    M = len(data["bits"])
    codes = codes.reshape(data["layers"], len(data["kinds"]), data["hidden"], M)
    out = {}
    for layer in range(data["layers"]):
        for k, kind in enumerate(data["kinds"]):
            lo, step = (np.array(v) for v in data["scale"][f"{layer}{kind}"])
            out[(layer, kind)] = (lo[:, None] + codes[layer, k] * step[:, None]).T  # (M, H)
    return out


def model_bits(lm, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Independent answer: -log2 softmax of one forward pass over the known characters."""
    ids = lm.vocab.encode(text, unknown="skip")
    with torch.inference_mode():
        logits, _ = lm.model(ids[None])
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    return (-logp[:-1].gather(1, ids[1:, None])[:, 0] / math.log(2)).numpy(), logp.exp().numpy()


# --- states: the replay equals PyTorch's kernels -------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_states_equal_pytorch(cell):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(cell=cell, num_layers=2, hidden_size=12, embedding_size=6), 20).eval()
    with torch.no_grad():
        for p in model.rnn.parameters():
            # Big weights: saturated gates and large c, where mistakes would show. Not for a
            # plain RNN: with big weights it is chaotic, and float32 rounding differences
            # between any two implementations grow step by step.
            p.mul_(1.0 if cell == "rnn" else 4.0)
    ids = torch.randint(0, 20, (300,))
    states = trace_states(model, ids.numpy())
    assert set(states) == {(layer, k) for layer in range(2) for k in KINDS[cell]}
    with torch.inference_mode():
        out, last = model.rnn(model.embed(ids)[None])
    assert states[(1, "h")].shape == (300, 12)
    np.testing.assert_allclose(states[(1, "h")], out[0].numpy(), atol=1e-5, rtol=0)
    h_n = last[0] if cell == "lstm" else last
    for layer in range(2):
        np.testing.assert_allclose(states[(layer, "h")][-1], h_n[layer, 0].numpy(), atol=1e-5, rtol=0)
    if cell == "lstm":
        s = {k: states[(0, k)] for k in KINDS[cell]}
        np.testing.assert_allclose(states[(1, "c")][-1], last[1][1, 0].numpy(), atol=1e-4, rtol=1e-5)
        assert np.abs(s["c"]).max() > 2  # large c: the test is not trivially met by small states
        # The equations, with PyTorch's gate order (i, f, g, o) read off the weights:
        prev_c = np.vstack([np.zeros((1, 12)), s["c"][:-1]])
        np.testing.assert_allclose(s["c"], s["f"] * prev_c + s["i"] * s["g"], atol=1e-5)
        np.testing.assert_allclose(s["h"], s["o"] * np.tanh(s["c"]), atol=1e-6)
        x0 = model.embed(ids[:1]).detach().numpy()[0]
        bias = (model.rnn.bias_ih_l0 + model.rnn.bias_hh_l0).detach().numpy()
        pre = model.rnn.weight_ih_l0.detach().numpy() @ x0 + bias
        np.testing.assert_allclose(s["i"][0], 1 / (1 + np.exp(-pre[:12])), atol=1e-6)
        np.testing.assert_allclose(s["g"][0], np.tanh(pre[24:36]), atol=1e-6)
    if cell == "gru":
        s = {k: states[(1, k)] for k in KINDS[cell]}
        prev_h = np.vstack([np.zeros((1, 12)), s["h"][:-1]])
        np.testing.assert_allclose(s["h"], (1 - s["z"]) * s["n"] + s["z"] * prev_h, atol=1e-6)


# --- text properties and the unit finder ----------------------------------------------------


def test_text_properties_known_answer():
    text = 'a "b" (c) 12.5\n  x. Y'
    p = {k: v.astype(int).tolist() for k, v in text_properties(text).items()}
    assert set(p) == set(PROPERTIES)
    # position:                 0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17 18 19 20
    # character:                a     "  b  "     (  c  )     1  2  .  5 \n        x  .     Y
    assert p["in_quotes"] == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert p["in_brackets"] == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert p["line_position"] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0, 1, 2, 3, 4, 5, 6]
    assert p["word_start"] == [1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1]
    assert p["in_number"] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert p["after_newline"] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    # the decimal point of 12.5 ends no sentence; "x." does, until the next word
    assert p["after_sentence_end"] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    assert p["indent_depth"] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert text_properties("end.\n\tNext")["after_sentence_end"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert text_properties("\tif x:")["indent_depth"].tolist() == [4, 4, 4, 4, 4, 4]


def test_unit_finder_finds_a_planted_quote_unit_and_nothing_in_noise():
    rng = np.random.default_rng(0)
    text = "".join(f'word {i} "quoted words here" and more text.\n' for i in range(60))
    props = text_properties(text)
    quotes = props["in_quotes"]
    M = len(text)
    noise = rng.standard_normal((M, 32)).astype(np.float32)
    planted = noise.copy()
    planted[:, 5] = quotes + 0.3 * rng.standard_normal(M)  # tracks quotes
    units, status = find_units({(0, "h"): noise[:, :16], (1, "c"): planted[:, 16:].copy(),
                                (1, "h"): planted[:, :16]}, props)
    expected_r = float(np.corrcoef(planted[:, 5], quotes)[0, 1])
    assert expected_r > 0.8
    best = units["in_quotes"][0]
    assert (best.layer, best.kind, best.unit) == (1, "h", 5)
    assert best.r == pytest.approx(expected_r, abs=1e-9)
    assert units["in_quotes"] == [UnitMatch(1, "h", 5, best.r)]  # no random unit passes |r| >= 0.2
    assert status["in_quotes"] == "" and "constant" in status["indent_depth"]
    # Noise alone: no unit for any property.
    units, _ = find_units({(0, "h"): noise}, props)
    assert all(found == [] for found in units.values()), units
    r = correlations(noise, np.stack([quotes, props["line_position"]], axis=1))
    assert np.abs(r).max() < 0.2
    np.testing.assert_allclose(r[0, 3], np.corrcoef(noise[:, 3], quotes)[0, 1], atol=1e-9)


# --- surprisal and predictions ----------------------------------------------------------------


def test_by_char_bits_sum_to_eval_and_to_the_model(run, short_file):
    ckpt = run / "best.pt"
    res = invoke("eval", ckpt, short_file, "--by-char")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    text = SHORT
    lm = charlm.load(ckpt)
    unknown = [p for p, ch in enumerate(text) if ch not in lm.vocab]
    assert len(unknown) == 8 and "".join(data["characters"]) == text  # € and … per line
    assert data["skipped_chars"] == 8 and "8 characters not in the vocabulary" in res.stderr
    bits = data["bits"]
    first_known = next(p for p in range(len(text)) if p not in unknown)
    assert [p for p, b in enumerate(bits) if b is None] == sorted([first_known, *unknown])
    scored = [b for b in bits if b is not None]
    assert data["chars"] == len(scored) == len(text) - 9
    assert data["bpc"] == pytest.approx(sum(scored) / len(scored), abs=1e-6)
    expected, _ = model_bits(lm, text)
    np.testing.assert_allclose(scored, expected, atol=1e-5)
    # Plain eval reads a text this short as one row: the same bpc, the same counts.
    res = invoke("eval", ckpt, short_file, "--json")
    assert res.exit_code == 0, res.output
    plain = json.loads(res.stdout)
    assert plain["bpc"] == pytest.approx(data["bpc"], abs=1e-6)
    assert (plain["chars"], plain["skipped_chars"]) == (data["chars"], data["skipped_chars"])


def test_page_and_npz_hold_the_same_numbers(run, short_file, tmp_path):
    ckpt = run / "best.pt"
    html, npz = tmp_path / "page.html", tmp_path / "states.npz"
    res = invoke("inspect", ckpt, short_file, "--html", html, "--npz", npz,
                 "--layer", 1, "--kind", "c", "--unit", 3)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [str(html), str(npz)]
    assert "8 characters not in the vocabulary are shown unscored" in res.stderr
    by_char = json.loads(invoke("eval", ckpt, short_file, "--by-char").stdout)
    lm = charlm.load(ckpt)

    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # Self-contained: no external script, style, image or font, no URL at all.
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=", page)
    assert "http://" not in page and "https://" not in page and "url(" not in page
    data = page_json(page)
    assert data["text"] == SHORT and data["unknown"] == [p for p, b in enumerate(SHORT) if b not in lm.vocab]
    assert data["bpc"] == by_char["bpc"] and data["scored"] == by_char["chars"]
    assert data["skipped"] == 8
    known_bits = [b for p, b in enumerate(by_char["bits"]) if SHORT[p] in lm.vocab]
    assert data["bits"][0] is None and known_bits[0] is None
    np.testing.assert_allclose(data["bits"][1:], known_bits[1:], atol=5e-4)
    meta = data["meta"]
    assert meta["checkpoint"] == str(ckpt) and meta["step"] == STEPS
    assert meta["model"] == "2x16 LSTM" and meta["corpus"] == str(run.parent / "speech.txt")
    assert meta["val_bpc"] == lm.info()["best_val_bpc"]
    assert data["initial"] == {"unit": [1, "c", 3]}
    assert set(data["units"]) == set(PROPERTIES) == set(data["properties"])

    # The npz: characters, the known ones' ids, the model's softmax after each of them.
    z = np.load(npz)
    _, probs = model_bits(lm, SHORT)
    ids = lm.vocab.encode(SHORT, unknown="skip").numpy()
    M = len(ids)
    assert "".join(z["chars"]) == SHORT and int(z["known"].sum()) == M
    np.testing.assert_array_equal(z["ids"], ids)
    np.testing.assert_allclose(z["probs"], probs, atol=1e-5)

    # Top-5 on the page: that softmax's five likeliest, likeliest first, and the true one's rank.
    id_type = np.uint8 if data["id_bytes"] == 1 else np.uint16
    top_ids = np.frombuffer(base64.b64decode(data["top_ids"]), dtype=id_type).reshape(-1, 5)
    top_p = np.frombuffer(base64.b64decode(data["top_p"]), dtype="<u2").reshape(-1, 5) / 65535
    np.testing.assert_array_equal(top_ids, np.argsort(-z["probs"], axis=1, kind="stable")[:-1, :5])
    np.testing.assert_allclose(top_p, np.take_along_axis(probs[:-1], top_ids.astype(int), 1), atol=1e-4)
    assert np.all(np.diff(top_p, axis=1) <= 0)
    rank = np.frombuffer(base64.b64decode(data["rank"]), dtype="<u2")
    true_p = z["probs"][np.arange(M - 1), ids[1:]]
    np.testing.assert_array_equal(rank, 1 + (z["probs"][:-1] > true_p[:, None]).sum(1))
    assert rank.min() >= 1 and rank.max() <= len(lm.vocab)
    np.testing.assert_allclose(z["bits"], np.array(by_char["bits"], dtype=float), atol=1e-5)
    assert "".join(z["vocab"]) == lm.vocab.chars and float(z["bpc"]) == data["bpc"]
    names = {f"{k}{layer}" for layer in range(LAYERS) for k in KINDS["lstm"]}
    assert names <= set(z.files)
    for name in names:
        assert z[name].shape == (M, HIDDEN) and z[name].dtype == np.float32
    with torch.inference_mode():
        out, _ = lm.model.rnn(lm.model.embed(torch.from_numpy(ids))[None])
    np.testing.assert_allclose(z["h1"], out[0].numpy(), atol=1e-5)
    # The page's 16-level states are the npz states to within half a level.
    decoded = page_states(data)
    for (layer, kind), values in decoded.items():
        step = np.array(data["scale"][f"{layer}{kind}"][1])
        err = np.abs(values - z[f"{kind}{layer}"])
        assert np.all(err <= step / 2 * 1.001 + 1e-6), (layer, kind, float(err.max()))


def test_levels_set_the_page_precision(run, short_file, tmp_path):
    html = tmp_path / "fine.html"
    res = invoke("inspect", run / "best.pt", short_file, "--html", html, "--levels", 256)
    assert res.exit_code == 0, res.output
    data = page_json(html.read_text(encoding="utf-8"))
    assert data["levels"] == 256 and data["initial"] == {}
    step = np.array(data["scale"]["0i"][1])
    assert np.allclose(step, 1 / 255)  # gates span [0, 1] in 255 steps


def test_default_text_is_the_held_out_part(run, tmp_path):
    html = tmp_path / "page.html"
    res = invoke("inspect", run / "best.pt", "--html", html)
    assert res.exit_code == 0, res.output
    data = page_json(html.read_text(encoding="utf-8"))
    held_out = CORPUS[-max(2, int(len(CORPUS) * 0.05)):]  # val_fraction 0.05, one document
    start = held_out.find("\n", 0, 1000) + 1
    assert data["text"] == held_out[start : start + 5000]
    assert data["meta"]["source"] == "held-out text of the run" and data["skipped"] == 0
    found = [u for units in data["units"].values() for u in units]
    assert all(abs(u[3]) >= 0.2 and 0 <= u[0] < LAYERS and 0 <= u[2] < HIDDEN for u in found)


def test_max_chars_cuts_the_text(run, tmp_path):
    html = tmp_path / "page.html"
    res = invoke("inspect", run / "best.pt", "--text", TEXT[:500], "--max-chars", 100, "--html", html)
    assert res.exit_code == 0, res.output
    assert "read the first 100 of 500 characters" in res.stderr
    data = page_json(html.read_text(encoding="utf-8"))
    assert data["text"] == TEXT[:100] and data["scored"] == 99 and data["meta"]["source"] == "--text"


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_gru_and_rnn_pages(cell, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "run"
    assert invoke("train", corpus, "--out", out, "--max-steps", 2, "--cell", cell, *FLAGS).exit_code == 0
    html, npz = tmp_path / "p.html", tmp_path / "p.npz"
    res = invoke("inspect", out / "best.pt", "--text", CORPUS[-300:], "--html", html, "--npz", npz,
                 "--kind", KINDS[cell][-1])
    assert res.exit_code == 0, res.output
    data = page_json(html.read_text(encoding="utf-8"))
    assert data["cell"] == cell and data["kinds"] == list(KINDS[cell])
    assert data["initial"] == {"unit": [0, KINDS[cell][-1], 0]}
    z = np.load(npz)
    assert {f"{k}{layer}" for layer in range(LAYERS) for k in KINDS[cell]} <= set(z.files)
    assert "c0" not in z.files
    for (layer, kind), values in page_states(data).items():
        step = np.array(data["scale"][f"{layer}{kind}"][1])
        assert np.all(np.abs(values - z[f"{kind}{layer}"]) <= step / 2 * 1.001 + 1e-6)
    one_line_error(invoke("inspect", out / "best.pt", "--text", "abc", "--kind", "c", "--html", html),
                   f"--kind c: a {cell.upper()} has {', '.join(KINDS[cell])}")


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Grüße aus Köln".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    greek = tmp_path / "greek.txt"
    greek.write_text("αβγδ" * 10, encoding="utf-8")
    return {"latin1": latin1, "empty": empty, "greek": greek, "missing": tmp_path / "nope.txt"}


@pytest.mark.parametrize("args, needles", [
    (["{missing}"], ["nope.txt", "no such file"]),
    (["{latin1}"], ["latin1.txt", "not valid UTF-8"]),
    (["{empty}"], ["empty.txt", "empty"]),
    (["--text", ""], ["the text is empty"]),
    (["{greek}"], ["nothing to score", "0 of the text's 40 characters"]),
    (["{latin1}", "--text", "hello"], ["TEXT_FILE or --text, not both"]),
    (["--layer", "2"], ["--layer 2", "2 layer(s), numbered 0 to 1"]),
    (["--layer", "-1"], ["--layer -1"]),
    (["--unit", "16"], ["--unit 16", "16 units, numbered 0 to 15"]),
    (["--kind", "r"], ["--kind r", "h, c, i, f, g, o"]),
    (["--levels", "1"], ["--levels 1", "between 2 and 256"]),
    (["--max-chars", "1"], ["--max-chars 1"]),
])
def test_bad_input_is_one_line_and_exit_2(run, bad_files, tmp_path, args, needles):
    args = [a.format(**bad_files) for a in args]
    html = tmp_path / "page.html"
    one_line_error(invoke("inspect", run / "best.pt", *args, "--html", html), *needles)
    assert not html.exists()


def test_eval_by_char_bad_input(run, bad_files):
    one_line_error(invoke("eval", run / "best.pt", bad_files["missing"], "--by-char"), "no such file")
    one_line_error(invoke("eval", run / "best.pt", bad_files["greek"], "--by-char"), "nothing to score")


def test_unwritable_page_is_one_line(run, tmp_path):
    one_line_error(invoke("inspect", run / "best.pt", "--text", TEXT[:200], "--html", tmp_path / "no" / "p.html"),
                   "--html", "cannot write")


def test_default_text_needs_the_corpus(run, tmp_path):
    """A run whose corpus is gone still inspects a given text, and says what to do without one."""
    corpus = tmp_path / "gone.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "run"
    assert invoke("train", corpus, "--out", out, "--max-steps", 2, *FLAGS).exit_code == 0
    corpus.unlink()
    # The corpus cache still holds the text's ids: the held-out passage comes from there.
    res = invoke("inspect", out / "best.pt", "--html", tmp_path / "p.html")
    assert res.exit_code == 0 and "gone.txt: no such file" in res.stderr and "from the cache" in res.stderr
    for p in Path(os.environ["CHARLM_CACHE_DIR"]).glob(checkpoint.load(out / "best.pt").corpus["sha256"] + ".*"):
        p.unlink()
    one_line_error(invoke("inspect", out / "best.pt", "--html", tmp_path / "p.html"),
                   "gone.txt", "pass a TEXT_FILE or --text")
    assert invoke("inspect", out / "best.pt", "--text", TEXT[:300], "--html", tmp_path / "p.html").exit_code == 0


# --- a real browser -----------------------------------------------------------------------------

SHOWN = {"\n": "\u21b5", " ": "\u2423", "\t": "\u21e5"}  # how the page shows invisible characters


@pytest.fixture(scope="module")
def page(run, tmp_path_factory) -> tuple[Path, Path]:
    """A page (and its npz) of a 600-character text with quotes, brackets and numbers."""
    base = tmp_path_factory.mktemp("page")
    text = CORPUS[-600:]
    res = invoke("inspect", run / "best.pt", "--text", text, "--html", base / "page.html", "--npz", base / "page.npz")
    assert res.exit_code == 0, res.output
    units = page_json((base / "page.html").read_text(encoding="utf-8"))["units"]
    assert units["word_start"], units  # the tests below click a found unit
    return base / "page.html", base / "page.npz"


@needs_chromium
def test_page_renders_in_chromium(page, tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    html, _ = page
    layer, kind, unit, _ = page_json(html.read_text(encoding="utf-8"))["units"]["word_start"][0]
    shots = {}
    for name, url in (("surprisal", html.as_uri()), ("neuron", f"{html.as_uri()}#unit={layer},{kind},{unit}")):
        shot = tmp_path / f"{name}.png"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={profile}", "--window-size=1200,800",
                            "--virtual-time-budget=5000", f"--screenshot={shot}", url],
                           capture_output=True, timeout=120, check=False)
        assert shot.exists() and shot.stat().st_size > 20_000, name
        img = (mpimg.imread(shot)[:, :, :3] * 255).round().astype(int)  # (H, W, RGB)
        assert img.shape == (800, 1200, 3)
        shots[name] = img
        colours = len(np.unique(img.reshape(-1, 3) // 8, axis=0))
        assert colours > 100, (name, colours)  # shaded text and a chart, not a blank page
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        # The active tab: the page's accent blue, near the top.
        accent = (abs(r - 31) < 25) & (abs(g - 95) < 25) & (abs(b - 191) < 25)
        assert accent[:250, :400].sum() > 300, name
        # The side panel (units list, details) holds text: dark pixels right of the text.
        assert (img[150:, 850:].max(axis=2) < 120).sum() > 1500, name
        text_area = (slice(150, 800), slice(0, 800))
        if name == "surprisal":  # characters shaded red by their surprisal
            reds = (r > 200) & (g < 170) & (b < 170)
            assert reds[text_area].sum() > 2000, reds[text_area].sum()
        else:  # the unit's activation: a green gate, or red (> 0) and blue (< 0)
            tinted = (np.abs(r - b) > 15) | (np.abs(g - r) > 15)
            assert tinted[text_area].sum() > 2000, tinted[text_area].sum()
    changed = np.abs(shots["surprisal"] - shots["neuron"]).max(axis=2) > 30
    assert changed[150:800, :800].sum() > 2000  # the neuron view recoloured the text


@needs_webdriver
def test_hover_shows_the_five_predictions(page):
    html, npz = page
    z = np.load(npz)
    text = "".join(z["chars"])
    with tempfile.TemporaryDirectory() as profile:
        wd = WebDriver(Path(profile), height=900)
        try:
            wd.open(html.as_uri())
            deadline = time.monotonic() + 30
            while wd.script("return document.body.dataset.ready || ''") != "1":
                assert time.monotonic() < deadline, "page never became ready"
                time.sleep(0.1)
            for p in (40, 41, 200):  # a hover on three characters (all known, on screen)
                wd.hover(wd.element(f"#text span[data-p='{p}']"))
                rows = wd.script("return Array.from(document.querySelectorAll('#predictions tr'))"
                                 ".map(tr => Array.from(tr.cells).map(td => td.textContent))")
                probs = z["probs"][p - 1]  # the prediction made after character p - 1
                top = np.argsort(-probs, kind="stable")[:5]
                assert [row[0] for row in rows] == [f"'{SHOWN.get(z['vocab'][i], z['vocab'][i])}'" for i in top]
                shown_p = [float(row[1].rstrip("%")) for row in rows]
                np.testing.assert_allclose(shown_p, 100 * probs[top], atol=0.051)
                marked = [row[0] for row in rows if row[3] == "\u2713 true"]
                assert marked == ([f"'{SHOWN.get(text[p], text[p])}'"] if text[p] in z["vocab"][top] else [])
                details = wd.script("return document.getElementById('details').textContent")
                assert f"at position {p}" in details and "running bpc" in details
                shown_bits = float(re.search(r"([0-9.]+) bits", details).group(1))
                assert shown_bits == pytest.approx(float(z["bits"][p]), abs=0.006)
            # One click on a found unit opens the neuron view on it.
            button = wd.element("#units button[data-unit]")
            unit = wd.script("return document.querySelector('#units button[data-unit]').dataset.unit")
            wd.click(button)
            state = wd.script("return [document.getElementById('mode-neuron').className,"
                              " document.getElementById('layer').value, document.getElementById('kind').value,"
                              " document.getElementById('unit').value,"
                              " document.querySelector('#text span[data-p=\"5\"]').style.backgroundColor]")
            layer, kind, number = unit.split(",")
            assert state[:4] == ["on", layer, kind, number]
            assert state[4].startswith("rgb(")
        finally:
            wd.quit()


def test_the_page_and_the_npz_replace_old_ones_whole(run, tmp_path, monkeypatch):
    """Written atomically like every file charlm writes: a write that fails half-way leaves the
    previous page and npz as they were, and no temporary file."""
    html, npz = tmp_path / "page.html", tmp_path / "states.npz"
    html.write_text("the old page", encoding="utf-8")
    npz.write_bytes(b"the old npz")

    def dies_half_way(fh, **arrays):
        fh.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", dies_half_way)
    res = invoke("inspect", run / "best.pt", "--text", TEXT[:200], "--html", html, "--npz", npz)
    assert res.exit_code == 2 and res.stdout == f"{html}\n"  # the page was written, then the npz failed
    [line] = res.stderr.splitlines()
    assert line.startswith(f"charlm: error: --npz {npz}: cannot write: No space left on device")
    assert npz.read_bytes() == b"the old npz" and html.read_text(encoding="utf-8") != "the old page"
    monkeypatch.undo()
    import charlm.fs

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(charlm.fs.os, "replace", full_disk)
    one_line_error(invoke("inspect", run / "best.pt", "--text", TEXT[:200], "--html", tmp_path / "new.html"),
                   "--html", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "states.npz"]
