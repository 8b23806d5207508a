"""`fused-optim demo`: trains both optimizers side by side, agrees, writes a PNG and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fused_optim
from fused_optim.cli import main

CPU_BUILT = pytest.mark.skipif(
    "cpu" not in fused_optim.available_backends("cpu"),
    reason="the C++ cpu backend is not built in this install",
)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=CPU_BUILT), "triton", "reference"])
def test_demo_runs_and_agrees(tmp_path, capsys, backend):
    plot, out = tmp_path / "loss.png", tmp_path / "demo.json"
    code = main(
        ["demo", "--steps", "6", "--batch-size", "32", "--backend", backend,
         "--plot", str(plot), "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "loss curves: max |difference|" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert result["backend"] == backend
    ours, theirs = result["losses"]["fused_optim.AdamW"], result["losses"]["torch.optim.AdamW"]
    assert len(ours) == len(theirs) == 6
    # fp32 AdamW: torch's own fused-vs-for-loop agreement is 3e-8 on params; the losses of two
    # runs that agree that closely stay within a few fp32 ulps of each other.
    assert result["max_param_diff"] <= 3e-7
    assert result["max_loss_diff"] <= 1e-6
    assert ours[-1] != ours[0]  # it trained
    diffs = result["param_diff_per_step"]
    assert set(diffs) == {"fused_optim.AdamW", "torch.optim.AdamW(fused=True)"}  # CPU has it
    assert all(len(values) == 6 for values in diffs.values())
    assert diffs["fused_optim.AdamW"][-1] == result["max_param_diff"]


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--backend", "cuda-magic"], ["--nope"]])
def test_demo_rejects_bad_arguments(capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *bad])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_demo_without_the_cli_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    """matplotlib is in the ``cli`` extra: without it, one line naming the install command,
    exit status 2."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code = main(["demo", "--steps", "2", "--batch-size", "8", "--plot", str(tmp_path / "x.png")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fused-optim demo: this needs matplotlib, which is not installed: "
        "pip install 'fused_optim[cli]'"
    ]


def test_optimizers_need_no_cli_extra():
    """The optimizers need torch (and triton) only: with tqdm and matplotlib made unimportable,
    fused_optim imports and steps an AdamW; the package declares neither as a dependency."""
    code = (
        "import sys\n"
        "sys.modules['tqdm'] = sys.modules['matplotlib'] = None\n"
        "import torch, fused_optim\n"
        "p = torch.nn.Parameter(torch.ones(4)); opt = fused_optim.AdamW([p])\n"
        "p.grad = torch.ones(4); opt.step()\n"
        "assert not torch.equal(p, torch.ones(4))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    dependencies = pyproject["project"]["dependencies"]
    assert [d.split(">")[0].split(";")[0].strip() for d in dependencies] == ["torch", "triton"]
    assert "matplotlib>=3.7" in pyproject["project"]["optional-dependencies"]["cli"]
