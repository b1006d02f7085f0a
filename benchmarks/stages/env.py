"""Stage ``env``: versions of everything the numbers depend on, and the card as found (clocks, power, temperature)."""
from __future__ import annotations

import sys

import torch

from report_lib import RowWriter
from stages.common import CUDA
from step_common import PEAK_TFLOPS


def stage_env(args, w: RowWriter) -> int:
    """Versions of everything the numbers depend on, and the card as found (clocks, power, temperature)."""
    import importlib
    import importlib.metadata as md
    import subprocess

    def version(dist: str, module: str | None = None) -> str:
        try:
            v = md.version(dist)
        except md.PackageNotFoundError:
            v = "not installed"
        if module and v != "not installed":
            try:
                importlib.import_module(module)
            except Exception as e:
                v += f" (import fails: {type(e).__name__}: {str(e)[:120]})"
        return v

    w.emit("env", key="python", value=sys.version.split()[0])
    w.emit("env", key="torch", value=f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
    for dist, mod in (("triton", "triton"), ("transformers", None), ("timm", None), ("xformers", "xformers.ops"),
                      ("torchao", "torchao.float8"), ("nvidia-cudnn-frontend", "cudnn")):
        w.emit("env", key=dist, value=version(dist, mod))
    from beit_fast.ops.attention import ATTENTION_BACKENDS, AUTO_PRIORITY
    from beit_fast.ops.backend import triton_available, triton_interpreting

    w.emit("env", key="beit_fast attention backends", value=", ".join(ATTENTION_BACKENDS))
    w.emit("attention_backends", backends=list(ATTENTION_BACKENDS), auto_priority_cuda=list(AUTO_PRIORITY["cuda"]))
    w.emit("env", key="beit_fast Triton kernels", value="interpreted" if triton_interpreting() else
           ("compiled" if triton_available() else "unavailable"))
    if CUDA:
        prop = torch.cuda.get_device_properties(0)
        w.emit("env", key="card", value=f"{prop.name}, capability {prop.major}.{prop.minor}, "
               f"{prop.multi_processor_count} SMs, {prop.total_memory / 2**30:.0f} GiB")
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                                "power.draw,power.limit,temperature.gpu", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            w.emit("env", key="nvidia-smi (driver, SM clock, max SM clock, mem clock, power, limit, temp)",
                   value=q.stdout.strip() or q.stderr.strip())
        except Exception as e:
            w.emit("env", key="nvidia-smi", value=f"{type(e).__name__}: {e}")
    w.emit("env", key="peak bf16 TFLOP/s used for MFU", value=PEAK_TFLOPS)
    return 0
