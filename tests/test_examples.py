"""The example concepts' evaluation splits are held out: no prompt a report measures was seen in
calibration (the retain test splits of three concepts once repeated calibration prompts)."""

from __future__ import annotations

import pytest
from conftest import EXAMPLES

from calibration.prompts import read_prompts
from guardit.evaluate import FORGET_PREFIXES

CALIBRATION = ("forget", "forget_more", "retain", "retain_more")
CONCEPTS = sorted(d.name for d in EXAMPLES.iterdir() if (d / "forget_test.jsonl").is_file())


def _prompts(files) -> dict[str, str]:
    return {r.prompt.strip().lower(): f.name for f in files for r in read_prompts(f)}


@pytest.mark.parametrize("concept", CONCEPTS)
def test_evaluation_prompts_are_not_calibration_prompts(concept):
    d = EXAMPLES / concept
    calib = _prompts(d / f"{name}.jsonl" for name in CALIBRATION if (d / f"{name}.jsonl").is_file())
    evaluated = _prompts(
        f for f in sorted(d.glob("*.jsonl")) if f.stem.startswith(FORGET_PREFIXES) or f.stem == "retain_test"
    )
    assert len(evaluated) >= 24 and len(calib) >= 64
    assert not [(p, evaluated[p], calib[p]) for p in evaluated if p in calib]


def test_the_examples_include_the_nineteen_concepts():
    assert CONCEPTS == [
        "ancient_egypt",
        "apollo_11",
        "apple_inc",
        "covid_19",
        "eiffel_tower",
        "einstein",
        "harry_potter",
        "japan",
        "leonardo_da_vinci",
        "lord_of_the_rings",
        "microsoft",
        "mount_everest",
        "photosynthesis",
        "python",
        "shakespeare",
        "star_wars",
        "the_beatles",
        "titanic",
        "world_war_ii",
    ]
