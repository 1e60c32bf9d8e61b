"""A no-op vLLM logits processor whose only job is ``validate_params``: vLLM calls it when a
request is admitted, so a bad ``guardit_*`` field fails that request alone (HTTP 400 on the
server, an exception offline) and never reaches the batch. Registered through the
``vllm.logits_processors`` entry point."""

from __future__ import annotations

import torch

from integrations.vllm import config
from steering.policy import guardit_fields, parse_request

try:
    from vllm.v1.sample.logits_processor import LogitsProcessor
except ImportError:  # pragma: no cover - vLLM absent
    LogitsProcessor = object  # type: ignore[misc,assignment]


class GuarditValidator(LogitsProcessor):  # type: ignore[misc]
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = getattr(sampling_params, "extra_args", None)
        if not extra or not guardit_fields(extra):
            return
        known, limit = config.known_packs()
        spec = parse_request(extra, known, limit)  # raises PolicyError (a ValueError) naming the field
        if spec is not None:
            spec.check_levels(config.pack_metas())

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        return None
