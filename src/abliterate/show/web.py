"""`abliterate web`: a static chat page that runs an exported ONNX model in the browser, with Transformers.js.

The page (PAGE_DIR/index.html, app.js) loads its runtime from PAGE_DIR/runtime/ and its models from
PAGE_DIR/models/, never from a CDN, so it works offline from the written folder (served from localhost:
browsers do not run WebAssembly modules from file:// pages).

The runtime is Transformers.js (`@huggingface/transformers`: the tokenizer, the chat template, greedy
generation with the key/value cache, the token streamer) and the WebAssembly build of onnxruntime it was
built against (`onnxruntime-web`, whose .wasm the library fetches from jsDelivr unless told otherwise).
Both come from the npm registry as pinned tarballs whose sha512 is written below (the registry's
`integrity`), fetched once into the cache on first use, with a message; no npm is needed. Why at first use
and not when the package is built: the wheel stays pure Python and small (the wasm alone is 27 MB), an
install without network still has every other command, and the files are checked against their hashes on
every use, as the packaged reference model is (model/packaged.py).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import sys
import tarfile
import typing
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import AbliterateError
from ..export.files import write_file
from ..export.onnx import FILES, ONNX_DIR, data_chunks, with_chat_template
from ..model.packaged import cache_dir


@dataclass(frozen=True)
class NpmPackage:
    """One pinned npm tarball and the files of it the page needs (path in the tarball -> name in runtime/)."""

    name: str
    version: str
    integrity: str  # the registry's dist.integrity: sha512 of the tarball, base64
    files: dict

    @property
    def url(self) -> str:
        return f"https://registry.npmjs.org/{self.name}/-/{self.name.split('/')[-1]}-{self.version}.tgz"

    @property
    def tarball(self) -> Path:
        return cache_dir() / "web" / f"{self.name.replace('/', '+')}-{self.version}.tgz"


# transformers.min.js bundles onnxruntime-web's JavaScript (ort.webgpu.bundle) and its jinja and tokenizers;
# the WebAssembly it loads is the asyncify build of the exact onnxruntime-web version it names.
RUNTIME = (
    NpmPackage("@huggingface/transformers", "4.3.2",
               "sha512-V3+dqf3iWlRYJ9I9GreM3zGQd0lAXnnoPeddmkOQYWAEE4l/+Fi6p7tx/qVUJlKQgLXGim2W76rTOzz+eC0i7g==",
               {"package/dist/transformers.min.js": "transformers.min.js",
                "package/LICENSE": "LICENSE.transformers.txt"}),
    NpmPackage("onnxruntime-web", "1.31.0-dev.20260914-8d85527a0",
               "sha512-Iy7rtadoBgxS/LLvDr3QW38DB1PNXRnr0GJMcL0TAt7c9qjgVQl83UlGCVyeAnK2InpmW8Uc3PL8XIuqtDeF6g==",
               {"package/dist/ort-wasm-simd-threaded.asyncify.mjs": "ort-wasm-simd-threaded.asyncify.mjs",
                "package/dist/ort-wasm-simd-threaded.asyncify.wasm": "ort-wasm-simd-threaded.asyncify.wasm",
                "package/README.md": "README.onnxruntime-web.md"}),
)
RUNTIME_DIR = "runtime"
MODELS_DIR = "models"
DIRECTION_JSON = "direction.json"
PAGE_CONFIG = "page.json"
PAGE_FILES = ("index.html", "app.js")
DTYPES = tuple(FILES)  # fp32, q8, q4, fp16: Transformers.js's names
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "manifest.json")


def _sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch_runtime(quiet: bool = False) -> dict[str, bytes]:
    """The runtime files (name in runtime/ -> bytes), from the pinned tarballs: cached, else fetched once from
    the npm registry with a message. A tarball whose hash is not the pinned one is an error, cached or not."""
    files: dict[str, bytes] = {}
    for pkg in RUNTIME:
        path = pkg.tarball
        if path.is_file():
            data = path.read_bytes()
            if _sha512(data) != pkg.integrity:
                raise AbliterateError(f"the cached {pkg.name} {pkg.version} ({path}) does not match its pinned "
                                      f"sha512; delete it and rerun: it is fetched again")
        else:
            if not quiet:
                print(f"fetching {pkg.name} {pkg.version} from the npm registry, once, into {path.parent} "
                      f"(the page's runtime; see docs/onnx.md)", file=sys.stderr)
            try:
                with urllib.request.urlopen(pkg.url, timeout=120) as r:
                    data = r.read()
            except OSError as e:
                raise AbliterateError(f"cannot fetch {pkg.url} ({e}); `abliterate web` needs the npm registry "
                                      f"once, or the file at {path}") from e
            if _sha512(data) != pkg.integrity:
                raise AbliterateError(f"{pkg.url} does not match its pinned sha512 ({pkg.integrity[:20]}...); "
                                      f"nothing was kept")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, data)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member, name in pkg.files.items():
                files[name] = tar.extractfile(member).read()
    return files


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class OnnxFolder:
    """An export-onnx folder: its path, hidden size, the dtypes it has, and the layer of its hidden_states."""

    path: Path
    hidden_size: int
    dtypes: tuple[str, ...]
    hidden_layer: int | None

    def graph(self, dtype: str) -> Path:
        return self.path / ONNX_DIR / FILES[dtype]


def read_onnx_folder(path: str | Path, what: str) -> OnnxFolder:
    """An export-onnx output, or the one-line error that says what is missing and how to make it."""
    path = Path(path).expanduser()
    fix = f"make it with `abliterate export-onnx MODEL -o {path}`"
    if not path.is_dir():
        raise AbliterateError(f"{what} {path} is not a directory; {fix}")
    dtypes = tuple(d for d in DTYPES if (path / ONNX_DIR / FILES[d]).is_file())
    if not dtypes:
        raise AbliterateError(f"{what} {path} has no ONNX graph ({ONNX_DIR}/{FILES['fp32']}); {fix}")
    try:
        config = json.loads((path / "config.json").read_text())
        hidden = int(config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
                     or config["n_embd"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AbliterateError(f"{what} {path} has no readable config.json with a hidden size ({e}); {fix}") from e
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            raise AbliterateError(f"{what} {path} has no {name}; {fix}")
    layer = None
    try:
        layer = json.loads((path / "manifest.json").read_text()).get("hidden_layer")
    except (OSError, ValueError, AttributeError):
        pass
    return OnnxFolder(path, hidden, dtypes, layer if isinstance(layer, int) else None)


def check_dtype(folder: OnnxFolder, dtype: str | None, what: str) -> str:
    """The dtype the page loads: the one asked for if the folder has it; by default fp32, else the first there."""
    if dtype is None:
        return "fp32" if "fp32" in folder.dtypes else folder.dtypes[0]
    if dtype not in DTYPES:
        raise AbliterateError(f"--onnx-dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if dtype not in folder.dtypes:
        raise AbliterateError(f"{what} {folder.path} has no {dtype} graph ({ONNX_DIR}/{FILES[dtype]}; it has "
                              f"{', '.join(folder.dtypes)}); export it with --quantize {dtype} or pick --onnx-dtype "
                              f"{folder.dtypes[0]}")
    return dtype


def read_direction(path: str | Path, folder: OnnxFolder) -> dict:
    """A direction file (abliterate's safetensors) as the page's JSON: its unit vector, its layer, and the layer
    of the model's hidden_states output it is projected on; checked against the model's hidden size."""
    from ..find.directions import Direction

    direction = Direction.load(path)
    if direction.vector.numel() != folder.hidden_size:
        raise AbliterateError(f"--direction {path} has {direction.vector.numel()} dimensions, but {folder.path} has "
                              f"hidden size {folder.hidden_size}; give a direction of this model")
    if folder.hidden_layer is None:
        raise AbliterateError(f"{folder.path} has no hidden_states output for the activation grid; export it with "
                              f"`abliterate export-onnx MODEL -o DIR --hidden-layer {direction.layer}`")
    v = direction.vector.double()
    return {"vector": (v / v.norm()).tolist(), "direction_layer": direction.layer,
            "hidden_layer": folder.hidden_layer, "source": str(Path(path).name)}


# ---------------------------------------------------------------- the site


def _place(src: Path, dst: Path) -> None:
    """dst as a hard link to src when they share a file system (an ONNX graph can be gigabytes), else a copy.
    The page never writes to its model files, so the link cannot change the user's export."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_model(folder: OnnxFolder, dtype: str, dst: Path) -> None:
    """The files Transformers.js reads for one dtype: configs, tokenizer, the graph and its external data."""
    for name in MODEL_FILES:
        if (folder.path / name).is_file():
            _place(folder.path / name, dst / name)
    # an export from before export-onnx put the template there: the page's copy gets it (the user's is kept)
    config = json.loads((folder.path / "tokenizer_config.json").read_text())
    if with_chat_template(folder.path, config) is not config:
        (dst / "tokenizer_config.json").unlink()
        (dst / "tokenizer_config.json").write_text(json.dumps(with_chat_template(folder.path, config), indent=2))
    graph = folder.graph(dtype)
    for src in (graph, *data_chunks(graph)):
        _place(src, dst / ONNX_DIR / src.name)


def write_site(tmp: Path, edited: OnnxFolder, dtype: str, original: OnnxFolder | None, original_dtype: str | None,
               direction: dict | None, runtime: dict[str, bytes], max_new_tokens: int) -> None:
    """Fill `tmp` with the page: index.html, app.js, page.json, runtime/, models/ and direction.json."""
    assets = resources.files("abliterate.show") / "webpage"
    for name in PAGE_FILES:
        (tmp / name).write_bytes((assets / name).read_bytes())
    for name, data in runtime.items():
        (tmp / RUNTIME_DIR).mkdir(exist_ok=True)
        (tmp / RUNTIME_DIR / name).write_bytes(data)
    models = [{"id": "edited", "label": edited.path.name, "dtype": dtype, "hidden_layer": edited.hidden_layer}]
    copy_model(edited, dtype, tmp / MODELS_DIR / "edited")
    if original is not None:
        models.append({"id": "original", "label": original.path.name, "dtype": original_dtype,
                       "hidden_layer": original.hidden_layer})
        copy_model(original, original_dtype, tmp / MODELS_DIR / "original")
    if direction is not None:
        (tmp / DIRECTION_JSON).write_text(json.dumps(direction))
    (tmp / PAGE_CONFIG).write_text(json.dumps({
        "models": models, "direction": DIRECTION_JSON if direction else None, "max_new_tokens": max_new_tokens,
        "runtime": {p.name: p.version for p in RUNTIME}}, indent=2))


# ---------------------------------------------------------------- serving


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map: typing.ClassVar[dict] = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".mjs": "text/javascript", ".js": "text/javascript", ".json": "application/json",
                      ".onnx": "application/octet-stream", ".onnx_data": "application/octet-stream"}

    def end_headers(self):
        # cross-origin isolation lets onnxruntime use threads (SharedArrayBuffer); no cache, so a rebuilt page is
        # the one seen
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):  # the base class's signature
        if not getattr(self.server, "quiet", False):
            super().log_message(format, *args)


def server(site: Path, port: int = 0, quiet: bool = True) -> http.server.ThreadingHTTPServer:
    """An HTTP server of `site` on 127.0.0.1 (port 0: any free one); the caller runs serve_forever()."""
    handler = functools.partial(_Handler, directory=str(site))
    try:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as e:
        raise AbliterateError(f"cannot serve on 127.0.0.1:{port} ({e.strerror}); give another --serve PORT") from e
    httpd.quiet = quiet
    return httpd


def serve(site: Path, port: int) -> None:
    """Serve `site` on localhost until Ctrl-C."""
    httpd = server(site, port, quiet=False)
    print(f"serving {site} at http://127.0.0.1:{httpd.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:  # the way to stop it: not an error
        print("stopped")
    finally:
        httpd.server_close()


def is_site(path: Path) -> bool:
    return (path / PAGE_CONFIG).is_file() and all((path / n).is_file() for n in PAGE_FILES)

