"""What steering did to a set of prompts: the behaviour's rate (refusal or a concept's markers), coherence
under the unsteered model, degenerate answers; and a sweep over strengths."""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..edit.steer import Steering, steered
from ..find.directions import Direction
from ..model.arch import Layout
from .decode import generate
from .evaluation import answer_logprob
from .refusal import is_degenerate, is_refusal


@dataclass
class Behaviour:
    """What steering did to a set of prompts."""

    strength: float
    layers: tuple[int, ...]
    rate: float  # share of answers showing the behaviour (refusal, or the concept's markers)
    coherence: float  # mean log-prob per token of the answers under the unsteered model (see `measure`)
    degenerate: float  # share of empty or looping answers
    answers: list[str]
    flags: list[bool] = field(default_factory=list)  # which answers showed it


def shows(text: str, markers: tuple[str, ...] | None) -> bool:
    """Refusal when `markers` is None; else any of the markers (case-insensitive)."""
    if markers is None:
        return is_refusal(text)
    low = text.lower()
    return not is_degenerate(text) and any(m.lower() in low for m in markers)


def measure(model, tokenizer, layout: Layout, texts: list[str], steering: Steering, *, max_new_tokens: int,
            batch_size: int, markers: tuple[str, ...] | None = None) -> Behaviour:
    """Generate with `steering`, then score the answers with the unsteered model.

    Coherence is the original's mean log-prob per token of each answer after its
    prompt, first token left out (`answer_logprob`). Scored without the prompt,
    loops such as "video video video" look as fluent as real answers (copying is
    cheap for a language model), so the prompt stays; a refusal of a harmless
    request then costs about 1.2 nats per token on Qwen2.5-Coder-0.5B, word salad
    about 3, which is why `induce_search` allows a drop of 1.5.
    """
    with steered(model, steering, layout):
        gen = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=None)
    flags = [shows(t, markers) for t in gen.text]
    logp = answer_logprob(model, tokenizer, texts, gen.ids, batch_size)
    return Behaviour(
        strength=steering.strength, layers=steering.layers,
        rate=sum(flags) / len(texts), coherence=float(logp.nanmean()),
        degenerate=sum(map(is_degenerate, gen.text)) / len(texts), answers=gen.text, flags=flags,
    )


def sweep(model, tokenizer, layout: Layout, texts: list[str], direction: Direction, layers: tuple[int, ...],
          strengths: list[float], **kw) -> list[Behaviour]:
    """Behaviour rate and coherence at each strength (strength 0 is the original model)."""
    out = []
    for strength in tqdm(strengths, desc="sweep", leave=False, unit="strength"):
        out.append(measure(model, tokenizer, layout, texts, Steering(direction, strength, layers), **kw))
    return out
