"""Prompt files: JSONL, one object per line with ``prompt`` (string) and optional ``answers``
(strings whose presence in an output counts as knowing/leaking the fact)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from steering.errors import GuarditError


class PromptFileError(GuarditError):
    """A prompt file is missing, empty or malformed."""


class PromptRecord(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    prompt: str = Field(min_length=1)
    answers: list[str] = Field(default_factory=list)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is blank")
        return v


def read_prompts(path: str | Path, *, allow_empty: bool = False) -> list[PromptRecord]:
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"prompt file not found: {p}")
    records: list[PromptRecord] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{p}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{p}:{lineno}: expected a JSON object with a 'prompt' field")
        try:
            records.append(PromptRecord.model_validate(obj))
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or "(line)"
            raise PromptFileError(f"{p}:{lineno}: field '{loc}': {first['msg']}") from None
    if not records and not allow_empty:
        raise PromptFileError(f"prompt file {p} holds no prompts")
    return records


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


_WORD = re.compile(r"\w+")


def concept_words(forget: list[str], retain: list[str], min_share: float = 0.2) -> list[str]:
    """The words that name the concept: lower-cased, in at least ``min_share`` of the forget
    prompts and in none of the retain prompts (a name, a title). Sorted by how many forget prompts
    have them."""

    def words(p: str) -> set[str]:
        return {w.lower() for w in _WORD.findall(p) if not w.isdigit()}

    in_retain = set().union(*(words(p) for p in retain)) if retain else set()
    counts: dict[str, int] = {}
    for p in forget:
        for w in words(p) - in_retain:
            counts[w] = counts.get(w, 0) + 1
    need = max(2, min_share * len(forget))
    return sorted((w for w, n in counts.items() if n >= need), key=lambda w: (-counts[w], w))


def without_words(prompt: str, words: list[str]) -> str:
    """``prompt`` with the given words (case-insensitive, whole words, possessive 's included)
    removed and the spacing tidied; the prompt unchanged when it has none of them."""
    if not words:
        return prompt
    pattern = r"\b(?:" + "|".join(map(re.escape, words)) + r")(?:'s)?\b"
    out = re.sub(pattern, "", prompt, flags=re.IGNORECASE)
    return re.sub(r"\s+([?.,!;:])", r"\1", re.sub(r"\s{2,}", " ", out)).strip()
