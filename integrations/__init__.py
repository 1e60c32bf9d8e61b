"""integrations: guardit's hooks for serving engines (``integrations.hf``, ``integrations.vllm``)."""
