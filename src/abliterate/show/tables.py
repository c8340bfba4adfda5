"""Text for the terminal: metrics before and after, selection scores, the search front, layer statistics,
token colours, what a GGUF output holds."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.text import Text

from ..measure.capability import Retention
from ..measure.evaluation import INSTRUMENT, Metrics, samples
from ..measure.inspection import LayerStats, TokenView
from ..measure.judge import LABELS, Judged, JudgeResult
from ..measure.long import LongEffects
from ..measure.repeats import LOOP_COPIES, LOOP_WIDTH
from ..measure.stats import Paired
from ..search.study import TrialResult
from .html import _shown, color


def describe(p: dict) -> str:
    """One line for a trial's parameters (Params.flat())."""
    pos = p.get("position", -1)
    return (f"dir {'per-layer' if p['per_layer'] else format(p['direction'], '.2f')}"
            f"{f' pos {pos}' if pos != -1 else ''}{' proj' if p['projected'] else ''} k={p['k']} norm={p['norm']} "
            f"attn {p['attn_peak']:.2f}@{p['attn_center']:.1f}±{p['attn_width']:.1f} "
            f"mlp {p['mlp_peak']:.2f}@{p['mlp_center']:.1f}±{p['mlp_width']:.1f} emb {p['embed']:.2f}")


def front_table(front: list[TrialResult]) -> str:
    """The Pareto front as text: refusals in the trials' short answers (plus the refusal-opening probability, a
    tie-break), refusals counted in full answers (finalists), first-token KL and KL over the first tokens."""
    capability = any(t.capability for t in front)
    lines = [f"{'trial':>5} {'refusals~':>10} {'counted':>8} {'kl':>8} {'kl@4':>8}"
             + (f" {'capability (95% CI)':>22}" if capability else "") + "  edit"]
    for t in front:
        counted = str(t.refusals) if t.refusals is not None else "-"
        mark = "  <- chosen" if t.chosen else ""
        cap = f" {capability_cell(t.capability):>22}" if capability else ""
        lines.append(f"{t.number:5d} {t.refusals_est:10.2f} {counted:>8} {t.kl:8.4f} {t.kl_steps:8.4f}{cap}  "
                     f"{describe(t.params)}{mark}")
    if capability:
        first = next(t.capability for t in front if t.capability)
        before = first["accuracy_before"]
        lines.append(f"capability: correct/n of each finalist by hooks, with its Wilson interval; the original "
                     f"{before['count']}/{before['n']}" + ("" if first["resolves"] else
                                                          " (chance is inside its interval: no loss can show)"))
    return "\n".join(lines)


def capability_cell(c: dict | None) -> str:
    """`k/n (lo-hi%)` of a finalist's capability, '-' for a trial that was not a finalist."""
    if not c:
        return "-"
    a = c["accuracy_after"]
    lo, hi = a["ci95"]
    return f"{a['count']}/{a['n']} ({100 * lo:.0f}-{100 * hi:.0f}%)"


def ask_terminal(front: list[TrialResult], default: TrialResult) -> int:
    """Show the front and read the trial to keep from the terminal (Enter keeps the rule's choice)."""
    print(front_table(front), flush=True)
    numbers = {t.number for t in front}
    while True:
        answer = input(f"keep which trial? (Enter: {default.number}, the rule's choice) ").strip()
        if not answer:
            return default.number
        if answer.isdigit() and int(answer) in numbers:
            return int(answer)
        print(f"{answer!r} is not a trial of the front: one of {', '.join(map(str, sorted(numbers)))}", flush=True)


def layer_table(stats: list[LayerStats]) -> str:
    """The per-layer table as fixed-width text."""
    head = (f"{'layer':>5} {'|harm|':>8} {'|harmless|':>10} {'|diff|':>8} {'rel gap':>8} {'cos prev':>8} "
            f"{'d':>6} {'AUC':>6} {'along':>8} {'bypass':>7} {'kl':>7}")
    lines = [head]
    for s in stats:
        cos = f"{s.cos_prev:8.3f}" if s.cos_prev is not None else f"{'-':>8}"
        byp = f"{s.bypass:7.2f}" if s.bypass is not None else f"{'-':>7}"
        kl = f"{s.kl:7.3f}" if s.kl is not None else f"{'-':>7}"
        mark = "  <- chosen" if s.chosen else ""
        lines.append(f"{s.layer:5d} {s.harmful_norm:8.1f} {s.harmless_norm:10.1f} {s.diff_norm:8.2f} "
                     f"{s.relative_gap:8.3f} {cos} {s.cohen_d:6.2f} {s.auc:6.3f} {s.along_chosen:8.2f} "
                     f"{byp} {kl}{mark}")
    return "\n".join(lines)


def render_terminal(view: TokenView, console=None) -> None:
    """The prompt's tokens coloured by their projection at `view.layer`, printed with rich."""

    console = console or Console()
    values = view.scaled()[:, view.layer].tolist()
    text = Text()
    for token, v in zip(view.tokens, values):
        r, g, b = color(v)
        text.append(_shown(token), style=f"black on rgb({r},{g},{b})")
    console.print(f"layer {view.layer}: cosine with the direction, red = along it, blue = against it, "
                  f"saturated at {view.scale:.3f}")
    console.print(text)


def metrics_table(before: Metrics, after: Metrics, change: dict[str, Paired] | None = None,
                  note: str | None = None) -> str:
    """Counts with their n and 95% Wilson interval, before and after; with `change` (the same prompts), the
    paired difference and McNemar's p, which says whether it is outside the noise of this many prompts. `note`
    heads the table: what the figures are not (find.splits.Overlap.note: not held out)."""
    rows = [(label, str(before.rates[key]), str(after.rates[key]), _change(change[key]) if change else "")
            for label, key in (("refusals (harmful)", "refusals"), ("over-refusals (harmless)", "over_refusals"))]
    rows += [("KL first token", "0", f"{after.kl_first:.4f}" if after.kl_first is not None else "-", ""),
             ("KL continuation", "0", f"{after.kl_continuation:.4f}" if after.kl_continuation is not None else "-",
              "")]
    lines = [f"report set {note}: these figures are in-sample, not held out"] if note else []
    lines += [f"{'':26}{'original':<30}{'edited':<30}" + ("change, paired (95% CI; McNemar p)" if change else "")]
    lines += [f"{a:26}{b:<30}{c:<30}{d}".rstrip() for a, b, c, d in rows]
    lines.append(f"refusals and over-refusals counted by: {INSTRUMENT} (a refusal phrase, or an empty or looping "
                 f"answer)")
    return "\n".join(lines)


def judge_rows(r: JudgeResult) -> list[tuple[str, str, str]]:
    """(measure, original, edited) rows of the judge's figures, each with its n and 95% interval."""
    def cell(j: Judged | None, key: str) -> str:
        if j is None:
            return "-"
        return str(j.agreement) if key == "agreement" else str(j.counts[key])

    rows = [(f"{label} ({r.instrument})", cell(r.original, label), cell(r.edited, label)) for label in LABELS]
    rows.append(("agrees with markers on refusal", cell(r.original, "agreement"), cell(r.edited, "agreement")))
    return rows


def judge_table(r: JudgeResult) -> str:
    """The judge's counts per model, its agreement with the markers, and the paired change in complied."""
    lines = [f"judge on the harmful prompts ({r.answers}; calibration: {r.calibration}):",
             f"{'':44}{'original':<30}edited"]
    lines += [f"{a:44}{b:<30}{c}" for a, b, c in judge_rows(r)]
    change = r.complied_change
    if change is not None:
        lines.append(f"{'complied, change (paired)':44}{change}")
    n = sum(len(j.disagreements()) for j in (r.original, r.edited) if j is not None)
    lines.append(f"{n} answers where judge and markers disagree: listed in the JSON and report.html")
    return "\n".join(lines)


def _change(p: Paired) -> str:
    lo, hi = p.interval
    return f"{p.difference:+.0%} ({lo:+.0%} to {hi:+.0%}; p = {p.p_value:.2g})"


def capability_table(r: Retention) -> str:
    """Multiple-choice accuracy before and after, retention and the paired change, overall and per group."""
    lo, hi = r.retention_interval
    lines = [f"capability ({r.change.n} items): original {r.before}, edited {r.after}",
             f"  retention {r.retention:.3f} (95% CI {lo:.3f}-{hi:.3f}); {len(r.lost)} lost, {len(r.gained)} gained; "
             f"change {_change(r.change)}"]
    if not r.resolves:
        lines.append(f"  the original is not above chance ({r.chance:.0%}) outside its interval: this check cannot "
                     f"show a loss on this model (more items, or --capability-protocol letter/cloze, or --tasks)")
    for group, g in r.groups.items():
        lines.append(f"  {group:<16} {str(g.before):<30} {str(g.after):<30} {_change(g.change)}")
    return "\n".join(lines)


LONG_ROWS = (("loops", "loops"), ("degenerate", "degenerate"), ("late refusals", "late_refusal"),
             ("ran to the cap (no EOS)", "capped"))


def median_cell(m: dict) -> str:
    if m["median"] is None:
        return "-"
    ci = f"95% CI {m['ci95'][0]:g}-{m['ci95'][1]:g}" if m["ci95"] else "n < 6: no 95% CI"
    return f"{m['median']:g} ({ci}; n {m['n']})"


def long_rows(e: LongEffects) -> list[tuple[str, str, list[str]]]:
    """(prompt set, measure, cells) for the terminal and the report: loops, degenerate answers, late refusals and
    answers cut at the cap, each model's count with its n and Wilson interval and the paired change; median
    lengths and the edited/original median length ratio. Cells: original, edited, change (edited alone when
    there is no original)."""
    both = e.sides[0].original is not None
    rows = []
    for side in e.sides:
        d = side.to_dict()
        name = f"{side.name} ({d['n']} prompts)"
        after = side.rates("edited")
        before, change = (side.rates("original"), side.change()) if both else ({}, {})
        for label, key in LONG_ROWS:
            cells = [str(before[key]), str(after[key]), _change(change[key]) if key in change else ""] if both \
                else [str(after[key])]
            rows.append((name, label, cells))
        cells = [median_cell(d["original"]["length"]) if both else "", median_cell(d["edited"]["length"]),
                 f"edited/original {median_cell(d['length_ratio'])}" if both else ""]
        rows.append((name, "length, median tokens", cells if both else cells[1:2]))
    return rows


def long_table(e: LongEffects) -> str:
    """The long answers as text (`long_rows`)."""
    both = e.sides[0].original is not None
    lines = [(f"long answers (up to {e.tokens} tokens; a late refusal comes after the first {e.head}; loop: "
              f"ends in one unit {LOOP_COPIES}+ times back to back, {LOOP_WIDTH}+ columns)"),
             (f"{'':28}" + (f"{'original':<30}" if both else "") + f"{'edited':<30}"
              + ("change, paired (95% CI; McNemar p)" if both else "")).rstrip()]
    current = None
    for name, label, cells in long_rows(e):
        if name != current:
            lines.append(current := name)
        lines.append((f"  {label:26}" + "".join(f"{c:<30}" for c in cells[:-1]) + cells[-1]).rstrip())
    return "\n".join(lines)


def samples_text(before, after, n: int = 3) -> str:
    """`n` answer pairs chosen to show the edit (measure.evaluation.pick_samples), each under its kind."""
    out = []
    for s in samples(before, after, n):
        out.append(f"\n{s.kind}:\n> {s.prompt}\n  original: {s.original[:300]!r}\n  edited:   {s.edited[:300]!r}")
    return "\n".join(out)


def selection_table(sel) -> str:
    lines = [f"original refusal score: harmful {sel.baseline_harmful:.2f}, harmless {sel.baseline_harmless:.2f}; "
             f"induce must exceed {sel.induce_min:.2f}",
             f"{'layer':>5} {'pos':>4} {'bypass':>8} {'induce':>8} {'kl':>8}"]
    for s in sel.scores:
        induce = f"{s.induce:8.2f}" if s.induce is not None else f"{'-':>8}"
        mark = "  <- chosen" if s.chosen else ""
        lines.append(f"{s.layer:5d} {s.position:4d} {s.bypass:8.2f} {induce} {s.kl:8.4f}{mark}")
    if sel.note:
        lines.append(f"note: {sel.note}")
    return "\n".join(lines)


def search_table(s) -> str:
    """The Pareto front of a search: refusals in the trials' short answers (plus the refusal-opening probability,
    a tie-break), first-token KL and KL over 4 tokens, and refusals in full answers for the finalists."""

    return (f"search: {len(s.trials)} trials in {s.wall_s:.0f} s; the original refused {s.baseline_refusals}/"
            f"{s.n_harmful} search prompts\n{front_table(s.front)}\nrule: {s.rule}")


def print_gguf(path: Path, manifest: dict) -> None:
    g = manifest["gguf"]
    stem = path.with_suffix("")
    if "types" in g:  # a Hugging Face model written whole
        kinds = sorted(set(g["types"].values()))
        print(f"\nsaved to {path}: {g['arch']}, {len(g['types'])} tensors ({', '.join(kinds)}), with tokenizer and "
              f"chat template")
    else:
        print(f"\nsaved to {path}: {len(g['edited'])} tensors edited "
              f"({', '.join(sorted(set(g['edited'].values())))}), {g['copied']} copied byte for byte"
              + (f", added {', '.join(g['added'])}" if g["added"] else ""))
    print(f"Ollama: ollama create {stem.name} -f {stem}.Modelfile")
