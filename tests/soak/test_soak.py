"""The chaos soak in `make test`: one 60-second run on PostgreSQL with 2 control replicas (a
private cluster the soak restarts), smaller than the bench's farm so 2 cores keep up (3
workers x 6 boards, 8 clients instead of 4 x 16 and 20). The seed is random unless
ICEFARM_SOAK_SEED is set; a failure prints it with the first broken invariant. The SQLite
variant runs only in the bench (`bench/soak.py --backend sqlite`)."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from tests.pg_cluster import require_private_cluster
from tests.soak.farm import Sizes
from tests.soak.report import summarise, text
from tests.soak.run import Options, soak

SECONDS = 60.0


@pytest.mark.postgres
def test_a_minute_of_chaos_on_two_replicas_breaks_no_invariant() -> None:
    require_private_cluster()
    seed = int(os.environ.get("ICEFARM_SOAK_SEED") or random.SystemRandom().randrange(1 << 31))
    options = Options(
        seconds=SECONDS,
        seed=seed,
        backend="postgresql",
        sizes=Sizes(replicas=2, workers=3, boards=6, clients=8),
        gap=(1.5, 5.0),
    )
    summary = summarise(asyncio.run(soak(options)))
    report = text(summary)
    print(report)
    assert summary["faults_by_kind"], report
    assert summary["results_ok"] > 0, report
    assert summary["passed"], report
