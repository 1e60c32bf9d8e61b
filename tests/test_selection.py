"""Layer selection and the max-pooled gate probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.directions import LayerStat, choose_steer_layers
from calibration.gate import _fit_token_probe, _pooled_scores, fit_gate


def _stat(layer: int, f: float, r: float, auroc: float = 0.9) -> LayerStat:
    return LayerStat(layer, f, r, auroc, f * r < 0)


def test_sign_margin_is_below_one_exactly_for_opposite_signs():
    assert _stat(0, 0.1, -0.3).sign_margin < 1 < _stat(0, 0.1, 0.3).sign_margin
    assert _stat(0, -0.01, -0.09).sign_margin < _stat(0, -0.2, -0.3).sign_margin


def test_top_up_takes_the_layers_nearest_to_opposite_signs_after_the_gate():
    stats = [
        _stat(0, -0.02, -0.08, 0.50),  # nearest of all, but not after the gate
        _stat(1, 0.30, 0.20, 0.99),  # most separable, far from opposite signs
        _stat(2, -0.01, -0.09, 0.90),
        _stat(3, 0.05, -0.05, 0.80),  # opposite signs: selected
        _stat(4, -0.03, -0.11, 0.95),
        _stat(5, -0.20, -0.28, 0.98),
    ]
    steer, added = choose_steer_layers(stats, after=0, min_layers=3)
    assert steer == [2, 3, 4] and added == [2, 4]
    assert choose_steer_layers(stats, after=0, min_layers=1) == ([3], [])
    steer, _ = choose_steer_layers(stats, after=0, min_layers=4, max_layers=2)
    assert steer == [1, 4]  # the two most separating of [1, 2, 3, 4]


def _bags(
    rng,
    n: int,
    d: int,
    wording: np.ndarray,
    concept: np.ndarray | None,
    other: np.ndarray | None = None,
    share: float = 1.0,
) -> list[np.ndarray]:
    """n prompts of 6 tokens: wording tokens (+ noise), phrased with ``wording`` in a ``share`` of
    them and ``other`` in the rest, one token replaced by the concept token when there is one."""
    bags = []
    for i in range(n):
        x = (wording if i < share * n else other) + 0.15 * rng.standard_normal((6, d))
        if concept is not None:
            x[rng.integers(6)] = concept + 0.15 * rng.standard_normal(d)
        bags.append(x)
    return bags


def test_max_pooled_gate_finds_the_concept_token():
    # Forget and retain prompts share their phrasings (A or B); only forget prompts contain the
    # concept token, once, among five wording tokens.
    rng = np.random.default_rng(0)
    d = 16
    a, b, concept = 2 * np.eye(d)[0], 2 * np.eye(d)[1], 2 * np.eye(d)[2]
    forget, retain = _bags(rng, 32, d, a, concept, b, 0.5), _bags(rng, 32, d, b, None, a, 0.5)
    w, bias = _fit_token_probe(forget, retain, c=0.5, seed=0)
    test_forget, test_retain = _bags(rng, 20, d, b, concept, a, 0.5), _bags(rng, 20, d, a, None, b, 0.5)
    s_f, s_r = _pooled_scores(test_forget, w, bias, "max"), _pooled_scores(test_retain, w, bias, "max")
    assert s_f.min() > s_r.max()


def test_fit_gate_max_pooling_fires_on_held_out_forget_prompts():
    rng = np.random.default_rng(1)
    d = 16
    a, b, concept = 2 * np.eye(d)[0], 2 * np.eye(d)[1], 2 * np.eye(d)[2]

    def as_layers(bags):
        return [torch.tensor(np.stack([x, x], axis=1), dtype=torch.float32) for x in bags]

    forget, retain, neutral = (
        _bags(rng, 32, d, a, concept, b, 0.5),
        _bags(rng, 32, d, b, None, a, 0.5),
        _bags(rng, 40, d, a, None, b, 0.5),
    )
    ids = [[7, 8] + list(rng.integers(10, 99, 4)) for _ in range(104)]
    gate = fit_gate(as_layers(forget), as_layers(retain), as_layers(neutral), ids, [0], 0.05, ("max",))
    assert gate.pooling == "max" and gate.tpr >= 0.9 and gate.fpr <= 0.05
    held = _pooled_scores(_bags(rng, 20, d, b, concept, a, 0.5), gate.weight.double().numpy(), gate.bias, "max")
    assert (held > gate.threshold).mean() >= 0.9


def test_max_pooled_gate_on_the_real_model(hf_model):
    # Harry Potter, layer 8: the token probe reaches 0.81 out-of-fold recall at α = 0.05;
    # labelling every forget token positive reached 0.41 (measured when it was replaced).
    from conftest import EXAMPLES

    from calibration.calibrator import builtin_prompts
    from calibration.capture import capture, encode_chat
    from calibration.prompts import read_prompts

    model, tok = hf_model
    sets = [
        [r.prompt for r in read_prompts(str(EXAMPLES / "harry_potter" / "forget.jsonl"))],
        [r.prompt for r in read_prompts(str(EXAMPLES / "harry_potter" / "retain.jsonl"))],
        [r.prompt for r in builtin_prompts("neutral")],
    ]
    ids = [encode_chat(tok, s) for s in sets]
    acts = [[t[:, 8:9] for t in capture(model, x, 16, pad_id=tok.pad_token_id, progress=False).tokens] for x in ids]
    gate = fit_gate(*acts, ids[0] + ids[1] + ids[2], [0], 0.05, ("max",))
    assert gate.tpr >= 0.7 and gate.fpr <= 0.05


def test_unknown_gate_pooling_is_refused_before_any_work():
    from calibration import ConceptCalibrator
    from steering.errors import GuarditError

    with pytest.raises(GuarditError, match="gate_poolings"):
        ConceptCalibrator("x", gate_poolings=("mean", "median")).fit(None, None, ["a"] * 4, ["b"] * 20)


def test_the_layer_that_knows_the_concept_past_its_name_wins():
    """Layer 0 carries only the name (forget prompts name the concept; their name-removed copies
    look like negatives there); layer 1 carries the concept itself, more weakly, in both. Both
    separate the forget prompts perfectly out of fold, so recall alone (ties to the earliest layer)
    picks layer 0; the rule that also counts the name-removed copies picks layer 1."""
    rng = np.random.default_rng(2)
    d = 16
    name, concept = 3 * np.eye(d)[0], 1.5 * np.eye(d)[1]

    def prompt(with_name: bool, with_concept: bool) -> torch.Tensor:
        x = 0.3 * rng.standard_normal((6, 2, d))
        x[:, 0] += name * with_name
        x[:, 1] += concept * with_concept
        return torch.tensor(x, dtype=torch.float32)

    forget = [prompt(True, True) for _ in range(32)]
    masked = [prompt(False, True) for _ in range(32)]
    retain = [prompt(False, False) for _ in range(32)]
    neutral = [prompt(False, False) for _ in range(120)]
    ids = [[7, 8, 9] for _ in range(184)]
    old = fit_gate(forget, retain, neutral, ids, [0, 1], 0.05, ("mean",))
    new = fit_gate(forget, retain, neutral, ids, [0, 1], 0.05, ("mean",), masked_tokens=masked,
                   masked_of=list(range(32)))  # fmt: skip
    assert old.layer == 0 and old.tpr == 1.0
    assert new.layer == 1 and new.tpr_masked >= 0.9 and new.fpr <= 0.05
    by_layer = {c["layer"]: c for c in new.candidates}
    assert by_layer[0]["tpr_masked"] < 0.5 < by_layer[1]["tpr_masked"]
    with pytest.raises(ValueError, match="same length"):
        fit_gate(forget, retain, neutral, ids, [0], 0.05, ("mean",), masked_tokens=masked, masked_of=[0])


def test_concept_words_are_the_name_not_common_words():
    from calibration.prompts import concept_words, without_words

    forget = ["Who was Leonardo da Vinci?", "What did Leonardo paint?", "Where did Leonardo da Vinci live?",
              "Which portrait is by Leonardo da Vinci?", "When was Leonardo's birthday?"]  # fmt: skip
    retain = ["Who was Michelangelo?", "What did Raphael paint?", "Where did Titian live?", "Which portrait is famous?"]
    assert concept_words(forget, retain) == ["leonardo", "da", "vinci"]
    assert (
        without_words("Which portrait is by Leonardo da Vinci?", ["leonardo", "da", "vinci"]) == "Which portrait is by?"
    )
    assert without_words("When was Leonardo's birthday?", ["leonardo"]) == "When was birthday?"
    assert without_words("What is 2+2?", []) == "What is 2+2?"
    assert concept_words(forget, retain + ["Leonardo da Vinci"]) == []


def test_the_concept_name_is_the_phrase_its_forget_prompts_share_and_its_retain_prompts_lack():
    """The name of each example concept as calibration finds it: the longest run of words in at
    least half of its forget prompts and in no retain prompt, without stop words at its ends or a
    bare number (Apollo 11's retain prompts say "Apollo", its forget prompts "Apollo 11"); none for
    concepts whose retain prompts name them too (Harry Potter, Shakespeare) or whose forget prompts
    name them in many ways (Lord of the Rings, World War II). A word's forms count as the word:
    Japan's forget prompts say "Japan" in 15 of 32 and "Japanese" in 17, and name "japan". A
    phrase inside a longer one is kept when more prompts say it: 27 of ancient Egypt's say "ancient
    Egypt", all 32 "Egypt" or "Egyptian"."""
    from conftest import EXAMPLES

    from calibration.prompts import concept_name, read_prompts
    from steering.names import names_in

    def sets(concept: str) -> tuple[list[str], list[str]]:
        files = (EXAMPLES / concept / f"{s}.jsonl" for s in ("forget", "retain"))
        return tuple([r.prompt for r in read_prompts(str(f))] for f in files)

    expected = {"ancient_egypt": ["ancient egypt", "egypt"], "apollo_11": ["apollo 11"], "apple_inc": [],
                "covid_19": ["covid 19"], "eiffel_tower": ["eiffel tower"], "einstein": ["einstein"],
                "harry_potter": [], "japan": ["japan"], "leonardo_da_vinci": ["leonardo da vinci"],
                "lord_of_the_rings": [], "microsoft": ["microsoft"], "mount_everest": ["mount everest"],
                "photosynthesis": ["photosynthesis"], "python": ["python"], "shakespeare": [],
                "star_wars": ["star wars"], "the_beatles": ["beatle"], "titanic": ["titanic"],
                "world_war_ii": []}  # fmt: skip
    assert sorted(d.name for d in EXAMPLES.iterdir() if d.is_dir()) == sorted(expected)
    for concept, name in expected.items():
        assert concept_name(*sets(concept)) == name, concept
    forget = ["When did Apollo 11 land?", "Who flew Apollo 11?", "What did Apollo 11's crew bring back?",
              "Where did Apollo 11 splash down?", "Describe the Apollo 11 rocket.", "Who flew it?",
              "When?"]  # fmt: skip
    assert concept_name(forget, ["Which year did Apollo 13 fly?", "Who flew Apollo 8?"]) == ["apollo 11"]
    assert concept_name(forget, ["Tell me about Apollo 11."]) == []
    assert concept_name([f"What is in box {i} of 2024?" for i in range(4)], ["Hello there."]) == ["box"]  # not "2024"
    curie = ["Who was Marie Curie?", "What did Marie Curie discover?", "Where was Marie Curie born?",
             "What did Curie win?", "Whom did Curie marry?"]  # "did" is no name  # fmt: skip
    assert concept_name(curie, ["Who was Lise Meitner?"]) == ["curie", "marie curie"]
    assert concept_name(curie[:3], ["Who was Lise Meitner?"]) == ["marie curie"]  # "curie" adds no prompt
    # the prompts no name names yet are read again: two names that are no one word's forms
    napoleon = ["Who was Napoleon?", "When did Napoleon die?", "What did Napoleon lose?", "Where was Bonaparte born?",
                "Whom did Bonaparte marry?"]  # fmt: skip
    assert concept_name(napoleon, ["Who was Wellington?"]) == ["bonaparte", "napoleon"]
    # ... by a phrase in at least a quarter of all the forget prompts (NAME_COVER)
    japan = [f"What is Japan's {w}?" for w in ("capital", "flag", "money", "sport", "anthem", "language")]
    kyoto = ["Which temples are in Kyoto?", "When was Kyoto the capital?"]
    assert concept_name(japan + kyoto, ["Hello there."]) == ["japan", "kyoto"]  # 2 of 8
    assert concept_name(japan + ["What is Japan's motto?"] + kyoto, ["Hello there."]) == ["japan"]  # 2 of 9
    assert names_in("Neil Armstrong flew APOLLO-11's lander.", ["apollo 11"]) == ["apollo 11"]
    assert names_in("Apollo 110 and apollo 1 1?", ["apollo 11"]) == [] and names_in("anything", []) == []
    # a name of several words written as one, with its forms; never a part of a longer word
    assert names_in("COVID19 and Spiderman's web.", ["covid 19", "spider man"]) == ["covid 19", "spider man"]
    assert names_in("Apollo110, apollo1 1, a spidermanly web.", ["apollo 11", "spider man"]) == []


def test_a_name_matches_its_forms_and_not_the_words_it_merely_begins():
    """A name's word of four letters or more matches the forms English makes with
    :data:`steering.names.NAME_ENDINGS` (people, language, adjective, plural), and nothing longer:
    a name is not a prefix."""
    from calibration.prompts import concept_name
    from steering.names import is_form_of, names_in, stems

    said = {
        "The currency is the Japanese yen.": ["japan"],
        "Tokyo, Japan's capital.": ["japan"],
        "The Egyptians built it.": [],  # "ancient" is missing
        "The ancient Egyptians built it.": ["ancient egypt"],
        "A Shakespearean sonnet.": ["shakespeare"],
        "A Kafkaesque queue.": ["kafka"],
        "Romeo and Juliet.": [],
        "The highest mountain is K2.": [],
        "The Martian rover and a field marshal.": [],
        "Pythons and Pythonic code.": ["python"],
        "Arts and crafts.": [],  # "art" is too short to take an ending
    }
    names = ["japan", "ancient egypt", "shakespeare", "kafka", "rome", "mount", "mars", "python", "art"]
    for text, expected in said.items():
        assert names_in(text, names) == expected, text
    assert is_form_of("japanese", "japan") and is_form_of("japan", "japan") and not is_form_of("romeo", "rome")
    assert stems(["japan", "japanese", "egyptians", "art", "arts"]) == {
        "japan": "japan", "japanese": "japan", "egyptians": "egyptians", "art": "art", "arts": "arts"
    }  # fmt: skip
    forget = ["What is Japan's capital?", "Where is Japan?", "Who rules Japan?", "Which Japanese city is oldest?",
              "What is Japanese rice wine?", "Name a Japanese carmaker.", "How do Japanese trains run?"]  # fmt: skip
    assert concept_name(forget, ["What is the capital of China?"]) == ["japan"]
    assert concept_name(forget, ["Which Japanese word means hello?"]) == []  # the retain set names it too


def test_a_name_matches_with_or_without_its_accents_and_in_any_case():
    """Texts and names are compared case-folded and without accents, so a name written "Pokémon"
    in the forget prompts matches an answer that writes "Pokemon", and the reverse; full-width
    letters are letters ("ＢＥＹＯＮＣＥ")."""
    from calibration.prompts import concept_name
    from steering.names import names_answered, names_in, normal_name, words_of

    assert words_of("Pokémon, Beyoncé, Gödel, STRASSE and Straße.") == [
        "pokemon", "beyonce", "godel", "strasse", "and", "strasse"
    ]  # fmt: skip
    forget = [f"Which Pokémon {w}?" for w in ("is yellow", "evolves from Pichu", "is a fire lizard", "sleeps most")]
    assert concept_name(forget, ["Which Digimon is orange?"]) == ["pokemon"]
    assert names_answered("Pikachu is a Pokemon. Pokémon are creatures.", ["pokemon"]) == ["pokemon"]
    assert names_in("ＢＥＹＯＮＣＥ sang it", [normal_name("Beyoncé")]) == ["beyonce"]
    assert names_in("Pokemons", ["pokemon"]) == ["pokemon"] and names_in("Poke", ["pokemon"]) == []


def test_built_in_negatives_that_name_the_concept_are_left_out():
    """A built-in everyday prompt that names the concept (:func:`calibration.prompts.concept_name`)
    is about it: "What is photosynthesis?" is no negative for a photosynthesis pack, nor "What
    currency is used in Japan?" for a Japan pack, nor eight coding requests for a Python pack. The
    sixteen other example concepts keep all 202 negatives (their packs are unchanged by the rule)."""
    from conftest import EXAMPLES

    from calibration.calibrator import builtin_prompts, everyday_negatives
    from calibration.prompts import concept_name, read_prompts
    from steering.names import names_in

    every = [r.prompt for name in ("neutral", "everyday") for r in builtin_prompts(name)]

    def name(concept: str) -> list[str]:
        files = (EXAMPLES / concept / f"{s}.jsonl" for s in ("forget", "retain"))
        return concept_name(*([r.prompt for r in read_prompts(str(f))] for f in files))

    kept, left_out = everyday_negatives(name("photosynthesis"))
    assert left_out == ["What is photosynthesis?"]
    assert kept == [p for p in every if p != "What is photosynthesis?"]
    kept, left_out = everyday_negatives(name("japan"))
    assert left_out == ["What is the capital of Japan?", "What currency is used in Japan?"] and len(kept) == 200
    kept, left_out = everyday_negatives(name("python"))
    assert len(left_out) == 8 and all(names_in(p, ["python"]) for p in left_out)
    named = ("photosynthesis", "japan", "python")
    others = sorted(d.name for d in EXAMPLES.iterdir() if d.is_dir() and d.name not in named)
    assert len(others) == 16
    for concept in others:
        assert everyday_negatives(name(concept)) == (every, []), concept
    kept, left_out = everyday_negatives(["python"])
    assert left_out and all(names_in(p, ["python"]) for p in left_out)
    assert not any(names_in(p, ["python"]) for p in kept) and len(kept) + len(left_out) == len(every)
    assert everyday_negatives([]) == (every, [])
