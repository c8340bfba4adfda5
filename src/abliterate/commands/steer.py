"""`abliterate steer`, `sweep` and `induce`: add a direction instead of removing it.

steer:  1. load, direction, prompts  2. answers at strength 0 and at the strength  3. report; bake with -o
sweep:  1. load, direction, prompts  2. behaviour and coherence at each strength  3. table, PNG, JSON
induce: 1. load  2. prompts  3. activations and candidates  4. search layers and strength on held-out prompts
        5. measure on the evaluation prompts  6. bake the addition as a bias and save
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import InduceOptions, RunConfig, SteerOptions, SweepOptions
from ..edit.steer import Steering, bake_steering, parse_layers
from ..errors import AbliterateError
from ..export.files import check_output, manifest, to_json, write_file
from ..export.hf import save_model
from ..export.llamacpp import write_control_vector
from ..export.outputs import write_steering_extras
from ..find.directions import Direction
from ..find.prompts import load_prompts
from ..measure.behaviour import Behaviour, measure, sweep
from ..model.load import Loaded
from ..search.induce import Induction, default_layer_sets, induce_search
from ..show.plots import plot_sweep
from ..show.report import steer_report
from .options import ALL, FORMAT, MODEL, SAVE, add_options, options, run_config
from .steps import (
    Timer,
    chat_format,
    compute_candidates,
    eval_sets,
    load,
    split,
    write_report,
)


@dataclass
class InduceResult:
    steering: Steering
    search: Induction
    original: Behaviour  # the original on the evaluation prompts (strength 0)
    induced: Behaviour  # the steered model on the same prompts
    output: Path | None
    timings: dict[str, float]
    report: str


def induce(source: str, out: str | Path | None, cfg: RunConfig | None = None,
           opts: InduceOptions | None = None) -> InduceResult:
    """A model that refuses everything, coherently: the refusal direction added as a bias at one layer.

    The layer and strength are searched on held-out harmless prompts (see search.induce.induce_search;
    `opts` gives the layer sets, strengths and largest coherence loss); the result is measured on the
    evaluation harmless prompts and baked into the weights.
    """
    cfg = (cfg or RunConfig()).check()
    opts = opts or InduceOptions()
    layer_sets = [parse_layers(part) for part in opts.layers.split(";")] if opts.layers else None
    strengths, max_drop = floats(opts.strengths), opts.max_drop
    timer = Timer()
    _, eval_harmless = eval_sets(cfg)
    with timer("load"):
        loaded, layout = load(source, cfg)
    if out is not None:
        check_output(out, inputs=loaded.inputs, force=cfg.force)
    fmt, tok = chat_format(cfg), loaded.tokenizer
    harmful_train, _ = split(load_prompts(cfg.harmful, column=cfg.column), cfg.n_train, cfg.n_select, cfg.seed)
    # Twice the usual held-out prompts: with 16, several settings tie at 16/16 and the
    # one chosen refused 71/100 held-out prompts.
    harmless_train, harmless_sel = split(load_prompts(cfg.harmless, column=cfg.column), cfg.n_train,
                                         2 * cfg.n_select, cfg.seed, "--n-select (twice it)")
    with timer("activations"):
        cands = compute_candidates(loaded, fmt, harmful_train, harmless_train, cfg)
    if layer_sets is None:
        layer_sets = default_layer_sets(layout.n_layers) if cfg.layer is None else [(cfg.layer,)]
    with timer("search"):
        search = induce_search(loaded.model, tok, layout, cands, fmt.render_all(tok, harmless_sel),
                               layer_sets=layer_sets, strengths=strengths, max_drop=max_drop,
                               max_new_tokens=opts.search_tokens, batch_size=cfg.batch_size)
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
            info = manifest(
                "induce", source, direction=steering.direction.describe(),
                steering={"layers": list(steering.layers), "strength": steering.strength,
                          "units": "multiples of the layer's mean difference"},
                search=[asdict(b) | {"answers": b.answers[:3], "flags": b.flags[:3]} for b in search.trials],
                metrics={"original": _behaviour(original), "induced": _behaviour(induced),
                         "baseline_coherence_search": search.baseline_coherence, "max_drop": max_drop},
                config=asdict(cfg), options=asdict(opts), timings_s=timer.stages,
            )
            baked = Loaded(model, tok, loaded.source, loaded.local_dir, loaded.gguf_file)
            saved = save_model(baked, out, manifest=info, shard_size=cfg.shard_size, force=cfg.force,
                               extra=lambda tmp: write_steering_extras(tmp, steering, layout, report))
    return InduceResult(steering, search, original, induced, saved, timer.stages, report)


def _behaviour(b: Behaviour) -> dict:
    return {"rate": b.rate, "coherence": b.coherence, "degenerate": b.degenerate, "n": len(b.answers),
            "samples": b.answers[:3]}


def floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError as e:
        raise AbliterateError(f"{text!r} is not a comma-separated list of numbers, e.g. -1,0,1,2") from e
    if not all(math.isfinite(v) for v in values):
        raise AbliterateError(f"{text!r} holds a number that is not finite; give finite numbers, e.g. -1,0,1,2")
    return values


def steer_inputs(args):
    """The model, its layout, the direction, formatted prompts and the layer list, shared by steer and sweep."""

    cfg = run_config(args)
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

    cfg, loaded, layout, direction, layers, prompts, texts = steer_inputs(args)
    steering = Steering(direction, args.strength, layers).check(layout)
    if args.output:
        check_output(args.output, inputs=loaded.inputs, force=cfg.force)
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
    write_report(args, report)
    if args.control_vector:

        cv = write_control_vector(args.control_vector, {layer: steering.vector() for layer in layers}, layout)
        print(f"control vector: {cv} (llama.cpp: --control-vector {cv}; same addition as the hooks at scale 1)")
    if args.output:
        model = bake_steering(loaded.model, steering, layout)
        info = manifest("steer", args.model, direction=direction.describe(),
                        steering={"layers": list(layers), "strength": args.strength,
                                  "units": "multiples of the direction's mean difference"})
        out = save_model(Loaded(model, loaded.tokenizer, loaded.source, loaded.local_dir, loaded.gguf_file),
                         args.output, manifest=info, shard_size=cfg.shard_size, force=cfg.force,
                         extra=lambda tmp: write_steering_extras(tmp, steering, layout, report))
        print(f"\nbaked into {out}")
    return 0


def cmd_sweep(args) -> int:
    strengths = floats(args.strengths)  # before the model loads
    cfg, loaded, layout, direction, layers, prompts, texts = steer_inputs(args)
    markers = tuple(args.marker) if args.marker else None
    rows = sweep(loaded.model, loaded.tokenizer, layout, texts, direction, layers, strengths,
                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, markers=markers)
    what = "refusal" if markers is None else "marker"
    print(f"{'strength':>9} {what + ' rate':>13} {'coherence':>10} {'degenerate':>11}")
    for r in rows:
        print(f"{r.strength:9.2f} {r.rate:13.2f} {r.coherence:10.2f} {r.degenerate:11.2f}")
    if args.plot:
        print(f"plot: {plot_sweep(rows, args.plot, what)}")
    if args.json:
        write_file(args.json, to_json([vars(r) for r in rows]))
    return 0


def cmd_induce(args) -> int:

    result = induce(args.model, args.output, run_config(args), options(args, InduceOptions))
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
    write_report(args, result.report)
    if result.output:
        print(f"\nsaved to {result.output}")
    return 0


def mount(sub) -> None:
    p = sub.add_parser("steer", help="add a direction to the residual stream (hooks), or bake it with -o",
                       description="Strength multiplies the direction's mean difference: 1 moves a harmless "
                       "prompt's mean onto a harmful one's; negative subtracts; 0 is the identity. Example: "
                       "abliterate steer ./model --direction refusal.safetensors --strength 1.5 --layers 12")
    add_options(p, SteerOptions)
    add_options(p, RunConfig, MODEL + SAVE + FORMAT + ("max_new_tokens", "column"))
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("sweep", help="behaviour rate and coherence against steering strength (table and PNG)",
                       description="Example: abliterate sweep ./model --direction refusal.safetensors "
                       "--layers 12 --strengths -1,0,1,2 --plot sweep.png")
    add_options(p, SweepOptions)
    add_options(p, RunConfig, MODEL + FORMAT + ("max_new_tokens", "column", "force"))
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("induce", help="a model that refuses everything, coherently (refusal direction as a bias)",
                       description="Example: abliterate induce ./model -o ./refuses-everything")
    add_options(p, InduceOptions)
    add_options(p, RunConfig, tuple(n for n in ALL if n != "allow_overlap"))  # induce checks no overlap
    p.set_defaults(func=cmd_induce)
