"""guardit's custom op (``guardit::steer_layer``) under torch.compile, without vLLM: the hook that
calls it is traced into the graph, the op's implementation runs at every call of the compiled code
with that call's tensors, its in-place writes reach the layers after it, and tokens it does not
write stay bit-identical to the model without the hook."""

from __future__ import annotations

import torch

from integrations.vllm import op
from integrations.vllm.patch import _hook


class _Layer(torch.nn.Module):
    """A decoder layer in vLLM's form: returns (hidden, residual), the stream being their sum."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden + residual
        return torch.tanh(self.lin(residual)), residual


class _Model(torch.nn.Module):
    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, residual = x, torch.zeros_like(x)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return hidden + residual


def test_the_op_runs_inside_compiled_code_with_live_tensors():
    torch.manual_seed(0)
    model = _Model().eval()
    x = torch.randn(6, 16)
    with torch.no_grad():
        eager, eager3 = model(x), model(x[:3])
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(_hook(i))
    calls: list[tuple[int, int]] = []
    rows = {"steer": torch.tensor([], dtype=torch.long)}  # host state read at run time, as the engine's step

    def impl(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
        calls.append((layer, hidden.shape[0]))
        if layer == 1:
            idx = rows["steer"]
            hidden[idx] = -(hidden[idx] + residual[idx])  # the stream's value, written whole
            residual[idx] = 0

    op.serve(impl)
    try:
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
        with torch.no_grad():
            # The compiled graph steering no row: the reference (inductor's kernels may round
            # differently from eager ones, so rows are compared within the same compiled code).
            plain, plain3 = compiled(x), compiled(x[:3])
            calls.clear()
            rows["steer"] = torch.tensor([1, 4])
            first = compiled(x)
            rows["steer"] = torch.tensor([0])
            second = compiled(x[:3])
    finally:
        op.serve(None)
    assert torch.allclose(plain, eager, atol=1e-5) and torch.allclose(plain3, eager3, atol=1e-5)
    assert calls == [(0, 6), (1, 6), (2, 6), (0, 3), (1, 3), (2, 3)]
    untouched = [0, 2, 3, 5]
    assert torch.equal(first[untouched], plain[untouched])
    assert not torch.allclose(first[[1, 4]], plain[[1, 4]])
    assert torch.equal(second[1:], plain3[1:]) and not torch.allclose(second[0], plain3[0])
