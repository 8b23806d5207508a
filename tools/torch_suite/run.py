#!/usr/bin/env python
"""Run PyTorch's optimizer tests with torch.optim's classes (baseline) and with fused_optim's
swapped in, one suite after the other, then compare outcomes per test id.

    python tools/torch_suite/run.py                      # baseline + swapped, all three suites
    python tools/torch_suite/run.py --modes swapped      # only the swapped run (compare reuses
                                                         # the last baseline XML if present)
    python tools/torch_suite/run.py --files lrscheduler --modes baseline swapped
    python tools/torch_suite/run.py --files differentiable   # TestDifferentiableOptimizer only
    python tools/torch_suite/run.py --backend reference  # swapped runs pass backend="reference"
    python tools/torch_suite/run.py --trace              # + per-test record of fused/torch paths
    python tools/torch_suite/run.py -- -k test_errors    # extra pytest arguments after --

Outputs in tools/torch_suite/results/: <run>_<file>.xml (JUnit), .log (pytest output),
.time (command, rc, wall seconds), .trace.json (--trace), and summary_<run>.md (compare.py's
counts and pass->fail table). <run> is baseline, swapped, or swapped-<backend>.
Runs under ``nice -n 10`` with a per-test timeout (pytest-timeout), never ``-x``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FILES = {
    "optim": "pytorch_test/test_optim.py",
    "lrscheduler": "pytorch_test/optim/test_lrscheduler.py",
    # The shim that re-exports TestDifferentiableOptimizer (and TestSGDComplexForeach) from
    # pytorch_test/optim/test_optim_upstream.py, PyTorch's test/optim/test_optim.py.
    "differentiable": "pytorch_test/optim/test_optim.py",
    # Not a PyTorch file: CPU probes of accelerator-only tests (see the file); not run by default.
    "probes": "probes/test_device_only_on_cpu.py",
}
DEFAULT_FILES = ["optim", "lrscheduler", "differentiable"]
# Files that must be in place (git-ignored copies of PyTorch's files, see README.md) for a suite.
NEEDS = {
    "optim": ["pytorch_test/test_optim.py", "pytorch_test/optim/test_lrscheduler.py"],
    "lrscheduler": ["pytorch_test/optim/test_lrscheduler.py"],
    "differentiable": ["pytorch_test/optim/test_optim_upstream.py"],
}


def mode_name(mode: str, backend: str | None) -> str:
    return f"{mode}-{backend}" if mode == "swapped" and backend else mode


def code_state() -> dict:
    """Which fused_optim the run imported: the repo's HEAD, its uncommitted changes under
    fused_optim/ and csrc/ (the working tree is what runs), and the built extensions' mtimes."""
    repo = HERE.parent.parent

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return proc.stdout.rstrip()

    return {
        "head": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "fused_optim", "csrc").splitlines(),
        "extensions": {
            p.name: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.stat().st_mtime))
            for p in sorted((repo / "fused_optim").glob("*.so"))
        },
    }


def run_one(
    mode: str, file_key: str, backend: str | None, timeout: int, extra: list[str], trace: bool
) -> dict:
    name = f"{mode_name(mode, backend)}_{file_key}"
    xml, log = RESULTS / f"{name}.xml", RESULTS / f"{name}.log"
    env = dict(os.environ)
    env["PYTORCH_TESTING_DEVICE_ONLY_FOR"] = "cpu"
    env.pop("TRITON_INTERPRET", None)
    env.pop("FUSED_OPTIM_DEFAULT_BACKEND", None)
    env.pop("FUSED_OPTIM_TRACE", None)
    if mode == "swapped" and trace:
        env["FUSED_OPTIM_TRACE"] = str(RESULTS / f"{name}.trace.json")
    env["FUSED_OPTIM_SWAP"] = "1" if mode == "swapped" else "0"
    if mode == "swapped" and backend:
        env["FUSED_OPTIM_DEFAULT_BACKEND"] = backend
    cmd = [
        "nice", "-n", "10", sys.executable, "-m", "pytest", FILES[file_key],
        "-p", "no:cacheprovider", "-q", "-rf", f"--junitxml={xml}",
        f"--timeout={timeout}", *extra,
    ]  # fmt: skip
    shown = " ".join(
        [f"FUSED_OPTIM_SWAP={env['FUSED_OPTIM_SWAP']}"]
        + ([f"FUSED_OPTIM_DEFAULT_BACKEND={backend}"] if mode == "swapped" and backend else [])
        + ([f"FUSED_OPTIM_TRACE={env['FUSED_OPTIM_TRACE']}"] if "FUSED_OPTIM_TRACE" in env else [])
        + ["PYTORCH_TESTING_DEVICE_ONLY_FOR=cpu"]
        + cmd
    )
    print(f"[torch_suite] (cd {HERE} && {shown})", flush=True)
    state = code_state()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    info = {"name": name, "command": shown, "cwd": str(HERE), "rc": proc.returncode,
            "started": started, "wall_s": round(wall, 1), "code": state}  # fmt: skip
    (RESULTS / f"{name}.time").write_text(json.dumps(info, indent=1) + "\n")
    tail = log.read_text().strip().splitlines()[-1:]
    print(
        f"[torch_suite] {name}: rc={proc.returncode} wall={wall:.0f}s  {' '.join(tail)}", flush=True
    )
    return info


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", nargs="+", choices=["baseline", "swapped"],
                    default=["baseline", "swapped"])  # fmt: skip
    ap.add_argument("--files", nargs="+", choices=sorted(FILES), default=DEFAULT_FILES)
    ap.add_argument(
        "--backend",
        default=None,
        help="swapped runs: default backend= for the fused classes (e.g. reference)",
    )
    ap.add_argument("--timeout", type=int, default=900, help="per-test timeout, seconds")
    ap.add_argument(
        "--trace",
        action="store_true",
        help="swapped runs: record per test how fused_optim stepped (results/<run>.trace.json)",
    )
    ap.add_argument("--no-compare", action="store_true")
    args = ap.parse_args(argv)
    missing = {k: [p for p in NEEDS.get(k, []) if not (HERE / p).exists()] for k in args.files}
    for key, paths in missing.items():
        if paths:
            print(f"[torch_suite] skipping {key}: missing {', '.join(paths)} (see README.md)")
    args.files = [k for k in args.files if not missing[k]]
    if not args.files:
        return 1
    RESULTS.mkdir(exist_ok=True)
    for mode in args.modes:  # one suite after the other, never in parallel
        for file_key in args.files:
            run_one(mode, file_key, args.backend, args.timeout, extra, args.trace)
    if not args.no_compare:
        swapped = mode_name("swapped", args.backend)
        cmd = [sys.executable, str(HERE / "compare.py"), "--swapped", swapped,
               "--files", *args.files]  # fmt: skip
        subprocess.run(cmd, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
