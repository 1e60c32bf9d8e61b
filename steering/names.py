"""A concept's name, and whether a text names it: one rule for calibration and serving.

A name is a phrase of words (``"apollo 11"``, ``"mount everest"``). Texts are compared as their
words, lower-cased, with punctuation and spacing ignored, and a name matches whole words only:
"Apollo 11's crew" and "APOLLO-11" name "apollo 11", "Apollo 110" does not.

Calibration finds the name in the forget prompts (:func:`calibration.prompts.concept_name`); it
leaves the built-in everyday prompts that name the concept out of the negatives, and the pack's
answer check fires on an answer whose first sentence names it
(:meth:`steering.runtime.SteeringBank.recheck`, :func:`first_sentence`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def words_of(text: str) -> list[str]:
    """The text's words, lower-cased (runs of letters, digits and underscores)."""
    return [w.lower() for w in _WORD.findall(text)]


def normal_name(phrase: str) -> str:
    """A name as it is stored and compared: its words, lower-cased, joined by single spaces ("" when
    it has none)."""
    return " ".join(words_of(phrase))


def names_in(text: str, names: Sequence[str]) -> list[str]:
    """The names (in :func:`normal_name` form) that ``text`` contains as whole words, in the order given."""
    if not names:
        return []
    padded = f" {normal_name(text)} "
    return [n for n in names if n and f" {n} " in padded]


def first_sentence(answer: str) -> str:
    """The answer up to its first ".", "!" or "?" followed by a space or a line break (the whole
    answer when it has none). What an answer says first is its answer ("The highest mountain in the
    world is Mount Everest."); a name met later is mostly context ("A black hole is a region … It
    is predicted by Einstein's theory"), and that is how everyday answers mention a concept."""
    return _SENTENCE_END.split(answer.strip(), maxsplit=1)[0]


def names_answered(answer: str, names: Sequence[str]) -> list[str]:
    """The names an answer gives: those its :func:`first_sentence` contains (:func:`names_in`). The
    answer check fires on any (:meth:`steering.runtime.SteeringBank.recheck`)."""
    return names_in(first_sentence(answer), names)
