"""`fused-optim demo`: trains both optimizers side by side, agrees, writes a PNG and JSON."""

from __future__ import annotations

import json

import pytest

from fused_optim.cli import main


@pytest.mark.parametrize("backend", ["triton", "reference"])
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


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--backend", "cuda-magic"], ["--nope"]])
def test_demo_rejects_bad_arguments(capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *bad])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
