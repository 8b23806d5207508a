"""Hugging Face Trainer with fused_optim, the two ways it takes a custom optimizer.

``Trainer(optimizers=(fused_optim.AdamW(...), None))`` and
``Trainer(optimizer_cls_and_kwargs=(fused_optim.AdamW, {...}))`` (transformers and accelerate are
test dependencies; the model is a tiny GPT-2 built from a config, nothing is downloaded). Both
train with Trainer's gradient clipping (``max_grad_norm``) and match torch.optim.AdamW's run.
"""

from __future__ import annotations

import pytest
import torch

import fused_optim

transformers = pytest.importorskip(
    "transformers", reason="transformers is installed with the test extras (pip install -e .[test])"
)
pytest.importorskip("accelerate", reason="Trainer needs accelerate (a test extra)")

LR, WEIGHT_DECAY = 1e-3, 0.1


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 32, length: int = 12, vocab: int = 64):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (count, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _train(tmp_path, how: str, cls, clip_in_optimizer: bool = False):
    """Trainer with ``cls`` handed over ``how``: built by us (``optimizers``; every param in one
    group) or by Trainer (``optimizer_cls_and_kwargs``; no decay for biases and LayerNorms).
    ``clip_in_optimizer``: Trainer's clipping off (``max_grad_norm=0``), the optimizer's own
    (``max_grad_norm=1.0``) on."""
    model = _model()
    kwargs = dict(lr=LR, weight_decay=WEIGHT_DECAY)
    if clip_in_optimizer:
        kwargs["max_grad_norm"] = 1.0
    extra = {}
    if how == "optimizers":
        extra["optimizers"] = (cls(model.parameters(), **kwargs), None)
    else:
        extra["optimizer_cls_and_kwargs"] = (cls, kwargs)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"{how}-{cls.__module__}-{clip_in_optimizer}"),
        per_device_train_batch_size=8,
        max_steps=6,
        max_grad_norm=0.0 if clip_in_optimizer else 1.0,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), **extra)
    trainer.train()
    return model, trainer.optimizer


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_hf_trainer_trains_with_fused_optim_as_with_torch_optim(tmp_path, how):
    """Six clipped steps: fused_optim's params follow torch.optim.AdamW's within 1e-5 (the
    difference is torch's fp32 sqrt rounding on this CPU), and every param that had a grad
    moved."""
    ours, optimizer = _train(tmp_path, how, fused_optim.AdamW)
    theirs, _ = _train(tmp_path, how, torch.optim.AdamW)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    assert isinstance(inner, fused_optim.AdamW)
    assert inner.group_backends()[0] in fused_optim.available_backends("cpu")
    start = _model()
    for (name, a), b, s in zip(ours.named_parameters(), theirs.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
        assert not torch.equal(a, s), name


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_hf_trainer_with_the_clip_folded_into_the_step(tmp_path, how):
    """The README's recipe: ``TrainingArguments(max_grad_norm=0)`` turns Trainer's clipping off
    and ``fused_optim.AdamW(..., max_grad_norm=1.0)`` clips inside its step; the params follow
    Trainer's own clipping with torch.optim.AdamW within the bound above."""
    ours, optimizer = _train(tmp_path, how, fused_optim.AdamW, clip_in_optimizer=True)
    theirs, _ = _train(tmp_path, how, torch.optim.AdamW)
    inner = getattr(optimizer, "optimizer", optimizer)
    assert inner.last_grad_norm is not None and float(inner.last_grad_norm) > 1.0  # it clipped
    start = _model()
    for (name, a), b, s in zip(ours.named_parameters(), theirs.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
        assert not torch.equal(a, s), name
