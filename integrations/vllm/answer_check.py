"""The answer check on ``guardit serve`` (non-streaming chat and completions).

The packs' answer check (:mod:`steering.text_gate`) reads a request's text with the answer the
model gave. The server holds back a non-streaming response to a request with such a pack until it
is checked: when the check fires for a pack whose gate stayed closed, the request is run again with
the fired packs forced, and the client gets that answer instead (``x-guardit-fired`` names the
packs, ``x-guardit-answer-check`` the ones the check fired). The decision is
:meth:`steering.runtime.SteeringBank.recheck`, as in ``guardit generate`` on both engines.

The request text is rebuilt here from the request body with the served model's tokenizer (the
chat template with a generation prompt, as vLLM applies it), then read as the text gate reads it
(:func:`steering.text_gate.request_text`). Streams are not checked: their tokens reach the client
as they are generated.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from integrations.vllm.config import ENV_MODEL
from steering.pack import load_packs
from steering.policy import PolicyConfig, RequestSpec
from steering.runtime import SteeringBank


def _content(message: dict) -> str:
    """A chat message's text (OpenAI content parts joined)."""
    c = message.get("content")
    if isinstance(c, list):
        return "\n".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c if isinstance(c, str) else ""


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"  # the routes whose answers are checked


class ServerAnswerCheck:
    """The configured packs' answer checks, for the middleware (None: no pack has one)."""

    def __init__(self, bank: SteeringBank, model_dir: str) -> None:
        self.bank = bank
        self.model_dir = model_dir
        self._tokenizer = None

    @classmethod
    def from_config(cls, config: PolicyConfig, model_dir: str | None) -> ServerAnswerCheck | None:
        bank = SteeringBank(load_packs(list(config.packs.values())))
        if not bank.has_answer_check():
            return None
        if not model_dir or not Path(model_dir).is_dir():
            raise RuntimeError(
                f"guardit: packs with an answer check need the served model's folder in {ENV_MODEL} "
                f"(guardit serve sets it; got {model_dir!r})"
            )
        return cls(bank, model_dir)

    def applies(self, route: str, spec: RequestSpec, body: dict) -> bool:
        """Does this request get its answer checked? (Chat or completions, packs with a check,
        not forced, not streamed, a prompt that can be read.)"""
        readable = "messages" in body if route == CHAT else isinstance(body.get("prompt"), str)
        if route not in (CHAT, COMPLETIONS) or spec.force or body.get("stream") or not readable:
            return False
        return any(self._has_check(p) for p in spec.packs)

    def _has_check(self, pack_id: str) -> bool:
        text = self.bank.packs[self.bank.index[pack_id]].meta.gate.text
        return text is not None and text.answer is not None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def _prompt_ids(self, body: dict) -> list[int]:
        tok = self.tokenizer
        if "messages" in body:
            msgs = [{"role": m.get("role", "user"), "content": _content(m)} for m in body["messages"]]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(body["prompt"])["input_ids"]

    def redo(self, spec: RequestSpec, body: dict, response: dict, fired: Iterable[str]) -> frozenset[str]:
        """The packs to force when running the request again (empty: keep the response): the
        check fires on any of the response's choices."""
        choices = response.get("choices") or []
        answers = [(_content(c["message"]) if "message" in c else c.get("text", "")) or "" for c in choices]
        if not answers:
            return frozenset()
        ids = self._prompt_ids(body)
        texts = self.bank.answer_texts(self.tokenizer, [ids] * len(answers), answers)
        known = [p for p in spec.packs if p in self.bank.index]
        redo, _ = self.bank.recheck(texts, [known] * len(texts), [set(fired)] * len(texts))
        return frozenset().union(*redo)
