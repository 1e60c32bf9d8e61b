"""guardit: inference-time forgetting for LLM serving (CLI, bundled model, generation, evaluation)."""

__version__ = "0.1.0"
