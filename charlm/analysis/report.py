"""A run folder that explains itself: `report.html`, one self-contained page (no network, no
script: the curves are inline SVG), and `README.md`, a card with the same facts in text.

Both are made from what the folder already holds — the checkpoints, `metrics.jsonl` — so
`charlm report RUN_DIR` rebuilds them at any time, and the samples are seeded, so a rebuild
writes the same text. They say what was trained on, the plan and why, the model's size, the
train and held-out curves, the best score against the references a reader needs (guessing
uniformly; the first evaluation; which settings differ from the fixed defaults), samples at
three temperatures, how long it took on which machine, and the commands that come next.

A `README.md` that charlm did not write (it does not start with `CARD_MARK`) is never
replaced: the card is skipped with a warning.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charlm.api import CharLM, load
from charlm.config.run import SECTIONS, RunConfig
from charlm.errors import CharLMError, CharLMWarning
from charlm.fs import replace_file
from charlm.storage import checkpoint as ckpt_io
from charlm.storage.rundir import CARD, CARD_MARK, REPORT, RunDir
from charlm.training.finetune import describe

TEMPERATURES = (0.5, 0.8, 1.0)
SAMPLE_CHARS = 400  # per temperature (a records model: up to RECORD_SAMPLES records of it)
RECORD_SAMPLES = 8
SAMPLE_SEED = 1  # the same samples on every rebuild


@dataclass
class Setting:
    """One setting of the run that differs from the built-in default."""

    name: str
    value: Any
    default: Any
    planned: bool  # the planner chose it (else the user did, or a fine-tune's base)


@dataclass
class RunFacts:
    """Everything the page and the card show, gathered from a run folder."""

    run_dir: Path
    sampled: Path  # the checkpoint the samples and scores come from (best.pt, else latest.pt)
    info: dict[str, Any]  # `CharLM.info()` of it
    latest: ckpt_io.Checkpoint  # where the run stands
    rows: list[dict[str, Any]]  # metrics.jsonl
    samples: list[tuple[float, str]]
    settings: list[Setting]
    records: str  # the records mode ("" for a stream of text)

    @property
    def best(self) -> float | None:
        return self.latest.progress.best_val_bpc

    @property
    def uniform(self) -> float:
        """Bits per character of a uniform guess among the model's characters."""
        return math.log2(max(2, self.info["vocab_size"]))


@dataclass
class ReportFiles:
    """What `write_report` wrote."""

    page: Path
    card: Path | None  # None: a README.md that is not charlm's was left alone


def gather(run_dir: Path | str, device: str = "cpu") -> RunFacts:
    """Read a run folder: its checkpoints (loaded and checked like every load), its metrics,
    and seeded samples from the best checkpoint."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise CharLMError(f"{run.path}: no such folder")
    if not run.latest.exists():
        raise CharLMError(f"{run.path}: no {run.latest.name} (is it a charlm run folder?)")
    rows = run.read_metrics()
    latest = ckpt_io.load(run.latest)
    sampled = run.to_sample
    lm = load(sampled, device=device)
    return RunFacts(run.path, sampled, lm.info(), latest, rows, _samples(lm), _settings(latest), lm.records)


def write_report(run_dir: Path | str, device: str = "cpu") -> ReportFiles:
    """Write `report.html` and `README.md` into `run_dir` (each atomically) from what it holds."""
    facts = gather(run_dir, device)
    run = RunDir(facts.run_dir)
    page = run / REPORT
    replace_file(page, render_page(facts).encode("utf-8"))
    card = run / CARD
    if card.exists() and not run.holds_card():
        warnings.warn(f"{card} is not a charlm run card: left as it is (the report is {page})",
                      CharLMWarning, stacklevel=2)
        return ReportFiles(page, None)
    replace_file(card, render_card(facts).encode("utf-8"))
    return ReportFiles(page, card)


def _samples(lm: CharLM) -> list[tuple[float, str]]:
    out = []
    for t in TEMPERATURES:
        if lm.records:
            rows = lm.sample(temperature=t, length=SAMPLE_CHARS // RECORD_SAMPLES, seed=SAMPLE_SEED,
                             num_samples=RECORD_SAMPLES)
            out.append((t, "\n".join(rows)))
        else:
            text = lm.sample(temperature=t, length=SAMPLE_CHARS, seed=SAMPLE_SEED)
            assert isinstance(text, str)
            out.append((t, text))
    return out


def _settings(ck: ckpt_io.Checkpoint) -> list[Setting]:
    """The model and recipe settings that differ from the defaults (session settings, such as
    the budget, are shown with the time)."""
    chosen = dict(ck.planner["settings"]) if ck.planner else {}
    default = RunConfig()
    out = []
    for section in ("model", "train"):
        mine, base = getattr(ck.config, section), getattr(default, section)
        for f in dataclasses.fields(SECTIONS[section]):
            value, was = getattr(mine, f.name), getattr(base, f.name)
            if value != was:
                out.append(Setting(f.name, value, was, f.name in chosen))
    return out


# --- the facts as text (shared by the page and the card) ---------------------------------------

def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def commands(f: RunFacts) -> list[tuple[str, str]]:
    """What to run next: sample, score, resume, fine-tune, rebuild this report."""
    latest = RunDir(f.run_dir).latest
    p = f.latest.progress
    planned = f.latest.budget.total_steps
    resume = f"charlm resume {_q(latest)}"
    if planned is not None and p.step >= planned:
        resume += f" --max-steps {2 * p.step}"
    return [("sample", f"charlm sample --checkpoint {_q(f.sampled)} --temperature 0.5"),
            ("score", f"charlm eval {_q(f.sampled)}"),
            ("resume" if planned is None or p.step < planned else "train on", resume),
            ("fine-tune", f"charlm train NEW_TEXT --init-from {_q(f.sampled)} --out {_q(f.run_dir)}-tuned "
                          "--time 2m"),
            ("rebuild this report", f"charlm report {_q(f.run_dir)}")]


def facts_table(f: RunFacts) -> list[tuple[str, str]]:
    """The run in rows of (what, value)."""
    info, ck = f.info, f.latest
    c = info["corpus"]
    m = ck.config.model
    sources = ", ".join(c["sources"] or []) or "?"
    corpus = f"{sources}: {c['chars']:,} characters in {c['documents']:,} document(s), {info['vocab_size']} distinct"
    if f.records:
        corpus += f", read as records ({f.records})"
    regular = [f"dropout {m.dropout:g}"]
    regular += [f"weight drop {m.weight_drop:g}"] if m.weight_drop else []
    regular += [f"locked dropout {m.locked_dropout:g}"] if m.locked_dropout else []
    model = (f"{m.num_layers}x{m.hidden_size} {m.cell.upper()}, embedding {m.embedding_size}, "
             f"{info['parameters']:,} parameters; " + ", ".join(regular))
    t = ck.config.train
    p, budget = ck.progress, ck.budget
    steps = f"{p.step:,}" + (f" of {budget.total_steps:,} planned" if budget.total_steps else "")
    where = ck.trained_on
    machine = where.machine or f"{where.device} (the checkpoint is older than the machine record)"
    budget_text = ck.config.session.time or (f"{ck.config.session.max_steps:,} steps" if ck.config.session.max_steps
                                             else "-")
    rows = [("trained on", corpus),
            ("model", model),
            ("recipe", f"batch {t.batch_size}x{t.seq_len}, lr {t.lr:g}"
                       + (f", an average of the weights (EMA, decay {t.ema:g}) is what samples" if t.ema else "")),
            ("steps", f"{steps}; {p.chars_seen:,} characters read "
                      f"({p.chars_seen / max(1.0, (c['chars'] or 1) * (1 - t.val_fraction)):.1f} passes over "
                      "the training text)"),
            ("time", f"{_duration(p.elapsed)} training, {_duration(budget.spent)} of the budget spent "
                     f"(budget {budget_text})"),
            ("machine", f"{machine}; {where.precision}" + (f" x {where.world_size} processes"
                                                           if where.world_size > 1 else "")),
            ("best held-out bpc", _bpc(f.best) + f" ({f.sampled.name}, step {info['step']:,})"),
            ("references", f"guessing uniformly among {info['vocab_size']} characters: {f.uniform:.3f} bpc; "
                           f"first evaluation (step {f.rows[0]['step']:,}): {f.rows[0]['val_bpc']:.3f}")]
    if ck.init:
        rows.append(("fine-tuned from", describe(ck.init)))
    return rows


def _bpc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plan_text(f: RunFacts) -> tuple[str, list[str]]:
    """The plan's summary and its reasons, or a line saying the settings were given."""
    planner = f.latest.planner
    if planner:
        return str(planner["summary"]), [str(w) for w in planner.get("why", [])]
    return "no plan: the settings were given (--no-planner, or every one set)", []


def _chosen_by(s: Setting) -> str:
    return "planner" if s.planned else "given"


def settings_note(f: RunFacts) -> str:
    planned = sum(s.planned for s in f.settings)
    measured = (" What the planner's choices are worth against the fixed defaults, measured on a panel of "
                "corpora and budgets: charlm's docs/planner.md.")
    if not f.settings:
        return "Every model and recipe setting is the fixed default (`charlm train --no-planner`)."
    return (f"{len(f.settings)} setting(s) differ from the fixed defaults of `charlm train --no-planner`"
            + (f", {planned} of them chosen by the planner." + measured if planned else "."))


# --- the page ------------------------------------------------------------------------------------

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 980px; padding: 24px; color: #1d1d1f; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.score { font-size: 20px; color: #1f5fbf; } table { border-collapse: collapse; }
td, th { text-align: left; vertical-align: top; padding: 3px 14px 3px 0; } th { color: #555; font-weight: 600; }
pre { background: #f4f5f7; padding: 10px 12px; white-space: pre-wrap; word-break: break-word; margin: 4px 0 14px; }
code { background: #f4f5f7; padding: 1px 4px; } .muted { color: #666; }
svg text { font: 12px system-ui, sans-serif; fill: #444; }
"""
TRAIN_COLOUR, VAL_COLOUR = "#1f77b4", "#ff7f0e"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_page(f: RunFacts) -> str:
    """The report as one HTML page."""
    summary, why = plan_text(f)
    facts = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts_table(f))
    settings = "".join(f"<tr><td><code>--{_esc(s.name.replace('_', '-'))}</code></td><td>{_esc(s.value)}</td>"
                       f"<td>{_esc(s.default)}</td><td>{_chosen_by(s)}</td></tr>"
                       for s in f.settings)
    settings_table = ("<table id='settings'><tr><th>setting</th><th>this run</th><th>default</th>"
                      f"<th>chosen by</th></tr>{settings}</table>") if f.settings else ""
    samples = "".join(f"<h3>temperature {t:g}</h3><pre class='sample' data-temperature='{t:g}'>{_esc(text)}</pre>"
                      for t, text in f.samples)
    cmds = "".join(f"<tr><th>{_esc(k)}</th><td><code>{_esc(v)}</code></td></tr>" for k, v in commands(f))
    name = f.run_dir.resolve().name
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>charlm run {_esc(name)}: {_esc(_bpc(f.best))} bpc</title>
<style>{_STYLE}</style></head>
<body>
<h1>charlm run <code>{_esc(name)}</code></h1>
<p class="score" id="best">best held-out score: <b>{_esc(_bpc(f.best))}</b> bits per character</p>
<p class="muted">Made by <code>charlm report</code> from this folder's checkpoints and metrics.jsonl;
lower bits per character is better (the text is predicted one character at a time).</p>
<table id="facts">{facts}</table>
<h2>The plan and why</h2>
<p id="plan">{_esc(summary)}</p>
{"<ul>" + "".join(f"<li>{_esc(w)}</li>" for w in why) + "</ul>" if why else ""}
<p>{_code(_esc(settings_note(f)))}</p>
{settings_table}
<h2>Learning curves</h2>
{curves_svg(f.rows)}
<h2>Samples</h2>
<p class="muted">From {_esc(f.sampled.name)}, seed {SAMPLE_SEED}, {SAMPLE_CHARS} characters each, no prime:
low temperatures write the likeliest text, high ones take more risks.</p>
<section id="samples">{samples}</section>
<h2>Next</h2>
<table id="commands">{cmds}</table>
</body></html>
"""


def _code(escaped: str) -> str:
    """`x` (Markdown's inline code, in the shared texts) as <code>x</code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def curves_svg(rows: list[dict[str, Any]], width: int = 900, height: int = 320) -> str:
    """Train and held-out bpc against characters read, as inline SVG."""
    left, right, top, bottom = 60, 20, 16, 44
    xs = [float(r["chars"]) for r in rows]
    values = [float(r[k]) for r in rows for k in ("train_bpc", "val_bpc") if math.isfinite(float(r[k]))]
    x0, x1 = 0.0, max(xs[-1], 1.0)
    y0, y1 = min(values), max(values)
    pad = max(0.05, 0.06 * (y1 - y0))
    y0, y1 = max(0.0, y0 - pad), y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    scale, unit = (1e6, "M") if x1 >= 2e6 else (1e3, "k")
    parts = [f"<svg id='curves' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' role='img' aria-label='train and held-out bpc'>"]
    for y in _ticks(y0, y1):
        parts.append(f"<line x1='{left}' x2='{width - right}' y1='{py(y):.1f}' y2='{py(y):.1f}' stroke='#e3e3e3'/>"
                     f"<text x='{left - 6}' y='{py(y) + 4:.1f}' text-anchor='end'>{y:.2f}</text>")
    for x in _ticks(x0, x1):
        parts.append(f"<text x='{px(x):.1f}' y='{height - bottom + 16}' text-anchor='middle'>"
                     f"{x / scale:g}{unit if x else ''}</text>")
    parts.append(f"<text x='{(left + width - right) / 2}' y='{height - 6}' text-anchor='middle'>characters read</text>"
                 f"<text x='14' y='{(top + height - bottom) / 2}' text-anchor='middle' "
                 f"transform='rotate(-90 14 {(top + height - bottom) / 2})'>bits per character</text>")
    for key, colour in (("train_bpc", TRAIN_COLOUR), ("val_bpc", VAL_COLOUR)):
        points = " ".join(f"{px(x):.1f},{py(float(r[key])):.1f}" for x, r in zip(xs, rows, strict=True)
                          if math.isfinite(float(r[key])))
        parts.append(f"<polyline class='{key.split('_')[0]}' fill='none' stroke='{colour}' stroke-width='2.5' "
                     f"points='{points}'/>")
    for x, r in zip(xs, rows, strict=True):
        parts.append(f"<circle class='val-point' cx='{px(x):.1f}' cy='{py(float(r['val_bpc'])):.1f}' r='3.5' "
                     f"fill='{VAL_COLOUR}'><title>step {r['step']:,}: held-out {float(r['val_bpc']):.4f} bpc, "
                     f"train {float(r['train_bpc']):.4f}</title></circle>")
    legend_x = width - right - 170
    parts.append(f"<rect x='{legend_x}' y='{top + 4}' width='164' height='44' fill='white' stroke='#ccc'/>"
                 f"<line x1='{legend_x + 8}' x2='{legend_x + 32}' y1='{top + 18}' y2='{top + 18}' "
                 f"stroke='{TRAIN_COLOUR}' stroke-width='2.5'/><text x='{legend_x + 38}' y='{top + 22}'>train</text>"
                 f"<line x1='{legend_x + 8}' x2='{legend_x + 32}' y1='{top + 36}' y2='{top + 36}' "
                 f"stroke='{VAL_COLOUR}' stroke-width='2.5'/><text x='{legend_x + 38}' y='{top + 40}'>held out</text>")
    parts.append("</svg>")
    return "".join(parts)


# --- the card ------------------------------------------------------------------------------------

def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_card(f: RunFacts) -> str:
    """The report's facts as a Markdown card (README.md)."""
    summary, why = plan_text(f)
    lines = [CARD_MARK, "", f"# charlm run `{f.run_dir.resolve().name}`", "",
             f"Best held-out score: **{_bpc(f.best)} bits per character** (lower is better). "
             "The page `report.html` beside this file has the curves.", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts_table(f)]
    lines += ["", "## The plan and why", "", summary]
    lines += [f"- {w}" for w in why]
    lines += ["", settings_note(f)]
    if f.settings:
        lines += ["", "| setting | this run | default | chosen by |", "|---|---|---|---|"]
        lines += [f"| `--{s.name.replace('_', '-')}` | {s.value} | {s.default} | {_chosen_by(s)} |" for s in f.settings]
    lines += ["", "## Held-out bpc", "", "| step | characters read | train bpc | held-out bpc |", "|---|---|---|---|"]
    lines += [f"| {r['step']:,} | {r['chars']:,} | {float(r['train_bpc']):.4f} | {float(r['val_bpc']):.4f} |"
              for r in _thinned(f.rows)]
    lines += ["", "## Samples", "", f"From {f.sampled.name}, seed {SAMPLE_SEED}, no prime."]
    for t, text in f.samples:
        fence = _fence(text)
        lines += ["", f"Temperature {t:g}:", "", fence + "text", text, fence]
    lines += ["", "## Next", ""]
    lines += [f"- {k}: `{v}`" for k, v in commands(f)]
    return "\n".join(lines) + "\n"


def _thinned(rows: list[dict[str, Any]], most: int = 12) -> list[dict[str, Any]]:
    """At most `most` rows, evenly spread, the first and last always in."""
    if len(rows) <= most:
        return rows
    keep = sorted({round(i * (len(rows) - 1) / (most - 1)) for i in range(most)})
    return [rows[i] for i in keep]
