"""A concept's name, and whether a text names it: one rule for calibration and serving.

A name is a phrase of words (``"apollo 11"``, ``"mount everest"``). Texts are compared as their
words, case-folded and without accents ("Pokémon" is "pokemon", "Straße" is "strasse"), with
punctuation and spacing ignored, and a name matches whole words only: "Apollo 11's crew",
"APOLLO-11" and "Apollo11" name "apollo 11", "Apollo 110" does not. A name's word of four
letters or more also matches the words English makes from it with a few endings
(:data:`NAME_ENDINGS`): "Japanese" names "japan", "Egyptians" names "egypt", "Shakespearean"
names "shakespeare"; "Romeo" does not name "rome", nor "mountain" "mount".

Calibration finds the name in the forget prompts (:func:`calibration.prompts.concept_name`); it
leaves the built-in everyday prompts that name the concept out of the negatives, and the pack's
answer check fires on an answer whose first sentence names it
(:meth:`steering.runtime.SteeringBank.recheck`, :func:`first_sentence`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache

_WORD = re.compile(r"\w+")
# The endings that make a name's people, language or adjective ("Japan" → "Japanese", "Egypt" →
# "Egyptian", "Shakespeare" → "Shakespearean", "Kafka" → "Kafkaesque"), each with an optional
# plural "s" or "es" (which alone also matches: "Pharaohs"). Kept short, so that a name does not
# match unrelated words it begins ("Rome" → "Romeo", "Mars" → "Marshal").
NAME_ENDINGS = ("n", "an", "ian", "ean", "ese", "ish", "ic", "ist", "ism", "esque")
_ENDING = "(?:" + "|".join(NAME_ENDINGS) + ")?(?:e?s)?"
MIN_STEM = 4  # shorter words ("ai", "us", "art") match themselves only
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# An answer's first sentence is read on into the next ones until it has this many words
# (:func:`first_sentence`): "Sure! The Beatles came from Liverpool." answers with its second.
MIN_SENTENCE_WORDS = 5


def _fold(text: str) -> str:
    """The text case-folded, in Unicode's compatibility form (full-width "ＡＢＣ" is "abc") and without
    combining marks: a name is met written with its accents or without them ("Beyoncé",
    "Beyonce"), and an answer may write it either way."""
    text = unicodedata.normalize("NFKD", text.casefold())
    return unicodedata.normalize("NFC", "".join(c for c in text if not unicodedata.combining(c)))


def words_of(text: str) -> list[str]:
    """The text's words, case-folded and without accents (:func:`_fold`; runs of letters, digits
    and underscores)."""
    return _WORD.findall(_fold(text))


def normal_name(phrase: str) -> str:
    """A name as it is stored and compared: its words, lower-cased, joined by single spaces ("" when
    it has none)."""
    return " ".join(words_of(phrase))


def _word_pattern(word: str) -> str:
    """A regular expression for one word of a name: itself, and its :data:`NAME_ENDINGS` forms when
    it is a word of letters at least :data:`MIN_STEM` long."""
    ending = _ENDING if len(word) >= MIN_STEM and word.isalpha() else ""
    return re.escape(word) + ending


@lru_cache(maxsize=1024)
def _name_pattern(name: str) -> re.Pattern[str]:
    """A name's whole-word pattern over :func:`normal_name` text: its words, or a name of several
    words written as one ("covid 19" is met as "COVID19", "spider man" as "Spiderman")."""
    words = name.split()
    ways = [" ".join(map(_word_pattern, words))]
    if len(words) > 1:
        ways.append("".join(map(re.escape, words[:-1])) + _word_pattern(words[-1]))
    return re.compile(r"(?<!\S)(?:" + "|".join(ways) + r")(?!\S)")


def is_form_of(word: str, stem: str) -> bool:
    """Whether ``word`` is ``stem`` or one of its :data:`NAME_ENDINGS` forms ("japanese", "japan")."""
    return re.fullmatch(_word_pattern(stem), word) is not None


def stems(words: Iterable[str]) -> dict[str, str]:
    """Each word mapped to the shortest of ``words`` it is a form of (:func:`is_form_of`), or to
    itself: "japanese" → "japan" when both occur. Calibration counts a name's forms as the name."""
    vocab = set(words)
    out: dict[str, str] = {}
    for w in vocab:
        shorter = (w[:k] for k in range(MIN_STEM, len(w)))
        out[w] = next((v for v in shorter if v in vocab and is_form_of(w, v)), w)
    return out


def names_in(text: str, names: Sequence[str]) -> list[str]:
    """The names (in :func:`normal_name` form) that ``text`` contains as whole words or their
    forms (:data:`NAME_ENDINGS`), in the order given."""
    if not names:
        return []
    words = normal_name(text)
    return [n for n in names if n and _name_pattern(n).search(words)]


def first_sentence(answer: str) -> str:
    """The answer up to its first ".", "!" or "?" followed by a space or a line break (the whole
    answer when it has none), taken on over the next sentences while it has fewer than
    :data:`MIN_SENTENCE_WORDS` words. What an answer says first is its answer ("The highest
    mountain in the world is Mount Everest."); a name met later is mostly context ("A black hole is
    a region … It is predicted by Einstein's theory"), and that is how everyday answers mention a
    concept. A short opening ("Sure!", "Great question.", "The Great White Shark.") is not yet the
    answer: what follows it is ("… I was on the RMS Titanic")."""
    taken, words = [], 0
    for sentence in _SENTENCE_END.split(answer.strip()):
        taken.append(sentence)
        words += len(words_of(sentence))
        if words >= MIN_SENTENCE_WORDS:
            break
    return " ".join(taken)


def names_answered(answer: str, names: Sequence[str]) -> list[str]:
    """The names an answer gives: those its :func:`first_sentence` contains (:func:`names_in`). The
    answer check fires on any (:meth:`steering.runtime.SteeringBank.recheck`)."""
    return names_in(first_sentence(answer), names)
