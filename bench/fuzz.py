"""The fuzz suite (tests/fuzz/) for longer: many cases per back end, and the figures.

For each back end: a control in this process with stand-in workers takes the
ReservationService and ControlService cases; a second control with the real worker daemon on
simulated boards takes the WorkerService cases (and some of the control's, through its real
worker). The cases are split between them in proportion to their RPCs. Prints, per back end,
the cases per RPC with their status codes, the counts of UNKNOWN, INTERNAL and invariant
breaks, and the first failures (the shortest case of each kind).

Usage: python bench/fuzz.py [--cases 20000] [--backend sqlite|postgresql|both] [--seed N]
Exit status 1 when any failure was found.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icefarm.logs import configure_logging  # noqa: E402
from tests.fuzz.cases import (  # noqa: E402
    CONTROL_RPCS,
    ORIGINS,
    RESERVATION_RPCS,
    WORKER_RPCS,
    Rpc,
)
from tests.fuzz.farm import ControlTarget, WorkerTarget  # noqa: E402
from tests.fuzz.run import BackgroundLoop, Target, run_cases  # noqa: E402
from tests.fuzz.verdicts import Tally  # noqa: E402

FOREVER = 10**9


def database_url(backend: str) -> tuple[str, Callable[[], None]]:
    """A fresh database, and how to remove it afterwards."""
    if backend == "sqlite":
        directory = tempfile.mkdtemp(prefix="icefarm-fuzz-db-")
        url = f"sqlite+aiosqlite:///{directory}/control.db"
        return url, lambda: shutil.rmtree(directory, ignore_errors=True)
    from tests.conftest import create_pg_database, drop_pg_database

    url = create_pg_database()
    return url, lambda: drop_pg_database(url)


def quiet() -> None:
    """The servers set their own log level when they start; the bench prints only figures
    (ICEFARM_LOG_LEVEL=warning shows the servers' logs)."""
    level = os.environ.get("ICEFARM_LOG_LEVEL", "critical")
    configure_logging("console", level)
    logging.getLogger("grpc").setLevel(level.upper())


@dataclass
class Options:
    cases: int
    seed: int | None
    show: int
    verbose: bool
    only: str
    origins: frozenset[str]


def run_target(
    loop: BackgroundLoop,
    backend: str,
    start: Callable[[str], Coroutine[Any, Any, Target]],
    rpcs: list[Rpc],
    cases: int,
    options: Options,
    tally: Tally,
) -> None:
    """Start a target on a fresh database, run `cases` cases of `rpcs` on it, stop it."""
    if not rpcs or cases <= 0:
        return
    url, remove = database_url(backend)
    try:
        target = loop.run(start(url))
        try:
            run_cases(
                loop,
                target,
                rpcs,
                max_cases=cases,
                seconds=FOREVER,
                seed=options.seed,
                tally=tally,
                verbose=options.verbose,
                origins=options.origins,
            )
        finally:
            loop.run(target.stop())
    finally:
        remove()


def run_backend(backend: str, options: Options) -> Tally:
    tally = Tally()
    control_rpcs = [r for r in RESERVATION_RPCS + CONTROL_RPCS if options.only in r.key]
    worker_rpcs = [r for r in WORKER_RPCS if options.only in r.key]
    total = len(control_rpcs) + len(worker_rpcs)
    on_control = options.cases * len(control_rpcs) // max(total, 1)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="icefarm-fuzz-") as tmp, BackgroundLoop() as loop:
        root = Path(tmp)

        async def control(url: str) -> Target:
            target = await ControlTarget.start(backend, url)
            quiet()
            return target

        async def worker(url: str) -> Target:
            target = await WorkerTarget.start(url, root / "sim")
            target.backend = backend
            quiet()
            return target

        run_target(loop, backend, control, control_rpcs, on_control, options, tally)
        run_target(loop, backend, worker, worker_rpcs, options.cases - on_control, options, tally)
    elapsed = time.monotonic() - started
    print(tally.report(f"{backend} ({elapsed:.0f} s)", show=options.show), flush=True)
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20000, help="cases per back end")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default random)")
    parser.add_argument("--show", type=int, default=30, help="distinct failures to print")
    parser.add_argument("--only", default="", help="only RPCs whose name contains this")
    parser.add_argument("--verbose", action="store_true", help="print every case and answer")
    parser.add_argument(
        "--origins",
        default=",".join(sorted(ORIGINS)),
        help="kinds of case, comma-separated: plausible, arbitrary, raw (default all)",
    )
    args = parser.parse_args()
    origins = frozenset(args.origins.split(",")) & ORIGINS
    options = Options(args.cases, args.seed, args.show, args.verbose, args.only, origins)
    quiet()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    failed = False
    for backend in backends:
        tally = run_backend(backend, options)
        failed = failed or bool(tally.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
