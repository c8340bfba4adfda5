"""`abliterate eval` (refusals, over-refusals and KL in transformers) and `abliterate verify-gguf` (the same in
llama.cpp itself).

eval:        1. prompts  2. load the original (or use hooks)  3. evaluate it  4. evaluate the edited model
verify-gguf: 1. prompts  2. the GGUF's tokenizer and template  3. answers and next-token logits in llama.cpp
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from ..config import EvalOptions, RunConfig, VerifyOptions
from ..edit.project import ablated
from ..errors import AbliterateError
from ..export.files import to_json, write_file
from ..export.llamacpp import read_control_vector
from ..find.directions import Direction
from ..measure import llamacpp
from ..measure.capability import compare
from ..measure.evaluation import changes
from ..model.load import check_gguf
from ..show.tables import capability_table, metrics_table, samples_text
from .options import CAPABILITY, EVAL, MODEL, add_options, run_config
from .steps import (
    capability_items,
    chat_format,
    eval_sets,
    load,
    run_capability,
    run_eval,
)


def cmd_eval(args) -> int:

    cfg = run_config(args)
    harmful, harmless = eval_sets(cfg)
    cap = capability_items(cfg)
    cap_before = cap_after = None
    if args.direction and args.original:
        raise AbliterateError("give --direction (hooks on MODEL) or --original (compare two models), not both")
    direction = Direction.load(args.direction) if args.direction else None
    before = None
    if args.original:
        orig, _ = load(args.original, cfg)
        before = run_eval(orig, cfg, harmful, harmless)
        cap_before = run_capability(orig, cfg, cap) if cap else None
        del orig
    loaded, layout = load(args.model, cfg)
    if direction is not None:
        direction.check_model(layout.hidden_size, layout.n_layers)
        before = run_eval(loaded, cfg, harmful, harmless)
        cap_before = run_capability(loaded, cfg, cap) if cap else None
        with ablated(loaded.model, direction, layout):
            after = run_eval(loaded, cfg, harmful, harmless, reference=before)
            cap_after = run_capability(loaded, cfg, cap) if cap else None
    else:
        after = run_eval(loaded, cfg, harmful, harmless, reference=before)
        cap_after = run_capability(loaded, cfg, cap) if cap else None
    report = {"model": args.model, "after": after.metrics.to_dict()}
    if before is not None:
        report["before"] = before.metrics.to_dict()
        change = changes(before, after)
        report["change"] = {k: p.to_dict() for k, p in change.items()}
        print(metrics_table(before.metrics, after.metrics, change))
        print(samples_text(before, after))
    else:
        m = after.metrics
        print(f"refusals {m.rates['refusals']}, over-refusals {m.rates['over_refusals']}")
    if cap_before is not None:
        retention = compare(cap_before, cap_after)
        report["capability"] = retention.to_dict()
        print(capability_table(retention))
    elif cap_after is not None:
        report["capability"] = {"accuracy": cap_after.accuracy.to_dict()}
        print(f"capability ({len(cap_after.items)} items): {cap_after.accuracy}")
    if args.json:
        write_file(args.json, to_json(report))
    return 0


def cmd_verify_gguf(args) -> int:

    cfg = run_config(args)
    llamacpp.require()
    harmful, harmless = eval_sets(cfg)
    path = Path(args.model)
    for p in (path, Path(args.original) if args.original else None):
        if p is not None and not p.is_file():
            raise AbliterateError(f"{p} does not exist; give a .gguf file")
        if p is not None:
            check_gguf(p)

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
        print(metrics_table(before, after))
    else:
        print(f"refusals {after.rates['refusals']}, over-refusals {after.rates['over_refusals']}")
    if args.json:
        report = {"model": args.model, "original": args.original, "engine": "llama.cpp",
                  "after": after.to_dict(), "before": before.to_dict() if before else None, "answers": answers}
        write_file(args.json, json.dumps(report, indent=2))
    return 0


def mount(sub) -> None:
    p = sub.add_parser("eval", help="refusals, over-refusals and KL of a model, alone or against another",
                       description="Example: abliterate eval ./out --original ./model")
    add_options(p, EvalOptions)
    add_options(p, RunConfig, MODEL + EVAL + CAPABILITY + ("force",))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("verify-gguf", help="refusals, over-refusals and KL of a GGUF, run in llama.cpp itself",
                       description="Needs llama-cpp-python (pip install 'abliterate[llama]'). Example: "
                       "abliterate verify-gguf out.gguf --original model.gguf; with a control vector: "
                       "abliterate verify-gguf model.gguf --original model.gguf --control-vector cv.gguf "
                       "--control-scale -1")
    add_options(p, VerifyOptions)
    add_options(p, RunConfig, EVAL + ("force",))
    p.set_defaults(func=cmd_verify_gguf)
