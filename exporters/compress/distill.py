"""Recovery by distillation: fine-tune a compressed student to match its teacher's output (MSE, Adam)."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]


@dataclass
class DistillReport:
    steps: int
    lr: float
    batch: int
    train_batches: int
    held_out_batches: int
    error_before: float  # relative L2 of student vs teacher on held-out feeds
    error_after: float
    loss_first: float | None = None
    loss_last: float | None = None

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _first(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, data: Sequence[Batch]) -> list[torch.Tensor]:
    teacher.eval()
    return [_first(teacher(*b)).detach() for b in data]


@torch.no_grad()
def relative_error(student: nn.Module, data: Sequence[Batch], targets: Sequence[torch.Tensor]) -> float:
    """||student - teacher|| / ||teacher|| over all held-out feeds (the validation layer's rel_l2)."""
    student.eval()
    num = den = 0.0
    for b, t in zip(data, targets):
        diff = _first(student(*b)).float() - t.float()
        num += float(diff.pow(2).sum())
        den += float(t.float().pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def distill(student: nn.Module, teacher: nn.Module, train: Sequence[Batch], held: Sequence[Batch], *,
            steps: int, lr: float, batch: int) -> DistillReport:
    """Adam on MSE(student(x), teacher(x)); the error is measured on `held` before and after.

    Only parameters that require grad train (pruning masks and frozen quantizer ranges are buffers).
    """
    train_targets = teacher_outputs(teacher, train)
    held_targets = teacher_outputs(teacher, held)
    before = relative_error(student, held, held_targets)
    report = DistillReport(steps, lr, batch, len(train), len(held), before, before)
    params = [p for p in student.parameters() if p.requires_grad]
    if steps <= 0 or not train or not params:
        return report
    opt = torch.optim.Adam(params, lr=lr)
    student.train()
    order = itertools.cycle(range(len(train)))
    with torch.enable_grad():
        for step in range(steps):
            i = next(order)
            loss = nn.functional.mse_loss(_first(student(*train[i])), train_targets[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 0:
                report.loss_first = loss.item()
            report.loss_last = loss.item()
            log.debug("distill step %d/%d: loss %.4g", step + 1, steps, loss.item())
    student.eval()
    report.error_after = relative_error(student, held, held_targets)
    log.info("distilled %d steps: held-out rel. error %.4g -> %.4g", steps, before, report.error_after)
    return report
