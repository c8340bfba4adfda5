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
are within `slack` of the best finalist's, or the trial the user picks.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .ablation import NORM_MODES, Ablation, ablating
from .activations import forward, id_batches
from .arch import Layout
from .errors import AbliterateError
from .evaluation import eos_ids, generate
from .refusal import is_refusal, refusal_token_ids

log = logging.getLogger(__name__)

# Each can be switched off to measure what it brings (benchmarks/bench_search.py).
OPTIONS = {
    "position": "the direction may come from any post-instruction token, not only the last one",
    "fractional": "direction index between two layers (interpolated), not only whole layers",
    "per_layer": "each block may use its own layer's direction instead of one for all",
    "projected": "the direction may be orthogonalized against the harmless mean (biprojection)",
    "embed": "the token embeddings are edited too, by their own weight",
    "row": "norm preservation per output row (Heretic's)",
    "column": "norm preservation per input column (grimjim's biprojection)",
    "subspace": "up to 3 directions (top singular vectors of per-prompt differences)",
    "strength": "weights up to 1.5 (overshoot), not only up to 1",
}
# On by default: what measurably helps. In equal searches with and without each option on the reference model
# (benchmarks/bench_option_searches.py, README "Results") none beat the noise between two searches of the same
# space, so the default search varies the direction's layer and the two components' profiles only.
# 'all' switches every option on.
DEFAULT_OPTIONS: tuple[str, ...] = ()


def parse_options(text: str) -> tuple[str, ...]:
    """'default', 'all', 'none', or a comma list; '+name' / '-name' adjust the defaults."""
    text = text.strip()
    if text in ("", "default"):
        return DEFAULT_OPTIONS
    if text in ("all", "none"):
        return tuple(OPTIONS) if text == "all" else ()
    items = [t.strip() for t in text.split(",") if t.strip()]
    relative = all(t[0] in "+-" for t in items)
    chosen = set(DEFAULT_OPTIONS) if relative else set()
    for t in items:
        name = t.lstrip("+-")
        if name not in OPTIONS:
            raise AbliterateError(f"search option {name!r} is unknown; options: {', '.join(OPTIONS)}")
        (chosen.discard if t.startswith("-") else chosen.add)(name)
    return tuple(o for o in OPTIONS if o in chosen)


@dataclass
class Profile:
    """Weight of one component along depth: `peak` at `center`, falling linearly to `floor * peak` at
    `width` layers away, 0 beyond (those layers are untouched)."""

    peak: float
    center: float
    floor: float  # fraction of the peak at the edges
    width: float

    def weights(self, n_layers: int) -> torch.Tensor:
        d = (torch.arange(n_layers, dtype=torch.float64) - self.center).abs()
        w = self.peak * (1 + (self.floor - 1) * d / max(self.width, 1e-6))
        return torch.where(d <= self.width, w, torch.zeros_like(w)).float()


@dataclass
class Params:
    """One point of the search space; `Params.classic(L)` is plain abliteration (Arditi et al.)."""

    direction: float  # layer index of the direction, fractional: interpolated between two layers
    per_layer: bool  # each block uses its own layer's direction instead
    projected: bool
    k: int  # directions removed
    norm: str
    attn: Profile
    mlp: Profile
    embed: float
    position: int = -1  # token the directions are taken at, counted from the end of the prompt

    @classmethod
    def classic(cls, n_layers: int, options: tuple[str, ...] = DEFAULT_OPTIONS, at: float = 0.6,
                weight: float = 1.0) -> "Params":
        """Every writer edited by `weight` along the direction of the layer at fraction `at` of depth."""
        full = Profile(weight, (n_layers - 1) / 2, 1.0, float(n_layers))
        lo, hi = _direction_range(n_layers, "fractional" in options)
        layer = float(min(max(round(at * (n_layers - 1)), lo), hi))
        embed = weight if "embed" in options else 0.0
        return cls(layer, False, False, 1, "none", full, copy.copy(full), embed, -1)

    @classmethod
    def seeds(cls, n_layers: int, options: tuple[str, ...] = DEFAULT_OPTIONS) -> list["Params"]:
        """The first trials of a study: plain abliteration, then the plain edit at half weight with the direction
        at 50%, 60% and 70% of depth (on the reference model, half weight kept most of the effect at a fifth of
        the KL; these points show the sampler where the front lies)."""
        return [cls.classic(n_layers, options)] + [cls.classic(n_layers, options, at, 0.5) for at in (0.5, 0.6, 0.7)]

    def flat(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("attn", "mlp")}
        for c in ("attn", "mlp"):
            out.update({f"{c}_{k}": v for k, v in asdict(getattr(self, c)).items()})
        return out

    @classmethod
    def from_flat(cls, d: dict) -> "Params":
        prof = {c: Profile(*(float(d[f"{c}_{k}"]) for k in ("peak", "center", "floor", "width")))
                for c in ("attn", "mlp")}
        return cls(float(d["direction"]), bool(d["per_layer"]), bool(d["projected"]), int(d["k"]), str(d["norm"]),
                   prof["attn"], prof["mlp"], float(d["embed"]), int(d.get("position", -1)))


def _direction_range(n_layers: int, fractional: bool) -> tuple[float, float]:
    """Directions from 30% to 90% of depth (earlier ones barely separate the sets, later ones act on words)."""
    lo, hi = 0.3 * (n_layers - 1), 0.9 * (n_layers - 1)
    if fractional:
        return lo, hi
    return math.ceil(lo), max(math.ceil(lo), math.floor(hi))


def suggest(trial, n_layers: int, options: tuple[str, ...], n_positions: int = 1) -> Params:
    """Ask an Optuna trial for a point. Every parameter is always asked (a fixed space suits multivariate TPE)."""
    L = n_layers
    position = trial.suggest_int("position", -n_positions if "position" in options else -1, -1)
    lo, hi = _direction_range(L, "fractional" in options)
    if "fractional" in options:
        direction = trial.suggest_float("direction", lo, hi)
    else:
        direction = float(trial.suggest_int("direction", lo, hi))
    per_layer = trial.suggest_categorical("per_layer", [False, True] if "per_layer" in options else [False])
    projected = trial.suggest_categorical("projected", [False, True] if "projected" in options else [False])
    k = trial.suggest_int("k", 1, 3 if "subspace" in options else 1)
    norms = ["none"] + [m for m in NORM_MODES[1:] if m in options]
    norm = trial.suggest_categorical("norm", norms)
    top = 1.5 if "strength" in options else 1.0
    prof = {}
    for c in ("attn", "mlp"):
        prof[c] = Profile(trial.suggest_float(f"{c}_peak", 0.2, top),
                          trial.suggest_float(f"{c}_center", 0.2 * (L - 1), L - 1),
                          trial.suggest_float(f"{c}_floor", 0.0, 1.0), trial.suggest_float(f"{c}_width", 1.0, L))
    embed = trial.suggest_float("embed", 0.0, 1.0) if "embed" in options else trial.suggest_float("embed", 0.0, 0.0)
    return Params(direction, per_layer, projected, k, norm, prof["attn"], prof["mlp"], embed, position)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class DirectionSource:
    """Per-prompt harmful activations and both means at every block input, at the last P prompt tokens.

    harmful: (N, L, P, H) float32; harmful_mean, harmless_mean: (L, P, H) float64. Position -1 is
    the last prompt token, -P the first of the template's post-instruction tokens.
    """

    harmful: torch.Tensor
    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.harmful_mean.shape[0]

    @property
    def n_positions(self) -> int:
        return self.harmful_mean.shape[1]

    def diff(self, layer: int, projected: bool, position: int = -1) -> torch.Tensor:
        if not -self.n_positions <= position <= -1:
            raise AbliterateError(f"token position {position} is outside the {self.n_positions} kept "
                                  f"(-{self.n_positions}..-1)")
        d = self.harmful_mean[layer, position] - self.harmless_mean[layer, position]  # (H,) float64
        if projected:
            mu = _unit(self.harmless_mean[layer, position])
            d = d - (d @ mu) * mu
        return _unit(d)

    def direction(self, index: float, projected: bool, position: int = -1) -> torch.Tensor:
        """Unit direction at a fractional layer index: the normalized interpolation of two layers' directions."""
        a = min(max(int(math.floor(index)), 0), self.n_layers - 1)
        b = min(a + 1, self.n_layers - 1)
        t = index - a
        return _unit((1 - t) * self.diff(a, projected, position) + t * self.diff(b, projected, position))

    def basis(self, index: float, projected: bool, k: int, position: int = -1) -> torch.Tensor:
        """(k, H) orthonormal: the direction, then the top singular vectors of the per-prompt differences
        (harmful prompt minus harmless mean, at the nearest layer) with the direction removed."""
        r = self.direction(index, projected, position)
        if k == 1:
            return r.float().unsqueeze(0)
        layer = min(max(round(index), 0), self.n_layers - 1)
        diffs = self.harmful[:, layer, position].double() - self.harmless_mean[layer, position]  # (N, H)
        diffs = diffs - (diffs @ r).unsqueeze(-1) * r
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
        q = torch.linalg.qr(torch.cat([r.unsqueeze(0), vh[: k - 1]]).T).Q.T  # (k, H)
        q[0] = q[0] * torch.sign(q[0] @ r)
        return q.float()

    def ablation(self, p: Params) -> Ablation:
        L = self.n_layers
        if p.per_layer:
            # the writers of block l write the stream entering block l + 1
            bases = torch.stack([self.basis(min(i + 1, L - 1), p.projected, p.k, p.position) for i in range(L)])
        else:
            bases = self.basis(p.direction, p.projected, p.k, p.position).unsqueeze(0).expand(L, -1, -1).contiguous()
        return Ablation(bases, p.attn.weights(L), p.mlp.weights(L), bases[0].clone(), p.embed, p.norm, p.flat())


# ---------------------------------------------------------------- cheap objectives


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


@dataclass
class Probe:
    """What a trial is scored against: token ids past a shared prefix, and the original's behaviour."""

    prefix: list[int]
    harmful: list[list[int]]  # suffixes after the prefix
    harmless: list[list[int]]  # suffixes, followed by the original's first answer tokens (k_steps - 1 of them)
    ref_logprobs: torch.Tensor  # (N, k_steps, V) the original's log-probabilities along its harmless answers
    ref_mask: torch.Tensor  # (N, k_steps)
    refusal_ids: list[int]
    baseline_refusals: int = 0
    pad_id: int = 0
    batch_size: int = 64
    answer_tokens: int = 12  # greedy answer length per trial
    eos: set[int] = field(default_factory=set)
    decode: object = None  # the tokenizer's decode

    @property
    def steps(self) -> int:
        return self.ref_logprobs.shape[1]


@torch.inference_mode()
def cached_logits(model, prefix: list[int], suffixes: list[list[int]], keep: int, pad_id: int,
                  batch_size: int) -> torch.Tensor:
    """Logits at the last `keep` positions of prefix + suffix, (N, keep, V) float32 on CPU, input order.

    The prefix is run once; its key/value cache is repeated over each batch. Batches are left
    padded between prefix and suffix (masked), with positions counting real tokens only.
    """
    device = next(model.parameters()).device
    out = [None] * len(suffixes)
    cache = None
    if prefix:
        cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
    for batch in id_batches(suffixes, pad_id, batch_size, device):
        if cache is None:
            logits = forward(model, batch, logits_to_keep=keep).logits
        else:
            n = len(batch.index)
            mask = torch.cat([torch.ones(n, len(prefix), dtype=torch.long, device=device), batch.attention_mask], 1)
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(n)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, len(prefix):]
            logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                           use_cache=True, logits_to_keep=keep).logits
        logits = logits.float().cpu()
        for row, i in enumerate(batch.index):
            out[i] = logits[row]
    return torch.stack(out)


@torch.inference_mode()
def cached_greedy(model, prefix: list[int], suffixes: list[list[int]], max_new_tokens: int, pad_id: int,
                  eos: set[int], batch_size: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy answers after prefix + suffix (the prefix run once), and the first step's logits (N, V).

    A batch stops when every row has produced an EOS token.
    """
    device = next(model.parameters()).device
    answers: list[list[int]] = [[] for _ in suffixes]
    first = [None] * len(suffixes)
    cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values if prefix else None
    eos_t = torch.tensor(sorted(eos), device=device)
    for batch in id_batches(suffixes, pad_id, batch_size, device):
        n = len(batch.index)
        mask = torch.cat([torch.ones(n, len(prefix), dtype=torch.long, device=device), batch.attention_mask], 1)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(n)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, len(prefix):]
        ids = batch.input_ids
        done = torch.zeros(n, dtype=torch.bool, device=device)
        out = []
        for step in range(max_new_tokens):
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True,
                        logits_to_keep=1)
            past, logits = res.past_key_values, res.logits[:, -1].float()
            if step == 0:
                for row, i in enumerate(batch.index):
                    first[i] = logits[row].cpu()
            nxt = logits.argmax(-1).masked_fill(done, pad_id)
            out.append(nxt)
            done |= torch.isin(nxt, eos_t)
            if done.all():
                break
            ids = nxt.unsqueeze(-1)
            mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long, device=device)], 1)
            pos = pos[:, -1:] + 1
        toks = torch.stack(out, 1).cpu()  # (n, steps)
        for row, i in enumerate(batch.index):
            seq = toks[row].tolist()
            end = next((t + 1 for t, tok in enumerate(seq) if tok in eos), len(seq))
            answers[i] = seq[:end]
    return answers, torch.stack(first)


def make_probe(model, tokenizer, harmful: list[str], harmless: list[str], *, max_new_tokens: int = 32,
               steps: int = 4, answer_tokens: int = 12, batch_size: int = 64) -> Probe:
    """The original's behaviour on formatted search prompts: its refusal openings, and its harmless answers'
    first `steps` log-probabilities (for KL)."""
    gen_h = generate(model, tokenizer, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     desc="search: original on harmful")
    gen_s = generate(model, tokenizer, harmless, max_new_tokens=steps, batch_size=batch_size, keep_logprobs=steps,
                     desc="search: original on harmless")
    refused = [is_refusal(t) for t in gen_h.text]
    answered_first = {ids[0] for ids, r in zip(gen_h.ids, refused) if ids and not r}
    answered_first |= {ids[0] for ids in gen_s.ids if ids}
    learned = {ids[0] for ids, r in zip(gen_h.ids, refused) if ids and r}
    ids = sorted((learned | set(refusal_token_ids(tokenizer))) - answered_first)
    if not learned:
        log.warning("the original refused none of the %d search prompts; refusals are estimated from built-in "
                    "refusal openings only", len(harmful))
    if not ids:
        raise AbliterateError("no refusal opening token is left that the original does not also use to answer; "
                              "the refusal estimate would be empty. Use harmful prompts that this model refuses")
    enc = lambda texts: tokenizer(list(texts), add_special_tokens=False).input_ids  # noqa: E731
    h_ids, s_ids = enc(harmful), enc(harmless)
    p = common_prefix(h_ids + s_ids)
    p = min(p, min(len(x) for x in h_ids + s_ids) - 1)  # keep at least one token per suffix
    # teacher forcing: the first steps - 1 answer tokens (EOS-padded answers are masked beyond their end)
    cont = [(a + [a[-1] if a else tokenizer.pad_token_id] * steps)[: steps - 1] for a in gen_s.ids]
    return Probe(
        prefix=h_ids[0][:p], harmful=[x[p:] for x in h_ids], harmless=[x[p:] + c for x, c in zip(s_ids, cont)],
        ref_logprobs=gen_s.logprobs, ref_mask=gen_s.mask, refusal_ids=ids,
        baseline_refusals=sum(refused), pad_id=tokenizer.pad_token_id, batch_size=batch_size,
        answer_tokens=answer_tokens, eos=eos_ids(model, tokenizer), decode=tokenizer.decode,
    )


@dataclass
class Score:
    refusals: float  # refusals counted in short answers, plus the mean refusal-opening probability (tie-break)
    kl: float  # mean KL at the first response token
    kl_steps: float  # mean KL over the first `steps` tokens
    counted: int = 0  # refusals counted in the short answers
    mass: float = 0.0  # expected refusal openings at the first token


def score(model, probe: Probe) -> Score:
    """The cheap objectives of whatever edit is active on `model` (hooks).

    Refusals: greedy answers of `answer_tokens` tokens checked for refusal markers (a refusal
    that opens with the topic, "Creating a fake ID is illegal...", is missed by any first-token
    estimate), plus the mean probability of the model's refusal openings, in [0, 1), which
    orders trials with the same count.
    """
    answers, h = cached_greedy(model, probe.prefix, probe.harmful, probe.answer_tokens, probe.pad_id, probe.eos,
                               probe.batch_size)
    counted = sum(is_refusal(probe.decode(a, skip_special_tokens=True).strip()) for a in answers)
    p_refuse = torch.softmax(h, -1)[:, probe.refusal_ids].sum(-1)  # (N,)
    s = cached_logits(model, probe.prefix, probe.harmless, probe.steps, probe.pad_id, probe.batch_size)
    new = torch.log_softmax(s, -1)
    ref = probe.ref_logprobs[:, :, : new.shape[-1]]
    kl = (ref.exp() * (ref - new)).sum(-1) * probe.ref_mask  # (N, steps)
    mass = p_refuse.mean().item()
    return Score(counted + min(mass, 0.999), kl[:, 0].mean().item(), (kl.sum() / probe.ref_mask.sum()).item(),
                 counted, mass)


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

    @property
    def ablation(self) -> Ablation:
        return self.ablations[self.chosen.number]

    def table(self) -> list[dict]:
        return [asdict(t) for t in self.front]


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
    lines = [f"{'trial':>5} {'refusals~':>10} {'counted':>8} {'kl':>8} {'kl@4':>8}  edit"]
    for t in front:
        counted = str(t.refusals) if t.refusals is not None else "-"
        mark = "  <- chosen" if t.chosen else ""
        lines.append(f"{t.number:5d} {t.refusals_est:10.2f} {counted:>8} {t.kl:8.4f} {t.kl_steps:8.4f}  "
                     f"{describe(t.params)}{mark}")
    return "\n".join(lines)


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


STUDY_NAME = "abliterate-search"  # one study per journal file


def journal_storage(path: str | Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def run_search(model, layout: Layout, source: DirectionSource, probe: Probe, *, trials: int = 60,
               time_budget: float | None = None, options: tuple[str, ...] = DEFAULT_OPTIONS, finalists: int = 3,
               slack: int = 1, max_kl: float | None = None, study_path: str | Path | None = None,
               fingerprint: str = "", seed: int = 0, max_new_tokens: int = 32, stop_after: int | None = None,
               pick: int | None = None, ask=None) -> SearchResult:
    """Run (or resume) the study until `trials` are complete or `time_budget` seconds pass, then choose.

    The choice is the rule's (`choose`) unless the user names a trial: `pick` (any completed trial's
    number), or `ask(front, default) -> number` (e.g. `ask_terminal`). A picked trial that is not a
    finalist has its refusals counted like one.
    stop_after: stop (as if killed) after this many new trials; for tests of resuming.
    """
    import optuna

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
            answers, _ = cached_greedy(model, probe.prefix, probe.harmful, max_new_tokens, probe.pad_id, probe.eos,
                                       probe.batch_size)
        t.refusals = sum(is_refusal(probe.decode(a, skip_special_tokens=True).strip()) for a in answers)

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
                        rule)


def completed_trials(study) -> list[TrialResult]:
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        out.append(TrialResult(t.number, dict(t.params), t.values[0], t.values[1], t.user_attrs.get("kl_steps", 0.0)))
    return out
