"""Compute precision: the autocast context every stage (features, training, evaluation, prediction) runs under, and
``auto``, the precision chosen by measuring this machine.

Concrete precisions are ``fp32`` (no autocast: bit-exact CPU work), ``bf16`` and ``fp16`` (autocast; learned
parameters and weights stay fp32). ``auto`` is resolved once per call site by :func:`resolve_precision`:

* CUDA: ``bf16`` where the GPU supports it (``torch.cuda.is_bf16_supported()``), else ``fp32``;
* CPU: a short matrix-product probe (:func:`matmul_probe`: the same product in fp32 and under bf16 autocast, casts
  included, best of a few interleaved rounds) decides: ``bf16`` when it is at least :data:`BF16_MIN_GAIN` times as
  fast, else ``fp32``. Whether bf16 pays off on a CPU depends on more than its flags (AMX, AVX-512 BF16, the
  oneDNN kernels of the torch build), so it is measured rather than guessed;
* any other device: ``fp32``.

The probe runs once per machine identity (:func:`machine_identity`: CPU model, a hash of the CPU flags, the torch
version, the device) and its answer is kept in ``$VLPROMPT_CACHE/precision/probe.json`` (written atomically, under a
file lock so concurrent processes probe once), so every later run on that machine gets the same answer at no cost.
``fp16`` is never chosen automatically (it needs loss scaling and is slow on CPUs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from vlprompt.common import locks
from vlprompt.common.io import atomic_write_json
from vlprompt.common.paths import cache_dir as cache_folder
from vlprompt.common.vocab import PRECISION_CHOICES, PRECISIONS
from vlprompt.errors import ConfigError

logger = logging.getLogger(__name__)


BF16_MIN_GAIN = 1.1
"""bf16 is chosen on a CPU only when the probe finds it at least this much faster than fp32 (a margin over the
probe's timing noise, so a machine where both are about equal stays on exact fp32)."""
PROBE_FILE = "probe.json"
PROBE_FORMAT = 1

Probe = Callable[["torch.device"], Mapping[str, Any]]
"""A probe: device -> at least ``{"fp32_s": seconds, "bf16_s": seconds}`` for the same work."""


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for a concrete ``precision`` (fp32: none; bf16/fp16: torch.autocast on ``device``'s type).

    ``auto`` must be resolved first (:func:`resolve_precision`)."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in dtypes:
        hint = "; resolve 'auto' with resolve_precision() first" if precision == "auto" else ""
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}{hint}")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISION_CHOICES`, else ConfigError."""
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    return str(precision)


# ------------------------------------------------------------------------------------------------- the probe


def _cpuinfo() -> tuple[str, list[str]]:
    """CPU model name and flags from ``/proc/cpuinfo`` (Linux); elsewhere the platform's processor string."""
    model, flags = "", []
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
                if model and flags:
                    break
    return model or platform.processor() or platform.machine() or "unknown", sorted(flags)


def machine_identity(device: torch.device | str) -> dict[str, str]:
    """What a cached probe answer is valid for: CPU model, a hash of its flags, torch version, device kind.

    For CUDA the device also names the GPU and its compute capability (two GPU models of one machine differ)."""
    device = torch.device(device)
    model, flags = _cpuinfo()
    described = device.type
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        described = f"cuda:{torch.cuda.get_device_name(index)}:sm_{major}{minor}"
    return {"cpu": model, "cpu_flags": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
            "torch": str(torch.__version__), "device": described}


def identity_key(identity: Mapping[str, str]) -> str:
    """A short stable key of a machine identity (the probe file's index)."""
    return hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()[:16]


def matmul_probe(device: torch.device, *, size: int = 1024, rounds: int = 5) -> dict[str, float]:
    """Best-of-``rounds`` seconds of one ``[size, size] @ [size, size]`` product from fp32 inputs in fp32 and under
    bf16 autocast (the cast of both inputs included: that is what autocast pays for a frozen weight), interleaved so
    both see the same load. About half a second on a CPU."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)

    def fp32() -> None:
        torch.mm(a, b)

    def bf16() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            torch.mm(a, b)

    best = {"fp32_s": float("inf"), "bf16_s": float("inf")}
    with torch.inference_mode():
        fp32(), bf16()  # warm-up: kernel selection, first-touch allocations
        for _ in range(rounds):
            for name, run in (("fp32_s", fp32), ("bf16_s", bf16)):
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    return {**best, "size": float(size)}


def probe_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The probe file: ``cache_dir/probe.json``, by default ``$VLPROMPT_CACHE/precision/probe.json``."""
    return Path(cache_dir) / PROBE_FILE if cache_dir is not None else cache_folder("precision") / PROBE_FILE


def _read_probes(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != PROBE_FORMAT or not isinstance(data.get("machines"), dict):
        return {}
    return data["machines"]


def measured_choice(device: torch.device | str, *, probe: Probe | None = None,
                    cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The cached probe record of this machine and ``device``, measuring it first if there is none.

    The record holds ``precision`` (the choice), ``fp32_s``, ``bf16_s``, ``speedup`` (fp32 / bf16), ``identity``
    and ``measured_at``. ``probe`` replaces :func:`matmul_probe` (tests inject one so the answer does not depend on
    this machine's speed). An unwritable cache folder only costs a new measurement next time (logged).
    """
    device = torch.device(device)
    identity = machine_identity(device)
    key = identity_key(identity)
    path = probe_path(cache_dir)
    record = _read_probes(path).get(key)
    if isinstance(record, dict) and record.get("precision") in PRECISIONS:
        return record
    try:
        # one process measures; the others wait and read its answer
        with locks.acquire(f"{path}.lock", timeout=60):  # type: ignore[union-attr] # a timeout raises, never None
            machines = _read_probes(path)
            record = machines.get(key)
            if isinstance(record, dict) and record.get("precision") in PRECISIONS:
                return record
            record = _measure(device, identity, probe)
            try:
                atomic_write_json(path, {"format": PROBE_FORMAT, "machines": {**machines, key: record}})
            except OSError as exc:
                logger.warning("cannot keep the precision probe in %s (%s); it will be measured again", path, exc)
            return record
    except locks.LockTimeout as exc:
        raise ConfigError(f"the precision probe file {path} stayed locked for 60 s by process {exc.holder}; retry, "
                          "or give --precision fp32 / bf16") from None
    except OSError as exc:  # the cache folder cannot be created or locked: measure, keep nothing
        logger.warning("cannot keep the precision probe in %s (%s); it will be measured again", path, exc)
        return _measure(device, identity, probe)


def _measure(device: torch.device, identity: Mapping[str, str], probe: Probe | None) -> dict[str, Any]:
    timings = dict((probe or matmul_probe)(device))
    fp32_s, bf16_s = float(timings["fp32_s"]), float(timings["bf16_s"])
    speedup = fp32_s / bf16_s if bf16_s > 0 else 0.0
    record = {**timings, "precision": "bf16" if speedup >= BF16_MIN_GAIN else "fp32", "speedup": speedup,
              "identity": dict(identity), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    logger.info("precision probe on %s (%s): bf16 autocast matrix product at %.2fx the fp32 speed -> auto = %s",
                identity["device"], identity["cpu"], speedup, record["precision"])
    return record


def resolve_precision(precision: str, device: torch.device | str, *, probe: Probe | None = None,
                      cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The concrete precision to run: ``precision`` itself unless it is ``auto`` (see the module docstring)."""
    check_precision(precision)
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu":
        return "fp32"
    return str(measured_choice(device, probe=probe, cache_dir=cache_dir)["precision"])
