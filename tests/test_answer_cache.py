"""The model's answers to the built-in prompts, kept on disk between calibrations
(:func:`calibration.capture.cached_greedy_answers`): a hit is exactly what generating gives, and any
changed input (prompt, length, a single weight) is a miss, never a stale answer."""

from __future__ import annotations

import json

import pytest
import torch

from calibration import capture
from calibration.capture import cached_greedy_answers, encode_chat, greedy_answers


class Generated(Exception):
    pass


def _refuse(*_args, **_kwargs):
    raise Generated


def test_answers_are_kept_on_disk_and_keyed_by_every_input(hf_model, tmp_path, monkeypatch):
    model, tok = hf_model
    ids = encode_chat(tok, ["What is 2 + 2?", "Name a primary colour."])

    def cached(prompt_ids=ids, tokens=8, folder=tmp_path):
        return cached_greedy_answers(model, tok, prompt_ids, tokens, 32, "test", False, folder)

    first = cached()
    assert first == greedy_answers(model, tok, ids, 8, 32, "test", False)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == first

    monkeypatch.setattr(capture, "greedy_answers", _refuse)
    assert cached() == first  # a hit generates nothing
    for changed in ({"prompt_ids": ids[:1]}, {"tokens": 9}):
        with pytest.raises(Generated):
            cached(**changed)
    weight = model.model.norm.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight[0] += 1.0
    try:
        with pytest.raises(Generated):  # one weight changed: another model
            cached()
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert cached() == first
    monkeypatch.undo()

    files[0].write_text('["half a file"')  # unreadable: generated again and replaced
    assert cached() == first
    assert json.loads(files[0].read_text()) == first
    files[0].write_text('["one answer for two prompts"]')
    assert cached() == first

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="could not keep the answers"):
        assert cached(folder=blocked / "answers") == first
