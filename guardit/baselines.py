"""Simple ungated baselines for the evaluation report, as HF forward hooks at the pack's layers:
directional ablation of the concept direction, and activation addition (ActAdd)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from steering.modules import decoder_layers
from steering.pack import ConceptPack


@contextmanager
def edit_layers(model, layers: list[int], fn):
    """Apply ``fn(layer, h) -> h`` to the outputs of the given decoder layers inside the block."""
    mods = decoder_layers(model)
    handles = []
    for i in layers:

        def hook(_m, _a, out, i=i):
            h = out[0] if isinstance(out, tuple) else out
            new = fn(i, h)
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

        handles.append(mods[i].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ablation(model, pack: ConceptPack):
    """h' = h − (h·d) d at every steered layer, every token, every request (no gate)."""
    dirs = {l: pack.planes[j, 0] for j, l in enumerate(pack.meta.layers)}

    def fn(layer, h):
        d = dirs[layer].to(h.device, torch.float32)
        x = h.to(torch.float32)
        return (x - (x @ d).unsqueeze(-1) * d).to(h.dtype)

    return edit_layers(model, list(dirs), fn)


def actadd(model, pack: ConceptPack, shift: dict[int, float]):
    """h' = h − shift_ℓ · d at every steered layer (no gate); shift_ℓ is the mean difference of the
    forget and retain projections on d_ℓ (from the calibration prompts)."""
    dirs = {l: pack.planes[j, 0] for j, l in enumerate(pack.meta.layers)}

    def fn(layer, h):
        d = dirs[layer].to(h.device, torch.float32)
        return (h.to(torch.float32) - shift[layer] * d).to(h.dtype)

    return edit_layers(model, list(dirs), fn)
