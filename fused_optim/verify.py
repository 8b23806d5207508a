"""``fused-optim verify``: parity with torch.optim on this machine, as a pass/fail table.

Runs :func:`fused_optim.testing.compare_to_torch` (PyTorch's own parity recipe, with torch's own
tolerances; see that module) for every optimizer (SGD, Adam, AdamW), every configuration in
:data:`fused_optim.testing.CONFIGS` (the flag combinations of torch's optimizer tests), every
dtype (fp64, fp32, bf16, fp16) and every backend that ``fused_optim.available_backends(device)``
lists, on one device::

    fused-optim verify                      # everything, on cuda if available, else cpu
    fused-optim verify --quick              # 2 configs per optimizer, fp32 and bf16
    fused-optim verify --optimizers AdamW --dtypes bf16 fp16 --backends triton
    fused-optim verify --json parity.json   # also write every figure as JSON
    fused-optim verify --candidate mypkg.opt:MyAdamW --reference AdamW   # your own optimizer

Options:

* ``--device``: default ``cuda`` if available, else ``xpu`` if available, else ``cpu``.
* ``--optimizers``, ``--dtypes``, ``--backends``: names, separated by spaces or commas; default
  all (all *available* backends). An unknown name, or a backend that cannot run on the device,
  is a usage error.
* ``--quick``: only :data:`fused_optim.testing.QUICK_CONFIGS` (two configs per optimizer) and,
  unless ``--dtypes`` says otherwise, fp32 and bf16: 24 cases on a CPU, well under a minute
  with the Triton interpreter.
* ``--candidate MODULE:ATTR``: verify any optimizer class or ``factory(params, **config)``
  importable as ``MODULE:ATTR`` (the current directory is searched too) against the torch.optim
  class ``--reference NAME`` (inferred when the candidate subclasses one), over that class's
  configs. The candidate gets ``backend=`` only if ``--backends`` is given.
* ``--seed``: seeds the recipe (default 0).
* ``--clip MAX_NORM``: every case with gradient clipping: the optimizer gets
  ``max_grad_norm=MAX_NORM`` (fused_optim's clip inside its step; a ``--candidate`` must take
  it and expose ``last_grad_norm``), torch.optim's runs clip with
  ``torch.nn.utils.clip_grad_norm_`` first (see ``compare_to_torch``'s ``max_grad_norm``).

On the CPU the Triton backend only runs through Triton's interpreter, which needs
``TRITON_INTERPRET=1`` before fused_optim's kernels are imported. So that the real kernels are
verified, ``verify --device cpu`` sets ``TRITON_INTERPRET=1`` itself (for the rest of the
process) unless the variable is already set; set ``TRITON_INTERPRET=0`` to verify only the
reference backend on a CPU.

Prints one row per case (optimizer | config | dtype | backend | max abs | max rel | vs exact |
tolerance | moved | PASS/FAIL/ERROR), the details of every failure, then a summary line. "max
abs" and "max rel" are against torch.optim's for-loop; "vs exact" (fp32 on the CPU) is the max
abs difference from torch.optim's for-loop evaluated with correctly rounded arithmetic (0 for
fused_optim's kernels); the tolerance reads "3e-08+5.96e-08" when torch.optim's own rounding on
this CPU, measured in the same run, is added to torch's figure. A progress bar goes
to stderr when it is a terminal. Exit status: 0 if every case passed, 1 if any failed or raised,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import available_backends
from ._extras import MissingExtraError, import_extra
from .backends import BACKENDS, BackendUnavailableError, select_backend
from .testing import (
    CONFIGS,
    DTYPES,
    OPTIMIZERS,
    QUICK_CONFIGS,
    ParityReport,
    adapt_config,
    compare_to_torch,
    config_label,
    torch_counterpart,
)

KERNELS_MODULE = "fused_optim.backends.triton.kernels"
QUICK_DTYPES = ("fp32", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        type=_device,
        default=None,
        help="device to verify on (default: cuda if available, else xpu if available, else cpu)",
    )
    parser.add_argument(
        "--optimizers",
        type=_names(OPTIMIZERS, "optimizer"),
        nargs="+",
        metavar="NAME",
        help=f"optimizers to verify (default: all of {', '.join(OPTIMIZERS)})",
    )
    parser.add_argument(
        "--dtypes",
        type=_names(tuple(DTYPES), "dtype"),
        nargs="+",
        metavar="DTYPE",
        help=f"param dtypes (default: all of {', '.join(DTYPES)}; with --quick: "
        f"{', '.join(QUICK_DTYPES)})",
    )
    parser.add_argument(
        "--backends",
        type=_names(BACKENDS, "backend"),
        nargs="+",
        metavar="BACKEND",
        help="fused_optim backends (default: every one available on the device)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="two configs per optimizer and (unless --dtypes) fp32 and bf16 only",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--candidate",
        type=_candidate_spec,
        metavar="MODULE:ATTR",
        help="verify this optimizer class or factory instead of fused_optim's",
    )
    parser.add_argument(
        "--reference",
        type=_name(OPTIMIZERS, "reference"),
        metavar="NAME",
        help="the torch.optim class the --candidate must match (SGD, Adam or AdamW)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the recipe (default: 0)")
    parser.add_argument(
        "--clip",
        type=float,
        default=None,
        metavar="MAX_NORM",
        help="verify with gradient clipping: max_grad_norm=MAX_NORM against torch's "
        "clip_grad_norm_ before torch.optim's steps",
    )
    parser.set_defaults(verify_parser=parser)


# Argument types ------------------------------------------------------------------------------


def _names(choices: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``choices`` (case-insensitive)."""
    by_lower = {c.lower(): c for c in choices}

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"expected a {what} name")
        for name in names:
            if name.lower() not in by_lower:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {name!r}; choose from {', '.join(choices)}"
                )
        return [by_lower[name.lower()] for name in names]

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _name(choices: tuple[str, ...], what: str) -> Callable[[str], str]:
    """An argparse type: exactly one of ``choices`` (case-insensitive)."""
    parse_list = _names(choices, what)

    def parse(text: str) -> str:
        names = parse_list(text)
        if len(names) != 1:
            raise argparse.ArgumentTypeError(f"expected one {what} name, got {text!r}")
        return names[0]

    parse.__name__ = what
    return parse


def _device(text: str):
    try:
        return torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: {error}") from None


def _candidate_spec(text: str) -> tuple[str, str]:
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        raise argparse.ArgumentTypeError(
            f"expected MODULE:ATTR (e.g. mypkg.optim:MyAdamW), got {text!r}"
        )
    return module, attr


# Helpers ------------------------------------------------------------------------------------


def _flatten(values: list[list[str]] | None) -> list[str] | None:
    if values is None:
        return None
    result: list[str] = []
    for group in values:
        result.extend(name for name in group if name not in result)
    return result


def _usage_error(args: argparse.Namespace, message: str):
    parser = getattr(args, "verify_parser", None)
    if parser is not None:
        parser.error(message)  # exits with status 2
    print(f"fused-optim verify: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _default_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")


def _prepare_interpreter(device) -> str | None:
    """On the CPU, have Triton's interpreter run the kernels; returns a note for the user."""
    if device.type != "cpu" or "TRITON_INTERPRET" in os.environ:
        return None
    if KERNELS_MODULE in sys.modules:
        return (
            "note: fused_optim's Triton kernels were imported before verify could set "
            "TRITON_INTERPRET=1, so the Triton backend cannot run on the CPU in this process; "
            "set TRITON_INTERPRET=1 before starting Python to verify it"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def _load_candidate(args: argparse.Namespace, spec: tuple[str, str]) -> Any:
    module_name, attr = spec
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or anything the module raises
        _usage_error(args, f"--candidate: cannot import {module_name!r}: {error!r}")
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            _usage_error(args, f"--candidate: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        _usage_error(args, f"--candidate: {module_name}:{attr} is not a class or a factory")
    return target


@dataclass
class Case:
    label: str  # the optimizer column
    optimizer: Any  # name, class or factory for compare_to_torch
    reference: str
    config: dict
    dtype: str
    backend: str | None


@dataclass
class Outcome:
    case: Case
    report: ParityReport | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.report is not None and self.report.passed

    def row(self) -> list[str]:
        case = self.case
        cells = [
            case.label,
            config_label(self.report.config if self.report else case.config),
            case.dtype,
            case.backend or "default",
        ]
        if self.report is None:
            return [*cells, "-", "-", "-", "-", "-", "ERROR"]
        r = self.report
        exact = r.correctly_rounded_max_abs
        tolerance = r.tolerance.short()
        if r.torch_rounding:
            tolerance += f"+{r.torch_rounding:.2g}"
        return [
            *cells,
            f"{r.max_abs:.3g}",
            f"{r.max_rel:.3g}",
            "-" if exact is None else f"{exact:.3g}",
            tolerance,
            "yes" if r.moved else "NO",
            "PASS" if r.passed else "FAIL",
        ]

    def to_dict(self) -> dict[str, Any]:
        if self.report is not None:
            return {"label": self.case.label, **self.report.to_dict()}
        return {
            "label": self.case.label,
            "optimizer": self.case.label,
            "reference": self.case.reference,
            "config": config_label(self.case.config),
            "dtype": self.case.dtype,
            "backend": self.case.backend,
            "passed": False,
            "error": self.error,
        }


HEADER = [
    "optimizer",
    "config",
    "dtype",
    "backend",
    "max abs",
    "max rel",
    "vs exact",
    "tolerance",
    "moved",
    "result",
]


def format_table(rows: list[list[str]]) -> str:
    """A plain-text table with a header rule; numbers right-aligned."""
    table = [HEADER, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    right = {4, 5, 6, 7}

    def line(row: list[str]) -> str:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ]
        return " | ".join(cells).rstrip()

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([line(HEADER), rule, *(line(row) for row in rows)])


def _cases(args, device, candidate) -> list[Case]:
    table = QUICK_CONFIGS if args.quick else CONFIGS
    dtypes = _flatten(args.dtypes) or list(QUICK_DTYPES if args.quick else DTYPES)
    requested_backends = _flatten(args.backends)
    cases = []
    if candidate is not None:
        reference = args.reference
        label = f"{args.candidate[0]}:{args.candidate[1]}"
        plan = [(label, candidate, reference)]
        backends: list[str | None] = requested_backends or [None]
    else:
        plan = [(f"fused_optim.{n}", n, n) for n in (_flatten(args.optimizers) or OPTIMIZERS)]
        backends = requested_backends or available_backends(device)
    for label, optimizer, reference in plan:
        for config in table[reference]:
            for dtype in dtypes:
                adapted = adapt_config(reference, config, DTYPES[dtype])
                for backend in backends:
                    cases.append(Case(label, optimizer, reference, adapted, dtype, backend))
    return cases


def _check_backends(args, device) -> None:
    for name in _flatten(args.backends) or []:
        try:
            select_backend(name, device)
        except BackendUnavailableError as error:
            _usage_error(args, f"--backends: {error} (device {device})")


def _run_case(case: Case, device, seed: int, clip: float | None = None) -> Outcome:
    try:
        report = compare_to_torch(
            case.optimizer,
            case.config,
            reference=case.reference,
            dtype=DTYPES[case.dtype],
            device=device,
            seed=seed,
            backend=case.backend,
            max_grad_norm=clip,
        )
    except Exception as error:  # one broken case must not hide the others
        return Outcome(case, error=f"{type(error).__name__}: {error}")
    return Outcome(case, report=report)


def run(args: argparse.Namespace) -> int:
    """Run the parity matrix; 0 if every case passed, 1 otherwise (2 via SystemExit for bad
    arguments)."""
    started = time.perf_counter()
    device = args.device if args.device is not None else _default_device()
    if args.candidate is None and args.reference is not None:
        _usage_error(args, "--reference needs --candidate")
    if args.candidate is not None and args.optimizers is not None:
        _usage_error(args, "--optimizers and --candidate exclude each other")
    if args.clip is not None and not 0.0 <= args.clip < float("inf"):
        _usage_error(args, f"--clip: a max norm must be finite and not negative, got {args.clip}")

    note = _prepare_interpreter(device)  # before anything imports the Triton kernels

    try:
        torch.empty(1, device=device)
    except Exception as error:
        _usage_error(args, f"device {str(device)!r} is not usable here: {error}")
    candidate = None
    if args.candidate is not None:
        candidate = _load_candidate(args, args.candidate)
        if args.reference is None:
            args.reference = torch_counterpart(candidate)
            if args.reference is None:
                _usage_error(
                    args, f"--candidate needs --reference (one of {', '.join(OPTIMIZERS)})"
                )
    _check_backends(args, device)
    cases = _cases(args, device, candidate)

    if note:
        print(note, file=sys.stderr)
    outcomes = []
    with _progress(len(cases)) as progress:
        for case in cases:
            progress.set_postfix_str(f"{case.reference} {case.dtype} {case.backend or ''}")
            outcomes.append(_run_case(case, device, args.seed, args.clip))
            progress.update()
    seconds = time.perf_counter() - started

    print(format_table([o.row() for o in outcomes]))
    failed = [o for o in outcomes if not o.passed]
    for outcome in failed:
        print()
        if outcome.report is not None:
            print(outcome.report.summary(max_failures=5))
        else:
            case = outcome.case
            where = f"{config_label(case.config)}, {case.dtype}, backend={case.backend}"
            print(f"{case.label} vs torch.optim.{case.reference} [{where}]: ERROR")
            print(f"  {outcome.error}")
    environment = _environment(device)
    if args.json:
        payload = {
            "command": "verify",
            **environment,
            "quick": bool(args.quick),
            "seed": args.seed,
            "clip": args.clip,
            "passed": not failed,
            "total": len(outcomes),
            "failed": len(failed),
            "seconds": round(seconds, 2),
            "cases": [o.to_dict() for o in outcomes],
        }
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)
    where = ", ".join(
        f"{k}={v}" if k.isupper() else f"{k} {v}"
        for k, v in environment.items()
        if k != "device" and v is not None
    )
    raised = sum(o.report is None for o in failed)
    verdict = (
        f"PASSED: all {len(outcomes)} cases agree with torch.optim"
        if not failed
        else f"FAILED: {len(failed)} of {len(outcomes)} cases ({len(failed) - raised} disagree "
        f"with torch.optim, {raised} raised an error)"
    )
    print(f"\n{verdict} on {device} ({where}) in {seconds:.1f} s")
    return 1 if failed else 0


class _NoProgress:
    """Stands in for tqdm (a declared dependency) where it is not installed."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix_str(self, text: str) -> None:
        pass

    def update(self) -> None:
        pass


def _progress(total: int):
    """A tqdm bar on stderr (hidden when stderr is not a terminal)."""
    try:
        tqdm = import_extra("tqdm").tqdm
    except MissingExtraError:
        return _NoProgress()  # verify runs without the cli extra, with no progress bar
    return tqdm(total=total, desc="verify", unit="case", file=sys.stderr, disable=None)


def _environment(device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    return info
