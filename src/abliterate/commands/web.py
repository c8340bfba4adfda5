"""`abliterate web`: a static chat page that runs an export-onnx folder in the browser (show/web.py).

    1. check the options and the output; read MODEL, --original and --direction (nothing is loaded)
    2. the runtime: Transformers.js and onnxruntime-web's wasm, pinned, from the cache or fetched once
    3. write the page folder (index.html, app.js, page.json, runtime/, models/, direction.json) and move it in
    4. with --serve, serve it on 127.0.0.1 until Ctrl-C
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..config import RunConfig, WebOptions
from ..errors import AbliterateError
from ..export.files import write_dir_atomic
from ..show import web
from .options import add_options, options, run_config


def mount(sub) -> None:
    p = sub.add_parser("web", help="write a static chat page that runs an export-onnx folder in the browser "
                       "(Transformers.js, no CDN), with the original side by side and the activation grid",
                       description="Example: abliterate export-onnx ./abliterated -o ./onnx --hidden-layer 12; "
                       "abliterate web ./onnx -o ./page --original ./onnx-original --direction "
                       "./abliterated/direction.safetensors --serve. The page answers greedily, token by token, "
                       "with the chat template; it loads nothing from outside its folder.")
    add_options(p, WebOptions)
    add_options(p, RunConfig, ("force",))
    p.set_defaults(func=command)


def command(args) -> int:
    cfg = run_config(args)  # checks -o before anything is read
    opts = options(args, WebOptions)
    if opts.max_new_tokens < 1:
        raise AbliterateError(f"--max-new-tokens {opts.max_new_tokens} must be at least 1")
    if opts.serve is not None and not 0 <= opts.serve <= 65535:
        raise AbliterateError(f"--serve {opts.serve} is not a port (0-65535); give one, e.g. --serve 8000")
    model = Path(opts.model).expanduser()
    if opts.output is None:
        if opts.serve is None:
            raise AbliterateError("give -o PAGE_DIR to write the page, or --serve [PORT] to look at it")
        if web.is_site(model):  # a page written before: serve it as it is
            web.serve(model.resolve(), opts.serve)
            return 0
    # 1. what the page shows, all checked before the runtime is fetched or a file written
    edited = web.read_onnx_folder(model, "MODEL")
    dtype = web.check_dtype(edited, opts.onnx_dtype, "MODEL")
    original = web.read_onnx_folder(opts.original, "--original") if opts.original else None
    original_dtype = web.check_dtype(original, opts.onnx_dtype or dtype, "--original") if original else None
    direction = web.read_direction(opts.direction, edited) if opts.direction else None
    if original is not None and original.hidden_size != edited.hidden_size:
        raise AbliterateError(f"--original {original.path} has hidden size {original.hidden_size}, MODEL "
                              f"{edited.hidden_size}; give the export of the model MODEL was made from")
    # 2. the runtime
    runtime = web.fetch_runtime(quiet=args.quiet)

    def fill(tmp: Path) -> None:  # 3.
        web.write_site(tmp, edited, dtype, original, original_dtype, direction, runtime, opts.max_new_tokens)

    if opts.output is None:  # --serve alone: a page in a temporary folder, removed on the way out
        with tempfile.TemporaryDirectory(prefix="abliterate-web-") as tmp:
            fill(Path(tmp))
            web.serve(Path(tmp), opts.serve)
        return 0
    out = Path(opts.output).expanduser().resolve()
    write_dir_atomic(out, fill, cfg.force)
    print(f"wrote {out}: {edited.path.name} ({dtype})" + (f" beside {original.path.name} ({original_dtype})"
          if original else "") + (f", activation grid at layer {edited.hidden_layer}" if direction else ""))
    if opts.serve is not None:  # 4.
        web.serve(out, opts.serve)
    else:
        print(f"look at it: abliterate web {out} --serve (browsers run WebAssembly only from http://, not file://)")
    return 0
