"""`abliterate convert`: a Hugging Face model (a steered or induced output, or anyone's) as one GGUF file.

    1. check the output, load the model
    2. write the GGUF (weights, hyperparameters, tokenizer, chat template) and an Ollama Modelfile
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConvertOptions, RunConfig
from ..errors import AbliterateError
from ..export.gguf_convert import write_gguf
from ..export.llamacpp import write_modelfile
from ..export.outputs import check_loaded_output, check_model_output
from ..show.tables import print_gguf
from .options import MODEL, add_options, run_config
from .steps import load


def mount(sub) -> None:
    p = sub.add_parser("convert", help="write a Hugging Face model (e.g. a steered or induced output) as one GGUF",
                       description="Example: abliterate convert ./induced -o induced.gguf --gguf-type Q8_0. "
                       "Llama, Mistral, Qwen2/3 and Gemma2/3, with tokenizer, chat template and special tokens; "
                       "an Ollama Modelfile is written next to it.")
    add_options(p, ConvertOptions)
    add_options(p, RunConfig, MODEL + ("force", "gguf_type"))
    p.set_defaults(func=command)


def command(args) -> int:
    cfg = run_config(args)
    if not str(args.output).endswith(".gguf"):
        raise AbliterateError(f"output {args.output} should end in .gguf")
    check_model_output(args.output, args.model, cfg.force, cfg.gguf_type)  # before the slow load
    loaded, _ = load(args.model, cfg)
    if loaded.gguf_file is not None:
        raise AbliterateError(f"{args.model} is already a GGUF file; convert takes a Hugging Face model")
    check_loaded_output(args.output, loaded, cfg.force)
    summary = write_gguf(loaded.model, loaded.tokenizer, args.output, qtype=cfg.gguf_type, name=args.model,
                         force=cfg.force)
    path = Path(summary["path"])
    write_modelfile(path, loaded.tokenizer)
    print_gguf(path, {"gguf": summary})
    return 0
