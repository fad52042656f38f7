"""What the benchmark scripts share: input checks (the CounterFact file, the statistics corpus) and timing.

Each check returns a message for the user instead of raising, so the scripts can log it and exit with 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple


def counterfact_records(path: str, edits: int) -> Tuple[Optional[List[dict]], Optional[str]]:
    """The first ``edits`` records of a flat EasyEdit CounterFact JSON file, or ``(None, why not)``."""
    data_path = Path(path)
    if not data_path.is_file():
        return None, f"CounterFact data not found at {data_path}; pass --data PATH (flat EasyEdit CounterFact JSON)"
    records = json.loads(data_path.read_text())[:edits]
    if len(records) < edits:
        return None, f"{data_path} has {len(records)} records, fewer than --edits {edits}"
    return records, None


def corpus_problem(corpus: str) -> Optional[str]:
    """Why ``--corpus`` cannot be used, or None ('self' needs no file)."""
    if corpus != "self" and not Path(corpus).exists():
        return f"statistics corpus not found at {corpus}; pass --corpus PATH or --corpus self"
    return None


def optional_bench_flags(args) -> List[str]:
    """The presets' optional alphaedit-bench flags (statistics settings) and whatever followed ``--``."""
    flags: List[str] = []
    for flag, value in (("--samples", args.samples), ("--max-tokens", args.max_tokens),
                        ("--stats-dir", args.stats_dir)):
        if value is not None:
            flags += [flag, value]
    return flags + [a for a in args.rest if a != "--"]


def run_bench(argv: List[str]) -> int:
    from alphaedit_plugin.bench.cli import main as bench_main

    return bench_main(argv)


@contextlib.contextmanager
def timed_calls(owner, name: str, seconds: List[float], then: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """While open, append the seconds of every call of ``owner.name`` to ``seconds``, then call ``then()``
    (instrumentation only; the attribute is put back afterwards)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - began)
            if then is not None:
                then()

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)
