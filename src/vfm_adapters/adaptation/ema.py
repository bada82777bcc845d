"""Mean teachers: an exponential moving average (EMA) copy of a network.

The teacher is a :func:`copy.deepcopy` of the student. Adapters are deep-copy safe
(their hooks are objects that live on the copied modules), so the teacher's Rein is
its own: updating the student never changes the teacher except through
:func:`ema_update`.

Update rule (DACS, DAFormer), with ``t`` the index of the training step just taken::

    alpha_t = min(1 - 1 / (t + 1), alpha_max)      # ramp (warm-up) on
    alpha_t = alpha_max                             # ramp off
    teacher <- alpha_t * teacher + (1 - alpha_t) * student

for every parameter and every floating-point buffer; integer buffers (such as
BatchNorm's ``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """An independent EMA teacher: a deep copy in eval mode with gradients off.

    Args:
        student: The network to copy (adapters included).

    Returns:
        The teacher; it shares no tensor with ``student``.

    Example:
        >>> student = nn.Linear(2, 2)
        >>> teacher = make_teacher(student)
        >>> teacher.weight.data_ptr() != student.weight.data_ptr(), teacher.training
        (True, False)
    """
    teacher = copy.deepcopy(student)
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def ema_alpha(step: int, alpha_max: float = 0.99, ramp: bool = True) -> float:
    """The EMA coefficient after step ``step`` (0-based).

    Args:
        step: Index of the training step just taken (0 for the first).
        alpha_max: The cap (DACS 0.99, DAFormer 0.999, CLOUDS 0.999).
        ramp: Use ``min(1 - 1/(t+1), alpha_max)`` (DACS/DAFormer) instead of a fixed alpha.

    Example:
        >>> ema_alpha(0), ema_alpha(1), ema_alpha(3), ema_alpha(1000)
        (0.0, 0.5, 0.75, 0.99)
        >>> ema_alpha(0, 0.999, ramp=False)
        0.999
    """
    if not 0.0 <= alpha_max <= 1.0:
        raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
    if not ramp:
        return float(alpha_max)
    return float(min(1.0 - 1.0 / (step + 1), alpha_max))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """``teacher <- alpha * teacher + (1 - alpha) * student`` for parameters and float buffers.

    Parameters and buffers are matched by name, so the two modules must have the same
    structure (a teacher made by :func:`make_teacher`).

    Example:
        >>> student, teacher = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        >>> _ = student.weight.data.fill_(1.0); _ = teacher.weight.data.fill_(0.0)
        >>> ema_update(teacher, student, 0.75)
        >>> teacher.weight.item()
        0.25
    """
    student_params = dict(student.named_parameters())
    student_buffers = dict(student.named_buffers())
    teacher_params = dict(teacher.named_parameters())
    teacher_buffers = dict(teacher.named_buffers())
    if student_params.keys() != teacher_params.keys() or student_buffers.keys() != teacher_buffers.keys():
        raise ValueError("teacher and student differ in structure; build the teacher with make_teacher(student)")
    for name, param in teacher_params.items():
        param.mul_(alpha).add_(student_params[name].detach().to(param.dtype), alpha=1.0 - alpha)
    for name, buffer in teacher_buffers.items():
        source = student_buffers[name].detach()
        if buffer.dtype.is_floating_point:
            buffer.mul_(alpha).add_(source.to(buffer.dtype), alpha=1.0 - alpha)
        else:
            buffer.copy_(source)
