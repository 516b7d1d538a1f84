"""Where and at what precision ``train`` runs: device choice, autocast, channels-last.

``--device auto`` takes CUDA when torch sees a GPU (the process's own one under
``torchrun``: ``cuda:LOCAL_RANK``), then Apple's MPS, else the CPU. ``--precision`` follows
the names trainers use: ``32`` (plain fp32), ``16-mixed`` (fp16 autocast with a gradient
scaler, for CUDA tensor cores) and ``bf16-mixed`` (bfloat16 autocast, no scaler needed;
also works on recent CPUs). Channels-last memory layout is used on CUDA, where cuDNN's
convolutions run faster in NHWC; the CPU keeps NCHW.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["32", "16-mixed", "bf16-mixed"]
PRECISIONS: tuple[Precision, ...] = ("32", "16-mixed", "bf16-mixed")
_AUTOCAST = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


class DeviceError(ValueError):
    """A device or precision that this machine cannot give."""


@dataclass(frozen=True)
class Accelerator:
    """The device a run trains on and how its forward passes are cast."""

    device: torch.device
    precision: Precision
    channels_last: bool

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST[self.precision]

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed-precision forward passes (a no-op at ``32``)."""
        dtype = self.autocast_dtype
        if dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield

    def scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, active only for fp16 (bf16 has fp32's exponent range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "16-mixed")

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """A host batch moved to the device in the layout the model uses."""
        batch = batch.to(self.device, non_blocking=self.device.type == "cuda")
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last \
            else batch


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a device this machine has."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise DeviceError(f"--device {spec!r}: not a device (use auto, cpu, cuda[:N] or mps)"
                          ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: torch sees no CUDA GPU here "
                              "(use --device cpu or auto)")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {spec}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {spec}: unsupported (use auto, cpu, cuda[:N] or mps)")
    return device


def accelerator(spec: str, precision: str, local_rank: int = 0) -> Accelerator:
    """The run's device (``spec``) and precision, checked against what the machine has."""
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    device = resolve_device(spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"{torch.cuda.get_device_name(device)} has no bf16; "
                              "use --precision 16-mixed")
    elif precision == "16-mixed" and device.type == "cpu":
        raise DeviceError("--precision 16-mixed needs a GPU; on a CPU use bf16-mixed or 32")
    return Accelerator(device, precision, channels_last=device.type == "cuda")
