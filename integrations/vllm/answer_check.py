"""The answer check on ``guardit serve`` (chat and completions, streamed or not; responses and
messages, not streamed).

The packs' answer check (:mod:`steering.text_gate`) reads a request's text with the answer the
model gave. The server holds back the response to a request with such a pack until it is
checked: when the check fires for a pack whose gate stayed closed, the request is run again with
the fired packs forced, and the client gets that answer instead (``x-guardit-fired`` names the
packs, ``x-guardit-answer-check`` the ones the check fired). The decision is
:meth:`steering.runtime.SteeringBank.recheck`, as in ``guardit generate`` on both engines.

The request text is rebuilt here from the request body with the served model's tokenizer (the
chat template with a generation prompt, as vLLM applies it), then read as the text gate reads it
(:func:`steering.text_gate.request_text`). A streamed request is generated whole, checked, and
then sent as a stream (:func:`event_stream`): a stream's tokens cannot be taken back once sent,
so an unchecked stream would be a way around the check.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from integrations.vllm.config import ENV_MODEL
from steering.errors import PolicyError
from steering.pack import load_packs
from steering.policy import PolicyConfig, RequestSpec
from steering.runtime import SteeringBank


def _content(message: dict) -> str:
    """A chat message's text (OpenAI content parts joined)."""
    c = message.get("content")
    if isinstance(c, list):
        return "\n".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c if isinstance(c, str) else ""


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
RESPONSES, MESSAGES = "/v1/responses", "/v1/messages"
STREAMED = (CHAT, COMPLETIONS)  # the routes whose checked answers can be sent as a stream


def _turns(route: str, body: dict) -> list[dict]:
    """A chat, responses or messages request as chat messages for the template (empty when the
    body has nothing to read)."""
    system: object = None
    if route == CHAT:
        items = body.get("messages")
    elif route == RESPONSES:
        system, items = body.get("instructions"), body.get("input")
        items = [{"role": "user", "content": items}] if isinstance(items, str) else items
    else:
        system, items = body.get("system"), body.get("messages")
    turns = [{"role": "system", "content": _content({"content": system})}] if system else []
    if isinstance(items, list):
        turns += [{"role": m.get("role", "user"), "content": _content(m)} for m in items if isinstance(m, dict)]
    return turns


def _answers(route: str, response: dict) -> list[str]:
    """The answer texts of a response: one per choice (chat, completions) or the whole message
    (responses: its message items' text; messages: its text blocks)."""
    if route in STREAMED:
        return [(_content(c["message"]) if "message" in c else c.get("text", "")) or ""
                for c in response.get("choices") or []]  # fmt: skip
    if route == RESPONSES:
        parts = [_content(o) for o in response.get("output") or [] if o.get("type") == "message"]
    else:
        parts = [_content({"content": response.get("content")})]
    text = "\n".join(p for p in parts if p)
    return [text] if text else []


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
        """Does this request get its answer checked? (A guarded route that gives text, packs with
        a check, not forced, a prompt that can be read.) A stream on a route whose checked answer
        cannot be streamed (responses, messages) is refused: it would leave unchecked."""
        if route not in (*STREAMED, RESPONSES, MESSAGES) or spec.force:
            return False
        readable = isinstance(body.get("prompt"), str) if route == COMPLETIONS else bool(_turns(route, body))
        if not readable or not any(self._has_check(p) for p in spec.packs):
            return False
        if body.get("stream") and route not in STREAMED:
            raise PolicyError(
                f"stream: the answers of packs {sorted(p for p in spec.packs if self._has_check(p))} are "
                f"checked before they are sent, and {route} cannot be streamed after the check; send "
                "stream=false, or stream from /v1/chat/completions"
            )
        return True

    def _has_check(self, pack_id: str) -> bool:
        text = self.bank.packs[self.bank.index[pack_id]].meta.gate.text
        return text is not None and text.answer is not None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def _prompt_ids(self, route: str, body: dict) -> list[int]:
        tok = self.tokenizer
        if route == COMPLETIONS:
            return tok(body["prompt"])["input_ids"]
        text = tok.apply_chat_template(_turns(route, body), add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    def redo(self, route: str, spec: RequestSpec, body: dict, response: dict, fired: Iterable[str]) -> frozenset[str]:
        """The packs to force when running the request again (empty: keep the response): the
        check fires on any of the response's answers."""
        answers = _answers(route, response)
        if not answers:
            return frozenset()
        ids = self._prompt_ids(route, body)
        texts = self.bank.answer_texts(self.tokenizer, [ids] * len(answers), answers)
        known = [p for p in spec.packs if p in self.bank.index]
        n = len(texts)
        redo, _ = self.bank.recheck(texts, answers, [known] * n, [set(fired)] * n, [spec.alpha] * n)
        return frozenset().union(*redo)


def event_stream(response: dict, include_usage: bool) -> bytes:
    """A finished chat or completions response as the server-sent events vLLM streams: per
    choice, one chunk with its whole text (and logprobs), then one with its finish reason; the
    usage chunk when the client asked for it (``stream_options.include_usage``); ``[DONE]``."""
    chat = response.get("object") == "chat.completion"
    head = {
        "id": response.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": response.get("created"),
        "model": response.get("model"),
    }
    chunks = []
    for c in response.get("choices") or []:
        if chat:
            m = c.get("message") or {}
            delta = {"role": m.get("role", "assistant"), "content": m.get("content") or ""}
            first, last = {"delta": delta}, {"delta": {}}
        else:
            first, last = {"text": c.get("text", "")}, {"text": ""}
        shared = {"index": c.get("index", 0), "logprobs": None}
        chunks.append({**head, "choices": [{**shared, **first, "logprobs": c.get("logprobs"), "finish_reason": None}]})
        chunks.append({**head, "choices": [{**shared, **last, "finish_reason": c.get("finish_reason")}]})
    if include_usage:
        chunks.append({**head, "choices": [], "usage": response.get("usage")})
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
