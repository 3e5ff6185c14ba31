"""The seeded chaos soak: 2 control replicas on PostgreSQL (a private cluster it may restart) or
one on SQLite, 4 workers x 16 simulated boards, 20 clients running real experiments through the
client library, and a fault injector at seeded random intervals (every kind: control, worker
and client SIGKILL, worker SIGSTOP past the offline timeout, PostgreSQL restart, board hang,
flash failure, unplug and replug, short read, slow board, worker drain, network cut). It
checks the invariants continuously and at the end and prints the report.

    .venv/bin/python bench/soak.py [--minutes 10] [--seed N] [--backend postgresql|sqlite] [--json]

The same seed draws the same faults, targets, intervals and experiments (process timing still
varies). Exit status 0 when every invariant held, 1 when one broke (the report names the seed
and the first broken invariant with the events around it), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icefarm.logs import configure_logging
from tests.soak.farm import Sizes
from tests.soak.report import summarise, text
from tests.soak.run import Options, soak


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--minutes", type=float, default=10.0, help="faults for this long (10)")
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (random)")
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--boards", type=int, default=16, help="simulated boards per worker")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.workers < 1 or args.boards < 1 or args.clients < 1:
        parser.error("--minutes, --workers, --boards and --clients must be positive")
    return args


def main() -> int:
    args = parse()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    replicas = 2 if args.backend == "postgresql" else 1
    options = Options(
        seconds=args.minutes * 60,
        seed=seed,
        backend=args.backend,
        sizes=Sizes(replicas, args.workers, args.boards, args.clients),
        gap=(3.0, 10.0),
        keep=args.keep,
    )
    configure_logging("console", "error")
    print(f"soak seed {seed}: running {args.minutes:g} min on {args.backend}", file=sys.stderr)
    # SIGTERM winds down like Ctrl-C: every process the soak started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        outcome = asyncio.run(soak(options))
    except KeyboardInterrupt:
        print(f"soak seed {seed}: interrupted; its processes were stopped", file=sys.stderr)
        return 130
    summary = summarise(outcome)
    print(json.dumps(summary, indent=2, default=str) if args.json else text(summary))
    if args.keep:
        print(f"logs kept in {outcome.root}", file=sys.stderr)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
