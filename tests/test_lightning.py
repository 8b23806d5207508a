"""Lightning's Trainer with fused_optim, as users run it (Lightning is a test dependency).

``Trainer(precision="bf16-mixed", gradient_clip_val=1.0)`` refuses optimizers that say they
unscale gradients themselves (``_step_supports_amp_scaling``): fused_optim says so only to
torch's GradScaler, so this trains, and its steps match torch.optim.AdamW's.
"""

from __future__ import annotations

import pytest
import torch

import fused_optim

lightning = pytest.importorskip(
    "lightning", reason="Lightning is installed with the test extras (pip install -e .[test])"
)


class _Regression(lightning.LightningModule):
    def __init__(self, optimizer_cls, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        self.optimizer_cls = optimizer_cls
        self.norms_before_clipping: list[float] = []
        self.norms_after_clipping: list[float] = []

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def _grad_norm(self) -> float:
        norms = [torch.linalg.vector_norm(p.grad) for p in self.parameters()]
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    def on_before_optimizer_step(self, optimizer):
        self.norms_before_clipping.append(self._grad_norm())

    def configure_optimizers(self):
        optimizer = self.optimizer_cls(self.parameters(), lr=1e-2, weight_decay=0.1)
        # Lightning runs the closure (backward, then clipping) inside step(): after it, the
        # grads the update used.
        optimizer.register_step_post_hook(
            lambda *_: self.norms_after_clipping.append(self._grad_norm())
        )
        return optimizer


def _train(optimizer_cls, gradient_clip_val: float | None = 1.0) -> _Regression:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=gen) * 10  # large grads: the clipping acts
    y = torch.randn(64, 1, generator=gen) * 10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = _Regression(optimizer_cls)
    trainer = lightning.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=gradient_clip_val,
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bf16_mixed_with_gradient_clipping_trains_as_torch_optim(backend):
    """bf16 autocast, clipping by Lightning before each step, 8 steps: fused_optim.AdamW's
    params follow torch.optim.AdamW's. Both see bitwise the same grads at the first step; after
    it, the only difference is torch's fp32 sqrt rounding on this CPU (an ulp on some elements),
    which bf16 forward passes carry on: the bound is 1e-5, where a step off by as little as 1% of
    one update (lr 1e-2) would exceed 1e-4."""

    def fused(params, **kwargs):
        return fused_optim.AdamW(params, backend=backend, **kwargs)

    ours = _train(fused)
    theirs = _train(torch.optim.AdamW)
    assert len(ours.norms_after_clipping) == 8
    # Lightning clipped: the norm the update used is at most 1, from grads far larger.
    assert all(norm > 2.0 for norm in ours.norms_before_clipping)
    assert all(norm <= 1.0 + 1e-5 for norm in ours.norms_after_clipping)
    start = _Regression(torch.optim.AdamW)
    for a, b, s in zip(ours.parameters(), theirs.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert not torch.equal(a, s)


def test_clipping_inside_the_optimizer_step_trains_as_lightning_s_clipping():
    """The README's recipe: no ``gradient_clip_val``, ``max_grad_norm=1.0`` on the optimizer
    (the clip folded into its step). Lightning calls ``step(closure)``; the norm is taken after
    the closure's backward. The params follow Lightning's own clipping with torch.optim.AdamW
    within the bound of the test above, and the gradients in memory stay unclipped."""

    def fused(params, **kwargs):
        return fused_optim.AdamW(params, max_grad_norm=1.0, **kwargs)

    ours = _train(fused, gradient_clip_val=None)
    theirs = _train(torch.optim.AdamW)
    assert all(norm > 2.0 for norm in ours.norms_after_clipping)  # .grad not rewritten
    start = _Regression(torch.optim.AdamW)
    for a, b, s in zip(ours.parameters(), theirs.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert not torch.equal(a, s)
