"""Choose the candidate direction that works, scored as in Arditi et al. (2024, section 3.2).

For each candidate (layer, position), on held-out prompts and at the first
response token only (one forward pass, no generation):

- bypass: refusal score on harmful prompts with the direction ablated (lower is better);
- kl: KL divergence from the original on harmless prompts with it ablated;
- induce: refusal score on harmless prompts with the mean difference added at its layer.

Candidates in the last 20% of layers are skipped (they tend to act on the
output vocabulary rather than on the refusal decision). The choice is the lowest
bypass score among candidates with kl <= kl_max whose addition induces refusal.
Arditi et al. ask for induce > 0 (refusal more likely than not); small models
such as Qwen2.5-0.5B rarely get there from one layer's addition (we measured
-1.3 at best), so the bar is the lower of 0 and the midpoint between the
original's scores on harmful and harmless prompts: the addition must move an
answered prompt at least halfway to a refused one. Induce is evaluated lazily,
in bypass order, since most candidates never need it.

The logits come from a runner: `InMemory` runs the loaded model once per prompt list (the default);
`model.streamed.StreamedRunner` runs every list of a stage in one pass, one decoder block at a time.
Both install the same hooks (`edit.project.ablated`, `added`), so the scores are the same function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..edit.project import ablated, added
from ..measure.kl import kl_div
from ..measure.refusal import refusal_score, refusal_token_ids
from ..model.arch import Layout
from ..model.forward import last_logits
from .directions import Candidates, Direction

log = logging.getLogger(__name__)


@dataclass
class Score:
    layer: int
    position: int
    bypass: float
    kl: float
    induce: float | None = None
    chosen: bool = False


@dataclass
class Selection:
    direction: Direction
    scores: list[Score]
    baseline_harmful: float  # refusal score of the original on the harmful prompts
    baseline_harmless: float
    induce_min: float = 0.0  # the bar an addition had to clear
    note: str = ""

    def table(self) -> list[dict]:
        return [asdict(s) for s in self.scores]


def candidate_layers(n_layers: int, min_frac: float, max_frac: float) -> list[int]:
    lo, hi = int(n_layers * min_frac), int(n_layers * max_frac)
    return list(range(lo, max(hi, lo + 1)))


Job = tuple[list[str], Callable | None]  # formatted prompts, and the hooks they run under (model -> context)


class InMemory:
    """Logits of prompt lists under hooks, from a model in memory: one forward pass per list, in order."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def logits(self, jobs: list[Job], desc: str | None = None) -> Iterator[torch.Tensor]:
        for texts, hooks in tqdm(jobs, desc=desc, disable=desc is None or len(jobs) < 2, leave=False, unit="list"):
            if hooks is None:
                yield last_logits(self.model, self.tokenizer, texts, self.batch_size)
            else:
                with hooks(self.model):
                    yield last_logits(self.model, self.tokenizer, texts, self.batch_size)


def ablating_hooks(direction: Direction, layout: Layout) -> Callable:
    return lambda model: ablated(model, direction, layout)


def adding_hooks(vector: torch.Tensor, layer: int, layout: Layout) -> Callable:
    return lambda model: added(model, vector, layer, layout)


def select(
    model, tokenizer, layout: Layout, candidates: Candidates, harmful: list[str], harmless: list[str], *,
    positions: tuple[int, ...] = (-1,), projected: bool, min_layer_frac: float,
    max_layer_frac: float, kl_max: float, batch_size: int, max_induce_checks: int = 8, runner=None,
) -> Selection:
    """Score candidates on formatted `harmful` and `harmless` prompts and return the choice. `runner` gives the
    logits (default: `InMemory` on `model`)."""
    run = runner or InMemory(model, tokenizer, batch_size)
    ids = refusal_token_ids(tokenizer)
    grid = [(layer, pos) for layer in candidate_layers(candidates.n_layers, min_layer_frac, max_layer_frac)
            for pos in positions]
    both = harmful + harmless
    # the original on each set, then every candidate ablated on both: one stage (streamed: one pass)
    jobs = [(harmful, None), (harmless, None)]
    jobs += [(both, ablating_hooks(candidates.direction(layer, pos, projected), layout)) for layer, pos in grid]
    out = run.logits(jobs, desc="selection")
    base_harmful, base_harmless = next(out), next(out)
    scores: list[Score] = []
    for (layer, pos), logits in zip(grid, out, strict=True):
        bypass = refusal_score(logits[: len(harmful)], ids).mean().item()
        kl = kl_div(base_harmless, logits[len(harmful):]).mean().item()
        scores.append(Score(layer, pos, bypass, kl))

    ranked = sorted(scores, key=lambda s: s.bypass)
    base_h = refusal_score(base_harmful, ids).mean().item()
    base_s = refusal_score(base_harmless, ids).mean().item()
    induce_min = min(0.0, (base_h + base_s) / 2)
    chosen, note, checks = None, "", 0
    for s in ranked:
        if s.kl > kl_max or checks >= max_induce_checks:
            continue
        d = candidates.direction(s.layer, s.position, projected)
        (logits,) = run.logits([(harmless, adding_hooks(d.vector * d.scale, s.layer, layout))])
        s.induce = refusal_score(logits, ids).mean().item()
        checks += 1
        if s.induce > induce_min:
            chosen = s
            break
    if chosen is None:
        within_kl = [s for s in ranked if s.kl <= kl_max]
        chosen = within_kl[0] if within_kl else min(scores, key=lambda s: s.kl)
        note = (f"no candidate had kl <= {kl_max} and induce > {induce_min:.2f}; took layer {chosen.layer} "
                f"(bypass {chosen.bypass:.2f}, kl {chosen.kl:.3f})")
        log.warning(note)
    chosen.chosen = True
    direction = candidates.direction(chosen.layer, chosen.position, projected)
    return Selection(direction, scores, baseline_harmful=base_h, baseline_harmless=base_s,
                     induce_min=induce_min, note=note)
