"""The forward pass one decoder block at a time, for models bigger than memory (directions --stream).

The in-memory path (`model.forward`) runs every batch through the whole model. Here the order is turned
around: every batch's hidden states go through block 0, then block 1, and so on. Each block's weights are
read from the safetensors shards (`export.streamed.Checkpoint`), used by every batch of the pass, and put back
on the meta device, so a stage loads each block once. The model is the checkpoint's skeleton
(`export.streamed.open_skeleton`: on the meta device, its 1-D tensors real), and everything is run by the
model's own modules:

- the token embedding is run on the rows the prompts use, read from its shard alone (a compact table);
- what a block receives (the causal and padding mask of each attention type, the rotary cos/sin, position
  ids, GPT-2's position embedding added to the stream) comes from the decoder's own forward, run once per
  batch with every block replaced by a recorder that keeps its arguments and passes the stream on;
- the final norm is the decoder's forward again, with the final stream put in at block 0; the head reads its
  rows in slices no bigger than a block, for the last position only.

Interventions are the in-memory hooks (`edit.project.ablated`, `added`) installed on the skeleton: they
sit on the modules the materialized weights fill, so each stream of a pass runs under its own hooks.

Evaluation (run --stream): `greedy` is `measure.decode.greedy` with every batch of a pass advancing together, so
a step reads every block and the head once; each block fills its layer of each batch's key/value cache.
`forced_logits` gives the teacher-forced logits the KL needs. Both in the in-memory batches, so the same answers
and figures.

Memory (`Budget`): the largest block, twice while it is read (the copy and the shard's mapped pages), the
hidden states of every stream of a pass, one batch's block temporaries, and the head's slice and logits; a
generation's pass also its key/value caches and step logits. A pass whose streams do not fit is split into several
passes (each loads every block once, per step for a generation).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..errors import AbliterateError
from .arch import text_config
from .forward import Batch, id_batches
from .load import resident_bytes, trim_heap

log = logging.getLogger(__name__)

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str, option: str = "--max-memory") -> int:
    """Bytes in `text` ("512MB", "8GB", "1.5GiB"); an error naming the value and the form otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise AbliterateError(f"{option} {text!r} is not a size; give a number and a unit, e.g. 512MB or 8GB "
                              f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def show_bytes(n: float) -> str:
    """`n` bytes in the largest unit, rounded up (a budget shown is never less than the one meant)."""
    for unit in ("GB", "MB", "KB"):
        if n >= _UNITS[unit]:
            digits = 1 if n < 10 * _UNITS[unit] else 0
            return f"{math.ceil(n / _UNITS[unit] * 10**digits) / 10**digits:.{digits}f}{unit}"
    return f"{math.ceil(n)}B"


Hooks = Callable[[nn.Module], AbstractContextManager]  # model -> the hooks of an intervention, as a context manager


@dataclass
class Stream:
    """One prompt list (token ids) run through the model under one intervention's hooks (None: none)."""

    ids: list[list[int]]
    hooks: Hooks | None = None

    def __call__(self, model: nn.Module) -> AbstractContextManager:
        return self.hooks(model) if self.hooks is not None else nullcontext()


@dataclass
class _Item:
    """One batch of one stream, as it goes through the blocks."""

    stream: int
    batch: Batch
    hidden: torch.Tensor | None = None  # (B, T, H), the stream entering the next block
    calls: list | None = None  # per block: (args after the hidden states, kwargs), as the decoder passes them


@dataclass
class Budget:
    """Bytes a pass holds, by part (see the module docstring)."""

    block: int  # the largest decoder block, in the load dtype
    fixed: int  # the other embeddings (GPT-2's positions) and the skeleton's 1-D tensors
    head: int  # one head slice, and the logits of one stream and of the baseline
    per_token: int  # hidden states kept between blocks: H * itemsize per token of every batch of the pass
    work_per_token: int  # a block's temporaries per token of the batch it runs (MLP, q/k/v, attention output)
    score_per_entry: int  # attention scores: per (token, key position) of the batch, times the heads
    kv_per_token: int = 0  # a generation's key/value cache: every block's keys and values of one token
    logits_per_row: int = 0  # a generation step's logits of one prompt, and their log-softmax (float32)

    def needed(self, tokens: int, batch_tokens: int, width: int, cache_tokens: int = 0, rows: int = 0) -> int:
        """A pass holding `tokens` tokens of hidden states, running batches of `batch_tokens` tokens, `width` wide;
        a generation's pass also holds the key/value cache of `cache_tokens` tokens and the logits of `rows`
        prompts at each step."""
        work = batch_tokens * (self.work_per_token + self.score_per_entry * width)
        return (2 * self.block + self.fixed + self.head + self.per_token * tokens + work
                + self.kv_per_token * cache_tokens + self.logits_per_row * rows)


class StreamedModel:
    """A checkpoint's model run one block at a time (`run`), within `max_memory` bytes if given."""

    def __init__(self, skel, max_memory: int | None = None, batch_size: int = 32, n_logits: int = 64,
                 option: str = "--max-memory", source: str | None = None):
        """`n_logits`: the most prompts of one stream whose logits are asked for (for the budget)."""
        self.skel, self.max_memory, self.batch_size, self.option = skel, max_memory, batch_size, option
        self.source = source or str(skel.ckpt.root)
        self.n_logits = n_logits
        model, layout = skel.model.eval(), skel.layout  # eval: GPT-2's dropout off, as load_model has it
        self.model, self.layout, self.tokenizer = model, layout, skel.tokenizer
        self.config = text_config(model)
        path = layout.spec.layers.rsplit(".", 1)[0]
        self.decoder = model.get_submodule(path)  # the module whose forward runs the blocks (its `layers`)
        self.blocks = [b.module for b in layout.blocks]
        self.block_names = [f"{layout.spec.layers}.{i}" for i in range(len(self.blocks))]
        self.token_embedding = model.get_input_embeddings()
        self._real_buffers()
        self._stored = [self._disk_names(i) for i in range(len(self.blocks))]  # before any weight is read
        self._token_name = self._disk_name(self._param_name(self.token_embedding.weight))
        head = layout.lm_head
        self._head_name = self._disk_name(self._param_name(head.weight))  # a tied head: the embedding's name
        self.vocab, self.hidden_size = head.weight.shape
        self.itemsize = torch.finfo(skel.dtype).bits // 8
        self.budget = self._budget()
        # The resident set the stream keeps to: what the process holds before any block (imports, skeleton) and
        # the budget. Past it, freed memory goes back to the system after a block (`trim_heap`).
        rss = resident_bytes()
        self.rss_cap = rss + max_memory if max_memory is not None and rss is not None else None
        self.trims = 0

    # -- what is where ------------------------------------------------------------------------------------------

    def _param_name(self, param: torch.Tensor) -> str:
        return next(n for n, p in self.model.named_parameters(remove_duplicate=False) if p is param)

    def _disk_name(self, name: str) -> str:
        from ..export.streamed import stored

        names = stored(self.model, name, self.model.get_parameter(name)).names
        if len(names) == 1 and names[0] in self.skel.ckpt.where:
            return names[0]
        raise AbliterateError(f"{name} is not in {self.skel.ckpt.root} under the name this transformers gives it "
                              f"({', '.join(names)}); leave out --stream")

    def _real_buffers(self) -> None:
        """In place: the skeleton's non-persistent buffers (rotary frequencies, Gemma's embedding scale) made
        real and computed as `from_pretrained` computes them (`_init_weights` of the modules that own them)."""
        owners = {}
        for name, buf in self.model.named_non_persistent_buffers():
            if buf.device.type == "meta":
                set_module_tensor_to_device(self.model, name, self.skel.device,
                                            value=torch.empty_like(buf, device=self.skel.device))
                owners[name.rsplit(".", 1)[0] if "." in name else ""] = True
        for path in owners:
            self.model._init_weights(self.model.get_submodule(path))
        bad = [n for n, b in self.model.named_buffers() if b.device.type == "meta" or
               (b.is_floating_point() and not torch.isfinite(b).all())]
        assert not bad, f"buffers not made real: {bad}"

    def _block_params(self, i: int) -> list[tuple[str, torch.Tensor]]:
        """Block i's parameters still on the meta device (its 2-D and larger weights), by full model name."""
        return [(f"{self.block_names[i]}.{n}", p) for n, p in self.blocks[i].named_parameters()
                if p.device.type == "meta"]

    def _disk_names(self, i: int) -> list:
        from ..export.streamed import stored

        try:
            return [stored(self.model, n, p) for n, p in self._block_params(i)]
        except AbliterateError as e:
            raise AbliterateError(f"the streamed forward cannot read block {i}: {e}") from e

    def block_bytes(self, i: int) -> int:
        return sum(p.numel() for _, p in self._block_params(i)) * self.itemsize

    def _budget(self) -> Budget:
        cfg = self.config
        block = max(self.block_bytes(i) for i in range(len(self.blocks)))
        others = [m for m in self.layout.embedding_modules if m is not self.token_embedding]
        fixed = sum(p.numel() for m in others for p in m.parameters()) * self.itemsize
        fixed += sum(p.numel() * p.element_size() for p in self.model.parameters() if p.device.type != "meta")
        rows = self._head_rows()
        head = rows * self.hidden_size * self.itemsize + 2 * self.n_logits * self.vocab * 4
        inter = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * self.hidden_size)
        moe = int(getattr(cfg, "num_experts_per_tok", 1) or 1)
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        work = (3 * moe * inter + 6 * self.hidden_size) * self.itemsize  # gate, up, their product; q, k, v, out
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or self.hidden_size // heads)
        kv = len(self.blocks) * 2 * kv_heads * head_dim * self.itemsize  # keys and values of every block
        return Budget(block, fixed, head, self.hidden_size * self.itemsize, work, 2 * heads * self.itemsize, kv,
                      2 * self.vocab * 4)

    def _head_rows(self) -> int:
        """Head rows per slice: a slice is no bigger than a block (so the head does not raise the peak)."""
        block = max(self.block_bytes(i) for i in range(len(self.blocks)))
        return max(1, min(self.vocab, block // (self.hidden_size * self.itemsize)))

    # -- memory ---------------------------------------------------------------------------------------------------

    def groups(self, items: list[_Item]) -> list[list[_Item]]:
        """The passes: consecutive items whose hidden states fit `max_memory` together (all in one without it)."""
        def need(part: list[_Item]) -> int:
            t = part[-1].batch.input_ids.shape[1]
            return self.budget.needed(sum(it.batch.input_ids.numel() for it in part), self.batch_size * t, t)

        return self._split(items, lambda it: it.batch, need, "one batch of prompts")

    def generation_passes(self, batches: list[Batch], prefix: int, new: int) -> list[list[Batch]]:
        """The passes of a generation: consecutive batches whose hidden states, key/value cache (the shared prefix
        once, and each row's prefix, prompt and `new` tokens) and step logits fit `max_memory` together."""
        def need(part: list[Batch]) -> int:
            t = max(b.input_ids.shape[1] for b in part)
            cache = prefix + sum(len(b.index) * (prefix + b.input_ids.shape[1] + new) for b in part)
            return self.budget.needed(sum(b.input_ids.numel() for b in part), self.batch_size * t, prefix + t + new,
                                      cache, sum(len(b.index) for b in part))

        return self._split(batches, lambda b: b, need, f"one batch of prompts with its key/value cache for {new} "
                                                        f"new tokens")

    def _split(self, items: list, batch_of: Callable, need: Callable[[list], int], what: str) -> list[list]:
        """`items` in consecutive passes whose `need(items of the pass)` fits `max_memory` (one pass without it);
        when one item alone does not fit, an error naming the smallest budget that works."""
        if self.max_memory is None:
            return [items]
        out, cur = [], []
        for it in items:
            if cur and need(cur + [it]) > self.max_memory:
                out.append(cur)
                cur = []
            if not cur and need([it]) > self.max_memory:
                smallest = need([it])
                b, t = batch_of(it).input_ids.shape
                raise AbliterateError(
                    f"{self.option} {show_bytes(self.max_memory)} is too small for one block of this model and {what}: "
                    f"the smallest budget that works is {show_bytes(smallest)} (largest block "
                    f"{show_bytes(self.budget.block)}, read twice over, plus one batch of {b} x {t} tokens): give "
                    f"{self.option} {show_bytes(smallest)} or more, or a smaller --batch-size")
            cur.append(it)
        return out + [cur] if cur else out

    def check_budget(self, longest: int) -> None:
        """Before any block is read: one batch of `longest` tokens must fit (`groups` gives the error)."""
        fake = _Item(0, Batch([0] * self.batch_size, torch.zeros(self.batch_size, longest, dtype=torch.long),
                              torch.ones(self.batch_size, longest, dtype=torch.long)))
        self.groups([fake])

    def check_generation(self, longest: int, new: int) -> None:
        """Before any block is read: one batch of `longest`-token prompts generating `new` tokens must fit."""
        fake = Batch([0] * self.batch_size, torch.zeros(self.batch_size, longest, dtype=torch.long),
                     torch.ones(self.batch_size, longest, dtype=torch.long))
        self.generation_passes([fake], 0, new)

    # -- weights in and out --------------------------------------------------------------------------------------

    @contextmanager
    def _materialized(self, i: int):
        """Block i's weights read from the shards for the block; back on the meta device on exit."""
        from ..export.streamed import _cast

        params = self._block_params(i)
        wheres = self._stored[i]
        tensors = iter(self.skel.ckpt.read([name for w in wheres for name in w.names]))
        try:
            for (name, p), w in zip(params, wheres):
                pieces = [_cast(next(tensors), self.skel.dtype) for _ in w.names]
                value = torch.stack(pieces) if w.stacked else pieces[0]
                if tuple(value.shape) != tuple(p.shape):
                    raise AbliterateError(f"{name} is {tuple(value.shape)} in {self.skel.ckpt.root} but the model "
                                          f"expects {tuple(p.shape)}; re-download or re-save the model")
                set_module_tensor_to_device(self.model, name, self.skel.device, value=value)
                del pieces, value
            yield self.blocks[i]
        finally:
            for name, _ in params:
                set_module_tensor_to_device(self.model, name, "meta")
            self._after_block()

    def _after_block(self) -> None:
        """Trim the heap when the resident set is over `rss_cap` (`load.trim_heap` says why)."""
        if self.rss_cap is not None and (resident_bytes() or 0) > self.rss_cap and trim_heap():
            self.trims += 1

    @contextmanager
    def _token_rows(self, ids: torch.Tensor):
        """The token embedding holding only the rows `ids` uses (they index it, in order), for the block."""
        emb = self.token_embedding
        table = torch.empty(len(ids), self.hidden_size, dtype=self.skel.dtype)
        shard = self.skel.ckpt.where[self._token_name]
        with safe_open(str(self.skel.ckpt.root / shard), "pt") as f:
            sl = f.get_slice(self._token_name)
            for j, r in enumerate(ids.tolist()):
                table[j] = sl[r:r + 1][0].to(self.skel.dtype)
        meta_weight, padding_idx = emb.weight, emb.padding_idx
        try:
            emb._parameters["weight"] = nn.Parameter(table.to(self.skel.device), requires_grad=False)
            emb.padding_idx = None  # it indexes the whole table (and matters only to gradients)
            yield emb
        finally:
            emb._parameters["weight"], emb.padding_idx = meta_weight, padding_idx

    @contextmanager
    def _other_embeddings(self):
        """The embeddings besides the tokens' (GPT-2's positions) read whole, for the block: the decoder's
        forward runs them."""
        others = [(self._param_name(p), p) for m in self.layout.embedding_modules if m is not self.token_embedding
                  for p in m.parameters() if p.is_meta]
        try:
            for name, p in others:
                set_module_tensor_to_device(self.model, name, self.skel.device, value=self.skel.read(name, p))
            yield
        finally:
            for name, _ in others:
                set_module_tensor_to_device(self.model, name, "meta")

    # -- the decoder's own arguments ---------------------------------------------------------------------------------

    @contextmanager
    def _recorders(self, calls: list, start: list, inject: torch.Tensor | None = None):
        """Every block replaced by a recorder: block i appends its (args, kwargs) to `calls`, block 0 its input
        hidden states to `start` and, with `inject`, passes `inject` on instead."""
        def recorder(i):
            def forward(*args, **kwargs):
                if args:
                    h, rest = args[0], args[1:]
                else:
                    h, rest = kwargs.pop("hidden_states"), ()
                calls.append((rest, kwargs))
                if i == 0:
                    start.append(h)
                    if inject is not None:
                        return inject
                return h
            return forward
        try:
            for i, block in enumerate(self.blocks):
                block.forward = recorder(i)
            yield
        finally:
            for block in self.blocks:
                del block.forward

    def _decoder(self, batch: Batch, embeds: torch.Tensor, inject: torch.Tensor | None = None):
        """The decoder's forward on one batch, as `model.forward.forward` calls the model (positions count real
        tokens), with recorders for blocks: (the stream entering block 0, each block's arguments, the output)."""
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
        h, calls, out = self._recorded(embeds, inject, attention_mask=batch.attention_mask, position_ids=position_ids,
                                       use_cache=False)
        return h, calls, out.last_hidden_state

    def _recorded(self, embeds: torch.Tensor, inject: torch.Tensor | None = None, **kwargs):
        """The decoder's forward on `embeds` with `kwargs` (a generation's: its mask, positions and key/value
        cache), with recorders for blocks: (the stream entering block 0, each block's arguments, the output)."""
        calls, start = [], []
        with self._recorders(calls, start, inject):
            out = self.decoder(inputs_embeds=embeds, **kwargs)
        assert len(calls) == len(self.blocks), f"the decoder ran {len(calls)} of {len(self.blocks)} blocks"
        return start[0], calls, out

    @property
    def loaded(self):
        """The skeleton as a `Loaded` (its tokenizer, its source), for the steps that take one."""
        from .load import Loaded

        return Loaded(self.model, self.tokenizer, str(self.source), self.skel.ckpt.root)

    def logits(self, jobs: list[tuple[list[str], Hooks | None]], desc: str | None = None) -> Iterator[torch.Tensor]:
        """`find.selection`'s runner: each formatted prompt list's next-token logits under its hooks, all lists in
        one pass (or as many as --max-memory needs)."""
        streams = [Stream(self.tokenizer(list(texts), add_special_tokens=False).input_ids, hooks)
                   for texts, hooks in jobs]
        yield from self.run(streams, desc=desc or "streamed pass")

    # -- the pass -----------------------------------------------------------------------------------------------------

    def items(self, streams: list[Stream], batch_size: int | None = None) -> list[_Item]:
        pad = self.tokenizer.pad_token_id
        return [_Item(s, b) for s, stream in enumerate(streams)
                for b in id_batches(stream.ids, pad, batch_size or self.batch_size, self.skel.device)]

    @torch.inference_mode()
    def run(self, streams: list[Stream], *, tap: Callable[[int, int, Batch, torch.Tensor], None] | None = None,
            logits: bool = True, desc: str = "streamed pass") -> Iterator[torch.Tensor]:
        """Every stream through every block; `tap(stream, layer, batch, hidden)` sees the stream entering each
        block (before the interventions' pre-hooks). With `logits`, yields each stream's next-token logits after
        its last token, (N, V) float32 on CPU in input order, stream by stream."""
        pending: dict[int, list] = {}
        remaining = [len(stream.ids) for stream in streams]
        for s, index, last in self._items(streams, tap, 1 if logits else 0, desc):
            out = pending.setdefault(s, [None] * len(streams[s].ids))
            for row, i in enumerate(index):
                out[i] = last[row, -1]
            remaining[s] -= len(index)
            if remaining[s] == 0:
                yield torch.stack(pending.pop(s))

    @torch.inference_mode()
    def forced_logits(self, ids: list[list[int]], keep: int, hooks: Hooks | None = None, desc: str = "forced",
                      batch_size: int | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """`measure.evaluation.teacher_forced_kl`'s forward: the logits at the last `keep` positions of every
        sequence of `ids`, in one pass (or as many as --max-memory needs). Yields (indices into `ids`, their
        (b, keep, V) float32 logits on CPU), a few rows at a time (`n_logits` positions), in batch order."""
        for _, index, logits in self._items([Stream(ids, hooks)], None, keep, desc, batch_size):
            yield index, logits

    def _items(self, streams: list[Stream], tap, keep: int, desc: str, batch_size: int | None = None):
        """(stream, indices, logits at the last `keep` positions (b, keep, V)) per head chunk of every item."""
        all_items = self.items(streams, batch_size)
        self.check_budget(max(it.batch.input_ids.shape[1] for it in all_items))
        with self._other_embeddings():
            yield from self._run(streams, all_items, tap, keep, desc)

    def _run(self, streams, all_items, tap, keep, desc):
        groups = self.groups(all_items)
        if len(groups) > 1:
            log.warning("%s %s: %s in %d passes (each reads every block once)", self.option,
                        show_bytes(self.max_memory), desc, len(groups))
        for group in groups:
            self._start(group, streams)
            for layer in tqdm(range(len(self.blocks)), desc=desc, leave=False, unit="block"):
                with self._materialized(layer) as block:
                    for s in dict.fromkeys(it.stream for it in group):
                        with streams[s](self.model):
                            for it in group:
                                if it.stream != s:
                                    continue
                                if tap is not None:
                                    tap(s, layer, it.batch, it.hidden)
                                args, kwargs = it.calls[layer]
                                it.hidden = block(it.hidden, *args, **kwargs)
            for s in dict.fromkeys(it.stream for it in group):  # the head, stream by stream: one's logits at a time
                for it in (it for it in group if it.stream == s):
                    if keep:
                        _, _, normed = self._decoder(it.batch, it.hidden, inject=it.hidden)
                        rows = max(1, self.n_logits // keep)  # a few rows at a time: V floats per position
                        for a in range(0, len(it.batch.index), rows):
                            (logits,) = self._head([normed[a:a + rows, -keep:]])
                            yield s, it.batch.index[a:a + rows], logits
                    it.hidden = it.calls = None

    def _start(self, group: list[_Item], streams: list[Stream]) -> None:
        """The stream entering block 0 for each item, under its stream's intervention, and what each block is
        passed."""
        ids = torch.cat([it.batch.input_ids.flatten() for it in group]).unique(sorted=True)
        with self._token_rows(ids.cpu()) as emb:
            for it in group:
                with streams[it.stream](self.model):
                    compact = torch.searchsorted(ids.to(it.batch.input_ids.device), it.batch.input_ids)
                    embeds = emb(compact)
                    it.hidden, it.calls, _ = self._decoder(it.batch, embeds)

    def _head(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The head on final-norm outputs `xs` (each (B, K, H)): logits (B, K, V) float32 on CPU each, the head's
        rows read in slices once for all of `xs`."""
        head = self.layout.lm_head
        bias = head.bias if getattr(head, "bias", None) is not None and head.bias.device.type != "meta" else None
        rows = self._head_rows()
        outs = [torch.empty(*x.shape[:-1], self.vocab, dtype=torch.float32) for x in xs]
        shard = self.skel.ckpt.where[self._head_name]
        for a in range(0, self.vocab, rows):
            with safe_open(str(self.skel.ckpt.root / shard), "pt") as f:  # reopened: its mapped pages go
                w = f.get_slice(self._head_name)[a:a + rows].to(self.skel.dtype).to(xs[0].device)
            for x, out in zip(xs, outs):
                out[..., a:a + rows] = F.linear(x, w, None if bias is None else bias[a:a + rows]).float().cpu()
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma 2's head, as its forward applies it
        if cap:
            outs = [torch.tanh(out / cap) * cap for out in outs]
        return outs

    # -- greedy generation ---------------------------------------------------------------------------------------------

    @property
    def generation_config(self):
        """The checkpoint's generation config, read as `from_pretrained` reads it (its EOS tokens end answers)."""
        from transformers import GenerationConfig

        if getattr(self, "_generation_config", None) is None:
            try:
                self._generation_config = GenerationConfig.from_pretrained(self.skel.ckpt.root)
            except OSError:  # no generation_config.json: made from config.json, as from_pretrained falls back
                self._generation_config = GenerationConfig.from_pretrained(
                    self.skel.ckpt.root, config_file_name="config.json", _from_model_config=True)
        return self._generation_config

    @torch.inference_mode()
    def greedy(self, prefix: list[int], suffixes: list[list[int]], *, max_new_tokens: int, pad_id: int,
               eos: set[int], batch_size: int, keep_logprobs: int = 0, desc: str | None = None,
               hooks: Hooks | None = None):
        """`measure.decode.greedy`, one block at a time: the same batches, key/value caches and steps, so the same
        answers and log-probabilities. Every batch of a pass advances together, so a step reads every block (and
        the head) once for all of them; a pass holds its batches' caches (`generation_passes`). The kept
        log-probabilities go to a temporary file as they are made (`SpilledRows`); `first` is not kept."""
        from ..measure.decode import Generated

        device = self.skel.device
        vocab = self.config.vocab_size
        answers: list[list[int]] = [[] for _ in suffixes]
        logprobs = SpilledRows(len(suffixes), keep_logprobs, vocab) if keep_logprobs else None
        mask_k = torch.zeros(len(suffixes), keep_logprobs, dtype=torch.bool) if keep_logprobs else None
        batches = list(id_batches(suffixes, pad_id, batch_size, device))
        passes = self.generation_passes(batches, len(prefix), max_new_tokens)
        if len(passes) > 1:
            log.warning("%s %s: %s in %d passes (each step reads every block once)", self.option,
                        show_bytes(self.max_memory), desc or "generation", len(passes))
        eos_t = torch.tensor(sorted(eos), device=device)
        with self._other_embeddings(), (hooks(self.model) if hooks is not None else nullcontext()):
            cache = self._prefix_cache(prefix) if prefix else None
            for part in passes:
                gens = [_Gen.start(b, len(prefix), cache, device) for b in part]
                for step in tqdm(range(max_new_tokens), desc=desc, disable=desc is None, leave=False, unit="token"):
                    live = [g for g in gens if not g.finished]
                    if not live:
                        break
                    for g, logits in zip(live, self._step(live)):
                        if step < keep_logprobs:
                            kept = torch.log_softmax(logits, -1).cpu()
                            for row, i in enumerate(g.batch.index):
                                if not g.done[row]:  # the in-memory loop keeps steps up to and including EOS
                                    logprobs.write(i, step, kept[row])
                        nxt = logits.argmax(-1).masked_fill(g.done, pad_id)
                        g.out.append(nxt)
                        g.done |= torch.isin(nxt, eos_t)
                        g.advance(nxt)
                for g in gens:
                    toks = torch.stack(g.out, 1).cpu()
                    for row, i in enumerate(g.batch.index):
                        seq = toks[row].tolist()
                        end = next((t + 1 for t, tok in enumerate(seq) if tok in eos), len(seq))
                        answers[i] = seq[:end]
                        if keep_logprobs:
                            mask_k[i, :min(keep_logprobs, len(seq), end)] = True
                del gens
        return Generated([""] * len(suffixes), answers, logprobs, mask_k, None)

    def _prefix_cache(self, prefix: list[int]):
        """The shared prefix run once, as `decode.greedy` runs it (no mask, positions from 0): its cache."""
        ids = torch.tensor([prefix], device=self.skel.device)
        table = ids.flatten().unique(sorted=True)
        with self._token_rows(table.cpu()) as emb:
            hidden, calls, out = self._recorded(emb(torch.searchsorted(table, ids)), use_cache=True)
        for layer in range(len(self.blocks)):
            with self._materialized(layer) as block:
                args, kwargs = calls[layer]
                hidden = block(hidden, *args, **kwargs)
        return out.cache

    def _step(self, gens: list[_Gen]) -> list[torch.Tensor]:
        """One generation step of every batch in `gens`: their next-token logits, (B, V) float32 each."""
        ids = torch.cat([g.ids.flatten() for g in gens]).unique(sorted=True)
        with self._token_rows(ids.cpu()) as emb:
            for g in gens:
                g.hidden, g.calls, _ = self._recorded(emb(torch.searchsorted(ids, g.ids)), attention_mask=g.mask,
                                                      position_ids=g.pos, cache=g.cache, use_cache=True)
        for layer in range(len(self.blocks)):
            with self._materialized(layer) as block:
                for g in gens:
                    args, kwargs = g.calls[layer]
                    g.hidden = block(g.hidden, *args, **kwargs)
        xs = []
        for g in gens:
            _, _, out = self._recorded(g.hidden, inject=g.hidden, attention_mask=g.mask[:, -g.hidden.shape[1]:],
                                       use_cache=False)
            xs.append(out.last_hidden_state[:, -1:])
            g.hidden = g.calls = None
        return [logits[:, -1] for logits in self._head(xs)]


@dataclass
class _Gen:
    """One batch of a streamed generation: what the next step feeds, and what it made so far."""

    batch: Batch
    ids: torch.Tensor  # (B, T) the tokens the next step feeds
    mask: torch.Tensor  # (B, prefix + tokens so far) the attention mask
    pos: torch.Tensor  # (B, T) their positions
    cache: object  # the batch's key/value cache (the prefix's, repeated over its rows, and its own tokens)
    done: torch.Tensor  # (B,) bool
    out: list  # the tokens of each step, (B,) each
    finished: bool = False
    hidden: torch.Tensor | None = None
    calls: list | None = None

    @classmethod
    def start(cls, batch: Batch, prefix: int, cache, device) -> _Gen:
        """As `decode.greedy` starts a batch: the prefix's cache copied for every row, positions counting real
        tokens."""
        n = len(batch.index)
        mask = torch.cat([torch.ones(n, prefix, dtype=torch.long, device=device), batch.attention_mask], 1)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(n)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, prefix:]
        return cls(batch, batch.input_ids, mask, pos, past, torch.zeros(n, dtype=torch.bool, device=device), [])

    def advance(self, nxt: torch.Tensor) -> None:
        """After a step that made `nxt`: stop when every row has ended, else feed `nxt` next."""
        if self.done.all():
            self.finished, self.cache = True, None
            return
        n = len(self.batch.index)
        self.ids = nxt.unsqueeze(-1)
        self.mask = torch.cat([self.mask, torch.ones(n, 1, dtype=torch.long, device=self.mask.device)], 1)
        self.pos = self.pos[:, -1:] + 1


class SpilledRows:
    """An (N, k, V) float32 array kept in a temporary file, zeros where not written: a generation's kept
    log-probabilities (100 prompts x 16 steps x 152k tokens are 970 MB), written one (row, step) at a time and
    read one row at a time, outside the process's memory (`rows[i]` is row i, (k, V))."""

    def __init__(self, n: int, k: int, v: int):
        self.shape = (n, k, v)
        # open as long as the array lives; the file has no name and goes when it is closed or collected
        self._file = tempfile.TemporaryFile(prefix="abliterate-logprobs-")  # noqa: SIM115
        self._file.truncate(n * k * v * 4)

    def write(self, i: int, t: int, values: torch.Tensor) -> None:
        _, k, v = self.shape
        self._file.seek((i * k + t) * v * 4)
        self._file.write(values[:v].float().contiguous().numpy().tobytes())

    def __getitem__(self, i: int) -> torch.Tensor:
        n, k, v = self.shape
        if not isinstance(i, int) or not 0 <= i < n:
            raise IndexError(f"row {i!r} of {n}")
        self._file.seek(i * k * v * 4)
        return torch.frombuffer(bytearray(self._file.read(k * v * 4)), dtype=torch.float32).view(k, v)
