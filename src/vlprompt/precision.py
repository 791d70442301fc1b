"""Compute precision: the autocast context every stage (features, training, evaluation, prediction) runs under."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from vlprompt.errors import ConfigError

if TYPE_CHECKING:
    import torch

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for ``precision`` (fp32: none; bf16/fp16: torch.autocast on ``device``'s type)."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in dtypes:
        raise ConfigError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])
