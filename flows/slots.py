"""A slot of a Prefect global concurrency limit (``execution.slots``: ``gpu``, ``cpu``) held for a run's
inference, by a lease whose id goes into the run's record.

Prefect's ``concurrency()`` context manager keeps its lease to itself: a run whose process is killed (out of
memory, a node drained) keeps its slot until the lease runs out unrenewed, five minutes by default, and every
other run of every deployment waits that long. Here the lease is short (``execution.slot_lease_s``, renewed
while the run lives) and named in the record, so the flow's ``on_crashed`` hook, which the worker runs once
the run's process is gone, gives the slot back at once (:func:`give_back`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID


@contextmanager
def lease_slot(name: str, timeout_s: float, lease_s: float,
               flow_run_id: str | None = None) -> Iterator[str | None]:
    """Wait up to ``timeout_s`` for one slot of the limit ``name`` (it must exist), hold it by a lease of
    ``lease_s`` seconds renewed in the background, and yield the lease's id; the slot is given back on exit,
    however the block ends. With a Prefect whose lease functions moved, its public ``concurrency()`` holds the
    slot (the same waiting and renewal) and the lease id is ``None``."""
    try:
        from prefect.concurrency._leases import maintain_concurrency_lease
        from prefect.concurrency._sync import (
            acquire_concurrency_slots_with_lease,
            release_concurrency_slots_with_lease,
        )
    except ImportError:  # pragma: no cover - another Prefect than the locked one
        from prefect.concurrency.sync import concurrency

        with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True, lease_duration=lease_s):
            yield None
        return
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(flow_run_id)) if flow_run_id else None
    lease = acquire_concurrency_slots_with_lease([name], 1, timeout_seconds=timeout_s, strict=True,
                                                 lease_duration=lease_s, holder=holder)
    try:
        with maintain_concurrency_lease(lease.lease_id, lease_s, raise_on_lease_renewal_failure=True):
            yield str(lease.lease_id)
    finally:
        release_concurrency_slots_with_lease(lease.lease_id)


def give_back(lease_id: str) -> None:
    """Release the slot held by the lease ``lease_id`` (a run that can no longer release it itself). A
    lease already given back or expired is no error: the server forgets it either way."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(UUID(lease_id))

