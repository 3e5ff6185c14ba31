"""The default timers and request limits: the one place they are defined."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Timers:
    """ARCHITECTURE §7. Every value can be overridden by configuration."""

    default_lease: timedelta = timedelta(minutes=60)
    ending_soon_before: timedelta = timedelta(minutes=10)
    heartbeat_interval: timedelta = timedelta(seconds=5)
    offline_timeout: timedelta = timedelta(seconds=30)
    worker_grace: timedelta = timedelta(minutes=5)
    client_grace: timedelta = timedelta(minutes=10)
    # How often the lease timer scans at most (leases end within this of their end time).
    lease_scan_interval: timedelta = timedelta(seconds=0.5)
    # A waiting Reserve re-reads its queue entry this often even without a wake-up.
    waiter_poll_interval: timedelta = timedelta(seconds=1)
    # Events older than this are pruned from the outbox (a client resuming later misses them).
    event_retention: timedelta = timedelta(hours=24)
    # A command sent to a worker and not answered within this breaks its device.
    command_timeout: timedelta = timedelta(seconds=60)
    # A WorkerSession must send Register within this of opening.
    handshake_timeout: timedelta = timedelta(seconds=5)
    # How long a drain waits for reservations when the request names no timeout.
    drain_timeout: timedelta = timedelta(minutes=15)
    # Each replica refreshes its row in `replicas` this often; a row older than
    # `replica_stale_after` means the replica is gone, and its worker streams with it.
    replica_refresh_interval: timedelta = timedelta(seconds=1)
    replica_stale_after: timedelta = timedelta(seconds=3)


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for; past them the request is INVALID_ARGUMENT."""

    max_count: int = 1024
    max_device_ids: int = 1024
    min_lease: timedelta = timedelta(seconds=1)
    max_lease: timedelta = timedelta(days=7)
    max_wait: timedelta = timedelta(days=1)
    max_mode_length: int = 64
    max_mode_args: int = 32
    max_mode_arg_key_length: int = 64
    max_mode_arg_value_length: int = 1024
    max_request_id_length: int = 128
    max_id_length: int = 128
    max_page_size: int = 1000
    default_page_size: int = 100
    # Boards one worker may register; past it Register is INVALID_ARGUMENT.
    max_devices_per_worker: int = 4096
    # A Register is reconciled (and a worker's boards taken offline) this many devices per
    # transaction, so one big worker never stalls the other writers for long (SQLite).
    devices_per_transaction: int = 100


# Periods and bounds of the control that are not settings; defined here all the same, so each
# fact has one place.
# A worker stream re-reads its commands this often without a wake-up (jittered): wake-ups do
# the real work, and a thousand idle workers must not become a steady stream of queries.
WORKER_COMMAND_POLL_SECONDS = 30.0
# Client Sessions, WatchEvents and availability watches check for what a lost wake-up missed.
UPKEEP_SECONDS = 5.0
# A client feed's own last-resort re-read.
FEED_REREAD_SECONDS = 60.0
# The modes workers offer are cached this long at Reserve.
MODE_CACHE_SECONDS = 2.0
# The operator-feed sequencer numbers events at most once per this.
SEQUENCER_GATHER_SECONDS = 0.05
# Selectors one Session may watch.
MAX_WATCHES_PER_SESSION = 64
# A drain waits at most this for reservations to end.
MAX_DRAIN_TIMEOUT = timedelta(days=7)
# The largest request the control's gRPC server takes.
MAX_MESSAGE_BYTES = 1024 * 1024
