"""The loop that runs many fuzz cases against one target, for the suite and the bench.

Hypothesis draws the cases; the RPCs take turns, so every RPC gets its share however few
cases fit in the time. A failure is recorded, not raised: the servers keep state between cases,
so hypothesis could neither replay nor shrink a case reliably (it would report a flaky test
instead of the defect). The tally keeps, per kind of failure, the shortest case that showed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
import warnings
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.errors import HypothesisDeprecationWarning

from icefarm_control.storage.database import Database
from tests import invariants
from tests.fuzz import execute, verdicts
from tests.fuzz.cases import ORIGINS, Case, Rpc, cases
from tests.fuzz.pools import Pools
from tests.fuzz.verdicts import Failure, Tally

REFRESH_EVERY = 10
UPKEEP_EVERY = 25
# An invariant break is looked at again after this long: does it last (a state that stays
# wrong) or was it a moment between two transactions (still a break: another reader saw it)?
RECHECK_SECONDS = 0.5
MAX_PAGE_TOKENS = 50
T = TypeVar("T")


class Target(Protocol):
    backend: str
    pools: Pools

    @property
    def database(self) -> Database: ...

    def channel_for(self, rpc: Rpc) -> grpc.aio.Channel: ...

    async def refresh(self) -> None: ...

    async def upkeep(self) -> None: ...

    async def stop(self) -> None: ...


class BackgroundLoop:
    """An event loop running in its own thread, so the servers, their timers and the stand-in
    workers' heartbeats go on while hypothesis draws the next cases (with the loop stopped
    between cases every worker would look silent after a slow draw)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def __enter__(self) -> BackgroundLoop:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Runner:
    """Runs cases against one target and judges each."""

    def __init__(self, target: Target, tally: Tally, verbose: bool = False) -> None:
        self.target = target
        self.tally = tally
        self.verbose = verbose
        self.seen: set[tuple[str, str]] = set()
        self.count = 0

    async def run(self, case: Case) -> None:
        self.count += 1
        try:
            if self.count % REFRESH_EVERY == 0:
                await self.target.refresh()
            if self.count % UPKEEP_EVERY == 0:
                await self.target.upkeep()
        except Exception as error:
            # The farm's own upkeep failed (an answer it relies on): worth seeing, not fatal.
            self.tally.failures.append(
                Failure("fuzzer", "upkeep", "-", repr(error)[:300], case.describe())
            )
        started = time.monotonic()
        try:
            outcome = await execute.run(self.target.channel_for(case.rpc), case)
        except Exception as error:
            failure = Failure("fuzzer", case.rpc.key, "-", repr(error)[:300], case.describe())
            self.tally.failures.append(failure)
            return
        problems = verdicts.judge(case, outcome)
        if self.verbose:
            took = time.monotonic() - started
            print(f"{outcome.code.name:20} {took:6.3f}s {outcome.details[:90]!r}")
            print(f"    {case.describe(300)}")
        self._keep_page_tokens(outcome.responses)
        problems.extend(await self._invariants(case))
        self.tally.record(case, outcome, problems, time.monotonic() - started)

    def _keep_page_tokens(self, responses: list[Any]) -> None:
        for response in responses:
            token = getattr(response, "next_page_token", "")
            if token and token not in self.target.pools.page_tokens:
                self.target.pools.page_tokens.append(token)
                del self.target.pools.page_tokens[:-MAX_PAGE_TOKENS]

    async def _invariants(self, case: Case) -> list[Failure]:
        found = await invariants.violations(self.target.database)
        new = [v for v in found if (v.invariant, repr(v.rows[0])) not in self.seen]
        if not new:
            return []
        await asyncio.sleep(RECHECK_SECONDS)
        lasting = {v.invariant for v in await invariants.violations(self.target.database)}
        failures = []
        for violation in new:
            self.seen.add((violation.invariant, repr(violation.rows[0])))
            how = "lasting" if violation.invariant in lasting else f"gone {RECHECK_SECONDS}s later"
            failures.append(
                Failure(
                    "invariant",
                    case.rpc.key,
                    self.target.backend,
                    f"{violation} ({how}; after this case)",
                    case.describe(),
                )
            )
        return failures


class _TimeUp(Exception):
    """Raised out of the hypothesis run when the time is spent (hypothesis has no other way to
    stop early; the body raises it before touching the servers, so its replay is harmless)."""


def run_cases(
    loop: BackgroundLoop,
    target: Target,
    rpcs: Sequence[Rpc],
    *,
    max_cases: int,
    seconds: float,
    seed: int | None = None,
    tally: Tally | None = None,
    verbose: bool = False,
    origins: frozenset[str] = ORIGINS,
) -> Tally:
    """Up to `max_cases` cases within about `seconds`; the tally.

    Each hypothesis example is one round: a case for every RPC, in a drawn order. Drawing the
    whole round first keeps the draws the same shape in every example (hypothesis refuses
    generation that depends on outside state, such as whose turn it is or the time left).
    """
    tally = tally if tally is not None else Tally()
    runner = Runner(target, tally, verbose)
    per_rpc = {rpc.key: cases(rpc, target.pools, origins) for rpc in rpcs}
    round_of = st.permutations(list(rpcs)).flatmap(
        lambda order: st.tuples(*(per_rpc[rpc.key] for rpc in order))
    )
    stop_at = time.monotonic() + seconds

    @settings(
        max_examples=max(1, -(-max_cases // len(rpcs))),
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        print_blob=False,
        report_multiple_bugs=False,
    )
    @given(round_of)
    def one_round(drawn: tuple[Case, ...]) -> None:
        for case in drawn:
            if time.monotonic() > stop_at or runner.count >= max_cases:
                raise _TimeUp
            loop.run(runner.run(case))

    if seed is not None:
        one_round = hypothesis_seed(seed)(one_round)
    # Hypothesis keeps caches under .hypothesis/ in the working directory; a run leaves nothing
    # in the tree (its example database is off too: cases are not replayable anyway).
    with tempfile.TemporaryDirectory(prefix="icefarm-hypothesis-") as home:
        set_hypothesis_home_dir(home)
        try:
            with contextlib.suppress(_TimeUp), warnings.catch_warnings():
                # The servers' thread uses `random` (jittered timers) while hypothesis draws;
                # hypothesis takes that for a strategy using it.
                warnings.filterwarnings(
                    "ignore", "Do not use the `random` module", HypothesisDeprecationWarning
                )
                one_round()
        finally:
            set_hypothesis_home_dir(None)
    return tally
