"""Greedy generation over a prompt file with the HF engine (vLLM: ``guardit.vllm_generation``).

Each result is ``{"prompt", "messages"?, ..., "output", "token_ids", "gate": {pack_id: {"score",
"fired", ...}}, "answers"?}``: the record's conversation when it has one, and its own other
fields (the "...") as read.

The answer check (packs whose text gate has one, :mod:`steering.text_gate`): once a batch is
generated, each row whose gates stayed closed for some pack is scored on its request text and
answer; a row whose check fires is generated again with the packs that fired forced (rotated from
its first token), and its gate reading for those packs says ``"by": "answer"``. Rows whose checks
stay closed keep their first answer, bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from calibration.capture import encode_chat, generate_batch
from calibration.prompts import PromptRecord
from integrations.hf import steer
from steering.pack import ConceptPack
from steering.runtime import PackUse, SteeringBank


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
    ids = encode_chat(tokenizer, [r.conversation() for r in records])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bank = SteeringBank(list(packs)) if packs and not force else None
    check = bank is not None and bank.has_answer_check()
    angles = dict(angles or {})

    def run(chunk: list[list[int]], rows=None) -> tuple[list[list[int]], list[dict]]:
        if not packs:
            return generate_batch(model, chunk, max_tokens, pad, tokenizer.eos_token_id), [{} for _ in chunk]
        with steer(model, packs, force=force, angles=angles, rows=rows, tokenizer=tokenizer) as session:
            new = generate_batch(model, chunk, max_tokens, pad, tokenizer.eos_token_id)
            return new, [{k: _reading(v) for k, v in g.items()} for g in session.gates()]

    for s in tqdm(range(0, len(records), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = ids[s : s + batch_size]
        new_ids, gates = run(chunk)
        outputs = [tokenizer.decode(x, skip_special_tokens=True) for x in new_ids]
        if check:
            assert bank is not None
            redo = answer_recheck(bank, tokenizer, chunk, outputs, gates)
            again = [i for i, r in enumerate(redo) if r]
            if again:
                rows = [{pid: PackUse(angles.get(pid), True) for pid in redo[i]} for i in again]
                take_reruns(tokenizer, again, *run([chunk[i] for i in again], rows), new_ids, outputs, gates)
        results += [result_row(*x) for x in zip(records[s : s + batch_size], outputs, new_ids, gates)]
    return results


def result_row(rec: PromptRecord, output: str, token_ids: list[int], gate: dict) -> dict:
    """One generation result (the module docstring's format)."""
    row: dict = {"prompt": rec.prompt}
    if rec.messages is not None:
        row["messages"] = rec.conversation()
    row.update(rec.extras)
    row.update(output=output, token_ids=token_ids, gate=gate)
    if rec.answers:
        row["answers"] = list(rec.answers)
    return row


def take_reruns(tokenizer, rows: list[int], new_ids, new_gates, token_ids: list, outputs: list, gates: list) -> None:
    """Put the forced second generations of ``rows`` in place of their first ones, in place."""
    for k, i in enumerate(rows):
        token_ids[i], outputs[i] = new_ids[k], tokenizer.decode(new_ids[k], skip_special_tokens=True)
        mark_answer_fired(gates[i], new_gates[k])


def answer_recheck(
    bank: SteeringBank,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    outputs: Sequence[str],
    gates: list[dict],
    alpha: float | None = None,
) -> list[frozenset[str]]:
    """The answer check of finished rows (either engine): per row, the packs to force when
    generating it again (empty: keep the answer). ``gates[i]``: row i's gate readings by pack
    (every pack that applied to it); each checked pack's reading gains its ``answer_score``.
    ``alpha``: the rows' gate level (None: as calibrated)."""
    texts = bank.answer_texts(tokenizer, prompt_ids, outputs)
    applied = [set(g) for g in gates]
    fired = [{pid for pid, v in g.items() if v["fired"]} for g in gates]
    redo, score = bank.recheck(texts, outputs, applied, fired, [alpha] * len(texts))
    for i, g in enumerate(gates):
        for pid, v in g.items():
            s = float(score[i, bank.index[pid]])
            if s != float("-inf"):
                v["answer_score"] = round(s, 5)
    return redo


def mark_answer_fired(first: dict, again: dict) -> None:
    """Merge a row's readings from its forced second generation into its first ones: a pack that
    the answer check fired now reads fired, ``"by": "answer"``."""
    for pid, v in again.items():
        if not first.get(pid, {}).get("fired"):
            first.setdefault(pid, {"score": v["score"]}).update(fired=True, by="answer")


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


def gives_answer(row: dict) -> bool:
    """Does a generation result row (:func:`result_row`) give one of its answers (:func:`leaked`)?"""
    return leaked(row["output"], row.get("answers", []))
