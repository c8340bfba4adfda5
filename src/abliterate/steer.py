"""Add a direction instead of removing it: activation addition, reversible or baked into a bias.

Strength is measured in units of the direction's own mean difference: strength 1
adds `direction.scale * direction.vector`, which moves the mean activation of the
harmless (or "negative") prompts onto the mean of the harmful ("positive") ones at
that layer. Negative strength subtracts; 0 is exactly the identity.

Baking: adding v to the stream entering block L is the same as adding v as a bias
to the last writer of block L-1 (its MLP down projection), since the residual
stream is a sum. That needs a bias the architecture can store; see
`arch.ArchSpec.steer_bias` for how each family does it, and why some cannot.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Layout, check_layer, resolve, text_config
from .directions import Direction
from .edit import added
from .errors import AbliterateError
from .evaluation import answer_logprob, generate
from .refusal import is_degenerate, is_refusal

# Defaults of the induction search, used by the API and the CLI alike.
INDUCE_STRENGTHS = (3.0, 4.0, 5.0, 6.0, 7.0)  # total strength over a layer set, in mean differences
INDUCE_MAX_DROP = 1.5  # nats per token of coherence a setting may lose (see `measure`)


@dataclass(frozen=True)
class Steering:
    direction: Direction
    strength: float
    layers: tuple[int, ...]

    def vector(self) -> torch.Tensor:
        return self.direction.vector * (self.direction.scale * self.strength)

    def check(self, layout: Layout) -> "Steering":
        if not math.isfinite(self.strength):
            raise AbliterateError(f"strength {self.strength} is not a finite number; use e.g. 1.0 or -0.5")
        if self.direction.hidden_size != layout.hidden_size:
            raise AbliterateError(
                f"direction has {self.direction.hidden_size} features but the model's hidden size is "
                f"{layout.hidden_size}; it was made for another model ({self.direction.meta.get('model', '?')})"
            )
        if not self.layers:
            raise AbliterateError("no layers to steer; give --layers, e.g. --layers 10 or --layers 8-12")
        for layer in self.layers:
            check_layer(layer, layout.n_layers)
        return self


def parse_layers(text: str) -> tuple[int, ...]:
    """'10', '8,9,12' or '8-12' (inclusive)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError as e:
        raise AbliterateError(f"--layers {text!r} is not a layer list; use e.g. 10, 8,9,12 or 8-12") from e
    return tuple(dict.fromkeys(out))


@contextmanager
def steered(model: nn.Module, steering: Steering, layout: Layout | None = None):
    """Within the block, the steering vector is added to the stream entering each of its layers."""
    layout = layout or resolve(model)
    steering.check(layout)
    v = steering.vector()
    with ExitStack() as stack:
        for layer in steering.layers:
            stack.enter_context(added(model, v, layer, layout))
        yield model


def _zero_bias_(linear: nn.Linear) -> None:
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)


def _as_llama(model: nn.Module) -> nn.Module:
    """The same network as a Llama with attention and MLP biases (Qwen2 = Llama + q/k/v biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = text_config(model)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim")
    fields = {k: getattr(src, k) for k in keep if getattr(src, k, None) is not None}
    config = LlamaConfig(**fields, attention_bias=True, mlp_bias=True)
    if getattr(src, "sliding_window", None) and getattr(src, "use_sliding_window", True):
        raise AbliterateError("this model uses sliding-window attention, which a Llama config cannot express")
    param = next(model.parameters())
    llama = LlamaForCausalLM(config).to(param.device, param.dtype).eval().requires_grad_(False)
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise AbliterateError(f"cannot re-express {type(model).__name__} as Llama (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if name in missing:
                p.zero_()
    llama.generation_config = model.generation_config
    return llama


@torch.no_grad()
def bake_steering(model: nn.Module, steering: Steering, layout: Layout | None = None) -> nn.Module:
    """A model that adds the steering vector with no hooks: as a bias on block L-1's MLP output.

    Returns `model` edited in place, or a re-expressed copy (Qwen2 and Mistral become
    Llama configs with zero biases), per the family's `steer_bias` entry.
    """
    layout = layout or resolve(model)
    steering.check(layout)
    how = layout.spec.steer_bias
    if how is None:
        raise AbliterateError(
            f"{text_config(model).model_type} cannot store a steering bias: {layout.spec.steer_bias_why}. "
            f"Steer with hooks (abliterate steer without -o) instead"
        )
    if 0 in steering.layers:
        raise AbliterateError("layer 0 has no block before it to carry a bias; steer layers 1 and up")
    if how == "as_llama":
        model = _as_llama(model)
        layout = resolve(model)
        how = layout.spec.steer_bias
    if how == "mlp_bias":
        for block in layout.blocks:
            for child in block.module.mlp.children():
                if isinstance(child, nn.Linear):
                    _zero_bias_(child)
        text_config(model).mlp_bias = True
        layout = resolve(model)
    v = steering.vector()
    for layer in steering.layers:
        bias = next((w for w in layout.blocks[layer - 1].mlp if w.name.endswith(".bias")), None)
        if bias is None:
            raise AbliterateError(f"block {layer - 1} has no MLP output bias to carry the steering vector")
        bias.param.add_(v.to(bias.param.device, bias.param.dtype))
    return model


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


def measure(model, tokenizer, layout: Layout, texts: list[str], steering: Steering, *, max_new_tokens: int = 24,
            batch_size: int = 32, markers: tuple[str, ...] | None = None) -> Behaviour:
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


def plot_sweep(rows: list[Behaviour], path: str | Path, behaviour: str = "refusal") -> Path:
    """Behaviour rate and coherence against strength, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.strength for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(xs, [r.rate for r in rows], "o-", color="tab:red", label=f"{behaviour} rate")
    ax.set_xlabel(f"strength (x mean difference), layers {','.join(map(str, rows[0].layers))}")
    ax.set_ylabel(f"{behaviour} rate", color="tab:red")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(xs, [r.coherence for r in rows], "s--", color="tab:blue", label="coherence")
    ax2.set_ylabel("coherence (mean log-prob / token, original model)", color="tab:blue")
    ax.set_title("Steering sweep")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class Induction:
    chosen: Behaviour
    trials: list[Behaviour]
    baseline_coherence: float  # the original's own answers, scored by itself
    max_drop: float


def induce_search(model, tokenizer, layout: Layout, candidates, texts: list[str], *,
                  layer_sets: list[tuple[int, ...]], strengths: list[float], target: float = 0.9,
                  max_drop: float = INDUCE_MAX_DROP,
                  max_new_tokens: int = 24, batch_size: int = 32) -> Induction:
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
