"""Detection quality, measured like a model: a corpus of real CPU trainings, a held-out half.

Every case in `corpus/` is a real training (its own data, model, optimizer and loop) with
`gradwatch.attach` added by the one line a user writes, spooling to a file; the spool is then
replayed through the collector's pure registry with its default detectors, exactly what a
live collector would decide. A case either carries a pathology (which alert kinds are a
correct answer, and the step it starts) or is healthy (any warning or critical alert on it
is a false alert; `info` notes are not alerts).

The split is fixed by a hash of each case's name, not chosen: `tune` cases are the ones
thresholds may be tuned on, `held-out` cases are only ever reported. The table printed is
the held-out half (`--split tune` or `--split all` for the others).

    python bench/detection.py               # train what is not cached (2 processes), print the table
    python bench/detection.py --quick       # a small fixed subset (CI)
    python bench/detection.py --cases       # also one line per case: what fired, when
    python bench/detection.py --retrain     # ignore the spool cache

Trained spools are cached under `--cache` (default: .detection-cache/ beside this file),
keyed by the case's module, the corpus's shared helpers (corpus/common.py), the probe's
source and torch's version, so iterating on the detectors replays in seconds; changing a
case, its helpers or the probe retrains it.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import CASES, QUICK, Case

from gradwatch.collector.config import RetentionConfig
from gradwatch.collector.detectors import AlertEvent, build_detectors
from gradwatch.collector.registry import AlertRaised, DetectorFailed, Registry
from gradwatch.protocol import Bye, Hello, Steps, decode_probe_message

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(__file__).resolve().parent / ".detection-cache"
CORPUS_SHARED = Path(__file__).resolve().parent / "corpus" / "common.py"
DIVERGENCE_BOUND = 10  # steps: the target for divergence
SILENT_BUG_BOUND = 100  # steps: the target for everything else


def split_of(name: str) -> str:
    """Fixed up front: the first byte of sha256(name), even -> tune, odd -> held-out."""
    return "held-out" if hashlib.sha256(name.encode()).digest()[0] % 2 else "tune"


# ---- training (worker processes) ---------------------------------------------------------


def _source_key(case: Case) -> str:
    probe_sources = sorted((ROOT / "gradwatch" / "probe").glob("*.py"))
    digest = hashlib.sha256()
    digest.update(inspect.getsource(sys.modules[case.train.__module__]).encode())
    digest.update(CORPUS_SHARED.read_bytes())  # the data and models every family imports
    for path in probe_sources:
        digest.update(path.read_bytes())
    import torch

    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:16]


def _train_one(name: str, spool: str) -> tuple[str, float, str | None]:
    """Runs in a worker process: trains one case into `spool`. Returns (name, seconds, error)."""
    import torch

    torch.set_num_threads(1)
    case = CASES[name]
    Path(spool).unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        case.train({"url": f"file:{spool}", "name": name})
    except Exception as err:  # noqa: BLE001 - reported in the table, the rest still runs
        import traceback

        return name, time.perf_counter() - started, "".join(traceback.format_exception(err))[-2000:]
    return name, time.perf_counter() - started, None


def train(cases: list[Case], cache: Path, retrain: bool, jobs: int) -> dict[str, Path]:
    """Spools for `cases`, trained where the cache has none for their current source."""
    cache.mkdir(parents=True, exist_ok=True)
    spools: dict[str, Path] = {}
    todo: list[tuple[str, Path]] = []
    for case in cases:
        spool = cache / f"{case.name}-{_source_key(case)}.jsonl"
        spools[case.name] = spool
        if retrain or not spool.exists():
            todo.append((case.name, spool))
    if not todo:
        return spools
    print(f"training {len(todo)} of {len(cases)} cases on {jobs} processes ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_train_one, name, str(spool.with_suffix(".part"))) for name, spool in todo]
        for done, future in enumerate(as_completed(futures), 1):
            name, seconds, error = future.result()
            part = spools[name].with_suffix(".part")
            if error is None:
                part.replace(spools[name])
                status = "ok"
            else:
                status = "FAILED"
                print(error, file=sys.stderr)
            print(f"  [{done}/{len(todo)}] {name}: {status} in {seconds:.1f} s "
                  f"({time.perf_counter() - started:.0f} s so far)", file=sys.stderr, flush=True)
    return spools


# ---- replay (pure: the collector's registry and default detectors) ----------------------


class DetectorCrashed(Exception):
    """A detector raised: the live collector would have switched it off for the run."""


def replay(*spools: Path) -> list[AlertEvent]:
    """Every alert event the collector's default detectors raise on these spools (one per
    rank of one run: `file:` spools of a distributed run are PATH.rank<N>), fed in time order."""
    registry = Registry(RetentionConfig(), build_detectors)
    messages = []
    for spool in spools:
        rank, run_name = 0, ""
        for line in spool.read_text(encoding="utf-8").splitlines():
            message = decode_probe_message(line)
            if isinstance(message, Hello):
                rank, run_name = message.rank, message.run
                registry.hello(message, message.started)
            elif isinstance(message, Steps):
                messages.append((max((r.time for r in message.records), default=0.0), run_name, rank, message))
            elif isinstance(message, Bye):
                messages.append((float("inf"), run_name, rank, message))
    events: list[AlertEvent] = []
    for now, run_name, rank, message in sorted(messages, key=lambda m: m[0]):
        if isinstance(message, Steps):
            produced = registry.steps(run_name, rank, message, now)
        else:
            produced = registry.bye(run_name, rank, message, 0.0)
        for event in produced:
            if isinstance(event, DetectorFailed):
                raise DetectorCrashed(f"detector {event.kind} failed on {spools[0].name}: {event.error}")
            if isinstance(event, AlertRaised) and event.alert.kind not in ("run_lost", "rank_lost"):
                events.append(event.alert)
    return events


# ---- scoring --------------------------------------------------------------------------------


@dataclass
class Verdict:
    case: Case
    fired: list[AlertEvent]  # warning/critical firings, in order
    notes: list[AlertEvent]  # info firings
    caught: AlertEvent | None  # the first acceptable firing at or after onset
    false: list[AlertEvent]  # firings that are not a correct answer for this case

    @property
    def latency(self) -> int | None:
        return None if self.caught is None else self.caught.step - self.case.onset

    @property
    def bound(self) -> int:
        return DIVERGENCE_BOUND if self.case.primary == "divergence" else SILENT_BUG_BOUND


def judge(case: Case, events: Iterable[AlertEvent]) -> Verdict:
    firings = [e for e in events if not e.resolved]
    fired = [e for e in firings if e.severity != "info"]
    notes = [e for e in firings if e.severity == "info"]
    # A note of a correct kind is a correct answer (plateau is a note by design); a note of
    # any other kind is not a false alert (it pages no one), but it is listed.
    caught = next((e for e in firings if e.kind in case.expected and e.step >= case.onset), None)
    false = [e for e in fired if not (e.kind in case.expected and e.step >= case.onset)]
    return Verdict(case, fired, notes, caught, false)


def _describe(events: list[AlertEvent], most: int = 3) -> str:
    shown = ", ".join(f"{e.kind}{'[' + e.layer + ']' if e.layer else ''}@{e.step}" for e in events[:most])
    return (shown + (f" +{len(events) - most} more" if len(events) > most else "")) or "-"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}% ({part}/{whole})" if whole else "-"


def report(verdicts: list[Verdict], title: str) -> str:
    sick = [v for v in verdicts if v.case.expected]
    healthy = [v for v in verdicts if not v.case.expected]
    lines = [f"== detection, {title}: {len(sick)} pathologies, {len(healthy)} healthy runs"]
    rows = [("kind", "cases", "recall", "precision", "latency median", "latency max", "within bound")]
    kinds = sorted({v.case.primary for v in sick} | {e.kind for v in verdicts for e in v.fired})
    for kind in kinds:
        cases = [v for v in sick if v.case.primary == kind]
        caught = [v for v in cases if v.caught is not None]
        latencies = [v.latency for v in caught if v.latency is not None]
        firings = [(v, e) for v in verdicts for e in v.fired if e.kind == kind]
        # a run where this kind fired counts once: right if it was a correct answer there
        runs_fired = {id(v): v for v, _ in firings}
        correct = sum(1 for v in runs_fired.values() if v.caught is not None and v.caught.kind == kind
                      or any(e.kind == kind and e not in v.false for e in v.fired))
        in_bound = sum(1 for v in caught if v.latency is not None and v.latency <= v.bound)
        rows.append((
            kind,
            str(len(cases)),
            _pct(len(caught), len(cases)) if cases else "-",
            _pct(correct, len(runs_fired)) if runs_fired else "-",
            f"{statistics.median(latencies):.0f}" if latencies else "-",
            f"{max(latencies)}" if latencies else "-",
            _pct(in_bound, len(caught)) if caught else "-",
        ))
    lines += _table(rows)
    caught = [v for v in sick if v.caught is not None]
    in_bound = [v for v in caught if v.latency is not None and v.latency <= v.bound]
    divergences = [v for v in sick if v.case.primary == "divergence"]
    div_fast = [v for v in divergences if v.latency is not None and v.latency <= DIVERGENCE_BOUND]
    false_on_healthy = sum(len(v.false) for v in healthy)
    false_on_sick = sum(len(v.false) for v in sick)
    lines += [
        "",
        f"recall (every pathology flagged by an acceptable kind): {_pct(len(caught), len(sick))}",
        f"caught within 100 steps of onset: {_pct(sum(1 for v in caught if v.latency <= SILENT_BUG_BOUND), len(sick))}",
        f"divergences within {DIVERGENCE_BOUND} steps: {_pct(len(div_fast), len(divergences))}",
        f"within their bound (divergence {DIVERGENCE_BOUND}, others {SILENT_BUG_BOUND}): {_pct(len(in_bound), len(sick))}",
        f"false alerts on healthy runs: {false_on_healthy} in {len(healthy)} runs "
        f"({false_on_healthy / len(healthy):.2f} per run; runs with any: "
        f"{sum(1 for v in healthy if v.false)})" if healthy else "false alerts on healthy runs: -",
        f"other alerts on pathology runs (wrong kind, or before onset): {false_on_sick}",
    ]
    return "\n".join(lines)


def case_lines(verdicts: list[Verdict]) -> str:
    rows = [("split", "case", "expected", "onset", "caught", "latency", "false / other", "notes")]
    for v in sorted(verdicts, key=lambda v: (v.case.primary or "~", v.case.name)):
        rows.append((
            split_of(v.case.name),
            v.case.name,
            "/".join(sorted(v.case.expected)) or "nothing",
            str(v.case.onset) if v.case.expected else "-",
            _describe([v.caught]) if v.caught else ("MISSED" if v.case.expected else "-"),
            str(v.latency) if v.latency is not None else "-",
            _describe(v.false),
            _describe(v.notes),
        ))
    return "\n".join(_table(rows))


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


# ---- the held-out table in the docs: generated here, checked by a test --------------------

DOCS_WITH_TABLE = (ROOT / "README.md", ROOT / "docs" / "detectors.md")
DOCS_MARKER = "<!-- generated by `python bench/detection.py --write-docs`; tests/test_detection_bench.py checks it -->"
_DOCS_BLOCK = re.compile(re.escape(DOCS_MARKER) + r"\n```text\n(.*?)\n```", re.DOTALL)


def stale_docs(table: str) -> list[Path]:
    """The docs whose generated held-out table is not `table`."""
    stale = []
    for path in DOCS_WITH_TABLE:
        match = _DOCS_BLOCK.search(path.read_text(encoding="utf-8"))
        if match is None or match.group(1) != table:
            stale.append(path)
    return stale


def write_docs(table: str) -> None:
    for path in DOCS_WITH_TABLE:
        text = path.read_text(encoding="utf-8")
        if _DOCS_BLOCK.search(text) is None:
            raise SystemExit(f"{path}: no generated table block (a line {DOCS_MARKER!r} then a ```text block)")
        path.write_text(_DOCS_BLOCK.sub(lambda _: f"{DOCS_MARKER}\n```text\n{table}\n```", text), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("held-out", "tune", "all"), default="held-out",
                        help="which half to report (default: held-out, the half no threshold was tuned on)")
    parser.add_argument("--quick", action="store_true", help=f"only the {len(QUICK)} cases of the CI subset")
    parser.add_argument("--only", default="", help="comma-separated case names (implies --split all)")
    parser.add_argument("--cases", action="store_true", help="also print one line per case")
    parser.add_argument("--list", action="store_true", help="list the cases and their split, then exit")
    parser.add_argument("--retrain", action="store_true", help="train again even where a cached spool exists")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="training processes (default: 2, one torch thread each)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"spool cache (default {DEFAULT_CACHE})")
    parser.add_argument("--json", type=Path, help="also write every verdict as JSON here")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the held-out table into README.md and docs/detectors.md")
    parser.add_argument("--check-docs", action="store_true",
                        help="exit 1 when the held-out table in README.md or docs/detectors.md is not this one")
    args = parser.parse_args(argv)
    if (args.write_docs or args.check_docs) and (args.quick or args.only or args.split != "held-out"):
        parser.error("--write-docs and --check-docs report the held-out half: drop --quick, --only and --split")

    if args.list:
        for case in CASES.values():
            print(f"{split_of(case.name):8}  {case.name:32}  {'/'.join(sorted(case.expected)) or 'healthy':28}  {case.description}")
        return 0
    if args.only:
        chosen = [CASES[n] for n in args.only.split(",")]
        split = "all"
    else:
        chosen = [CASES[n] for n in QUICK] if args.quick else list(CASES.values())
        split = "all" if args.quick else args.split
    spools = train(chosen, args.cache, args.retrain, args.jobs)
    verdicts = [judge(c, replay(spools[c.name])) for c in chosen if spools[c.name].exists()]
    missing = [c.name for c in chosen if not spools[c.name].exists()]
    shown = [v for v in verdicts if split == "all" or split_of(v.case.name) == split]
    if args.cases:
        print(case_lines(shown))
        print()
    title = {"held-out": "held-out half (no threshold tuned on it)", "tune": "tuning half",
             "all": "all cases"}[split]
    if args.quick:
        title = "quick subset (CI)"
    table = report(shown, title)
    print(table)
    if args.write_docs and not missing:
        write_docs(table)
        print(f"wrote the table into {', '.join(str(p.relative_to(ROOT)) for p in DOCS_WITH_TABLE)}")
    if args.check_docs and (stale := stale_docs(table)):
        print(f"!! the held-out table in {', '.join(str(p.relative_to(ROOT)) for p in stale)} is not what the "
              "benchmark prints now: run `python bench/detection.py --write-docs` and review the prose around it")
        return 1
    if args.json:
        args.json.write_text(json.dumps([
            {"case": v.case.name, "split": split_of(v.case.name), "expected": sorted(v.case.expected),
             "onset": v.case.onset, "latency": v.latency,
             "fired": [{"kind": e.kind, "step": e.step, "layer": e.layer, "severity": e.severity,
                        "message": e.message} for e in v.fired],
             "false": [{"kind": e.kind, "step": e.step, "layer": e.layer} for e in v.false]}
            for v in verdicts
        ], indent=1))
    if missing:
        print(f"!! {len(missing)} case(s) failed to train: {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
