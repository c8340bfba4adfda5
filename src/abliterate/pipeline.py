"""The whole job, as numbered steps. Each step is a function of the stage modules.

    1. load the model                       models.load_model
    2. load and format prompt sets          prompts
    3. collect activations                  activations.collect
    4. difference-of-means candidates       directions.Candidates
    5. select a direction                   selection.select
    6. evaluate the original                evaluation.evaluate
    7. orthogonalize the weights            edit.orthogonalize_
    8. evaluate the edited model            evaluation.evaluate
    9. save model, direction and manifest   export.save_model

With --search, steps 4-5 and 7 become: per-prompt activations -> search.run_search
(a weighted, searched edit, tried by hooks) -> ablation.apply_ablation_.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .ablation import Ablation, apply_ablation_
from .activations import Activations, collect
from .arch import ArchSpec, Layout, resolve
from .config import RunConfig
from .directions import Candidates, Direction
from .edit import orthogonalize_, residual_component
from .errors import AbliterateError
from .evaluation import Evaluation, evaluate
from .export import check_output, save_model, versions
from .gguf_convert import check_convertible, write_gguf
from .gguf_export import check_gguf_output, write_control_vector, write_edited_gguf, write_modelfile
from .inspection import LayerStats, layer_stats
from .models import Loaded, load_model
from .prompts import ChatFormat, PromptSet, load_prompts
from .refusal import is_refusal
from .report import run_report, steer_report
from .search import DirectionSource, Probe, SearchResult, ask_terminal, make_probe, parse_options, run_search
from .selection import Selection, select
from .steer import (
    INDUCE_MAX_DROP,
    INDUCE_STRENGTHS,
    Behaviour,
    Induction,
    Steering,
    bake_steering,
    default_layer_sets,
    induce_search,
    measure,
)

log = logging.getLogger(__name__)


@dataclass
class Timer:
    """Wall time per named stage; `with timer("selection"): ...` adds to that stage."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        log.info("%s ...", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start


def load(source: str, cfg: RunConfig) -> tuple[Loaded, Layout]:
    """Step 1: the model and its resolved residual writers (fails fast on unknown layouts)."""
    loaded = load_model(source, device=cfg.device, dtype=cfg.dtype, allow_pickle=cfg.allow_pickle,
                        trust_remote_code=cfg.trust_remote_code)
    spec = ArchSpec.from_json(cfg.arch_spec) if cfg.arch_spec else None
    return loaded, resolve(loaded.model, spec)


def chat_format(cfg: RunConfig) -> ChatFormat:
    return ChatFormat(system=cfg.system_prompt, plain=cfg.plain_prompts)


def split(prompts: PromptSet, n_train: int, n_select: int, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle once with `seed`; the first `n_select` score candidates, the next `n_train` make directions."""
    items = list(prompts.prompts)
    random.Random(seed).shuffle(items)
    if len(items) < n_select + 2:
        raise AbliterateError(
            f"prompt set {prompts.name} has {len(items)} prompts; at least {n_select + 2} are needed "
            f"(n_select={n_select} for selection, 2+ for directions). Add prompts or lower --n-select"
        )
    return items[n_select:n_select + n_train], items[:n_select]


def collect_pair(loaded: Loaded, fmt: ChatFormat, harmful: list[str], harmless: list[str], cfg: RunConfig,
                 keep: bool = False) -> tuple[Activations, Activations]:
    """Step 3: activations of both sets at the post-instruction positions (per prompt too, with `keep`)."""
    tok = loaded.tokenizer
    cfg.check()
    n_pos = fmt.n_post_instruction(tok) if cfg.positions == "all" else 1
    kw = dict(n_positions=n_pos, batch_size=cfg.batch_size, keep=keep)
    a = collect(loaded.model, tok, fmt.render_all(tok, harmful), desc="harmful activations", **kw)
    b = collect(loaded.model, tok, fmt.render_all(tok, harmless), desc="harmless activations", **kw)
    return a, b


def candidates_from(loaded: Loaded, harmful: list[str], harmless: list[str], a: Activations,
                    b: Activations) -> Candidates:
    """Step 4: the difference-of-means candidates, with what they were made from."""
    meta = {
        "model": loaded.source,
        "harmful_sha256": hashlib.sha256("\n".join(harmful).encode()).hexdigest(),
        "harmless_sha256": hashlib.sha256("\n".join(harmless).encode()).hexdigest(),
        "n_harmful": len(harmful), "n_harmless": len(harmless), "activation_tokens": a.tokens + b.tokens,
    }
    n_pos = a.mean.shape[1]
    return Candidates(a.mean, b.mean, tuple(range(-n_pos, 0)), meta)


def compute_candidates(loaded: Loaded, fmt: ChatFormat, harmful: list[str], harmless: list[str],
                       cfg: RunConfig) -> Candidates:
    """Steps 3-4: mean activations of both sets at the post-instruction positions, and their differences."""
    a, b = collect_pair(loaded, fmt, harmful, harmless, cfg)
    return candidates_from(loaded, harmful, harmless, a, b)


@dataclass
class Splits:
    """Training prompts make the candidates; held-out ones score them."""

    harmful_train: list[str]
    harmful_select: list[str]
    harmless_train: list[str]
    harmless_select: list[str]


def splits(cfg: RunConfig) -> Splits:
    harmful = split(load_prompts(cfg.harmful, column=cfg.column), cfg.n_train, cfg.n_select, cfg.seed)
    harmless = split(load_prompts(cfg.harmless, column=cfg.column), cfg.n_train, cfg.n_select, cfg.seed)
    return Splits(harmful[0], harmful[1], harmless[0], harmless[1])


def choose(loaded: Loaded, layout: Layout, cands: Candidates, sp: Splits, cfg: RunConfig
           ) -> tuple[Direction, Selection | None]:
    """Step 5: the direction at `cfg.layer`, or the one selection picks."""
    if cfg.layer is not None:
        return cands.direction(cfg.layer, -1, cfg.projected), None
    fmt, tok = chat_format(cfg), loaded.tokenizer
    sel = select(
        loaded.model, tok, layout, cands, fmt.render_all(tok, sp.harmful_select),
        fmt.render_all(tok, sp.harmless_select), positions=cands.positions, projected=cfg.projected,
        min_layer_frac=cfg.min_layer_frac, max_layer_frac=cfg.max_layer_frac, kl_max=cfg.select_kl_max,
        batch_size=cfg.batch_size,
    )
    return sel.direction, sel


def find_direction(loaded: Loaded, layout: Layout, cfg: RunConfig, timer: Timer | None = None
                   ) -> tuple[Direction, Candidates, Selection | None]:
    """Steps 2-5: prompts in, one chosen direction out."""
    timer = timer or Timer()
    sp = splits(cfg)
    with timer("activations"):
        cands = compute_candidates(loaded, chat_format(cfg), sp.harmful_train, sp.harmless_train, cfg)
    with timer("selection"):
        direction, sel = choose(loaded, layout, cands, sp, cfg)
    return direction, cands, sel


def eval_sets(cfg: RunConfig) -> tuple[PromptSet, PromptSet]:
    harmful = load_prompts(cfg.eval_harmful, column=cfg.column).head(cfg.n_eval_harmful)
    harmless = load_prompts(cfg.eval_harmless, column=cfg.column).head(cfg.n_eval_harmless)
    return harmful, harmless


def run_eval(loaded: Loaded, cfg: RunConfig, harmful: PromptSet, harmless: PromptSet,
             reference: Evaluation | None = None) -> Evaluation:
    fmt = chat_format(cfg)
    tok = loaded.tokenizer
    return evaluate(
        loaded.model, tok, fmt.render_all(tok, harmful.prompts), fmt.render_all(tok, harmless.prompts),
        harmful_prompts=list(harmful.prompts), harmless_prompts=list(harmless.prompts), reference=reference,
        max_new_tokens=cfg.max_new_tokens, kl_tokens=cfg.kl_tokens, batch_size=cfg.batch_size,
    )


def bake(loaded: Loaded, layout: Layout, direction: Direction) -> list[str]:
    """Step 7: orthogonalize in place, then check on a real forward pass that no writer was missed."""
    edited = orthogonalize_(loaded.model, direction, layout)
    left = residual_component(loaded.model, loaded.tokenizer, direction)
    tol = 1e-3 if next(loaded.model.parameters()).dtype == torch.float32 else 2e-2
    if left > tol:
        raise AbliterateError(
            f"after orthogonalization the residual stream still has a component {left:.2e} along the direction "
            f"(tolerance {tol:g}): some module writes to the stream that the architecture spec does not list. "
            f"Describe it with --arch-spec"
        )
    return edited


@dataclass
class RunResult:
    direction: Direction
    before: Evaluation
    after: Evaluation
    selection: Selection | None
    output: Path | None
    timings: dict[str, float]
    manifest: dict
    report: str  # report.html, self-contained
    search: SearchResult | None = None


def side_by_side(before: Evaluation, after: Evaluation) -> dict:
    """Every evaluation prompt with the original's and the edited model's answers."""
    def rows(prompts, a, b):
        return [{"prompt": p, "original": x, "edited": y,
                 "original_refused": is_refusal(x), "edited_refused": is_refusal(y)}
                for p, x, y in zip(prompts, a.text, b.text)]
    return {"harmful": rows(before.harmful_prompts, before.harmful, after.harmful),
            "harmless": rows(before.harmless_prompts, before.harmless, after.harmless)}


def manifest_for(loaded: Loaded, cfg: RunConfig, direction: Direction, selection: Selection | None,
                 before: Evaluation, after: Evaluation, edited: list[str], timings: dict) -> dict:
    return {
        "kind": "abliterate.run",
        "model": loaded.source,
        "direction": direction.describe(),
        "config": asdict(cfg),
        "edited_tensors": edited,
        "selection": selection.table() if selection else None,
        "selection_note": selection.note if selection else None,
        "metrics": {"before": before.metrics.to_dict(), "after": after.metrics.to_dict()},
        "samples": [{"prompt": a["prompt"], "before": a["response"], "after": b["response"]}
                    for a, b in zip(before.samples(3), after.samples(3))],
        "timings_s": timings,
        "versions": versions(),
        "seed": cfg.seed,
    }


def study_path(cfg: RunConfig, out: str | Path | None) -> Path | None:
    if cfg.study:
        return Path(cfg.study).expanduser()
    return Path(str(out).rstrip("/") + ".study") if out is not None else None


@dataclass
class SearchSetup:
    """What every trial of a search needs: the directions' sources and the scoring prompts."""

    cands: Candidates
    source: DirectionSource
    probe: Probe
    options: tuple[str, ...]
    fingerprint: str  # model, prompts (the search's as formatted: template and system prompt included)


def search_setup(loaded: Loaded, cfg: RunConfig, timer: Timer) -> SearchSetup:
    """Steps 2-4 of a search: activations of the direction prompts, and the original on the prompts that score
    trials (held out of the direction prompts, or the evaluation prompts with --search-on eval)."""
    fmt, tok = chat_format(cfg), loaded.tokenizer
    held_out = 0 if cfg.search_on == "eval" else cfg.n_search
    harmful, harmful_search = split(load_prompts(cfg.harmful, column=cfg.column), cfg.n_train, held_out, cfg.seed)
    harmless, harmless_search = split(load_prompts(cfg.harmless, column=cfg.column), cfg.n_train, held_out,
                                      cfg.seed)
    if cfg.search_on == "eval":  # Heretic's way: trials are scored on the prompts the evaluation reports
        harmful_search, harmless_search = (list(s.prompts) for s in eval_sets(cfg))
    options = parse_options(cfg.search_options)
    positions = "all" if "position" in options else "last"
    with timer("activations"):
        a, b = collect_pair(loaded, fmt, harmful, harmless, replace(cfg, positions=positions), keep=True)
        cands = candidates_from(loaded, harmful, harmless, a, b)
    source = DirectionSource(a.per_prompt, a.mean, b.mean)
    harmful_search, harmless_search = fmt.render_all(tok, harmful_search), fmt.render_all(tok, harmless_search)
    with timer("search set-up"):
        probe = make_probe(loaded.model, tok, harmful_search, harmless_search, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size)
    fingerprint = hashlib.sha256(json.dumps([loaded.source, cands.meta["harmful_sha256"],
                                             cands.meta["harmless_sha256"], harmful_search, harmless_search,
                                             cfg.max_new_tokens]).encode()).hexdigest()
    return SearchSetup(cands, source, probe, options, fingerprint)


def search_edit(loaded: Loaded, layout: Layout, cfg: RunConfig, timer: Timer, out: str | Path | None
                ) -> tuple[Direction, Candidates, SearchResult]:
    """Steps 2-5 and the edit's parameters, by search: held-out prompts score every trial."""
    setup = search_setup(loaded, cfg, timer)
    cands = setup.cands
    with timer("search"):
        result = run_search(
            loaded.model, layout, setup.source, setup.probe, trials=cfg.trials, time_budget=cfg.time_budget,
            options=setup.options, finalists=cfg.finalists, slack=cfg.slack, max_kl=cfg.max_kl,
            study_path=study_path(cfg, out), fingerprint=setup.fingerprint, seed=cfg.seed,
            max_new_tokens=cfg.max_new_tokens, **pick_from(cfg),
        )
    p = result.chosen.params
    direction = cands.direction(min(round(p["direction"]), cands.n_layers - 1), int(p.get("position", -1)),
                                bool(p["projected"]))
    direction.meta["search"] = "the main direction of a searched edit; the whole edit is ablation.safetensors"
    return direction, cands, result


def pick_from(cfg: RunConfig) -> dict:
    """run_search's choice arguments for --pick: a trial number, the terminal, or the rule."""
    if cfg.pick.isdigit():
        return {"pick": int(cfg.pick)}
    on_terminal = sys.stdin.isatty() and sys.stdout.isatty()
    return {"ask": ask_terminal} if cfg.pick == "ask" or (cfg.pick == "auto" and on_terminal) else {}


def bake_ablation(loaded: Loaded, layout: Layout, ablation: Ablation) -> list[str]:
    """Step 7 of a search: the chosen weighted edit, baked."""
    return apply_ablation_(loaded.model, ablation, layout)


def run(source: str, out: str | Path | None, cfg: RunConfig | None = None) -> RunResult:
    """Steps 1-9: abliterate `source` and save it to `out` (None: evaluate only, save nothing)."""
    cfg = (cfg or RunConfig()).check()
    timer = Timer()
    torch.manual_seed(cfg.seed)
    eval_harmful, eval_harmless = eval_sets(cfg)  # bad prompt files fail before the model loads
    to_gguf = out is not None and str(out).endswith(".gguf")
    if to_gguf:  # also before loading: the input itself as output, or an existing file
        check_gguf_output(out, Path(source).expanduser(), cfg.force)
    with timer("load"):
        loaded, layout = load(source, cfg)
    if out is not None:
        check_outputs(out, loaded, cfg)
    selection = searched = None
    if cfg.search:
        direction, cands, searched = search_edit(loaded, layout, cfg, timer, out)
    else:
        direction, cands, selection = find_direction(loaded, layout, cfg, timer)
    with timer("evaluate original"):
        before = run_eval(loaded, cfg, eval_harmful, eval_harmless)
    with timer("orthogonalize"):
        edited = bake_ablation(loaded, layout, searched.ablation) if searched else bake(loaded, layout, direction)
    with timer("evaluate edited"):
        after = run_eval(loaded, cfg, eval_harmful, eval_harmless, reference=before)
    manifest = manifest_for(loaded, cfg, direction, selection, before, after, edited, timer.stages)
    if searched:
        manifest["search"] = search_manifest(searched)
    report = run_report(source, direction, before, after, selection, timer.stages)
    saved = None
    if to_gguf:
        with timer("save"):
            saved = save_gguf(loaded, layout, out, direction, edited, manifest, cfg, cands=cands, report=report,
                              searched=searched)
    elif out is not None:
        with timer("save"):
            def extra(tmp: Path) -> None:
                direction.save(tmp / "direction.safetensors", cands)
                for rel, ablation in (search_files(searched) if searched else {}).items():
                    ablation.save(tmp / rel)
                (tmp / "metrics.json").write_text(json.dumps(manifest["metrics"], indent=2))
                (tmp / "generations.json").write_text(json.dumps(side_by_side(before, after), indent=2))
                (tmp / "report.html").write_text(report)

            saved = save_model(loaded, out, manifest=manifest, extra=extra, shard_size=cfg.shard_size,
                               force=cfg.force)
    return RunResult(direction, before, after, selection, saved, timer.stages, manifest, report, searched)


ABLATION_FILE = "ablation.safetensors"


def edit_file(r: SearchResult, number: int, prefix: str = "") -> str:
    """Where checked trial `number`'s edit is saved, relative to the manifest (prefix: 'NAME.' beside a GGUF
    file): the chosen one in ABLATION_FILE, the other finalists under finalists/."""
    return prefix + (ABLATION_FILE if number == r.chosen.number else f"finalists/trial-{number}.{ABLATION_FILE}")


def search_files(r: SearchResult, prefix: str = "") -> dict[str, Ablation]:
    """Every checked trial's edit, by the path it is saved at."""
    return {edit_file(r, n, prefix): ablation for n, ablation in r.ablations.items()}


def search_manifest(r: SearchResult, prefix: str = "") -> dict:
    """Everything needed to see and reproduce the choice: the edit's parameters and where its tensors are
    (the chosen edit's, and every finalist's for `apply --manifest --trial N`)."""
    checked = r.finalists + ([r.chosen] if r.chosen not in r.finalists else [])
    return {
        "chosen": asdict(r.chosen), "rule": r.rule, "ablation_file": edit_file(r, r.chosen.number, prefix),
        "front": r.table(),
        "finalists": [asdict(t) | {"ablation_file": edit_file(r, t.number, prefix)} for t in checked],
        "trials": len(r.trials),
        "baseline_refusals": r.baseline_refusals, "n_harmful": r.n_harmful, "n_harmless": r.n_harmless,
        "study": r.study, "wall_s": r.wall_s,
    }


def check_outputs(out: str | Path, loaded: Loaded, cfg: RunConfig) -> bool:
    """Refuse an output that cannot or must not be written, before long work. True for a GGUF file output."""
    if not str(out).endswith(".gguf"):
        check_output(out, loaded.local_dir, loaded.gguf_file, cfg.force)
        return False
    if loaded.gguf_file is not None:
        check_gguf_output(out, loaded.gguf_file, cfg.force)
        return True
    check_convertible(loaded.model)  # a Hugging Face model written as a new GGUF
    out = check_gguf_output(out, Path(loaded.source), cfg.force)
    if loaded.local_dir is not None and out.is_relative_to(loaded.local_dir.resolve()):
        raise AbliterateError(f"output {out} is inside the input model's directory {loaded.local_dir}; "
                              f"write it somewhere else")
    return True


def save_gguf(loaded: Loaded, layout: Layout, out: str | Path, direction: Direction, edited: list[str],
              manifest: dict, cfg: RunConfig, cands: Candidates | None = None, report: str | None = None,
              ablation: Ablation | None = None, searched: SearchResult | None = None) -> Path:
    """Step 9 for a GGUF output: the edited copy of a GGUF input, or a Hugging Face model written whole
    (weights in `cfg.gguf_type`); then the companions next to it (NAME.*)."""
    if loaded.gguf_file is not None:
        summary = write_edited_gguf(loaded.gguf_file, out, loaded.model, layout, edited,
                                    fallback_type=cfg.gguf_fallback_type, force=cfg.force)
    else:
        summary = write_gguf(loaded.model, loaded.tokenizer, out, qtype=cfg.gguf_type, name=loaded.source,
                             force=cfg.force)
    path = Path(summary["path"])
    manifest["gguf"] = {k: v for k, v in summary.items() if k != "path"}
    stem = path.with_suffix("")
    direction.save(stem.with_name(stem.name + ".direction.safetensors"), cands)
    if searched is not None:  # a run's search: every checked trial's edit
        manifest["search"] = search_manifest(searched, prefix=stem.name + ".")
        for rel, saved in search_files(searched, prefix=stem.name + ".").items():
            saved.save(stem.parent / rel)
    elif ablation is not None:  # an apply of a searched edit
        name = stem.name + "." + ABLATION_FILE
        ablation.save(stem.with_name(name))
        manifest["search"]["ablation_file"] = name
    stem.with_name(stem.name + ".manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    if report is not None:
        stem.with_name(stem.name + ".report.html").write_text(report)
    write_modelfile(path, loaded.tokenizer)
    return path


def write_steering_extras(tmp: Path, steering: Steering, layout: Layout, report: str) -> None:
    """Beside a baked steering: the direction, the report and, where llama.cpp can express it, a control vector."""
    steering.direction.save(tmp / "direction.safetensors")
    (tmp / "report.html").write_text(report)
    if layout.spec.gguf_arch and min(steering.layers) >= 2:
        vectors = {layer: steering.vector() for layer in steering.layers}
        write_control_vector(tmp / "control_vector.gguf", vectors, layout)


@dataclass
class InduceResult:
    steering: Steering
    search: Induction
    original: Behaviour  # the original on the evaluation prompts (strength 0)
    induced: Behaviour  # the steered model on the same prompts
    output: Path | None
    timings: dict[str, float]
    report: str


def induce(source: str, out: str | Path | None, cfg: RunConfig | None = None, *,
           layer_sets: list[tuple[int, ...]] | None = None, strengths: tuple[float, ...] = INDUCE_STRENGTHS,
           max_drop: float = INDUCE_MAX_DROP) -> InduceResult:
    """A model that refuses everything, coherently: the refusal direction added as a bias at one layer.

    The layer and strength are searched on held-out harmless prompts (see steer.induce_search);
    the result is measured on the evaluation harmless prompts and baked into the weights.
    """
    cfg = (cfg or RunConfig()).check()
    timer = Timer()
    _, eval_harmless = eval_sets(cfg)
    with timer("load"):
        loaded, layout = load(source, cfg)
    if out is not None:
        check_output(out, loaded.local_dir, loaded.gguf_file, cfg.force)
    fmt, tok = chat_format(cfg), loaded.tokenizer
    harmful_train, _ = split(load_prompts(cfg.harmful, column=cfg.column), cfg.n_train, cfg.n_select, cfg.seed)
    # Twice the usual held-out prompts: with 16, several settings tie at 16/16 and the
    # one chosen refused 71/100 held-out prompts.
    harmless_train, harmless_sel = split(load_prompts(cfg.harmless, column=cfg.column), cfg.n_train,
                                         2 * cfg.n_select, cfg.seed)
    with timer("activations"):
        cands = compute_candidates(loaded, fmt, harmful_train, harmless_train, cfg)
    if layer_sets is None:
        layer_sets = default_layer_sets(layout.n_layers) if cfg.layer is None else [(cfg.layer,)]
    with timer("search"):
        search = induce_search(loaded.model, tok, layout, cands, fmt.render_all(tok, harmless_sel),
                               layer_sets=layer_sets, strengths=list(strengths), max_drop=max_drop,
                               batch_size=cfg.batch_size)
    chosen = search.chosen
    steering = Steering(cands.direction(chosen.layers[len(chosen.layers) // 2]), chosen.strength, chosen.layers)
    texts = fmt.render_all(tok, eval_harmless.prompts)
    kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    with timer("evaluate"):
        original = measure(loaded.model, tok, layout, texts, Steering(steering.direction, 0.0, steering.layers), **kw)
        induced = measure(loaded.model, tok, layout, texts, steering, **kw)
    info = {"layers": ", ".join(map(str, steering.layers)), "strength per layer": f"{steering.strength:.3f}",
            "units": "multiples of the layer's mean difference",
            "coherence of the original's answers (search prompts)": f"{search.baseline_coherence:.3f}",
            "largest coherence loss allowed": max_drop,
            "wall time": ", ".join(f"{k} {v:.1f} s" for k, v in timer.stages.items())}
    report = steer_report(f"abliterate induce: {source}", source, info, original, induced,
                          list(eval_harmless.prompts), trials=search.trials)
    saved = None
    if out is not None:
        with timer("save"):
            model = bake_steering(loaded.model, steering, layout)
            manifest = {
                "kind": "abliterate.induce", "model": source, "direction": steering.direction.describe(),
                "steering": {"layers": list(steering.layers), "strength": steering.strength,
                             "units": "multiples of the layer's mean difference"},
                "search": [asdict(b) | {"answers": b.answers[:3], "flags": b.flags[:3]} for b in search.trials],
                "metrics": {"original": _behaviour(original), "induced": _behaviour(induced),
                            "baseline_coherence_search": search.baseline_coherence, "max_drop": max_drop},
                "config": asdict(cfg), "versions": versions(), "timings_s": timer.stages,
            }
            baked = Loaded(model, tok, loaded.source, loaded.local_dir, loaded.gguf_file)
            saved = save_model(baked, out, manifest=manifest, shard_size=cfg.shard_size, force=cfg.force,
                               extra=lambda tmp: write_steering_extras(tmp, steering, layout, report))
    return InduceResult(steering, search, original, induced, saved, timer.stages, report)


def _behaviour(b: Behaviour) -> dict:
    return {"rate": b.rate, "coherence": b.coherence, "degenerate": b.degenerate, "n": len(b.answers),
            "samples": b.answers[:3]}


@dataclass
class Inspection:
    stats: list[LayerStats]
    direction: Direction  # the chosen (or given) direction, marked in the stats
    selection: Selection | None
    candidates: Candidates


def inspect_layers(loaded: Loaded, layout: Layout, cfg: RunConfig, direction: Direction | None = None,
                   timer: Timer | None = None) -> Inspection:
    """Steps 2-5 as `find_direction` runs them, keeping per-prompt activations for the layer geometry.

    Without `direction`, the chosen layer is the one a run would choose (same prompts, same selection).
    """
    timer = timer or Timer()
    sp = splits(cfg)
    if direction is not None:
        direction.check_model(layout.hidden_size, layout.n_layers)
    with timer("activations"):
        a, b = collect_pair(loaded, chat_format(cfg), sp.harmful_train, sp.harmless_train, cfg, keep=True)
        cands = candidates_from(loaded, sp.harmful_train, sp.harmless_train, a, b)
    selection = None
    if direction is None:
        with timer("selection"):
            direction, selection = choose(loaded, layout, cands, sp, cfg)
    p = cands.positions.index(direction.position) if direction.position in cands.positions else -1
    stats = layer_stats(a.per_prompt[:, :, p], b.per_prompt[:, :, p], direction, selection)
    return Inspection(stats, direction, selection, cands)
