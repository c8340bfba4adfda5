"""Search the edit: which direction, how strongly each layer's writers are edited, and how.

A trial is a set of parameters (`Params`) resolved into an `Ablation` and run by hooks
(no weight copies). It is scored cheaply on held-out prompts, or on the evaluation prompts
as Heretic does (`Probe`):

- refusals: counted by the marker detector in short greedy answers (12 tokens) to harmful
  prompts, plus the mean probability of the model's own refusal openings at the first
  token (first tokens of the original's refusals that never open its answers) to break ties;
- KL: KL(original || edited) at the first response token of harmless prompts (and over
  a short teacher-forced continuation of the original's answers, recorded).

Every prompt of a chat template shares the template's opening (system prompt and role
markers), so each trial runs it once and reuses its key/value cache for every prompt:
on Qwen2.5 that is 25 of 41 tokens, and trials cost 2.5 times less.

Optuna's multi-objective TPE proposes trials; the study lives in a journal file, so a killed
search resumes where it stopped. The Pareto front's most effective points (the finalists)
are re-checked by longer generation, and the choice is the lowest KL whose counted refusals
are within `slack` of the best finalist's, or the trial the user picks. With a capability
scorer (`run --search`'s `--capability`), each finalist also answers the capability items
under its hooks, by the code `run` and `eval` use (`measure.capability`), and records its
accuracy and retention against the original's with their intervals: shown, not used to choose.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from tqdm.auto import tqdm

from ..edit.weighted import Ablation, ablating
from ..errors import AbliterateError
from ..measure.capability import Scores, compare
from ..measure.decode import greedy
from ..measure.refusal import is_refusal
from ..model.arch import Layout
from .probe import Probe, score
from .space import DirectionSource, Params, suggest

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- cheap objectives


# ---------------------------------------------------------------- the study


@dataclass
class TrialResult:
    number: int
    params: dict  # Params.flat()
    refusals_est: float
    kl: float
    kl_steps: float
    refusals: int | None = None  # counted in full generations (finalists only)
    chosen: bool = False
    capability: dict | None = None  # finalists, with a capability scorer: `finalist_capability`


@dataclass
class SearchResult:
    chosen: TrialResult
    ablations: dict[int, Ablation]  # every finalist's edit (and the chosen one's), by trial number
    trials: list[TrialResult]
    front: list[TrialResult]  # Pareto-optimal on (refusals_est, kl), by refusals
    finalists: list[TrialResult]
    baseline_refusals: int
    n_harmful: int
    n_harmless: int
    study: str | None
    wall_s: float
    rule: str = ""
    capability_before: Scores | None = None  # the original's, when the finalists were scored

    @property
    def ablation(self) -> Ablation:
        return self.ablations[self.chosen.number]

    def table(self) -> list[dict]:
        return [asdict(t) for t in self.front]


def pareto(trials: list[TrialResult]) -> list[TrialResult]:
    front = [t for t in trials
             if not any(o.refusals_est <= t.refusals_est and o.kl <= t.kl and (o.refusals_est, o.kl) !=
                        (t.refusals_est, t.kl) for o in trials)]
    seen, out = set(), []
    for t in sorted(front, key=lambda t: (t.refusals_est, t.kl, t.number)):
        if (t.refusals_est, t.kl) not in seen:
            seen.add((t.refusals_est, t.kl))
            out.append(t)
    return out


def choose(finalists: list[TrialResult], slack: int, max_kl: float | None) -> tuple[TrialResult, str]:
    """Lowest KL among finalists whose counted refusals are within `slack` of the best (KL <= max_kl if given)."""
    pool = [t for t in finalists if max_kl is None or t.kl <= max_kl]
    if not pool:
        best = min(finalists, key=lambda t: t.kl)
        return best, f"no finalist had KL <= {max_kl}; took the lowest KL ({best.kl:.4f})"
    best = min(t.refusals for t in pool)
    pick = min((t for t in pool if t.refusals <= best + slack), key=lambda t: (t.kl, t.refusals))
    return pick, (f"lowest first-token KL among finalists with refusals <= best ({best}) + {slack}"
                  + (f" and KL <= {max_kl}" if max_kl is not None else ""))


def finalist_capability(before: Scores, after: Scores) -> dict:
    """A finalist's capability against the original's on the same items: both accuracies, retention and the
    paired change, each with its 95% interval (`Retention.to_dict`, without the per-item lists)."""
    r = compare(before, after)
    keep = ("n", "accuracy_before", "accuracy_after", "retention", "retention_ci95", "chance", "resolves",
            "lost", "gained", "difference", "difference_ci95", "mcnemar_p", "significant")
    d = r.to_dict(indices=False)
    return {k: d[k] for k in keep if k in d}


STUDY_NAME = "abliterate-search"  # one study per journal file


def journal_storage(path: str | Path):

    return JournalStorage(JournalFileBackend(str(path)))


def run_search(model, layout: Layout, source: DirectionSource, probe: Probe, *, trials: int,
               time_budget: float | None, options: tuple[str, ...], finalists: int,
               slack: int, max_kl: float | None, study_path: str | Path | None = None,
               fingerprint: str = "", seed: int, max_new_tokens: int, stop_after: int | None = None,
               pick: int | None = None, ask=None, capability: Callable[[], Scores] | None = None,
               capability_before: Scores | None = None) -> SearchResult:
    """Run (or resume) the study until `trials` are complete or `time_budget` seconds pass, then choose.

    The choice is the rule's (`choose`) unless the user names a trial: `pick` (any completed trial's
    number), or `ask(front, default) -> number` (e.g. `ask_terminal`). A picked trial that is not a
    finalist has its refusals counted like one.
    stop_after: stop (as if killed) after this many new trials; for tests of resuming.
    capability: scores the model as it is (hooks on) on the capability items; each finalist then records
    `finalist_capability(capability_before, ...)` (`capability_before`: the original's; scored here if None).
    """

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    L = layout.n_layers
    storage = journal_storage(study_path) if study_path else None
    sampler = optuna.samplers.TPESampler(multivariate=True, n_startup_trials=max(5, trials * 3 // 10), seed=seed)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, load_if_exists=True,
                                directions=["minimize", "minimize"])
    info = {"fingerprint": fingerprint, "options": list(options)}
    if study.user_attrs:
        if {k: study.user_attrs.get(k) for k in info} != info:
            raise AbliterateError(
                f"study {study_path} was made for another model, prompts or options "
                f"({study.user_attrs.get('options')}); delete it or give another --study path"
            )
    else:
        for k, v in info.items():
            study.set_user_attr(k, v)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # left running by a killed search
    if not study.trials:
        for p in Params.seeds(L, options):  # plain abliteration is always a candidate
            study.enqueue_trial(p.flat())

    def done() -> int:
        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))

    bar = tqdm(total=trials, initial=done(), desc="search", unit="trial")
    new = 0
    while done() < trials:
        if time_budget is not None and time.perf_counter() - start > time_budget:
            log.info("time budget of %.0f s reached after %d trials", time_budget, done())
            break
        if stop_after is not None and new >= stop_after:
            break
        trial = study.ask()
        params = suggest(trial, L, options, source.n_positions)
        with ablating(model, source.ablation(params), layout):
            s = score(model, probe)
        trial.set_user_attr("kl_steps", s.kl_steps)
        trial.set_user_attr("short_refusals", s.counted)
        study.tell(trial, [s.refusals, s.kl])
        new += 1
        bar.update(1)
        front = pareto(completed_trials(study))
        best = min(front, key=lambda t: (t.refusals_est, t.kl))
        bar.set_postfix_str(f"best refusals~{best.refusals_est:.1f}/{len(probe.harmful)} kl {best.kl:.3f}")
    bar.close()

    results = completed_trials(study)
    if not results:
        raise AbliterateError("the search finished no trial; raise --trials or --time-budget")
    front = pareto(results)
    by_number = {t.number: t for t in results}
    if pick is not None and pick not in by_number:
        raise AbliterateError(f"--pick {pick}: no completed trial has that number; the front's trials are "
                              f"{', '.join(str(t.number) for t in front)}")
    picks = [t for t in front if max_kl is None or t.kl <= max_kl][:finalists] or front[:1]
    ablations = {}

    def check(t: TrialResult) -> None:  # refusals counted in full answers
        ablations[t.number] = source.ablation(Params.from_flat(t.params))
        with ablating(model, ablations[t.number], layout):
            answers = greedy(model, probe.prefix, probe.harmful, max_new_tokens=max_new_tokens, pad_id=probe.pad_id,
                             eos=probe.eos, batch_size=probe.batch_size).ids
            scores = capability() if capability is not None else None
        t.refusals = sum(is_refusal(probe.decode(a, skip_special_tokens=True).strip()) for a in answers)
        if scores is not None:
            t.capability = finalist_capability(capability_before, scores)

    if capability is not None and capability_before is None:
        capability_before = capability()  # the original: no hooks yet

    for t in tqdm(picks, desc="finalists", leave=False, unit="trial"):
        check(t)
    chosen, rule = choose(picks, slack, max_kl)
    number = pick if pick is not None else ask(front, chosen) if ask is not None else chosen.number
    if number != chosen.number:
        rule = f"trial {number}, picked by the user (the rule would take trial {chosen.number}: {rule})"
        chosen = by_number[number]
        if chosen.number not in ablations:
            check(chosen)
    chosen.chosen = True
    return SearchResult(chosen, ablations, results, front, picks, probe.baseline_refusals, len(probe.harmful),
                        len(probe.harmless), str(study_path) if study_path else None, time.perf_counter() - start,
                        rule, capability_before)


def completed_trials(study) -> list[TrialResult]:

    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        out.append(TrialResult(t.number, dict(t.params), t.values[0], t.values[1], t.user_attrs.get("kl_steps", 0.0)))
    return out
