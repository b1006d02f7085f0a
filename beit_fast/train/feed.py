"""Feeding the loop: the next micro-batch (the end of an epoch, unreadable data sets, data workers killed
by a signal), the loader's workers shut down when a run ends, and how many workers a process gets."""
from __future__ import annotations

import logging
import os

__all__ = ["next_batch", "data_error", "shutdown_workers", "WORKERS_GONE", "cores_per_process", "default_num_workers"]

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


def cores_per_process(local_world_size: int | None = None) -> int:
    """The CPU cores this process may use (its affinity mask, which containers and schedulers set, not the
    machine's count) shared among the training processes of this node (``local_world_size``, default
    torchrun's ``LOCAL_WORLD_SIZE``); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_world_size))


def default_num_workers(device_type: str, *, on_cpu: int | None = None, local_world_size: int | None = None) -> int:
    """Loader workers of a process when the run does not say (``--num_workers`` unset).

    On CUDA, every core of the process's share (:func:`cores_per_process`) but one, which the process itself
    needs to queue the GPU's work: decoding and augmenting images is what limits a GPU's step rate (about
    140 images/s a core for BEiT's two views against a step of thousands). Elsewhere ``on_cpu`` (fine-tuning:
    0, the step's own threads use the cores), or ``min(8, cores)`` (pretraining: its augmentation is the heavier
    part of a CPU step)."""
    cores = cores_per_process(local_world_size)
    if device_type == "cuda":
        return max(1, cores - 1)
    return min(8, cores) if on_cpu is None else on_cpu


def shutdown_workers(loader) -> None:
    """Stop the loader's persistent workers now, not whenever the loader is collected (after an error its
    traceback keeps it alive, and the workers would linger in an in-process caller)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None
