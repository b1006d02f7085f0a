"""Feeding the loop: the next micro-batch (the end of an epoch, unreadable data sets, data workers killed
by a signal) and the loader's workers shut down when a run ends."""
from __future__ import annotations

import logging

__all__ = ["next_batch", "data_error", "shutdown_workers", "WORKERS_GONE"]

log = logging.getLogger("beit_fast.train")

WORKERS_GONE = object()


def data_error(e: BaseException) -> SystemExit | None:
    """A clear SystemExit for a data set that yields no readable image (raised in a worker or here)."""
    for line in str(e).splitlines()[::-1]:
        if "could not be read" in line:
            return SystemExit("error: " + line.strip().removeprefix("RuntimeError: "))
    return None


def next_batch(it, stopper, world_size: int = 1):
    """The next micro-batch; None at the end of the epoch; :data:`WORKERS_GONE` when a stop was requested
    and the data workers were killed as well (signalled one by one), so the run stops at the last step."""
    try:
        return next(it)
    except StopIteration:
        return None
    except RuntimeError as e:
        err = data_error(e)
        if err is not None:
            raise err from None
        if stopper.requested is not None and world_size == 1:  # (several ranks must stop together: no)
            log.warning("the data workers are gone (%s); stopping at the last finished step", str(e).splitlines()[0])
            return WORKERS_GONE
        raise


def shutdown_workers(loader) -> None:
    """Stop the loader's persistent workers now, not whenever the loader is collected (after an error its
    traceback keeps it alive, and the workers would linger in an in-process caller)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None
