"""Which prompts did what in an edit, and whether the figures reported on it are held out.

An edit uses three sets of prompts, each with a harmful and a harmless side:

    fit     makes the direction                       --harmful/--harmless, --n-train
    select  picks the layer, or scores search trials  --n-select, --n-search (--search-on eval: the report set)
    report  what the printed figures are measured on  --eval-harmful/--eval-harmless

A refusal rate measured on prompts the edit was fitted or selected on is in-sample: the direction was made, or
chosen, to move exactly those prompts, so it flatters the edit. The manifest therefore records each set (its
source, n, the sha256 of its texts and one short fingerprint per prompt), and `run` and `eval` refuse a report
set that shares prompts with the other two unless --allow-overlap says to go on, with the overlap flagged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import AbliterateError
from .prompts import prompts_sha256

SIDES = ("harmful", "harmless")
# 64 bits per prompt: among a few thousand prompts the chance that two different ones share a fingerprint
# is about n^2 / 2^65, under 1e-12; 20 characters of JSON each, so a run's manifest grows by ~10 kB.
FINGERPRINT_HEX = 16
FINGERPRINT = (f"sha256 of the prompt with case and runs of whitespace folded, first {FINGERPRINT_HEX} hex digits "
               f"(sha256 is of the exact texts, joined by newlines)")


def fingerprint(prompt: str) -> str:
    """A prompt's short fingerprint. Case and whitespace are folded so that a copy re-typed as 'how do I  X?'
    still counts as the prompt 'How do I X?'."""
    return hashlib.sha256(" ".join(prompt.split()).casefold().encode()).hexdigest()[:FINGERPRINT_HEX]


@dataclass(frozen=True)
class Role:
    """One set's prompts, both sides, where they came from, and the options that chose them."""

    by: str
    sources: tuple[str, str]  # harmful, harmless
    harmful: tuple[str, ...]
    harmless: tuple[str, ...]

    def fingerprints(self) -> set[str]:
        return {fingerprint(p) for p in self.harmful + self.harmless}

    def to_dict(self) -> dict:
        return {"by": self.by, **{side: {"source": src, "n": len(ps), "sha256": prompts_sha256(ps),
                                         "fingerprints": [fingerprint(p) for p in ps]}
                                  for side, src, ps in zip(SIDES, self.sources, (self.harmful, self.harmless))}}


@dataclass(frozen=True)
class Overlap:
    """How many report prompts are also fit or select prompts (a prompt in both counts once in `prompts`)."""

    n_report: int
    fit: int
    select: int
    prompts: int
    allowed_by: str | None = None  # --allow-overlap, or --search-on eval for the select set

    def note(self) -> str | None:
        """What the table and the manifest say of the figures, or None when the report set is held out."""
        if not self.prompts:
            return None
        return f"(overlaps fit/select set: {self.prompts} prompt{'s' if self.prompts != 1 else ''})"

    def to_dict(self) -> dict:
        return {"overlap": self.prompts, "overlap_with": {"fit": self.fit, "select": self.select},
                "overlap_allowed_by": self.allowed_by, "overlap_note": self.note()}


def overlap(report: Iterable[str], fit: set[str], select: set[str]) -> Overlap:
    """The overlap of the report prompts with the fit and select fingerprints (both sides of each: a harmless
    report prompt that is a harmful fit prompt counts too)."""
    fps = [fingerprint(p) for p in report]
    return Overlap(len(fps), sum(f in fit for f in fps), sum(f in select for f in fps),
                   sum(f in fit or f in select for f in fps))


@dataclass(frozen=True)
class SplitRecord:
    """The three sets of one run. `select` is None when nothing was selected (--layer)."""

    fit: Role
    select: Role | None
    report: Role

    def overlap(self) -> Overlap:
        return overlap(self.report.harmful + self.report.harmless, self.fit.fingerprints(),
                       self.select.fingerprints() if self.select else set())

    def to_dict(self, ov: Overlap) -> dict:
        """The manifest's `splits`."""
        return {"fingerprint": FINGERPRINT, "fit": self.fit.to_dict(),
                "select": self.select.to_dict() if self.select else None, "report": self.report.to_dict(),
                **ov.to_dict()}


def check_overlap(ov: Overlap, *, allow: bool, report: str, against: str, select_by_request: bool = False
                  ) -> Overlap:
    """`ov` with what allowed it, or an error if the report set shares prompts with the fit or select set.

    `report` and `against` name the two sides in the message (options and files); `select_by_request`: the
    select set is the report set because the user asked (--search-on eval), so only a fit overlap refuses."""
    if not ov.prompts:
        return ov
    if allow:
        return replace(ov, allowed_by="--allow-overlap")
    if select_by_request and not ov.fit:
        return replace(ov, allowed_by="--search-on eval")
    which = " and ".join(name for name, n in (("fit", ov.fit), ("select", ov.select)) if n)
    raise AbliterateError(
        f"{ov.prompts} of the {ov.n_report} report prompts ({report}) {'is' if ov.prompts == 1 else 'are'} also "
        f"in the {which} set{'s' if ov.fit and ov.select else ''} ({against}): "
        f"figures measured on prompts the edit was fitted or selected on are not held out. Give evaluation "
        f"prompts the edit never saw, or pass --allow-overlap to go on with the overlap flagged"
    )


def recorded(manifest: dict, path: Path) -> tuple[set[str], set[str], str] | None:
    """The fit and select fingerprints a manifest recorded, with the sources they came from for messages; None
    when it has no `splits` (a manifest from before they were recorded, or of an edit without prompt sets)."""
    splits = manifest.get("splits")
    if splits is None:
        return None
    try:
        sets = {role: set() for role in ("fit", "select")}
        sources = []
        for role, found in sets.items():
            if splits[role] is None:  # --layer: nothing was selected
                continue
            for side in SIDES:
                entry = splits[role][side]
                fps = entry["fingerprints"]
                if not isinstance(fps, list) or not all(isinstance(f, str) for f in fps):
                    raise TypeError(f"{role}.{side}.fingerprints is not a list of strings")
                found.update(fps)
                sources.append(str(entry["source"]))
    except (KeyError, TypeError, AttributeError) as e:
        raise AbliterateError(f"{path}: its `splits` section is not one `run` writes ({type(e).__name__}: {e}); "
                              f"give the manifest as it was saved, or pass --allow-overlap to evaluate without "
                              f"the overlap check") from e
    return sets["fit"], sets["select"], ", ".join(dict.fromkeys(sources))
