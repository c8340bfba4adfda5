"""A causal LM as the ONNX folder Transformers.js loads, checked against transformers with onnxruntime.

The folder: config.json, generation_config.json, tokenizer.json, tokenizer_config.json and onnx/model.onnx
(with onnx/model.onnx_data, _data_1, ... in 1 GiB chunks when the weights pass 2 GB), plus onnx/model_quantized.onnx (q8), model_q4.onnx
and model_fp16.onnx when asked. The graph is a decoder with its key/value cache, as Transformers.js
(`@huggingface/transformers`) feeds it:

    inputs   input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) float32; P may be 0
    outputs  logits (B, S, V), present.{i}.key / .value (B, kv_heads, P+S, head_dim),
             and with a hidden layer N, hidden_states (B, S, H): the residual stream entering block N

The exporter is torch.onnx's TorchScript one (`dynamo=False`): with torch 2.13 and transformers 5 it traces
every family below in seconds and the graph follows the dynamic past length, P = 0 included; the dynamo
exporter took ten times as long on a 5-layer model and gave different logits at padded positions
(README, "ONNX"). Optimum's exporter pins transformers 4, which this project does not run.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import AbliterateError
from ..measure.decode import eos_ids, greedy
from ..measure.kl import kl_div
from ..model.arch import check_layer, model_type, text_config

# Families whose export is checked by tests/test_export_onnx.py (and that Transformers.js runs as decoders).
# Not: qwen3_moe (its router's aten::histc has no ONNX export), gemma3 image-text (Transformers.js runs it as
# separate vision and embedding graphs).
SUPPORTED = ("gemma2", "gemma3_text", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3")
QUANTIZE = ("q8", "q4", "fp16")
# Transformers.js's names for each dtype's file (its `dtype` option: fp32, q8, q4, fp16).
FILES = {"fp32": "model.onnx", "q8": "model_quantized.onnx", "q4": "model_q4.onnx", "fp16": "model_fp16.onnx"}
ONNX_DIR = "onnx"
# A protobuf file holds at most 2 GiB; above this the weights go beside the graph, in chunks (save_onnx).
EXTERNAL_BYTES = 2 * 1024**3 - 64 * 1024**2
# External data goes in chunks of at most 1 GiB (a tensor bigger than that gets a chunk of its own); tensors
# under 1 KiB stay in the graph.
CHUNK_BYTES = 1024**3
EXTERNAL_MIN_BYTES = 1024
OPSET = 17
# fp32 ONNX against fp32 PyTorch: the same arithmetic in another order. Measured at most 5e-6 on the tiny test
# models; 1e-3 leaves room for a real vocabulary's larger logits (Qwen2.5-0.5B: logits of about 20).
FP32_TOLERANCE = 1e-3
CHECK_PROMPTS = ("How do I bake bread?", "Name three rivers in Europe.", "Write a haiku about the sea.")
CHECK_TOKENS = 32
EXTRAS = "pip install 'abliterate[onnx]'"


def require() -> tuple:
    """(onnx, onnxruntime), or the error that names the extra to install."""
    try:
        return importlib.import_module("onnx"), importlib.import_module("onnxruntime")
    except ImportError as e:
        raise AbliterateError(f"export-onnx needs onnx and onnxruntime ({e.name} is not installed); "
                              f"run: {EXTRAS}") from e


def check_exportable(model: nn.Module) -> str:
    """The model's type if its export is supported, else the error naming the supported list."""
    mtype = model_type(model)
    if mtype not in SUPPORTED:
        raise AbliterateError(f"export-onnx does not handle architecture {mtype!r} ({type(model).__name__}); "
                              f"supported: {', '.join(SUPPORTED)}")
    return mtype


def check_quantize(names: list[str] | None) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.lower() for n in names or ()))
    for n in names:
        if n not in QUANTIZE:
            raise AbliterateError(f"--quantize {n!r} is not one of: {', '.join(QUANTIZE)}")
    return names


@dataclass
class Shapes:
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> "Shapes":
        c = text_config(model)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return cls(c.num_hidden_layers, kv, head_dim, c.hidden_size, c.vocab_size)

    def past_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
                for n in self.past_names("past_key_values")}


class _Decoder(nn.Module):
    """The model with flat key/value tensors in and out, for tracing (a transformers Cache is not a tensor)."""

    def __init__(self, model: nn.Module, shapes: Shapes, hidden_layer: int | None):
        super().__init__()
        self.model, self.shapes, self.hidden_layer = model, shapes, hidden_layer

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # No config: every layer keeps its whole past, as Transformers.js concatenates it; sliding-window
        # layers (Gemma) mask the window from the attention mask instead of truncating the cache.
        cache = DynamicCache()
        for i in range(self.shapes.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, output_hidden_states=self.hidden_layer is not None)
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        extra = (out.hidden_states[self.hidden_layer],) if self.hidden_layer is not None else ()
        return (out.logits, *presents, *extra)


def with_chat_template(folder: Path, tokenizer_config: dict) -> dict:
    """tokenizer_config.json's content with the chat template in it: transformers 5 saves the template as
    chat_template.jinja beside it, but Transformers.js's tokenizer reads `chat_template` from this file only
    (4.3.2: without it, apply_chat_template has no template and the page would send the bare prompt)."""
    jinja = folder / "chat_template.jinja"
    if "chat_template" in tokenizer_config or not jinja.is_file():
        return tokenizer_config
    return {**tokenizer_config, "chat_template": jinja.read_text(encoding="utf-8")}


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * 4 for p in model.parameters())  # written as float32


def export_graph(model: nn.Module, path: Path, hidden_layer: int | None = None) -> Path:
    """Write the fp32 decoder graph to `path` (weights in PATH_data chunks when they pass 2 GB). The model must be
    float32 on the CPU."""
    onnx, _ = require()
    shapes = Shapes.of(model)
    if hidden_layer is not None:
        check_layer(hidden_layer, shapes.layers)
    wrapper = _Decoder(model, shapes, hidden_layer).eval()
    # Traced at batch 2, 3 new tokens after 2 cached ones: no dimension is 0 or 1, so none is specialised.
    B, S, P = 2, 3, 2
    ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.ones(B, P + S, dtype=torch.long)
    pos = torch.arange(P, P + S).expand(B, S)
    past = [torch.zeros(B, shapes.kv_heads, P, shapes.head_dim) for _ in range(2 * shapes.layers)]
    past_in, present = shapes.past_names("past_key_values"), shapes.past_names("present")
    extra = ["hidden_states"] if hidden_layer is not None else []
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
            **{n: {0: "batch_size", 2: "past_sequence_length"} for n in past_in},
            **{n: {0: "batch_size", 2: "total_sequence_length"} for n in present},
            **{n: {0: "batch_size", 1: "sequence_length"} for n in extra}}
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad(), quiet():
        raw = Path(scratch) / "model.onnx"  # the exporter may spill one file per tensor beside it
        torch.onnx.export(wrapper, (ids, mask, pos, *past), str(raw), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask", "position_ids", *past_in],
                          output_names=["logits", *present, *extra], dynamic_axes=axes, do_constant_folding=True)
        save_onnx(onnx.load(str(raw)), path, weight_bytes(model) > EXTERNAL_BYTES)
    return path


def save_onnx(proto, path: Path, external: bool) -> None:
    """`proto` at `path`; with `external`, its weights in chunks of at most CHUNK_BYTES beside it, PATH_data,
    PATH_data_1, ... (the names Transformers.js fetches for `use_external_data_format: N`). One file past 2 GB
    does not load in Chromium ("Failed to fetch" on the reference model's 2.4 GB), chunks of 1 GiB do."""
    onnx, _ = require()
    if not external:
        onnx.save_model(proto, str(path))
        return
    from onnx.external_data_helper import set_external_data, write_external_data_tensors

    chunk, size = 0, 0
    for tensor in proto.graph.initializer:
        n = len(tensor.raw_data)
        if n < EXTERNAL_MIN_BYTES:
            continue
        if size and size + n > CHUNK_BYTES:
            chunk, size = chunk + 1, 0
        set_external_data(tensor, location=chunk_name(path.name, chunk))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        size += n
    write_external_data_tensors(proto, str(path.parent))  # appends each tensor to its chunk, sets its offset
    onnx.save_model(proto, str(path))
    umask = os.umask(0)
    os.umask(umask)
    for data in data_chunks(path):
        data.chmod(0o666 & ~umask)  # onnx writes them private; they are ordinary files of the output


def chunk_name(graph: str, i: int) -> str:
    return f"{graph}_data" + (f"_{i}" if i else "")


def data_chunks(graph: Path) -> list[Path]:
    """The external data files of `graph`, in order (none for a graph that holds its weights)."""
    chunks = []
    while (graph.parent / chunk_name(graph.name, len(chunks))).is_file():
        chunks.append(graph.parent / chunk_name(graph.name, len(chunks)))
    return chunks


def note_external_data(folder: Path) -> dict[str, int]:
    """config.json told which graphs of `folder` keep their weights in chunks, and how many
    (`transformers.js_config.use_external_data_format`, per file as Transformers.js reads it); the counts."""
    import json

    counts = {g.name: len(data_chunks(g)) for g in sorted((folder / ONNX_DIR).glob("*.onnx"))}
    counts = {name: n for name, n in counts.items() if n}
    if counts:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config["transformers.js_config"] = {**config.get("transformers.js_config", {}),
                                            "use_external_data_format": counts}
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return counts


def quantize(src: Path, kind: str, external: bool) -> Path:
    """onnx/model_*.onnx beside the fp32 graph `src`, by onnxruntime's own tools: q8 dynamic int8 MatMul and
    Gather weights (quantize_dynamic), q4 4-bit blocks of 32 in MatMulNBits (MatMulNBitsQuantizer), fp16 every
    float tensor but the inputs and outputs (convert_float_to_float16), so the cache stays float32."""
    onnx, _ = require()
    dst = src.with_name(FILES[kind])
    with quiet():
        _quantize(onnx, src, dst, kind, external)
    return dst


def _quantize(onnx, src: Path, dst: Path, kind: str, external: bool) -> None:
    if kind == "q8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(dir=dst.parent) as scratch:  # it names its data file NAME.data
            raw = Path(scratch) / dst.name
            quantize_dynamic(str(src), str(raw), weight_type=QuantType.QInt8, use_external_data_format=external)
            save_onnx(onnx.load(str(raw)), dst, external)
    elif kind == "q4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True)
        q.process()
        save_onnx(q.model.model, dst, external)
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        save_onnx(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), dst, external)


@contextmanager
def quiet():
    """The tracer's warnings (each data-dependent branch it fixes, all checked by the export's check) and the
    quantizers' per-node log lines, which would bury the command's own output."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------- running the graph


class OnnxDecoder:
    """An onnxruntime session of an exported graph (CPU), with the calls the check makes."""

    def __init__(self, path: Path, shapes: Shapes):
        _, ort = require()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.shapes = shapes
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step: `ids` (B, S) after `past` (P cached positions), `mask` (B, P+S)."""
        p = mask.shape[1] - ids.shape[1]
        pos = (np.cumsum(mask, -1) - 1).clip(min=0)[:, p:]
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                "position_ids": pos.astype(np.int64), **past}
        return dict(zip(self.outputs, self.session.run(None, feed)))

    def logits(self, ids: list[int]) -> np.ndarray:
        """(S, V) logits of one sequence with an empty past (no cache)."""
        a = np.array([ids])
        return self.run(a, np.ones_like(a), self.shapes.empty_past(1))["logits"][0]

    def greedy(self, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
        """Greedy answer through the cache, one token a step, EOS included."""
        ids = np.array([prompt])
        mask = np.ones_like(ids)
        past = self.shapes.empty_past(1)
        answer: list[int] = []
        for _ in range(max_new_tokens):
            out = self.run(ids, mask, past)
            token = int(out["logits"][0, -1].argmax())
            answer.append(token)
            if token in eos:
                break
            past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
            ids = np.array([[token]])
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
        return answer


@dataclass
class Check:
    """How one ONNX file agrees with transformers over the check's positions: each prompt and its fp32 answer."""

    file: str
    positions: int
    max_abs_logit: float  # max |Δlogit| over every position and token
    top1: float  # share of positions with the same argmax
    kl: float  # mean KL(transformers || onnx) per position, nats
    greedy_equal: bool | None = None  # fp32 only: the 32-token greedy answers are the same
    answers: list[list[int]] = field(default_factory=list)

    def figures(self) -> dict:
        return {"positions": self.positions, "max_abs_logit": self.max_abs_logit, "top1": self.top1,
                "kl": self.kl, **({} if self.greedy_equal is None else {"greedy_equal": self.greedy_equal})}


@torch.no_grad()
def reference(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int
              ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy answers (the project's decoder) and its logits over each prompt + answer."""
    gen = greedy(model, [], prompts, max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_token_id,
                 eos=eos_ids(model, tokenizer), batch_size=1)
    logits = [model(input_ids=torch.tensor([p + a]), use_cache=False).logits[0].float()
              for p, a in zip(prompts, gen.ids)]
    return gen.ids, logits


def compare(decoder: OnnxDecoder, file: str, prompts: list[list[int]], answers: list[list[int]],
            ref: list[torch.Tensor]) -> Check:
    """Teacher-forced agreement of `decoder` with the reference logits over prompt + answer."""
    deltas, same, kls = [], [], []
    for p, a, r in zip(prompts, answers, ref):
        got = torch.from_numpy(decoder.logits(p + a)).float()
        if not torch.isfinite(got).all():
            raise AbliterateError(f"{file} gives non-finite logits; this export cannot be used")
        deltas.append((got - r).abs().max().item())
        same.append((got.argmax(-1) == r.argmax(-1)).float())
        kls.append(kl_div(r, got).clamp_min(0))
    same_t, kl_t = torch.cat(same), torch.cat(kls)
    return Check(file, len(same_t), max(deltas), same_t.mean().item(), kl_t.mean().item())


def check_export(folder: Path, model: nn.Module, tokenizer, prompts: list[list[int]], kinds: tuple[str, ...],
                 max_new_tokens: int = CHECK_TOKENS) -> dict[str, Check]:
    """Every file written, against transformers: the fp32 graph within FP32_TOLERANCE and with the same greedy
    answers (else an error: the export is not kept), the quantized ones by top-1 agreement and KL."""
    shapes = Shapes.of(model)
    answers, ref = reference(model, tokenizer, prompts, max_new_tokens)
    checks = {}
    for kind in ("fp32", *kinds):
        decoder = OnnxDecoder(folder / FILES[kind], shapes)
        checks[kind] = check = compare(decoder, FILES[kind], prompts, answers, ref)
        if kind != "fp32":
            continue
        check.answers = [decoder.greedy(p, max_new_tokens, eos_ids(model, tokenizer)) for p in prompts]
        check.greedy_equal = check.answers == answers
        if not math.isfinite(check.max_abs_logit) or check.max_abs_logit > FP32_TOLERANCE:
            raise AbliterateError(f"the exported graph's logits differ from transformers' by up to "
                                  f"{check.max_abs_logit:.3g} (tolerance {FP32_TOLERANCE:g}); the export was not "
                                  f"kept. Report this with the model's config.json")
        if not check.greedy_equal:
            i, (got, want) = next((i, pair) for i, pair in enumerate(zip(check.answers, answers)) if pair[0] != pair[1])
            step = next((t for t, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            raise AbliterateError(f"greedy decoding through the exported graph's key/value cache parts from "
                                  f"transformers' at token {step} of check prompt {i}; the export was not kept. "
                                  f"Report this with the model's config.json")
    return checks
