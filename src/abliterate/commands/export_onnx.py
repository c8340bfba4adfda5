"""`abliterate export-onnx`: a model as the ONNX folder Transformers.js loads, checked with onnxruntime.

    1. check the output, the options and that onnx and onnxruntime are installed; load the model (float32, CPU)
    2. check its architecture and the hidden layer (default: the direction's, for a run's output)
    3. write config, generation config and tokenizer; export onnx/model.onnx; quantize when asked
    4. check every graph against transformers on a few prompts, then write the manifest and move the folder in
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from ..config import ExportOnnxOptions, RunConfig
from ..errors import AbliterateError
from ..export import onnx as ox
from ..export.files import DIRECTION, MANIFEST, check_output, manifest, to_json, write_dir_atomic
from ..find.directions import Direction
from ..find.prompts import ChatFormat
from ..model.load import Loaded, load_model
from .options import add_options, options, run_config


def mount(sub) -> None:
    p = sub.add_parser("export-onnx", help="write a model as ONNX for Transformers.js (onnx/model.onnx, key/value "
                       "cache), checked against transformers with onnxruntime",
                       description="Example: abliterate export-onnx ./abliterated -o ./web --quantize q8. "
                       "Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3 text and GPT-2, in float32 on the CPU; the "
                       "export is kept only if onnxruntime gives transformers' logits (max |dlogit| <= "
                       f"{ox.FP32_TOLERANCE:g}) and the same {ox.CHECK_TOKENS}-token greedy answers.")
    add_options(p, ExportOnnxOptions)
    add_options(p, RunConfig, ("allow_pickle", "trust_remote_code", "force"))
    p.set_defaults(func=command)


def command(args) -> int:
    cfg = run_config(args)
    opts = options(args, ExportOnnxOptions)
    kinds = ox.check_quantize([k for given in opts.quantize or () for k in given.split(",") if k])
    onnx, ort = ox.require()  # before the slow load
    # 1. float32 on the CPU: the graph is exported in float32 and onnxruntime checks it on the CPU
    loaded = load_model(opts.model, device="cpu", dtype="float32", allow_pickle=cfg.allow_pickle,
                        trust_remote_code=cfg.trust_remote_code)
    out = check_output(opts.output, inputs=loaded.inputs, force=cfg.force)
    # 2. what can be exported
    ox.check_exportable(loaded.model)
    layer = hidden_layer(loaded, opts.hidden_layer)
    prompts = check_prompts(loaded)
    external = ox.weight_bytes(loaded.model) > ox.EXTERNAL_BYTES
    checks: dict[str, ox.Check] = {}

    def fill(tmp: Path) -> None:
        # 3. the files Transformers.js reads, and the graphs
        write_configs(loaded, tmp)
        graphs = tmp / ox.ONNX_DIR
        graphs.mkdir()
        ox.export_graph(loaded.model, graphs / ox.FILES["fp32"], hidden_layer=layer)
        for kind in kinds:
            ox.quantize(graphs / ox.FILES["fp32"], kind, external)
        chunks = ox.note_external_data(tmp)
        # 4. the check; an fp32 graph that disagrees raises, and nothing is moved into place
        checks.update(ox.check_export(graphs, loaded.model, loaded.tokenizer, prompts, kinds))
        (tmp / MANIFEST).write_text(to_json(manifest(
            "export_onnx", opts.model, hidden_layer=layer, external_data=chunks,
            files={k: f"{ox.ONNX_DIR}/{ox.FILES[k]}" for k in ("fp32", *kinds)},
            check={"prompts": len(prompts), "tokens": ox.CHECK_TOKENS, "fp32_tolerance": ox.FP32_TOLERANCE,
                   **{k: c.figures() for k, c in checks.items()}},
            exporter={"name": "torch.onnx (TorchScript)", "opset": ox.OPSET},
            onnx_versions={"onnx": onnx.__version__, "onnxruntime": ort.__version__,
                           "onnxscript": _version("onnxscript")})))

    write_dir_atomic(out, fill, cfg.force)
    print_checks(out, checks, layer)
    return 0


def hidden_layer(loaded: Loaded, given: int | None) -> int | None:
    """The layer whose residual stream the graph also outputs: the one given, or the direction's own when the
    model is an abliterate output that keeps its direction, or none."""
    n_layers = ox.Shapes.of(loaded.model).layers
    if given is not None:
        if not 0 <= given < n_layers:
            raise AbliterateError(f"--hidden-layer {given} is out of range; this model has layers 0..{n_layers - 1}")
        return given
    saved = loaded.local_dir / DIRECTION if loaded.local_dir and loaded.gguf_file is None else None
    if saved is not None and saved.is_file():
        layer = Direction.load(saved).layer
        return layer if 0 <= layer < n_layers else None
    return None


def check_prompts(loaded: Loaded) -> list[list[int]]:
    """The check's prompts as token ids, with the chat template when the model has one."""
    tok = loaded.tokenizer
    fmt = ChatFormat(plain=not getattr(tok, "chat_template", None))
    return tok(fmt.render_all(tok, ox.CHECK_PROMPTS), add_special_tokens=False).input_ids


def write_configs(loaded: Loaded, tmp: Path) -> None:
    """config.json, generation_config.json, tokenizer.json and tokenizer_config.json (with the chat template, which
    Transformers.js reads there) and the tokenizer's other files. Which graphs have external data is added to
    config.json once they are written (`ox.note_external_data`)."""
    loaded.model.config.save_pretrained(tmp)
    loaded.model.generation_config.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    tok_config = tmp / "tokenizer_config.json"
    if tok_config.is_file():
        tok_config.write_text(to_json(ox.with_chat_template(tmp, json.loads(tok_config.read_text()))))
    if not (tmp / "tokenizer.json").is_file():
        raise AbliterateError(f"{loaded.source} has no fast tokenizer (tokenizer.json), which Transformers.js "
                              f"needs; save the model with a fast tokenizer (AutoTokenizer(use_fast=True)) first")


def print_checks(out: Path, checks: dict[str, ox.Check], layer: int | None) -> None:
    fp32 = checks["fp32"]
    print(f"wrote {out} (onnx/{ox.FILES['fp32']}" + "".join(f", onnx/{ox.FILES[k]}" for k in checks if k != "fp32")
          + (f"; hidden_states of layer {layer}" if layer is not None else "") + ")")
    print(f"checked with onnxruntime against transformers over {fp32.positions} positions:")
    print(f"  fp32   max |dlogit| {fp32.max_abs_logit:.2e} (tolerance {ox.FP32_TOLERANCE:g}), "
          f"greedy {ox.CHECK_TOKENS} tokens {'equal' if fp32.greedy_equal else 'DIFFERENT'}")
    for kind, c in checks.items():
        if kind != "fp32":
            print(f"  {kind:<6} top-1 agreement {c.top1:.1%}, mean KL {c.kl:.2e} nats, max |dlogit| "
                  f"{c.max_abs_logit:.2e}")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
