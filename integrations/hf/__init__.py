"""HF transformers integration: ``with steer(model, packs) as session: model.generate(...)``."""

from integrations.hf.session import GateReading, SteerSession, steer

__all__ = ["GateReading", "SteerSession", "steer"]
