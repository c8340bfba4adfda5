"""The induction search: which layers and strength make a model refuse harmless prompts while its answers stay
coherent (`abliterate induce`)."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from ..edit.steer import Steering
from ..measure.behaviour import Behaviour, measure
from ..measure.decode import generate
from ..measure.evaluation import answer_logprob
from ..model.arch import Layout

# Defaults of the induction search, used by the API and the CLI alike.




@dataclass
class Induction:
    chosen: Behaviour
    trials: list[Behaviour]
    baseline_coherence: float  # the original's own answers, scored by itself
    max_drop: float


def induce_search(model, tokenizer, layout: Layout, candidates, texts: list[str], *,
                  layer_sets: list[tuple[int, ...]], strengths: list[float], target: float = 0.9,
                  max_drop: float,
                  max_new_tokens: int, batch_size: int) -> Induction:
    """Find layers and strength that make harmless prompts refused while the answers stay coherent.

    Each layer set adds the mean difference of its middle layer at every layer in
    the set; `strengths` are totals, divided over the set's layers (a wide set
    needs less at each layer: on Qwen2.5-Coder-0.5B one layer plateaued at 71%
    refusals while seven layers at a quarter of the strength each reached 98%).
    Coherent: at most one answer in ten degenerate and mean log-prob per token (see `measure`)
    at most `max_drop` nats below the original's own answers. Strengths are tried
    in increasing order; a set stops when every prompt is refused or at its first
    incoherent result. The choice: among coherent trials reaching `target`, the
    most coherent; else the coherent trial with the highest rate. (Taking the
    highest rate instead chose 97% at a coherence loss of 1.5 nats on the search
    prompts, which became 89% at a loss of 1.7 on held-out ones.)
    """
    base = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=None)
    baseline = float(answer_logprob(model, tokenizer, texts, base.ids, batch_size).nanmean())

    def coherent(b: Behaviour) -> bool:
        # A refusal said twice in 24 tokens already reads as a loop; allow one answer in ten.
        return b.degenerate <= 0.1 and b.coherence >= baseline - max_drop

    trials = []
    for layers in tqdm(layer_sets, desc="induce search", leave=False, unit="set"):
        d = candidates.direction(layers[len(layers) // 2])
        for total in sorted(strengths):
            b = measure(model, tokenizer, layout, texts, Steering(d, total / len(layers), tuple(layers)),
                        max_new_tokens=max_new_tokens, batch_size=batch_size)
            trials.append(b)
            if not coherent(b) or b.rate >= 1.0:
                break
    good = [b for b in trials if coherent(b)]
    hits = [b for b in good if b.rate >= target]
    if hits:
        chosen = max(hits, key=lambda b: b.coherence)
    elif good:
        chosen = max(good, key=lambda b: (b.rate, b.coherence))
    else:
        chosen = min(trials, key=lambda b: b.strength)
    return Induction(chosen, trials, baseline, max_drop)


def default_layer_sets(n_layers: int) -> list[tuple[int, ...]]:
    """Three, seven and eleven layers around 60% of depth, where refusal directions usually sit.

    On Qwen2.5-Coder-0.5B (100 held-out harmless prompts): one layer plateaued at 71%
    refused; seven layers reached 78% with coherence unchanged but 89% only at a loss of
    1.7 nats per token; eleven layers at a total of 6 refused 90% at a loss of 1.3.
    """
    c = round(0.6 * n_layers)
    sets = [tuple(range(c - 1, c + 2)), tuple(range(c - 3, c + 4)), tuple(range(c - 5, c + 6))]
    return list(dict.fromkeys(tuple(layer for layer in s if 1 <= layer < n_layers) for s in sets))
