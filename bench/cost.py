"""Noise-resistant costs of one reserve+release cycle on PostgreSQL: the control's CPU time and
the WAL bytes written per cycle (both hardly depend on what else the machine is doing), plus
the cycles/s of this run. Usage: python bench/cost.py [--seconds 8] [--clients 32] [--ceiling]"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reserve_release import (
    PG_ADMIN,
    create_pg_database,
    drive,
    drop_pg_database,
    seed,
    start_ceiling,
    start_control_process,
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wal_lsn() -> int:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        assert row is not None
        return int(row[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--ceiling", action="store_true", help="measure the ceiling server")
    args = parser.parse_args()
    name, url = create_pg_database()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.ceiling:
                process, address = start_ceiling(url)
            else:
                asyncio.run(seed(url))
                process, address = start_control_process(url, Path(tmp) / "control.log")
            try:
                asyncio.run(drive(address, 4, 1.0))
                cpu, wal = cpu_seconds(process.pid), wal_lsn()
                figures = asyncio.run(drive(address, args.clients, args.seconds))
                cpu, wal = cpu_seconds(process.pid) - cpu, wal_lsn() - wal
            finally:
                process.terminate()
                process.wait(timeout=30)
    finally:
        drop_pg_database(name)
    cycles = figures.cycles_per_second * args.seconds
    print(
        f"{figures.cycles_per_second:.1f} cycles/s; control CPU {cpu / cycles * 1000:.2f} ms "
        f"per cycle; WAL {wal / cycles / 1024:.1f} KiB per cycle; "
        f"Reserve p50 {figures.p50_ms:.1f} ms p99 {figures.p99_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
