"""Prompt files: JSONL, one object per line with ``prompt`` (string) or ``messages`` (a
conversation: ``{"role": "system"|"user"|"assistant", "content": ...}`` objects ending with the
user's ask), and optional ``answers`` (strings whose presence in an output counts as
knowing/leaking the fact). Any other field is kept and written back with the record's output."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from steering.errors import GuarditError
from steering.names import names_in, stems, words_of


class PromptFileError(GuarditError):
    """A prompt file is missing, empty or malformed."""


# Fields a generation result writes itself (``guardit.generation.result_row``): a prompt record
# carrying one of them would lose it in the output.
RESULT_FIELDS = ("output", "token_ids", "gate")


class ChatMessage(BaseModel):
    """One turn of a conversation, as OpenAI's chat API and the model's chat template take it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class PromptRecord(BaseModel):
    """One request: a single ``prompt``, or a whole conversation in ``messages`` whose last turn is
    the user's ask (``prompt`` is then that turn's text). Other fields are kept (``extras``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    # messages first: its errors are the ones to report when a conversation is malformed.
    messages: list[ChatMessage] | None = None
    prompt: str = Field(min_length=1)
    answers: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _prompt_of_messages(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prompt" not in data and isinstance(data.get("messages"), list | tuple):
            last = data["messages"][-1] if data["messages"] else None
            if isinstance(last, dict) and isinstance(last.get("content"), str):
                data = {**data, "prompt": last["content"]}
        return data

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is blank")
        return v

    @field_validator("messages")
    @classmethod
    def _ends_with_the_ask(cls, v: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if v is not None:
            if not v:
                raise ValueError("a conversation needs at least one message")
            if v[-1].role != "user":
                raise ValueError(f"the last message is the ask to answer: its role must be 'user', not '{v[-1].role}'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PromptRecord:
        if self.messages is not None and self.messages[-1].content != self.prompt:
            raise ValueError("prompt differs from the last message's content (give one of them)")
        taken = [k for k in RESULT_FIELDS if k in (self.model_extra or {})]
        if taken:
            raise ValueError(f"field '{taken[0]}' is written by guardit in each output row; rename it")
        return self

    def conversation(self) -> list[dict[str, str]]:
        """The request as chat messages (one user message for a plain ``prompt``)."""
        if self.messages is None:
            return [{"role": "user", "content": self.prompt}]
        return [m.model_dump() for m in self.messages]

    @property
    def extras(self) -> dict[str, Any]:
        """The record's own fields beyond guardit's, in file order."""
        return dict(self.model_extra or {})


def single_prompts(records: list[PromptRecord] | list[str], what: str) -> list[str]:
    """The prompt texts of requests that must be single prompts (calibration sets, evaluation
    suites): a conversation among them is an error naming the record."""
    out = []
    for i, r in enumerate(records, start=1):
        if isinstance(r, PromptRecord) and r.messages is not None and len(r.messages) > 1:
            raise GuarditError(
                f"{what} prompt {i} ({r.prompt[:40]!r}): field 'messages': {what} takes single prompts, "
                "not conversations (a served conversation is gated turn by turn); give 'prompt' instead"
            )
        out.append(r.prompt if isinstance(r, PromptRecord) else r)
    return out


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
            loc = ".".join(str(x) for x in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            raise PromptFileError(f"{p}:{lineno}: " + (f"field '{loc}': {msg}" if loc else msg)) from None
    if not records and not allow_empty:
        raise PromptFileError(f"prompt file {p} holds no prompts")
    return records


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def concept_words(forget: list[str], retain: list[str], min_share: float = 0.2) -> list[str]:
    """The words the name copies (``--name-copies``) remove: lower-cased single words, digits
    aside, in at least ``min_share`` of the forget prompts and in none of the retain prompts (a
    name, a title, and any word many forget prompts share). Sorted by how many forget prompts have
    them. Not the concept's name, which :func:`concept_name` finds (phrases, their forms, no stop
    words) for the everyday negatives and the answer check."""

    def words(p: str) -> set[str]:
        return {w for w in words_of(p) if not w.isdigit()}

    in_retain = set().union(*(words(p) for p in retain)) if retain else set()
    counts: dict[str, int] = {}
    for p in forget:
        for w in words(p) - in_retain:
            counts[w] = counts.get(w, 0) + 1
    need = max(2, min_share * len(forget))
    return sorted((w for w, n in counts.items() if n >= need), key=lambda w: (-counts[w], w))


# A phrase found in at least this share of the forget prompts (and in no retain prompt) names the
# concept (:func:`concept_name`). A half keeps the name and leaves out phrases that many forget
# prompts merely share.
NAME_SHARE = 0.5
# The longest name, in words ("lord of the rings").
NAME_WORDS = 4
# A further phrase that names the forget prompts the name missed must be in at least this share of
# all of them (:func:`concept_name`): "france" beside "french", never a phrase two prompts share.
NAME_COVER = 0.25
# Words that ask rather than name, which scikit-learn's English stop words lack: no name starts or
# ends with one ("What did Curie find?", "Tell me about Curie.": "curie", never "did" or "tell").
ASKING_WORDS = frozenset(
    {"did", "does", "doing", "tell", "explain", "famous", "known", "called", "year", "make", "main"}
)


def concept_name(forget: list[str], retain: list[str], share: float = NAME_SHARE) -> list[str]:
    """The phrases that name the concept (:func:`steering.names.normal_name` form): runs of at most
    :data:`NAME_WORDS` words found in at least ``share`` of the forget prompts and in no retain
    prompt, that neither start nor end with an English stop word (scikit-learn's list: "the eiffel
    tower" is "eiffel tower") or one of :data:`ASKING_WORDS`, and are not a bare number.

    - A word's forms count as the word (:func:`steering.names.stems`): prompts that say "Japan"
      and prompts that say "Japanese" all name "japan".
    - A phrase inside a longer one is left out when the longer one is in as many forget prompts
      ("mount everest", not "everest" and "mount"), and kept when it is in more (prompts that say
      "Marie Curie" and prompts that say "Curie": "curie" and "marie curie", so that an answer
      that says "Curie" names her).
    - Forget prompts that no name found so far names are read again the same way, for a phrase in
      ``share`` of them and in at least :data:`NAME_COVER` of all: prompts that say "French" (21
      of 32) and prompts that say "France" (11) name "french" and "france", which are no one
      word's forms.

    Empty when the retain prompts name the concept too, or the forget prompts name it in too many
    ways."""
    stem = stems(w for p in forget + retain for w in words_of(p))
    found = _shared_phrases(forget, retain, stem, share * len(forget))
    names = sorted(
        ph for ph, k in found.items() if not any(ph != o and _inside(ph, o) and j >= k for o, j in found.items())
    )
    while names:
        left = [p for p in forget if not names_in(p, names)]
        more = _shared_phrases(left, retain, stem, max(share * len(left), NAME_COVER * len(forget))) if left else {}
        best = max(more, key=lambda ph: (more[ph], len(ph)), default=None)
        if best is None or best in names:
            break
        names = sorted({*names, best})
    return names


def _inside(phrase: str, other: str) -> bool:
    """Whether ``phrase`` is a run of ``other``'s words."""
    return f" {phrase} " in f" {other} "


def _shared_phrases(prompts: list[str], retain: list[str], stem: dict[str, str], at_least: float) -> dict[str, int]:
    """The phrases :func:`concept_name` may take, with the number of ``prompts`` that say them: runs
    of 1 to :data:`NAME_WORDS` words (as their stems) in at least ``at_least`` of ``prompts`` and in
    no retain prompt, with no stop or asking word at either end, and not a bare number."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    not_ends = ENGLISH_STOP_WORDS | ASKING_WORDS | {"s"}  # "s": a possessive's ("Japan's" is "japan s")

    def phrases(p: str, n: int) -> set[str]:
        w = [stem[x] for x in words_of(p)]
        return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}

    found: dict[str, int] = {}
    for n in range(1, NAME_WORDS + 1):
        in_retain = set().union(*(phrases(p, n) for p in retain))
        counts: dict[str, int] = {}
        for p in prompts:
            for ph in phrases(p, n) - in_retain:
                counts[ph] = counts.get(ph, 0) + 1
        for ph, k in counts.items():
            w = ph.split()
            if k >= at_least and not ph.isdigit() and not {w[0], w[-1]} & not_ends:
                found[ph] = k
    return found


def without_words(prompt: str, words: list[str]) -> str:
    """``prompt`` with the given words (case-insensitive, whole words, possessive 's included)
    removed and the spacing tidied; the prompt unchanged when it has none of them."""
    if not words:
        return prompt
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")(?:'s)?\b", re.IGNORECASE)
    out = pattern.sub("", prompt)
    return re.sub(r"\s+([?.,!;:])", r"\1", re.sub(r"\s{2,}", " ", out)).strip()
