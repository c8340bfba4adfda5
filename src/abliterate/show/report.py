"""`report.html` for a run, an induction or a steering: the views of one result, on one self-contained page."""

from __future__ import annotations

from ..find.selection import Selection
from ..measure.capability import LETTERS, Retention, Scores
from ..measure.evaluation import INSTRUMENT, Evaluation
from ..measure.judge import JudgeResult
from ..measure.long import LongEffects
from ..measure.refusal import is_refusal
from .html import report_html
from .plots import plot_selection
from .tables import judge_rows, long_rows

N_PAIRS = 6  # answers shown side by side, per prompt set


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def run_report(model: str, direction, before: Evaluation, after: Evaluation, selection: Selection | None,
               timings: dict[str, float], n_pairs: int = N_PAIRS, note: str | None = None,
               long_answers: LongEffects | None = None, judge: JudgeResult | None = None,
               capability: tuple[Retention, Scores, Scores] | None = None, facts: dict | None = None) -> str:
    """`note`: what the figures are not (find.splits.Overlap.note), shown with the run's facts; `long_answers`
    (--long-tokens): a table of the long answers' loops, degenerate answers, late refusals and lengths; `judge`
    (--judge): the judge's counts, its agreement with the markers, and the answers they disagree on;
    `capability` (the comparison and both models' answers): "what it cost", accuracy before and after per
    MMLU group with intervals, and examples of the items lost. `facts`: more lines for the run's facts (how each
    stage ran, what was skipped)."""
    b, a = before.metrics, after.metrics
    metrics = (["", "original", "abliterated"], [
        ["refusals (harmful prompts)", str(b.rates["refusals"]), str(a.rates["refusals"])],
        ["over-refusals (harmless prompts)", str(b.rates["over_refusals"]), str(a.rates["over_refusals"])],
        ["KL, first answer token", "0", _fmt(a.kl_first)],
        ["KL, mean over the original's first answer tokens", "0", _fmt(a.kl_continuation)],
    ])
    info = {"model": model, "direction layer": direction.layer, "position": direction.position,
            "projected": direction.projected, "mean difference norm": f"{direction.scale:.3f}",
            "wall time": ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()),
            "refusals and over-refusals counted by": f"{INSTRUMENT} (a refusal phrase, or an empty or looping answer)"}
    if judge is not None:
        info["answers to harmful prompts also judged by"] = f"{judge.instrument} ({judge.answers})"
    if note:
        info["evaluation prompts"] = f"{note}: these figures are in-sample, not held out"
    info.update(facts or {})
    images, tables = [], []
    if selection is not None:
        images.append(("Selection scores", plot_selection(selection.scores, direction.layer)))
        tables.append(("Selection table", ["layer", "position", "bypass", "induce", "kl", "chosen"],
                       [[s.layer, s.position, s.bypass, s.induce, s.kl, "yes" if s.chosen else ""]
                        for s in selection.scores]))
    if capability is not None:
        tables += capability_sections(*capability)
    if long_answers is not None:
        tables.append(long_section(long_answers))
    if judge is not None:
        tables += judge_sections(judge)
    pairs, flags = [], []
    for ev_b, ev_a, prompts in ((before.harmful, after.harmful, before.harmful_prompts),
                                (before.harmless, after.harmless, before.harmless_prompts)):
        for p, x, y in list(zip(prompts, ev_b.text, ev_a.text))[:n_pairs]:
            pairs.append((p, x, y))
            flags.append((is_refusal(x), is_refusal(y)))
    return report_html(f"abliterate run: {model}", info=info, metrics=metrics, images=images, tables=tables,
                       pairs=pairs, flags=flags, labels=("original", "abliterated"))


N_LOST = 5  # lost items shown in the report


def capability_sections(r: Retention, before: Scores, after: Scores) -> list[tuple[str, list[str], list[list]]]:
    """What the edit cost in knowledge: accuracy of each model (n, Wilson 95% CI), retention (Bonett-Price CI)
    and the paired change (Newcombe CI, McNemar p), overall and per MMLU group; then the first items lost."""
    def row(name: str, g: Retention) -> list:
        lo, hi = g.retention_interval
        ret = f"{g.retention:.3f} ({lo:.3f}-{hi:.3f})" if g.before.count else "-"
        d, (clo, chi) = g.change.difference, g.change.interval
        return [name, g.change.n, str(g.before), str(g.after), ret, len(g.lost), len(g.gained),
                f"{d:+.1%} ({clo:+.1%} to {chi:+.1%}; p = {g.change.p_value:.2g})"]

    header = ["items", "n", "original", "abliterated", "retention (95% CI)", "lost", "gained",
              "change (95% CI; McNemar p)"]
    rows = [row("all", r)] + [row(name, g) for name, g in r.groups.items()]
    title = f"What it cost: multiple-choice accuracy ({before.shots}-shot, {r.change.n} items)"
    if not r.resolves:
        title += (f". The original is not above chance ({r.chance:.0%}) outside its interval: on this model the "
                  f"check cannot show a loss")
    out = [(title, header, rows)]
    lost = [[before.items[i].subject, before.items[i].question.strip()[:200],
             f"{LETTERS[before.items[i].answer]}. {before.items[i].choices[before.items[i].answer]}"[:80],
             LETTERS[before.predicted[i]], LETTERS[after.predicted[i]]] for i in r.lost[:N_LOST]]
    if lost:
        out.append((f"Items lost (the first {len(lost)} of {len(r.lost)}): right before the edit, wrong after",
                    ["subject", "question", "answer", "original", "abliterated"], lost))
    return out


def long_section(e: LongEffects) -> tuple[str, list[str], list[list]]:
    """The report's table of long answers (show.tables.long_rows): each count with its n and 95% interval, per
    model and prompt set, the paired change, and median lengths."""
    both = e.sides[0].original is not None
    header = ["prompts", "measure"] + (["original", "abliterated", "change (95% CI; McNemar p)"] if both
                                       else ["abliterated"])
    return (f"Long answers: up to {e.tokens} tokens, late refusals after the first {e.head}", header,
            [[name, label, *cells] for name, label, cells in long_rows(e)])


def judge_sections(r: JudgeResult) -> list[tuple[str, list[str], list[list]]]:
    """The report's judge tables: counts per label with n and 95% interval for each model, agreement with the
    markers, the paired change in complied; then every answer where judge and markers disagree."""
    rows = [list(row) for row in judge_rows(r)]
    change = r.complied_change
    if change is not None:
        rows.append(["complied, change (paired; 95% CI, McNemar p)", "", str(change)])
    counts = (f"Judge: {r.instrument}, on the harmful prompts ({r.answers}; calibration: {r.calibration})",
              ["measure", "original", "abliterated"], rows)
    disagree = [[model, d["prompt"], d["answer"], d["markers"], d["judge"],
                 ", ".join(f"{k} {v:.2f}" for k, v in d["judge_probs"].items())]
                for model, j in (("original", r.original), ("abliterated", r.edited)) if j is not None
                for d in j.disagreements()]
    caption = (f"Judge and markers disagree: {len(disagree)} answers (markers: refusal phrase or empty/looping "
               f"answer; judge: {r.instrument})")
    listed = (caption, ["model", "prompt", "answer", "markers", "judge", "judge P(label)"], disagree)
    return [counts, listed]


def steer_report(title: str, model: str, info: dict, original, steered, prompts: list[str], *,
                 trials=None, sweep_png: bytes | None = None, behaviour: str = "refusal",
                 n_pairs: int = 2 * N_PAIRS) -> str:
    """For `induce` and `steer`: behaviour rate and coherence before and after, the search, answers side by side."""
    metrics = (["", "original", "steered"], [
        [f"{behaviour} rate", f"{original.rate:.2f}", f"{steered.rate:.2f}"],
        ["coherence (mean log-prob per token, original model)", f"{original.coherence:.3f}",
         f"{steered.coherence:.3f}"],
        ["degenerate answers", f"{original.degenerate:.2f}", f"{steered.degenerate:.2f}"],
    ])
    tables = []
    if trials:
        tables.append(("Search over layers and strengths", ["layers", "strength", behaviour, "coherence",
                                                            "degenerate"],
                       [[",".join(map(str, t.layers)), t.strength, t.rate, t.coherence, t.degenerate]
                        for t in trials]))
    images = [("Strength sweep", sweep_png)] if sweep_png else []
    pairs = list(zip(prompts, original.answers, steered.answers))[:n_pairs]
    flags = list(zip(original.flags, steered.flags))[:n_pairs]
    return report_html(title, info={"model": model, **info}, metrics=metrics, images=images, tables=tables,
                       pairs=pairs, flags=flags, labels=("original", "steered"))
