"""AdamW with warmup and cosine/linear/constant decay, and global-norm gradient clipping (optax)."""
from __future__ import annotations

import optax

from distillm2_jax.errors import UserError


def learning_rate_schedule(lr: float, total_steps: int, warmup_ratio: float, kind: str) -> optax.Schedule:
    """0 -> lr over round(warmup_ratio * total_steps) steps, then `kind` decay to 0 at total_steps."""
    total_steps = max(int(total_steps), 1)
    warmup = min(int(round(warmup_ratio * total_steps)), total_steps - 1) if total_steps > 1 else 0
    rest = total_steps - warmup
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, rest)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, rest)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise UserError(f"optim.schedule: unknown schedule '{kind}' (cosine, linear, constant)")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation for the `optim` config section, and its learning-rate schedule."""
    schedule = learning_rate_schedule(optim.lr, total_steps, optim.warmup_ratio, optim.schedule)
    parts = []
    if optim.grad_clip and optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay))
    return optax.chain(*parts), schedule
