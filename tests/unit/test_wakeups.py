"""The light wake-up primitives every open stream holds: Flag and Mailbox."""

from __future__ import annotations

import asyncio

import pytest

from icefarm_control.notifier import Flag, Mailbox


async def test_a_flag_wakes_every_waiter_and_stays_set_until_cleared() -> None:
    flag = Flag()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)  # let them start waiting
    assert not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]
    assert flag.is_set() and await flag.wait()
    flag.clear()
    assert not flag.is_set()


async def test_a_waiter_cancelled_by_a_timeout_does_not_disturb_the_others() -> None:
    flag = Flag()
    patient = asyncio.create_task(flag.wait())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(flag.wait(), 0.01)
    flag.set()
    assert await asyncio.wait_for(patient, 1)


async def test_a_mailbox_hands_items_over_in_order_and_join_waits_for_task_done() -> None:
    box: Mailbox[int] = Mailbox()
    await asyncio.wait_for(box.join(), 1)  # nothing put: nothing to wait for
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put_nowait(1)
    box.put_nowait(2)
    assert await asyncio.wait_for(getter, 1) == 1
    joined = asyncio.create_task(box.join())
    box.task_done()
    assert await box.get() == 2
    await asyncio.sleep(0)
    assert not joined.done()  # one item taken but not yet marked done
    box.task_done()
    await asyncio.wait_for(joined, 1)
