"""The benchmarks' correctness gate: no wrong answer is timed.

Each timed candidate is run once and compared with a reference before it is timed, by the rule of the
tests (tests/kernel_test_utils.py, one formula in one place): fp32 candidates within ``rel`` x the largest
magnitude of each tensor (against an fp64 reference), bf16/fp16 candidates by flash-attention's rule
(their error against the fp64 / fp32 reference at most twice PyTorch's own at the same precision, plus
1e-3 of the tensor's scale). A wrong candidate is not timed: its row fails with "WRONG ANSWER" (so the run
exits non-zero) and ``extra_info["correct"]`` says False. Timed training steps are checked afterwards:
every loss finite, no step skipped (``check_steps``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kernel_test_utils import close_flash_rule, close_rel  # noqa: E402

LOW_PRECISION = (torch.float16, torch.bfloat16)


class WrongAnswer(AssertionError):
    """A benchmark candidate gave a wrong answer (or a timed step a non-finite or skipped one)."""


def run_once(fn, leaves: Sequence[torch.Tensor], grad_out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[output, grad of each leaf]`` of one forward + backward of ``fn()`` (the leaves' grads are reset)."""
    for t in leaves:
        t.grad = None
    out = fn()
    out.backward(grad_out)
    result = [out.detach().clone()] + [t.grad.detach().clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return result


def check(benchmark, got: Sequence[torch.Tensor], reference: Sequence[torch.Tensor],
          lowp_reference: Sequence[torch.Tensor] | None = None, names: Sequence[str] | None = None,
          rel: float = 1e-5) -> None:
    """Compare ``got`` with ``reference`` tensor by tensor: the fp32 rule, or with ``lowp_reference``
    (PyTorch at the candidate's precision) the flash-attention rule. Raises :class:`WrongAnswer`."""
    names = list(names or [f"output {i}" for i in range(len(reference))])
    if len(got) != len(reference):
        raise WrongAnswer(f"WRONG ANSWER, not timed: {len(got)} outputs for {len(reference)} reference ones")
    problems = []
    for i, (g, r) in enumerate(zip(got, reference)):
        g = g.detach().cpu()
        r = r.detach().cpu()
        if lowp_reference is None:
            problems.append(close_rel(g, r, rel, names[i]))
        else:
            problems.append(close_flash_rule(g, lowp_reference[i].detach().cpu(), r, names[i]))
    verdict(benchmark, [p for p in problems if p])


def verdict(benchmark, problems: Sequence[str]) -> None:
    """Record the gate's outcome in ``extra_info`` and refuse a wrong candidate."""
    benchmark.extra_info["correct"] = not problems
    if problems:
        raise WrongAnswer("WRONG ANSWER, not timed: " + "; ".join(problems[:4]))


def check_steps(benchmark, results) -> None:
    """Every timed training step (``StepResult`` or a loss tensor / float) finite and not skipped."""
    bad = []
    for i, r in enumerate(results):
        loss = getattr(r, "loss", r)
        skipped = bool(getattr(r, "skipped", False))
        value = float(loss)
        if not math.isfinite(value) or skipped:
            bad.append(f"step {i}: loss {value}" + (" (skipped)" if skipped else ""))
    benchmark.extra_info["steps_ok"] = not bad and len(results) > 0
    if not results:
        raise WrongAnswer("no timed step was recorded")
    if bad:
        raise WrongAnswer("timed steps not finite or skipped: " + "; ".join(bad[:4]))
