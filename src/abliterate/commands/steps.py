"""The steps several commands share, each one call of the stage modules: load the model and its layout, split
and format the prompts, collect activations, make and pick a direction, evaluate, bake. `run.py` lists them in
order."""

from __future__ import annotations

import logging
import math
import random
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig
from ..edit.project import orthogonalize_, residual_component
from ..errors import AbliterateError
from ..export.files import write_file
from ..find.activations import Activations, collect, collect_streamed
from ..find.directions import Candidates, Direction
from ..find.prompts import ChatFormat, PromptSet, load_prompts, prompts_sha256
from ..find.selection import Selection, select
from ..find.splits import Overlap, Role, SplitRecord, check_overlap
from ..measure import capability, harness
from ..measure.capability import Item, Scores, load_items, read_items
from ..measure.evaluation import Evaluation, evaluate
from ..measure.judge import Judge, JudgeResult, judge_answers
from ..measure.long import LongAnswer, LongEffects, answer_long
from ..model.arch import ArchSpec, Layout, check_layer, resolve
from ..model.forward import first_param
from ..model.load import Loaded, load_model, pick_device, pick_dtype

log = logging.getLogger(__name__)


@dataclass
class Timer:
    """Wall time per named stage; `with timer("selection"): ...` adds to that stage. `peaks_mb`: the process's
    peak resident set (MB) when each stage ended; it only grows, so the first stage that raises it is the one
    that set it (`benchmarks/bench_stream.py` reads it)."""

    stages: dict[str, float] = field(default_factory=dict)
    peaks_mb: dict[str, float] = field(default_factory=dict)

    def peak(self, name: str) -> None:
        """Record the peak resident set now, for `name`."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        self.peaks_mb[name] = round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)

    @contextmanager
    def __call__(self, name: str):
        log.info("%s ...", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start
            self.peak(name)


def load(source: str, cfg: RunConfig) -> tuple[Loaded, Layout]:
    """Step 1: the model and its resolved residual writers (fails fast on unknown layouts, and on a --layer the
    model does not have, before any activation is collected)."""
    spec = ArchSpec.from_json(cfg.arch_spec) if cfg.arch_spec else None
    loaded = load_model(source, device=cfg.device, dtype=cfg.dtype, allow_pickle=cfg.allow_pickle,
                        trust_remote_code=cfg.trust_remote_code, device_map=cfg.device_map,
                        device_memory=cfg.device_memory)
    if cfg.device_map is not None:
        from ..model.mapped import where

        log.warning("--device-map %s: the model's modules on %s", cfg.device_map, where(loaded.model))
    layout = resolve(loaded.model, spec)
    if cfg.layer is not None:
        check_layer(cfg.layer, layout.n_layers)
    return loaded, layout


def chat_format(cfg: RunConfig) -> ChatFormat:
    return ChatFormat(system=cfg.system_prompt, plain=cfg.plain_prompts)


def split(prompts: PromptSet, n_train: int, n_select: int, seed: int, held_out: str = "--n-select"
          ) -> tuple[list[str], list[str]]:
    """Shuffle once with `seed`; the first `n_select` are held out (they score candidates or trials), the next
    `n_train` make directions. `held_out` names the option that set `n_select`, for the error."""
    items = list(prompts.prompts)
    random.Random(seed).shuffle(items)
    if len(items) < n_select + 2:
        why = f"{n_select} held out ({held_out}) and 2 or more for the direction" if n_select else \
            "2 or more for the direction"
        raise AbliterateError(f"prompt set {prompts.name} has {len(items)} prompts; at least {n_select + 2} are "
                              f"needed: {why}. Add prompts" + (f" or lower {held_out}" if n_select else ""))
    return items[n_select:n_select + n_train], items[:n_select]


def open_streamed(source: str, cfg: RunConfig, n_logits: int | None = None):
    """A `model.streamed.StreamedModel` of `source` when --stream is given, or when --max-memory is and the
    model's weights do not fit it; None: the model loads whole. Reads the config, the safetensors headers and
    the 1-D tensors only. Says which path on stderr."""
    if not cfg.stream and cfg.max_memory is None:
        return None
    from ..export.streamed import Checkpoint, open_skeleton
    from ..model.streamed import StreamedModel, parse_memory, show_bytes

    budget = parse_memory(cfg.max_memory) if cfg.max_memory is not None else None
    if not cfg.stream:
        if not Path(source).expanduser().is_dir():
            log.warning("--max-memory: %s is not a local model directory, so it loads whole", source)
            return None
        ckpt = Checkpoint.open(source)
        dtype = pick_dtype(pick_device(cfg.device), cfg.dtype)
        size = sum(math.prod(s) for s in ckpt.shapes.values()) * torch.finfo(dtype).bits // 8
        if size <= budget:
            log.warning("in memory: the model's %s of weights fit --max-memory %s", show_bytes(size),
                        show_bytes(budget))
            return None
        log.warning("streamed, one block at a time: the model's %s of weights exceed --max-memory %s",
                    show_bytes(size), show_bytes(budget))
    skel = open_skeleton(source, cfg)
    if cfg.layer is not None:
        check_layer(cfg.layer, skel.layout.n_layers)
    n = n_logits or 2 * max(cfg.n_select, cfg.batch_size)
    return StreamedModel(skel, max_memory=budget, batch_size=cfg.batch_size, n_logits=n, source=source)


def collect_pair(loaded: Loaded, fmt: ChatFormat, harmful: list[str], harmless: list[str], cfg: RunConfig,
                 keep: bool = False, streamed=None) -> tuple[Activations, Activations]:
    """Step 3: activations of both sets at the post-instruction positions (per prompt too, with `keep`); with
    `streamed`, both in one pass, one block at a time."""
    tok = loaded.tokenizer
    cfg.check()
    n_pos = fmt.n_post_instruction(tok) if cfg.positions == "all" else 1
    if streamed is not None:
        assert not keep, "per-prompt activations are not streamed"
        a, b = collect_streamed(streamed, [fmt.render_all(tok, harmful), fmt.render_all(tok, harmless)],
                                n_positions=n_pos)
        return a, b
    kw = dict(n_positions=n_pos, batch_size=cfg.batch_size, keep=keep)
    a = collect(loaded.model, tok, fmt.render_all(tok, harmful), desc="harmful activations", **kw)
    b = collect(loaded.model, tok, fmt.render_all(tok, harmless), desc="harmless activations", **kw)
    return a, b


def candidates_from(loaded: Loaded, harmful: list[str], harmless: list[str], a: Activations,
                    b: Activations) -> Candidates:
    """Step 4: the difference-of-means candidates, with what they were made from."""
    meta = {
        "model": loaded.source,
        "harmful_sha256": prompts_sha256(harmful), "harmless_sha256": prompts_sha256(harmless),
        "n_harmful": len(harmful), "n_harmless": len(harmless), "activation_tokens": a.tokens + b.tokens,
    }
    n_pos = a.mean.shape[1]
    return Candidates(a.mean, b.mean, tuple(range(-n_pos, 0)), meta)


def compute_candidates(loaded: Loaded, fmt: ChatFormat, harmful: list[str], harmless: list[str],
                       cfg: RunConfig, streamed=None) -> Candidates:
    """Steps 3-4: mean activations of both sets at the post-instruction positions, and their differences."""
    a, b = collect_pair(loaded, fmt, harmful, harmless, cfg, streamed=streamed)
    return candidates_from(loaded, harmful, harmless, a, b)


@dataclass
class Splits:
    """Training prompts make the candidates; held-out ones score them (or a search's trials)."""

    harmful_train: list[str]
    harmful_select: list[str]
    harmless_train: list[str]
    harmless_select: list[str]
    select_by: str = "--n-select"  # the options that chose the select prompts


def splits(cfg: RunConfig, report: tuple[PromptSet, PromptSet] | None = None) -> Splits:
    """The fit and select prompts of --harmful and --harmless: the first --n-select (a search: --n-search) after
    one shuffle score, the next --n-train fit. With --search --search-on eval the report set (`report`, the
    evaluation prompts) scores the trials, and nothing is held out of the fit prompts for it."""
    held, by = (cfg.n_search, "--n-search") if cfg.search else (cfg.n_select, "--n-select")
    if cfg.search and cfg.search_on == "eval":
        held, by = 0, "--search-on eval"
    harmful = split(load_prompts(cfg.harmful, column=cfg.column), cfg.n_train, held, cfg.seed, by)
    harmless = split(load_prompts(cfg.harmless, column=cfg.column), cfg.n_train, held, cfg.seed, by)
    sp = Splits(harmful[0], harmful[1], harmless[0], harmless[1], by)
    if held == 0 and cfg.search:
        report = report or eval_sets(cfg)
        sp.harmful_select, sp.harmless_select = (list(s.prompts) for s in report)
    return sp


def split_record(cfg: RunConfig, sp: Splits, report: tuple[PromptSet, PromptSet]) -> SplitRecord:
    """The three sets of a run, for its manifest and the overlap check (find.splits)."""
    train = (cfg.harmful, cfg.harmless)
    evals = (cfg.eval_harmful, cfg.eval_harmless)
    fit = Role("--harmful/--harmless, --n-train, --seed", train, tuple(sp.harmful_train), tuple(sp.harmless_train))
    select = None
    if cfg.search or cfg.layer is None:  # --layer: nothing selects
        sources = evals if sp.select_by == "--search-on eval" else train
        select = Role(sp.select_by, sources, tuple(sp.harmful_select), tuple(sp.harmless_select))
    by = "--eval-harmful/--eval-harmless, --n-eval-harmful/--n-eval-harmless"
    return SplitRecord(fit, select, Role(by, evals, report[0].prompts, report[1].prompts))


def checked_splits(cfg: RunConfig, rec: SplitRecord) -> Overlap:
    """The run's overlap, refused unless --allow-overlap (or, for the select set only, --search-on eval); a loud
    line on stderr when it goes on."""
    ov = check_overlap(
        rec.overlap(), allow=cfg.allow_overlap,
        report=f"--eval-harmful {cfg.eval_harmful}, --eval-harmless {cfg.eval_harmless}",
        against=f"--harmful {cfg.harmful}, --harmless {cfg.harmless} with --seed {cfg.seed}",
        select_by_request=cfg.search and cfg.search_on == "eval")
    warn_overlap(ov)
    return ov


def warn_overlap(ov: Overlap) -> None:
    if ov.prompts:
        log.warning("warning: %d of the %d report prompts are also fit or select prompts (%s): the figures below "
                    "are in-sample, not held out", ov.prompts, ov.n_report, ov.allowed_by)


def pick_direction(loaded: Loaded, layout: Layout, cands: Candidates, sp: Splits, cfg: RunConfig, runner=None
           ) -> tuple[Direction, Selection | None]:
    """Step 5: the direction at `cfg.layer`, or the one selection picks (`runner`: find.selection's)."""
    if cfg.layer is not None:
        return cands.direction(cfg.layer, -1, cfg.projected), None
    fmt, tok = chat_format(cfg), loaded.tokenizer
    sel = select(
        loaded.model, tok, layout, cands, fmt.render_all(tok, sp.harmful_select),
        fmt.render_all(tok, sp.harmless_select), positions=cands.positions, projected=cfg.projected,
        min_layer_frac=cfg.min_layer_frac, max_layer_frac=cfg.max_layer_frac, kl_max=cfg.select_kl_max,
        batch_size=cfg.batch_size, runner=runner,
    )
    return sel.direction, sel


def find_direction(loaded: Loaded, layout: Layout, cfg: RunConfig, timer: Timer | None = None,
                   sp: Splits | None = None, streamed=None) -> tuple[Direction, Candidates, Selection | None]:
    """Steps 2-5: prompts in (`sp`, or read from cfg), one chosen direction out. With `streamed` (a
    `model.streamed.StreamedModel`, `loaded` its `.loaded`), each stage is one pass, one block at a time."""
    timer = timer or Timer()
    sp = sp or splits(cfg)
    if streamed is not None:  # the budget against the longest prompt of every stage, before a block is read
        texts = chat_format(cfg).render_all(loaded.tokenizer, sp.harmful_train + sp.harmless_train +
                                            sp.harmful_select + sp.harmless_select)
        streamed.check_budget(max(map(len, loaded.tokenizer(texts, add_special_tokens=False).input_ids)))
    with timer("activations"):
        cands = compute_candidates(loaded, chat_format(cfg), sp.harmful_train, sp.harmless_train, cfg, streamed)
    with timer("selection"):
        direction, sel = pick_direction(loaded, layout, cands, sp, cfg, runner=streamed)
    return direction, cands, sel


def eval_sets(cfg: RunConfig) -> tuple[PromptSet, PromptSet]:
    harmful = load_prompts(cfg.eval_harmful, column=cfg.column).head(cfg.n_eval_harmful)
    harmless = load_prompts(cfg.eval_harmless, column=cfg.column).head(cfg.n_eval_harmless)
    return harmful, harmless


def run_eval(loaded: Loaded, cfg: RunConfig, harmful: PromptSet, harmless: PromptSet,
             reference: Evaluation | None = None, model=None) -> Evaluation:
    """Steps 6 and 8 on `loaded.model`, or on `model` (a `model.streamed.StreamedModel`: one block at a time)."""
    fmt = chat_format(cfg)
    tok = loaded.tokenizer
    return evaluate(
        loaded.model if model is None else model, tok, fmt.render_all(tok, harmful.prompts), fmt.render_all(tok, harmless.prompts),
        harmful_prompts=list(harmful.prompts), harmless_prompts=list(harmless.prompts), reference=reference,
        max_new_tokens=cfg.max_new_tokens, kl_tokens=cfg.kl_tokens, batch_size=cfg.batch_size,
    )


@dataclass
class CapabilityItems:
    """What `--capability` asks: the items, and the exemplars for few-shot prompts (None: zero-shot)."""

    items: list[Item]
    dev: list[Item] | None
    shots: int
    protocol: str = "letter"
    quick: bool = False  # the packaged quick check (the default), not a file the user gave


def capability_items(cfg: RunConfig) -> CapabilityItems | None:
    """The --capability items, read before the model loads (None: 'none')."""
    if cfg.capability == "none":
        return None
    if cfg.capability == "quick":  # cloze: zero-shot, as lm-eval's mmlu_continuation; letter: 5-shot, as mmlu
        items, dev = capability.quick_items()
        if cfg.capability_dev:
            dev = read_items(cfg.capability_dev)
        elif cfg.capability_protocol == "cloze":
            dev = None
        return CapabilityItems(items, dev, cfg.capability_shots if dev else 0, cfg.capability_protocol, quick=True)
    dev = read_items(cfg.capability_dev) if cfg.capability_dev else None
    return CapabilityItems(load_items(cfg.capability, cfg.seed), dev, cfg.capability_shots if dev else 0,
                           cfg.capability_protocol)


def capability_record(cap: CapabilityItems, scores: Scores) -> dict:
    """What the capability figures were measured on, for the manifest and the JSON."""
    return {"items": "quick (packaged MMLU sample)" if cap.quick else "--capability", "protocol": cap.protocol,
            "shots": cap.shots, "seconds_original": round(scores.seconds, 1)}


def run_capability(loaded: Loaded, cfg: RunConfig, cap: CapabilityItems) -> Scores:
    return capability.score(loaded.model, loaded.tokenizer, cap.items, shots=cap.shots, dev_items=cap.dev,
                            batch_size=cfg.batch_size, desc="capability", protocol=cap.protocol)


def run_capability_streamed(sm, cfg: RunConfig, cap: CapabilityItems) -> Scores:
    """`run_capability` on a `model.streamed.StreamedModel`: every question's choices in one streamed pass."""
    return capability.score_streamed(sm, sm.tokenizer, cap.items, shots=cap.shots, dev_items=cap.dev,
                                     protocol=cap.protocol, batch_size=cfg.batch_size)


def capability_longest(tokenizer, cap: CapabilityItems) -> int:
    """The longest sequence `run_capability_streamed` runs (for the budget check before any block is read)."""
    seqs, _ = capability.choice_sequences(tokenizer, cap.items, shots=cap.shots, dev_items=cap.dev,
                                          protocol=cap.protocol)
    return max(map(len, seqs))


def harness_tasks(cfg: RunConfig) -> harness.Tasks | None:
    """The --tasks of lm-eval, resolved before the model loads (None when not asked)."""
    return harness.resolve(cfg.tasks) if cfg.tasks else None


def run_harness(loaded: Loaded, cfg: RunConfig, tasks: harness.Tasks) -> dict:
    return harness.run_tasks(loaded.model, loaded.tokenizer, tasks, batch_size=cfg.batch_size, limit=cfg.tasks_limit)


def long_prompts(cfg: RunConfig, harmful: PromptSet, harmless: PromptSet) -> dict[str, list[str]] | None:
    """What `--long-tokens` asks: the first --n-long prompts of each evaluation set (None when not asked)."""
    if not cfg.long_tokens:
        return None
    return {"harmful": list(harmful.prompts[:cfg.n_long]), "harmless": list(harmless.prompts[:cfg.n_long])}


def run_long(loaded: Loaded, cfg: RunConfig, prompts: dict[str, list[str]]) -> dict[str, list[LongAnswer]]:
    """Each set's long answers, judged against their first --max-new-tokens tokens."""
    fmt, tok = chat_format(cfg), loaded.tokenizer
    return {name: answer_long(loaded.model, tok, fmt.render_all(tok, ps), max_new_tokens=cfg.long_tokens,
                              head=cfg.max_new_tokens, batch_size=cfg.batch_size, desc=f"long {name} answers")
            for name, ps in prompts.items()}


def load_judge(cfg: RunConfig) -> Judge | None:
    """The --judge model (None when not asked), loaded before the model under evaluation and before anything is
    written: a judge that cannot load stops the command in one line, with nothing left behind."""
    if not cfg.judge:
        return None
    return Judge.load(cfg.judge, device=cfg.device, dtype=cfg.dtype, batch_size=min(cfg.batch_size, 8),
                      allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code,
                      calibration=cfg.judge_calibration)


def judged_texts(ev: Evaluation, long_answers: list[LongAnswer] | None) -> list[str]:
    """The answers the judge reads: the long answer where --long-tokens made one (it starts with the short one, and
    a longer answer shows what the model went on to do), the evaluation's answer elsewhere."""
    long_texts = [a.text for a in long_answers or []]
    return long_texts + list(ev.harmful.text[len(long_texts):])


def run_judge(judge: Judge, cfg: RunConfig, after: Evaluation, before: Evaluation | None = None,
              long_effects: LongEffects | None = None) -> JudgeResult:
    """The judge's verdicts on the harmful answers of the edited model (and of the original, when there is one)."""
    side = next((s for s in long_effects.sides if s.name == "harmful"), None) if long_effects else None
    n_long = len(side.edited) if side else 0
    answers = (f"{cfg.long_tokens}-token answers (--long-tokens) for the first {n_long} prompts, "
               f"{cfg.max_new_tokens}-token ones for the rest" if n_long else f"{cfg.max_new_tokens}-token answers")
    original = judged_texts(before, side.original if side else None) if before is not None else None
    return judge_answers(judge, after.harmful_prompts, judged_texts(after, side.edited if side else None), original,
                         answers=answers)


def bake(loaded: Loaded, layout: Layout, direction: Direction) -> list[str]:
    """Step 7: orthogonalize in place, then check on a real forward pass that no writer was missed."""
    edited = orthogonalize_(loaded.model, direction, layout)
    check_removed(loaded, direction, "after orthogonalization")
    return edited


def check_removed(loaded: Loaded, direction: Direction, when: str) -> None:
    """Raise when the residual stream still carries `direction` (`when`: after the bake, or with the edit's
    hooks): a module writes to the stream that the architecture spec does not list."""
    left = residual_component(loaded.model, loaded.tokenizer, direction)
    tol = 1e-3 if first_param(loaded.model).dtype == torch.float32 else 2e-2
    if left > tol:
        raise AbliterateError(
            f"{when} the residual stream still has a component {left:.2e} along the direction "
            f"(tolerance {tol:g}): some module writes to the stream that the architecture spec does not list. "
            f"Describe it with --arch-spec"
        )


def write_report(args, report: str) -> None:
    if getattr(args, "report", None):
        print(f"report: {write_file(args.report, report)}")
