"""Greedy generation over a prompt file with the HF engine (vLLM: ``guardit.vllm_generation``).

Each result is ``{"prompt", "output", "gate": {pack_id: {"score", "fired"}}, "answers"?}``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from calibration.capture import encode_chat, pad_batch
from calibration.prompts import PromptRecord
from integrations.hf import steer
from steering.pack import ConceptPack


@torch.no_grad()
def hf_generate(
    model,
    tokenizer,
    records: Sequence[PromptRecord],
    packs: Sequence[ConceptPack] = (),
    max_tokens: int = 48,
    batch_size: int = 16,
    force: bool = False,
    angles: dict[str, float] | None = None,
    progress: bool = True,
    desc: str = "generating (hf)",
) -> list[dict]:
    results: list[dict] = []
    ids = encode_chat(tokenizer, [r.prompt for r in records])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    starts = range(0, len(records), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        chunk = ids[s : s + batch_size]
        inp, mask = pad_batch(chunk, pad)
        width = inp.shape[1]
        kwargs = dict(input_ids=inp, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
        if packs:
            with steer(model, packs, force=force, angles=angles, tokenizer=tokenizer) as session:
                out = model.generate(**kwargs)
                gates = session.gates()
        else:
            out = model.generate(**kwargs)
            gates = [{} for _ in chunk]
        for r, rec in enumerate(records[s : s + batch_size]):
            new = out[r, width:].tolist()
            eos = {tokenizer.eos_token_id, pad}
            trimmed = []
            for t in new:
                if t in eos:
                    break
                trimmed.append(t)
            row = {
                "prompt": rec.prompt,
                "output": tokenizer.decode(trimmed, skip_special_tokens=True),
                "token_ids": trimmed,
                "gate": {k: _reading(v) for k, v in gates[r].items()},
            }
            if rec.answers:
                row["answers"] = list(rec.answers)
            results.append(row)
    return results


def _reading(v) -> dict:
    out = {"score": round(v.score, 5), "fired": v.fired}
    if v.text_score is not None:
        out["text_score"] = round(v.text_score, 5)
    return out


def leaked(output: str, answers: Sequence[str]) -> bool:
    """True when any acceptable answer string occurs in the output at the start of a word,
    case-insensitively: an answer may be a word's stem ("Ital" for Italy, Italian, Italia), but
    "Ital" inside "digital" or "Ron" inside "environment" is not the answer."""
    return any(re.search(r"(?<!\w)" + re.escape(a), output, re.IGNORECASE) for a in answers if a)
