"""Talk to the original and the edited model at once; their answers stream side by side.

Each side keeps its own history (each model sees its own earlier answers).
Decoding is greedy, token by token with a KV cache, so the two answers differ
only because the models do. The edited side is either a second model or the same
model under hooks (`ablated` or `steered`), entered around each of its forward passes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import zip_longest

import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..errors import AbliterateError
from ..find.prompts import ChatFormat
from ..measure.decode import eos_ids
from ..model.forward import input_device


@dataclass
class Speaker:
    name: str
    model: torch.nn.Module
    tokenizer: object
    fmt: ChatFormat
    context: Callable[[], AbstractContextManager] = nullcontext
    history: list[tuple[str, str]] = field(default_factory=list)

    def render(self, message: str) -> str:
        if self.fmt.plain:
            turns = "".join(f"{u}\n{a}\n\n" for u, a in self.history)
            head = f"{self.fmt.system}\n\n" if self.fmt.system else ""
            return f"{head}{turns}{message}\n"
        msgs = [{"role": "system", "content": self.fmt.system}] if self.fmt.system else []
        for user, answer in self.history:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        msgs.append({"role": "user", "content": message})
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def reply(self, message: str, max_new_tokens: int) -> Iterator[str]:
        """The answer so far, after each new token; the last one is the whole answer (also added to history)."""
        tok = self.tokenizer
        device = input_device(self.model)
        ids = tok(self.render(message), add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        eos = eos_ids(self.model, tok)
        past, out_ids, text = None, [], ""
        for _ in range(max_new_tokens):
            with self.context():
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
            if nxt in eos:
                break
            out_ids.append(nxt)
            text = tok.decode(out_ids, skip_special_tokens=True)
            ids = torch.tensor([[nxt]], device=device)
            yield text
        self.history.append((message, text.strip()))
        yield text


def lockstep(speakers: list[Speaker], message: str, max_new_tokens: int) -> Iterator[list[str]]:
    """Both answers so far, advancing one token on each side per step."""
    current = [""] * len(speakers)
    for step in zip_longest(*(s.reply(message, max_new_tokens) for s in speakers)):
        current = [c if new is None else new for c, new in zip(current, step)]
        yield list(current)


def _live_table(speakers: list[Speaker], answers: list[str]):

    table = Table(expand=True, show_lines=False)
    for s in speakers:
        table.add_column(s.name, ratio=1, overflow="fold")
    table.add_row(*answers)
    return table


def one_shot(speakers: list[Speaker], message: str, max_new_tokens: int) -> list[str]:
    """Both full answers to one message."""
    if not message.strip():
        raise AbliterateError("the prompt is empty; give some text with --prompt")
    final = [""] * len(speakers)
    for final in lockstep(speakers, message, max_new_tokens):
        pass
    return [a.strip() for a in final]


def interactive(speakers: list[Speaker], max_new_tokens: int, console=None) -> None:
    """Read messages until /quit or end of input; stream both answers side by side in a live table."""

    console = console or Console()
    names = " and ".join(s.name for s in speakers)
    console.print(f"Chatting with {names}. /reset clears the history, /quit (or Ctrl-D) ends.")
    while True:
        try:
            message = console.input("[bold green]you>[/] ")
        except EOFError:
            console.print()
            return
        message = message.strip()
        if not message:
            continue
        if message in ("/quit", "/exit"):
            return
        if message == "/reset":
            for s in speakers:
                s.history.clear()
            console.print("history cleared")
            continue
        with Live(_live_table(speakers, [""] * len(speakers)), console=console, refresh_per_second=12,
                  transient=False) as live:
            for answers in lockstep(speakers, message, max_new_tokens):
                live.update(_live_table(speakers, answers))
        sys.stdout.flush()
