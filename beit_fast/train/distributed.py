"""Multi-process training support: process groups from torchrun, DDP / FSDP2 wrapping, full-state
checkpoints of sharded models, cross-rank metrics, and graceful stop on SIGTERM / SIGINT.

Launch with ``torchrun`` (no launcher of our own)::

    torchrun --nproc_per_node=8 -m beit_fast.pretrain --data_path ... --batch_size 128
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=host0:29400 -m beit_fast.pretrain ...

:func:`init_distributed` initialises the default process group from the environment torchrun sets
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL on CUDA, gloo on CPU.
Without ``WORLD_SIZE`` everything here degrades to single-process no-ops.

The model is always called through one module, :class:`beit_fast.train.loss.MIMLoss`
(``forward(images, bool_masked_pos, tokens) -> (loss, acc)``), for the eager reference step and for the
fast static-shape step alike. That module is what DDP wraps (so DDP's reducer sees every forward, including
the fast path's ``model.forward_masked_hidden``) and what FSDP2 shards as its root (each Transformer block
is its own FSDP unit; the root holds the embeddings, the bias table, the final norm and the head, which
the fused loss reads directly and which the root's pre-forward hook has gathered by then).
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "DistInfo", "env_world_size", "init_distributed", "cleanup_distributed", "all_reduce_mean", "any_rank",
    "broadcast_object", "all_gather_object", "barrier", "wrap_ddp", "apply_fsdp", "is_fsdp",
    "no_grad_sync", "full_model_state_dict", "load_full_model_state_dict", "full_optimizer_state_dict",
    "load_full_optimizer_state_dict", "GracefulStop", "isolate_worker_from_signals",
]

log = logging.getLogger("beit_fast.train.distributed")


@dataclass
class DistInfo:
    """This process's place in the job. ``world_size == 1`` and ``active == False``: a plain run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False  # a default process group is in use
    owns_group: bool = False  # this module created it (and destroys it in cleanup_distributed)
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int | None:
    """``WORLD_SIZE`` from the environment (torchrun sets it), or None when not launched that way."""
    value = os.environ.get("WORLD_SIZE")
    if value in (None, ""):
        return None
    try:
        n = int(value)
    except ValueError:
        raise SystemExit(f"error: environment variable WORLD_SIZE={value!r} is not an integer") from None
    if n < 1:
        raise SystemExit(f"error: environment variable WORLD_SIZE={n} must be >= 1")
    return n


def init_distributed(device_arg: str | None, timeout_minutes: float = 30.0) -> tuple[DistInfo, torch.device]:
    """Join the job torchrun started (if any) and pick this process's device.

    * No ``WORLD_SIZE`` in the environment and no process group: single process, ``device_arg`` or
      ``cuda`` when available, else ``cpu``.
    * ``WORLD_SIZE`` set: ``init_process_group`` from the environment (``env://``), NCCL when the device is
      CUDA, gloo otherwise; the CUDA device is ``cuda:LOCAL_RANK`` (``--device`` may only say ``cuda`` or
      ``cpu`` then). A group that already exists is reused and left alone by :func:`cleanup_distributed`.
    """
    world = env_world_size()
    if world is None and not (dist.is_available() and dist.is_initialized()):
        return DistInfo(), _single_device(device_arg)
    if not dist.is_available():
        raise SystemExit("error: WORLD_SIZE is set but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    want = (device_arg or ("cuda" if torch.cuda.is_available() else "cpu")).strip()
    try:
        requested = torch.device(want)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {want!r} is not a device: {e}") from None
    if requested.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is available")
        if requested.index is not None:
            raise SystemExit(f"error: --device {want} names one GPU, but under torchrun each process uses "
                             "cuda:LOCAL_RANK; pass --device cuda (or nothing)")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices "
                             "are visible; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif requested.type == "cpu":
        device = torch.device("cpu")
    else:
        raise SystemExit(f"error: --device {want!r}: distributed runs support cuda (NCCL) or cpu (gloo)")
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({"device_id": device} if device.type == "cuda" else {}))
        owns = True
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, active=True,
                    owns_group=owns, backend=dist.get_backend())
    if info.backend == "nccl" and device.type != "cuda":
        raise SystemExit("error: the process group uses NCCL, which needs --device cuda")
    return info, device


def _single_device(device_arg: str | None) -> torch.device:
    name = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {name!r} is not a device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA devices are visible")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise SystemExit(f"error: --device {name!r}: use cuda, cuda:N or cpu")
    return device


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(info: DistInfo, device: torch.device) -> torch.device:
    return device if info.backend == "nccl" else torch.device("cpu")


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``values`` over ranks (returned; the input is not modified). No-op for one process."""
    if not info.active or info.world_size == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (one tiny all-reduce)."""
    if not info.active or info.world_size == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(info, device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not info.active or info.world_size == 1:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info.active or info.world_size == 1:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.active and info.world_size > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------------------
# Wrapping
# --------------------------------------------------------------------------------------------------------
def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around the loss module.

    Buffers are not broadcast each step (the model's only buffer, the relative position index, is a
    constant); gradients are bucket views (no extra copy). All parameters get gradients in both steps, so
    ``find_unused_parameters`` stays off.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               **no_buffer_sync)


def apply_fsdp(loss_module: nn.Module, blocks: Iterable[nn.Module], reshard_after_forward: bool = True,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 (``fully_shard``) each Transformer block, then the loss module as the root; in place.

    Call before building the optimizer: the parameters become sharded DTensors, fp32 (the optimizer's
    master weights). ``param_dtype`` None: the gathered parameters are fp32 too (autocast does the
    low-precision compute; the numbers are those of the DDP/single runs); bf16 (what a bf16 run passes):
    parameters are all-gathered in bf16 (half the bytes; the matmuls cast them to bf16 under autocast anyway)
    and gradients reduce-scattered in fp32 (FSDP2's ``MixedPrecisionPolicy``).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(loss_module, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return loss_module


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(module, FSDPModule)


def no_grad_sync(module: nn.Module, skip: bool):
    """Context for a micro-batch whose gradients must only accumulate locally (gradient accumulation):
    DDP's ``no_sync()``; for FSDP2 ``set_requires_gradient_sync(False)`` (restored to True after)."""
    if not skip:
        return nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    if is_fsdp(module):
        return _FSDPNoSync(module)
    return nullcontext()


class _FSDPNoSync:
    def __init__(self, module) -> None:
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)
        return False


# --------------------------------------------------------------------------------------------------------
# Full-state checkpoints of FSDP2-sharded models (the same file format as a single-process run)
# --------------------------------------------------------------------------------------------------------
def _dcp():
    from torch.distributed.checkpoint import state_dict as dcp_sd

    return dcp_sd


def full_model_state_dict(root: nn.Module, prefix: str = "model.") -> dict:
    """Collective: the unsharded state dict of ``root``'s sub-module at ``prefix`` on rank 0 (CPU tensors),
    ``{}`` on other ranks."""
    dcp_sd = _dcp()
    sd = dcp_sd.get_model_state_dict(root, options=dcp_sd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_full_model_state_dict(root: nn.Module, state: dict, prefix: str = "model.") -> None:
    """Load a full (unsharded) model state dict into the sharded ``root`` (every rank passes the same dict)."""
    dcp_sd = _dcp()
    dcp_sd.set_model_state_dict(root, {prefix + k: v for k, v in state.items()},
                                options=dcp_sd.StateDictOptions(full_state_dict=True, strict=True))


def _group_names(optimizer: torch.optim.Optimizer, prefix: str) -> list[list[str]]:
    names = []
    for group in optimizer.param_groups:
        if "param_names" not in group or len(group["param_names"]) != len(group["params"]):
            raise ValueError("FSDP checkpoints need param groups with 'param_names' (beit_fast.train.optim.build_optimizer)")
        names.append([prefix + n for n in group["param_names"]])
    return names


def full_optimizer_state_dict(root: nn.Module, optimizer: torch.optim.Optimizer, prefix: str = "model.") -> dict:
    """Collective: the optimizer state of a sharded model, unsharded, in ``optimizer.state_dict()``'s own
    integer-keyed layout (as a single-process run saves it) on rank 0; ``{}`` on other ranks."""
    dcp_sd = _dcp()
    fqn = dcp_sd.get_optimizer_state_dict(
        root, optimizer, options=dcp_sd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not fqn:
        return {}
    ids: dict[str, int] = {}
    groups = []
    for group, names in zip(fqn["param_groups"], _group_names(optimizer, prefix)):
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = []
        for name in names:
            ids[name] = len(ids)
            g["params"].append(ids[name])
        groups.append(g)
    state = {ids[name]: value for name, value in fqn["state"].items()}
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state_dict(root: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                                   prefix: str = "model.") -> None:
    """Load an ``optimizer.state_dict()``-layout state (as saved by any run of this package) into the
    optimizer of a sharded model."""
    dcp_sd = _dcp()
    names = [n for group in _group_names(optimizer, prefix) for n in group]
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError("the checkpoint's optimizer has another number of parameter groups")
    ids = [i for g in state["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise ValueError("the checkpoint's optimizer holds another number of parameters")
    by_id = dict(zip(ids, names))
    groups = []
    offset = 0
    for group in state["param_groups"]:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = names[offset: offset + len(group["params"])]
        offset += len(group["params"])
        groups.append(g)
    for current, saved in zip(optimizer.param_groups, groups):  # DCP wants the keys the schedule adds ("_decays")
        current.update({k: v for k, v in saved.items() if k != "params" and k not in current})
    fqn = {"state": {by_id[i]: v for i, v in state["state"].items()}, "param_groups": groups}
    dcp_sd.set_optimizer_state_dict(root, optimizer, fqn, options=dcp_sd.StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------------------------------------
# Graceful stop
# --------------------------------------------------------------------------------------------------------
class GracefulStop:
    """SIGTERM / SIGINT handler: the first signal sets :attr:`requested` (the training loop checks it at
    step boundaries, saves a checkpoint and exits cleanly); a second signal restores the default action
    and re-delivers itself, i.e. the process ends at once (exit status -signum, as if unhandled).

    ``install()`` only works in the main thread (elsewhere it does nothing: the caller keeps the flag
    it can set by hand); ``restore()`` puts the previous handlers back. Usable as a context manager.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.requested).name if self.requested else None

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum
        log.warning("received %s: finishing the current step, then saving a checkpoint and exiting "
                    "(send it again to exit at once)", signal.Signals(signum).name)

    def install(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "GracefulStop":
        return self.install()

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False


def isolate_worker_from_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: move the worker into a process group of its own.

    A Ctrl-C (SIGINT to the terminal's foreground process group) and torchrun's shutdown (SIGTERM to each
    rank's process group) then reach only the main process, which finishes its step, saves and stops,
    instead of also killing its data workers under it (the DataLoader would raise at an arbitrary point of
    the step). The workers keep the default signal actions, which the DataLoader's own shutdown relies on,
    and still exit by themselves when the main process dies (their parent watchdog).
    """
    if hasattr(os, "setpgid"):
        try:
            os.setpgid(0, 0)
        except OSError:  # pragma: no cover - e.g. a session leader
            pass
