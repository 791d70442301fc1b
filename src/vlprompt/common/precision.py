"""Compute precision: the autocast context every stage (features, training, evaluation, prediction) runs under."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from vlprompt.common.vocab import PRECISIONS
from vlprompt.errors import ConfigError

if TYPE_CHECKING:
    import torch



def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for ``precision`` (fp32: none; bf16/fp16: torch.autocast on ``device``'s type)."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in dtypes:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices faster than fp32 ones: Intel AMX (``amx_bf16``).

    Without AMX (AVX-512 BF16 alone, or older CPUs) bf16 matrix products run at about half the fp32 rate on current
    PyTorch CPU builds, so bf16 autocast slows training down there. Read from ``/proc/cpuinfo`` (Linux); elsewhere
    False.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def preferred_precision(device: torch.device | str) -> str:
    """The fastest precision on ``device`` that keeps results sound: bf16 on CUDA GPUs that support it and on CPUs
    with AMX, else fp32 (fp16 is never chosen automatically: it needs loss scaling and is slow on CPU)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"
