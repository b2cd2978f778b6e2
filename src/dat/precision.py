"""``--precision exact|fast``: exact float32 (the default and the test reference), or the
fastest arithmetic the hardware runs natively.

``fast`` picks bfloat16 weights and activations on a CUDA GPU or on a CPU with native bf16
(``avx512_bf16`` or ``amx_bf16`` in the CPU flags), and otherwise int8 dynamic quantisation
of the linear layers (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations
quantised per batch, the oneDNN/FBGEMM kernels). It says what it chose and why.

On the CPU, a bf16 model also gets faster kernels for the same arithmetic
(:mod:`dat.cpu_kernels`): oneDNN linear layers on weights reordered once, with sibling
projections (q/k/v, gate/up) stacked into one product.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dat.cpu_kernels import can_pack
from dat.errors import DatError

PRECISIONS = ("exact", "fast", "bf16", "int8")  # bf16 / int8: force one of fast's choices
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "exact" | "fast"
    dtype: torch.dtype  # weights and activations
    int8_linear: bool  # dynamic int8 quantisation of the linear layers
    reason: str
    packed_linear: bool = False  # bf16 CPU kernels: dat.cpu_kernels.use_cpu_kernels

    def describe(self) -> str:
        kind = "int8 dynamic linear layers" if self.int8_linear else str(self.dtype).split(".")[-1]
        if self.packed_linear:
            kind += ", oneDNN prepacked and stacked linear layers"
        return f"precision {self.precision}: {kind} ({self.reason})"


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where the file does not exist, e.g. macOS)."""
    try:
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def choose(precision: str, device: torch.device, flags: set[str] | None = None) -> PrecisionChoice:
    """What ``precision`` means on ``device`` (``flags``: the CPU's, read when not given)."""
    if precision not in PRECISIONS:
        raise DatError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "exact":
        return PrecisionChoice("exact", torch.float32, False, "float32, the reference")
    if precision == "bf16":
        return PrecisionChoice("bf16", torch.bfloat16, False, "asked for",
                               packed_linear=device.type == "cpu" and can_pack())
    if precision == "int8":
        if device.type != "cpu":
            raise DatError("--precision int8 (dynamic int8 linear layers) runs on the CPU only.")
        return PrecisionChoice("int8", torch.float32, True, "asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("fast", torch.bfloat16, False, "CUDA GPU with bf16")
        return PrecisionChoice("fast", torch.float16, False, "CUDA GPU without bf16")
    if device.type != "cpu":
        return PrecisionChoice("fast", torch.float16, False, f"{device.type} device")
    flags = cpu_flags() if flags is None else flags
    native = sorted(set(BF16_FLAGS) & flags)
    if native:
        return PrecisionChoice("fast", torch.bfloat16, False, f"CPU with native bf16: {', '.join(native)}",
                               packed_linear=can_pack())
    return PrecisionChoice("fast", torch.float32, True,
                           "no native bf16 on this CPU (no avx512_bf16/amx_bf16): int8 fallback")


def quantize_linear(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (float32) with its linear layers as dynamic int8 ones: a new module. The
    dtype of everything else is chosen at load time (:attr:`PrecisionChoice.dtype`)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
