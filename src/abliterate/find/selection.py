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
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

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


def select(
    model, tokenizer, layout: Layout, candidates: Candidates, harmful: list[str], harmless: list[str], *,
    positions: tuple[int, ...] = (-1,), projected: bool, min_layer_frac: float,
    max_layer_frac: float, kl_max: float, batch_size: int, max_induce_checks: int = 8,
) -> Selection:
    """Score candidates on formatted `harmful` and `harmless` prompts and return the choice."""
    ids = refusal_token_ids(tokenizer)
    base_harmful = last_logits(model, tokenizer, harmful, batch_size)
    base_harmless = last_logits(model, tokenizer, harmless, batch_size)
    scores: list[Score] = []
    grid = [(layer, pos) for layer in candidate_layers(candidates.n_layers, min_layer_frac, max_layer_frac)
            for pos in positions]
    both = harmful + harmless
    for layer, pos in tqdm(grid, desc="selection", leave=False, unit="cand"):
        d = candidates.direction(layer, pos, projected)
        with ablated(model, d, layout):
            logits = last_logits(model, tokenizer, both, batch_size)
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
        with added(model, d.vector * d.scale, s.layer, layout):
            s.induce = refusal_score(last_logits(model, tokenizer, harmless, batch_size), ids).mean().item()
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
