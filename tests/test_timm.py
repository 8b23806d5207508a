"""timm's optimizer factory with fused_optim: registered under a name, built by
``create_optimizer_v2`` with layer-wise lr decay (one param group per layer and decay class),
trained bitwise as torch.optim.AdamW (its fp32 arithmetic rounded correctly).

timm is not a test extra: it requires torchvision, and pip would replace the CPU build of torch
to satisfy it. CI installs it with ``pip install --no-deps timm==1.0.31`` (its other
requirements come with transformers). When torchvision itself is missing, the test stands in a
placeholder for it before importing timm: timm's model and optimizer code does not run
torchvision, it only imports names from it at module level (image transforms, a frozen
batch-norm layer) that this test never uses.
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

import fused_optim
from fused_optim.testing import correctly_rounded_optimizer


class _InterpolationMode(enum.Enum):
    """torchvision.transforms.InterpolationMode's members, which timm indexes at import."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _Unused(type):
    """Any torchvision class or function timm names at import; using one is an error."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __call__(cls, *args, **kwargs):
        raise RuntimeError("torchvision is a placeholder in this test")


class _Placeholder(metaclass=_Unused):
    pass


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _InterpolationMode if name == "InterpolationMode" else _Placeholder


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torchvision`` and its lower-case submodules as placeholder modules."""

    def find_spec(self, name, path=None, target=None):
        top, _, last = name.rpartition(".")
        if (name == "torchvision" or top.startswith("torchvision")) and last.islower():
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _import_timm():
    if importlib.util.find_spec("timm") is None:
        pytest.skip(
            "timm is not installed: `pip install --no-deps timm==1.0.31` (CI does); its "
            "torchvision requirement would make pip replace the CPU build of torch"
        )
    if importlib.util.find_spec("torchvision") is None and "timm" not in sys.modules:
        finder = _TorchvisionPlaceholder()
        sys.meta_path.insert(0, finder)
        try:
            import timm.optim
        finally:
            sys.meta_path.remove(finder)
    import timm
    import timm.optim

    return timm


@pytest.fixture(scope="module")
def timm():
    return _import_timm()


def _vit(timm):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
        depth=4, embed_dim=48, num_heads=2,
    )  # fmt: skip


def _register(timm, name, cls):
    from timm.optim import OptimInfo
    from timm.optim._optim_factory import default_registry

    default_registry.register(OptimInfo(name=name, opt_class=cls, description=name, has_betas=True))


def test_timm_layer_decay_trains_bitwise_as_torch(timm):
    """The README's recipe: register fused_optim.AdamW under a name without underscores and
    build it with timm's layer-wise lr decay; 3 steps of a small ViT equal torch.optim.AdamW's,
    built the same way, bit for bit, with every layer group in one launch."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    _register(timm, "fusedoptimadamw", fused_optim.AdamW)
    _register(timm, "torchadamwcr", correctly_rounded_optimizer(torch.optim.AdamW))
    models, optimizers, schedulers = [], [], []
    for name in ("fusedoptimadamw", "torchadamwcr"):
        model = _vit(timm)
        models.append(model)
        opt = create_optimizer_v2(model, name, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        optimizers.append(opt)
        # timm's schedulers apply each layer group's lr_scale to its lr.
        schedulers.append(CosineLRScheduler(opt, t_initial=6, warmup_t=2, warmup_lr_init=1e-4))
    fused, reference = optimizers
    assert isinstance(fused, fused_optim.AdamW)
    assert len(fused.param_groups) == len(reference.param_groups) > 6
    assert len({group["lr"] for group in fused.param_groups}) > 3  # the decay made distinct lrs
    initial = [p.detach().clone() for p in models[0].parameters()]
    images = torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (3, 4), generator=torch.Generator().manual_seed(2))
    for step in range(3):
        for model, opt, scheduler in zip(models, optimizers, schedulers):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(images[step]), labels[step]).backward()
            opt.step()
            scheduler.step(step + 1)
    assert fused.launches_per_step() == 1
    assert set(fused.group_backends()) == {"cpu"}
    for ours, theirs, start in zip(models[0].parameters(), models[1].parameters(), initial):
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()
        assert not torch.equal(ours, start)


def test_timm_parses_underscores_in_optimizer_names(timm):
    """The pitfall the README warns about: timm keeps only the part after the last underscore
    of the name it is given, so a class registered as ``fused_adamw`` is never used and
    ``create_optimizer_v2(model, "fused_adamw")`` silently builds torch.optim.AdamW."""
    from timm.optim import create_optimizer_v2

    _register(timm, "fused_adamw", fused_optim.AdamW)
    opt = create_optimizer_v2(_vit(timm), "fused_adamw", lr=1e-3)
    assert type(opt) is torch.optim.AdamW
