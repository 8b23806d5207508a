#!/usr/bin/env python
"""Compare the JUnit XMLs of a baseline and a swapped run (tools/torch_suite/results/).

    python tools/torch_suite/compare.py [--swapped swapped] [--files optim lrscheduler ...]

Writes results/summary_<swapped>[_<files>].md (and prints it; <files> only when not the
default three: optim, lrscheduler, differentiable): per-file counts for both runs, every test
that passes in the baseline and fails (or errors) in the swapped run with the first line of its
exception, and any other change of outcome.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_FILES = ["optim", "lrscheduler", "differentiable"]


def outcomes(path: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, one-line message)."""
    result = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = one_line(node.get("message") or "", node.text or "")
                break
        result[test_id] = (outcome, message)
    return result


def one_line(message: str, text: str) -> str:
    """The exception's type and the first line of its message."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # pytest's JUnit text ends with "path:line: ExcType"; the "E   " lines hold the message.
    e_lines = [line[1:].strip() for line in lines if line.startswith("E ")]
    exc_type = ""
    if lines and ": " in lines[-1]:
        exc_type = lines[-1].rsplit(": ", 1)[-1]
    first = message.splitlines()[0].strip() if message.strip() else (e_lines[0] if e_lines else "")
    if exc_type and not first.startswith(exc_type):
        first = f"{exc_type}: {first}"
    return first[:300]


def counts(res: dict[str, tuple[str, str]]) -> Counter:
    return Counter(outcome for outcome, _ in res.values())


def wall(name: str) -> str:
    path = RESULTS / f"{name}.time"
    return f"{json.loads(path.read_text())['wall_s']:.0f}s" if path.exists() else "?"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="baseline")
    ap.add_argument("--swapped", default="swapped")
    ap.add_argument("--files", nargs="+", default=DEFAULT_FILES)
    args = ap.parse_args()
    out = [f"# torch_suite: {args.baseline} vs {args.swapped}", ""]
    out += ["| file | run | passed | failed | errors | skipped | total | wall |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    diffs = []
    for key in args.files:
        runs = {}
        for mode in (args.baseline, args.swapped):
            path = RESULTS / f"{mode}_{key}.xml"
            if not path.exists():
                out.append(f"| {key} | {mode} | (no {path.name}) | | | | | |")
                continue
            runs[mode] = outcomes(path)
            c = counts(runs[mode])
            out.append(
                f"| {key} | {mode} | {c['passed']} | {c['failed']} | {c['error']} | "
                f"{c['skipped']} | {sum(c.values())} | {wall(f'{mode}_{key}')} |"
            )
        if len(runs) == 2:
            base, swap = runs[args.baseline], runs[args.swapped]
            for test_id in sorted(set(base) | set(swap)):
                b = base.get(test_id, ("absent", ""))
                s = swap.get(test_id, ("absent", ""))
                if b[0] != s[0]:
                    diffs.append((key, test_id, b, s))
    regressions = [d for d in diffs if d[2][0] == "passed" and d[3][0] in ("failed", "error")]
    others = [d for d in diffs if d not in regressions]
    out += ["", f"## Pass in {args.baseline}, fail/error in {args.swapped}: {len(regressions)}", ""]
    out += ["| file | test | swapped outcome | exception (first line) |", "|---|---|---|---|"]
    for key, test_id, _b, s in regressions:
        msg = s[1].replace("|", "\\|")
        out.append(f"| {key} | `{test_id.split('::', 1)[1]}` | {s[0]} | {msg} |")
    out += ["", f"## Other outcome changes: {len(others)}", ""]
    if others:
        out += ["| file | test | baseline | swapped | swapped message |", "|---|---|---|---|---|"]
        for key, test_id, b, s in others:
            msg = s[1].replace("|", "\\|") or b[1].replace("|", "\\|")
            out.append(f"| {key} | `{test_id.split('::', 1)[1]}` | {b[0]} | {s[0]} | {msg} |")
    text = "\n".join(out) + "\n"
    suffix = "" if args.files == DEFAULT_FILES else "_" + "+".join(args.files)
    (RESULTS / f"summary_{args.swapped}{suffix}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
