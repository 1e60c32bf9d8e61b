"""vLLM integration: a general plugin (entry point ``vllm.general_plugins``) that patches the model
runner so requests naming concept packs are gated and steered inside the forward pass.

``register()`` runs in every vLLM process before the model loads; it is cheap and idempotent.
"""


def register() -> None:
    from integrations.vllm.patch import install

    install()
