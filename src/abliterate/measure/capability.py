"""Capability retention: the same multiple-choice questions answered by the original and the edited model.

An edit that removes refusals may also remove knowledge. KL at the first response token says how far the
edited model's distribution moved, not whether it still knows things, so we also score MMLU-style
questions (Hendrycks et al. 2021) before and after, item by item, and compare them paired (`stats.paired`).

Protocols, both lm-eval-harness's, plain text, no chat template (a zero-shot check that read the first
response token through the chat template measured chance, 25.4%, on the reference model):

- "letter" (lm-eval's `mmlu`): a header, k solved exemplars of the same subject (MMLU's dev split), the
  question with its lettered choices, and the choice whose letter (" A", " B", ...) is likeliest after
  "Answer:". On the reference model (Qwen2.5-Coder-0.5B-Instruct) it measured chance: 1-shot 215/764 (28%;
  95% CI 25-31%), 95% of the answers A or C; 5-shot 57/200 (28%; 95% CI 23-35%), 111 of them C. The prompt
  is lm-eval's to the character, the letters are single tokens, and cached equals plain log-likelihoods; the
  letters hold ~99% of the next-token mass, near uniformly: a 0.5B model follows the format without mapping
  letters to answers (benchmarks/results/capability-letter-5shot-reference.json).
- "cloze" (lm-eval's `mmlu_continuation`, the default): "Question: ...\nAnswer:" and the choice whose own
  text is likeliest per character (acc_norm), the form small-model evaluations use (SmolLM2's MMLU is cloze).

Letter: the header and exemplars are the same for every question of a subject, so they are run once per
subject and their key/value cache reused (`model.forward.cached_logits`): with 5 shots that is most of every
prompt's tokens. Cloze: each question is run once and its cache reused for its choices. Everything is forward passes, so it works unchanged under hooks (`with ablated(model, d): ...`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import AbliterateError
from ..find.prompts import _bos
from ..model.forward import cached_logits
from .stats import Paired, Rate, paired

LETTERS = "ABCDEFGHIJ"

# MMLU's 57 subjects in the four groups of the original release (hendrycks/test, categories.py: subject ->
# subcategory -> category; MIT license). Written out here by group.
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "social sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}
SUBJECT_GROUP = {s: g for g, subjects in MMLU_GROUPS.items() for s in subjects}


def group_of(subject: str) -> str:
    """The MMLU group of a subject; a subject outside MMLU is its own group."""
    return SUBJECT_GROUP.get(subject, subject or "unlabelled")


@dataclass(frozen=True)
class Item:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str = ""


def _item(raw, where: str) -> Item:
    """One item from parsed JSON. `answer` is a 0-based index or a letter ("A" = first choice), as MMLU
    re-exports use either; anything else (a choice's text, "1") is refused rather than guessed."""
    if not isinstance(raw, dict):
        raise AbliterateError(f"{where}: expected an object with question, choices, answer; got {raw!r:.60}")
    q, choices, subject = raw.get("question"), raw.get("choices"), raw.get("subject", "")
    if not isinstance(q, str) or not q.strip():
        raise AbliterateError(f"{where}: 'question' must be a non-empty string; add the question text")
    if not isinstance(choices, list) or len(choices) < 2:
        raise AbliterateError(f"{where}: 'choices' must be a list of at least two strings; got {choices!r:.60}")
    if len(choices) > len(LETTERS):
        raise AbliterateError(f"{where}: {len(choices)} choices; at most {len(LETTERS)} are supported")
    if not all(isinstance(c, str) for c in choices):
        raise AbliterateError(f"{where}: every choice must be a string; got {choices!r:.80}")
    if not isinstance(subject, str):
        raise AbliterateError(f"{where}: 'subject' must be a string; got {subject!r:.40}")
    if "answer" not in raw:
        raise AbliterateError(f"{where}: no 'answer'; add the correct choice's 0-based index or letter")
    ans = raw["answer"]
    letters = LETTERS[:len(choices)]
    if isinstance(ans, str) and len(ans) == 1 and ans in letters:
        ans = letters.index(ans)
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise AbliterateError(f"{where}: answer {ans!r} is not a choice; use an index 0-{len(choices) - 1} "
                              f"or a letter {letters[0]}-{letters[-1]}")
    return Item(q, tuple(choices), ans, subject)


def read_items(path: str | Path) -> list[Item]:
    """All items of a JSON list or JSON-lines file; errors name the file and the (1-based) line or item."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise AbliterateError(f"{path}: no such file; pass a JSON or JSONL file of questions") from None
    except UnicodeDecodeError as e:
        raise AbliterateError(f"{path}: not UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    if not text.strip():
        raise AbliterateError(f"{path}: empty; it needs a JSON list or JSON lines of {{question, choices, answer}}")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise AbliterateError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); fix the syntax") from None
        items = [_item(r, f"{path}: item {i}") for i, r in enumerate(rows, 1)]
    else:
        items = []
        # split on "\n" only: str.splitlines also breaks at U+2028 and U+0085, which JSON strings may hold raw
        for ln, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise AbliterateError(f"{path}: line {ln}: not valid JSON ({e.msg}); one object per line") from None
            items.append(_item(raw, f"{path}: line {ln}"))
    if not items:
        raise AbliterateError(f"{path}: holds no items; add {{question, choices, answer}} objects")
    return items


def load_items(spec: str, seed: int = 0) -> list[Item]:
    """`FILE` (every item) or `FILE:N` (a stratified sample of N, seeded)."""
    path, n = spec, None
    if not Path(spec).is_file() and ":" in spec:
        path, _, tail = spec.rpartition(":")
        if not tail.isdigit() or int(tail) < 1:
            raise AbliterateError(f"{spec}: N in FILE:N must be a positive integer; got {tail!r}")
        n = int(tail)
    items = read_items(path)
    if n is None:
        return items
    if n > len(items):
        raise AbliterateError(f"{spec}: asks for {n} items but {path} has {len(items)}; lower N")
    return stratified(items, n, seed)


# The quick check `run` does by default (`--capability quick`): a stratified sample of MMLU's test split shipped
# with the package (data/mmlu_quick.jsonl, written by benchmarks/make_mmlu_quick.py; MIT, data/LICENSE-MMLU.txt),
# with the dev exemplars of its subjects: every subject at least once, the rest by subject size. Its interval is
# wide (about +-9 points at 50%): it catches a broken edit, not a 2-point loss; `--capability FILE[:N]` on the
# full test split measures that (docs/measure.md: the time it takes, and what it measured on the reference model).
QUICK_N = 114


def quick_items() -> tuple[list[Item], list[Item]]:
    """The packaged quick-check items and their subjects' dev exemplars."""
    data = resources.files("abliterate").joinpath("data")
    out = []
    for name in ("mmlu_quick.jsonl", "mmlu_quick_dev.jsonl"):
        with resources.as_file(data.joinpath(name)) as path:
            out.append(read_items(path))
    return out[0], out[1]


def stratified(items: list[Item], n: int, seed: int) -> list[Item]:
    """A sample of n items proportional to subject sizes, at least one per subject when n allows, in file order.

    Largest-remainder allocation (deterministic, ties by subject name); within a subject, a seeded shuffle.
    A plain random sample of 1,000 MMLU items would leave small subjects with 0-3 items by chance.
    """
    if n < 1:
        raise AbliterateError(f"sample size must be a positive integer; got {n}")
    if n >= len(items):
        return list(items)
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_subject[it.subject].append(i)
    subjects = sorted(by_subject)
    base = 1 if n >= len(subjects) else 0  # one each first, the rest proportional to what is left
    rest, pool = n - base * len(subjects), len(items) - base * len(subjects)
    quota = {s: rest * (len(by_subject[s]) - base) / pool for s in subjects}
    take = {s: base + int(quota[s]) for s in subjects}
    left = n - sum(take.values())
    for s in sorted(subjects, key=lambda s: (-(quota[s] - int(quota[s])), s))[:left]:
        take[s] += 1
    rng = random.Random(seed)
    chosen = []
    for s in subjects:
        idx = list(by_subject[s])
        rng.shuffle(idx)
        chosen += idx[:take[s]]
    return [items[i] for i in sorted(chosen)]


PROTOCOLS = ("letter", "cloze")


def question_text(item: Item, protocol: str = "letter") -> str:
    """lm-eval's rendering of one question, up to and including 'Answer:': MMLU's default task (the choices
    lettered, "letter") or its continuation task ("cloze": the question alone, the choices' own text scored)."""
    if protocol == "cloze":
        return f"Question: {item.question.strip()}\nAnswer:"
    lines = [item.question.strip()] + [f"{LETTERS[j]}. {c}" for j, c in enumerate(item.choices)]
    return "\n".join(lines) + "\nAnswer:"


def continuations(item: Item, protocol: str = "letter") -> list[str]:
    """What follows 'Answer:' for each choice: ' A', ' B', ... or ' <choice text>' (lm-eval's target delimiter)."""
    return [f" {c}" if protocol == "cloze" else f" {LETTERS[j]}" for j, c in enumerate(item.choices)]


def header(subject: str, protocol: str = "letter") -> str:
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    kind = "questions" if protocol == "cloze" else "multiple choice questions"
    return f"The following are {kind} (with answers){about}.\n\n"


def prefix_text(subject: str, exemplars: list[Item], protocol: str = "letter") -> str:
    """Header and solved exemplars: shared by every question of `subject`."""
    return header(subject, protocol) + "".join(
        f"{question_text(e, protocol)}{continuations(e, protocol)[e.answer]}\n\n" for e in exemplars)


def choose(item: Item, logprobs: list[float], protocol: str = "letter") -> int:
    """The answer a model gives: the likeliest choice ("letter"), or the likeliest per character of the choice's
    own text ("cloze": lm-eval's acc_norm, which divides by len(choice), the space before it not counted)."""
    if protocol == "cloze":
        logprobs = [lp / max(1, len(c)) for lp, c in zip(logprobs, item.choices)]
    return max(range(len(logprobs)), key=logprobs.__getitem__)


@dataclass
class Scores:
    """One model's answers: per item the chosen index and the log-probability of each choice's letter."""

    items: list[Item]
    predicted: list[int]
    logprobs: list[list[float]]
    shots: int
    tokens: int = 0  # tokens run through the model (shared prefixes once per subject)
    seconds: float = 0.0

    @property
    def correct(self) -> list[bool]:
        return [p == it.answer for p, it in zip(self.predicted, self.items)]

    @property
    def accuracy(self) -> Rate:
        return Rate(sum(self.correct), len(self.items))


def _exemplars(protocol: str, shots: int, dev_items: list[Item] | None) -> dict[str, list[Item]]:
    """The dev exemplars by subject, after checking the protocol and that `shots` > 0 has exemplars."""
    if protocol not in PROTOCOLS:
        raise AbliterateError(f"capability protocol {protocol!r} is not one of: {', '.join(PROTOCOLS)}")
    if shots and dev_items is None:
        raise AbliterateError(f"{shots}-shot scoring needs exemplars: pass dev_items (e.g. mmlu_dev.jsonl) or shots=0")
    dev: dict[str, list[Item]] = defaultdict(list)
    for it in dev_items or []:
        dev[it.subject].append(it)
    return dev


def score(model, tokenizer, items: list[Item], *, shots: int = 5, dev_items: list[Item] | None = None,
          batch_size: int = 8, desc: str | None = None, protocol: str = "letter") -> Scores:
    """Answer `items` by a log-likelihood protocol (module docstring), subject by subject.

    "letter": the choice whose letter (" A", " B", ...) is likeliest after "Answer:" (lm-eval's `mmlu`; the
    subject's prefix is run once and its cache reused). "cloze": the choice whose own text is likeliest per
    character (lm-eval's `mmlu_continuation`, acc_norm), each question run once as a prefix of its choices.
    """
    t0 = time.perf_counter()
    dev = _exemplars(protocol, shots, dev_items)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    def gather(logp: torch.Tensor, k: int, c: list[int], keep: int) -> float:
        rows = logp[k, keep - len(c):]  # (len(c), V): the positions that predict each continuation token
        return float(rows[torch.arange(len(c)), torch.tensor(c)].sum())

    predicted, logprobs = [None] * len(items), [None] * len(items)
    tokens = 0
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_subject[it.subject].append(i)
    for subject, idx in tqdm(by_subject.items(), desc=desc, disable=desc is None, unit="subject"):
        if len(dev[subject]) < shots:
            raise AbliterateError(f"subject {subject!r} has {len(dev[subject])} exemplars in dev_items, {shots} "
                                  f"needed; pass dev items of that subject or lower shots")
        prefix_str = _bos(tokenizer) + prefix_text(subject, dev[subject][:shots], protocol)
        if protocol == "cloze":
            # Per item: prefix and question run once, the choices as suffixes. Each suffix starts with the
            # question's last `keep` tokens, so it is at least `keep` long and the logits at its last `keep`
            # positions include every one that predicts a token of the choice.
            for i in idx:
                it = items[i]
                q = enc(prefix_str + question_text(it, protocol))
                conts = [enc(c) for c in continuations(it, protocol)]
                keep = max(len(c) for c in conts)
                cut = max(0, len(q) - keep)
                logits = cached_logits(model, q[:cut], [q[cut:] + c[:-1] for c in conts], keep=keep, pad_id=pad,
                                       batch_size=batch_size)  # (choices, keep, V)
                logp = torch.log_softmax(logits.double(), -1)
                tokens += len(q) + sum(len(c) for c in conts)
                logprobs[i] = [gather(logp, j, c, keep) for j, c in enumerate(conts)]
                predicted[i] = choose(it, logprobs[i], protocol)
            continue
        prefix = enc(prefix_str)
        # One sequence per (item, choice): the question, then the choice's continuation but its last token;
        # the last len(continuation) positions predict the continuation's tokens. When every continuation is
        # one token (" A" is, for the common tokenizers), an item's sequences coincide and are run once.
        seqs, where = [], []  # where: (item, choice, continuation ids, row in seqs)
        for i in idx:
            q = enc(question_text(items[i]))
            conts = [enc(c) for c in continuations(items[i])]
            single = all(len(c) == 1 for c in conts)
            for j, c in enumerate(conts):
                if not (single and j):
                    seqs.append(q + c[:-1])
                where.append((i, j, c, len(seqs) - 1))
        keep = max(len(c) for _, _, c, _ in where)
        logits = cached_logits(model, prefix, seqs, keep=keep, pad_id=pad, batch_size=batch_size)  # (S, keep, V)
        logp = torch.log_softmax(logits.double(), -1)
        tokens += len(prefix) + sum(len(s) for s in seqs)
        for i in idx:
            logprobs[i] = [0.0] * len(items[i].choices)
        for i, j, c, k in where:
            logprobs[i][j] = gather(logp, k, c, keep)
        for i in idx:
            predicted[i] = choose(items[i], logprobs[i], protocol)
    return Scores(list(items), predicted, logprobs, shots, tokens, time.perf_counter() - t0)


def choice_sequences(tokenizer, items: list[Item], *, shots: int = 5, dev_items: list[Item] | None = None,
                     protocol: str = "letter") -> tuple[list[list[int]], dict[int, list[tuple[int, int, list[int]]]]]:
    """Every (item, choice) as one whole sequence, prefix included, tokenized as `score` tokenizes it (cloze: prefix
    and question together; letter: apart): the distinct sequences, and per sequence the (item, choice,
    continuation ids) it scores. One-token letters (" A".." D") make an item's sequences coincide: run once."""
    dev = _exemplars(protocol, shots, dev_items)

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    seqs: dict[tuple, int] = {}
    where: dict[int, list] = defaultdict(list)
    for i, it in enumerate(items):
        if len(dev[it.subject]) < shots:
            raise AbliterateError(f"subject {it.subject!r} has {len(dev[it.subject])} exemplars in dev_items, {shots} "
                                  f"needed; pass dev items of that subject or lower shots")
        prefix_str = _bos(tokenizer) + prefix_text(it.subject, dev[it.subject][:shots], protocol)
        q = enc(prefix_str + question_text(it, protocol)) if protocol == "cloze" else \
            enc(prefix_str) + enc(question_text(it))
        for j, c in enumerate(enc(c) for c in continuations(it, protocol)):
            where[seqs.setdefault(tuple(q + c[:-1]), len(seqs))].append((i, j, c))
    return [list(q) for q in seqs], dict(where)


def score_streamed(streamed, tokenizer, items: list[Item], *, shots: int = 5, dev_items: list[Item] | None = None,
                   protocol: str = "letter", batch_size: int | None = None, desc: str = "capability") -> Scores:
    """`score` on a `model.streamed.StreamedModel`: the same questions, tokens and choice rule, every
    `choice_sequences` sequence run whole in one streamed pass (`forced_logits`), so every block is read once for
    all of them, not once per question. `score`'s prefix cache saves compute only: its logits are the whole
    sequence's, to rounding; here the shared prefix runs once per sequence."""
    t0 = time.perf_counter()
    seqs, where = choice_sequences(tokenizer, items, shots=shots, dev_items=dev_items, protocol=protocol)
    keep = max(len(c) for scored in where.values() for _, _, c in scored)
    logprobs = [[0.0] * len(it.choices) for it in items]
    for index, logits in streamed.forced_logits(seqs, keep, desc=desc, batch_size=batch_size):
        logp = torch.log_softmax(logits.double(), -1)  # (b, keep, V)
        for row, k in enumerate(index):
            for i, j, c in where[k]:
                rows = logp[row, keep - len(c):]  # the positions that predict each continuation token
                logprobs[i][j] = float(rows[torch.arange(len(c)), torch.tensor(c)].sum())
    predicted = [choose(it, lps, protocol) for it, lps in zip(items, logprobs)]
    return Scores(list(items), predicted, logprobs, shots, sum(map(len, seqs)), time.perf_counter() - t0)


@dataclass
class Retention:
    """Original vs edited on the same items: accuracies, retention (after / before) and the paired change."""

    before: Rate
    after: Rate
    change: Paired
    lost: list[int]  # indices of items the original answered and the edit does not
    gained: list[int]
    groups: dict[str, Retention] = field(default_factory=dict)
    chance: float = 0.0  # the accuracy of guessing: the mean of 1 / (number of choices) over the items

    @property
    def resolves(self) -> bool:
        """Whether the original is above chance outside its 95% interval. When it is not, the check cannot show a
        loss: a model that guesses has nothing to lose, and a broken edit keeps its (chance) accuracy."""
        return self.before.interval[0] > self.chance

    @property
    def retention(self) -> float:
        return self.change.ratio

    @property
    def retention_interval(self) -> tuple[float, float]:
        """Bonett-Price 95% interval for the ratio of paired accuracies (`stats.ratio_interval`)."""
        return self.change.ratio_interval

    def to_dict(self, indices: bool = True) -> dict:
        lo, hi = self.retention_interval
        def num(x: float):  # JSON has no NaN or Infinity: retention is undefined when nothing was right before
            return round(x, 4) if math.isfinite(x) else None

        out = {"n": self.change.n, "accuracy_before": self.before.to_dict(), "accuracy_after": self.after.to_dict(),
               "retention": num(self.retention), "retention_ci95": [num(lo), num(hi)],
               "chance": round(self.chance, 4), "resolves": self.resolves, **self.change.to_dict()}
        if indices:
            out.update(lost_items=self.lost, gained_items=self.gained)
        if self.groups:
            out["groups"] = {g: r.to_dict(indices=False) for g, r in self.groups.items()}
        return out


def _retention(a: list[bool], b: list[bool], index: list[int]) -> Retention:
    change = paired(a, b)
    return Retention(change.before, change.after, change,
                     [i for i, x, y in zip(index, a, b) if x and not y], [i for i, x, y in zip(index, a, b) if y and not x])


def compare(before: Scores, after: Scores) -> Retention:
    """Paired comparison of two `Scores` of the same items, overall and per MMLU group."""
    if before.items != after.items:
        raise AbliterateError(f"compare needs scores of the same items in the same order; got {len(before.items)} "
                              f"and {len(after.items)} items that differ. Score both models on one item list")
    a, b = before.correct, after.correct
    guess = [1 / len(it.choices) for it in before.items]
    out = _retention(a, b, list(range(len(a))))
    out.chance = sum(guess) / len(guess) if guess else 0.0
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(before.items):
        by_group[group_of(it.subject)].append(i)
    out.groups = {g: _retention([a[i] for i in idx], [b[i] for i in idx], idx) for g, idx in sorted(by_group.items())}
    for g, idx in by_group.items():
        out.groups[g].chance = sum(guess[i] for i in idx) / len(idx)
    return out
