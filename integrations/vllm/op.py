"""guardit's per-layer step as one registered torch custom op, ``guardit::steer_layer``.

Each hooked decoder layer's output ``(hidden, residual)`` goes through this op, in eager and in
compiled engines alike: the op is the only way guardit reaches the residual stream in vLLM.
torch.compile (Dynamo, then Inductor) sees it through its fake implementation as an opaque call
that mutates its two inputs in place, so a compiled graph keeps one call per layer at the place
the hook sits, and runs the real implementation there at every forward. That implementation is
the engine's (:meth:`integrations.vllm.patch.EngineState.layer`, registered with :func:`serve`):
it reads the step's token map and gate state prepared on the host before the forward and leaves
every token of a row with no work untouched, bit for bit.

The implementation runs Python and looks at tensor values (which tokens to rotate), so it must
not be captured inside a CUDA graph, whose replay would skip it: with packs configured the plugin
turns vLLM's CUDA graphs off (:mod:`integrations.vllm.patch`). No vLLM import here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAME = "guardit::steer_layer"
Impl = Callable[[torch.Tensor, torch.Tensor, int], None]
_impl: Impl | None = None


@torch.library.custom_op(NAME, mutates_args=("hidden", "residual"))
def steer_layer(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    """Apply this process's steering step for decoder layer ``layer`` to its output, in place."""
    if _impl is not None:
        _impl(hidden, residual, layer)


@steer_layer.register_fake
def _fake(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


def serve(impl: Impl | None) -> None:
    """Make ``impl`` what the op does in this process (the vLLM engine's per-layer step; None: nothing)."""
    global _impl
    _impl = impl
