"""ControlService.WatchEvents: the operator feed as a server stream.

Replays the operator events after `resume_after` (0 = none: only what happens from now on),
then streams new ones in order. Wake-ups on the `operator` topic say when to re-read; the feed
also re-reads on a slow timer, so a lost wake-up only delays an event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from icefarm.v1 import control_service_pb2 as pb
from icefarm_control.domain.errors import Reason
from icefarm_control.domain.feeds import OPERATOR_BATCH, OperatorFeed
from icefarm_control.domain.settings import UPKEEP_SECONDS
from icefarm_control.notifier import STOPPING, Notifier
from icefarm_control.storage import outbox
from icefarm_control.storage.database import Database
from icefarm_control.transport import events as event_messages
from icefarm_control.transport.errors import abort, to_status
from icefarm_control.transport.identity import caller_identity
from icefarm_control.transport.streams import failure_status, to_completion

Context = grpc.aio.ServicerContext[Any, Any]
RESYNC_SECONDS = UPKEEP_SECONDS
SHUTTING_DOWN = to_status(
    grpc.StatusCode.UNAVAILABLE,
    "the control is shutting down; reconnect (to another replica) with resume_after",
    Reason.SHUTTING_DOWN.value,
)


async def watch_events(
    database: Database, notifier: Notifier, request: pb.WatchEventsRequest, context: Context
) -> AsyncIterator[pb.WatchEventsResponse]:
    feed = OperatorFeed(database)
    try:
        caller_identity(context, required=False)
        # STOPPING: when the control shuts down the feed ends, so watchers reconnect elsewhere.
        with notifier.subscribe(outbox.OPERATOR, STOPPING) as subscription:
            # Subscribed before the first read, so nothing committed after it is missed.
            cursor = request.resume_after or await to_completion(feed.last_sequence())
            # Headers now: the caller knows the feed is live before the first event.
            await context.send_initial_metadata(())
            while not notifier.stopping:
                rows = await to_completion(feed.events_after(cursor))
                for row in rows:
                    cursor = row.sequence
                    message = event_messages.event(row)
                    if message is not None:
                        yield pb.WatchEventsResponse(event=message)
                if len(rows) < OPERATOR_BATCH:
                    await subscription.wait(RESYNC_SECONDS)
    except Exception as error:
        await abort(context, failure_status(error, "WatchEvents"))
    await abort(context, SHUTTING_DOWN)
