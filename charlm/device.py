"""Device and precision choice: `auto` picks CUDA, then MPS, then CPU; bf16 only where it pays.
And what a machine is, for the planner's speed cache and a run's record (`machine`)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from charlm.errors import CharLMError

_KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what picks oneDNN's kernels
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The torch device for `--device`, or `CharLMError` when it is not on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CharLMError("--device cuda: CUDA is not available on this machine")
    if name == "mps" and not _mps_available():
        raise CharLMError("--device mps: Apple MPS is not available on this machine")
    if name not in ("cpu", "cuda", "mps"):
        raise CharLMError(f"--device: {name!r} is not one of auto, cpu, cuda, mps")
    return torch.device(name)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels (AVX512-BF16 / AMX); without them bf16
    matrix products are emulated and far slower than fp32 (measured ~100x on AVX2 Zen 3)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """Concrete precision ("fp32", "bf16" or "fp16") for `--precision` on `device`."""
    if name == "auto":
        # Not bf16 on CUDA: cuDNN's LSTM is bound by its sequential steps, not by arithmetic,
        # so bf16 bought no speed on an H100 (2x512-2x1024 at 128x128: 0.84-0.96 M chars/s in
        # both), and a 2x1024 model stalled at 2.25 bpc in bf16 where fp32 reached 1.52 in the
        # same minute (benchmarks/RESULTS.md, GPU section).
        if device.type == "cpu" and cpu_has_fast_bf16():
            return "bf16"
        return "fp32"
    if name == "fp16" and device.type == "cpu":
        raise CharLMError("--precision fp16: not supported for training on the CPU; use bf16 or fp32")
    if name == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        # oneDNN has no bf16 recurrent kernels without AVX-512: training would stop in a traceback.
        raise CharLMError("--precision bf16: this CPU has no bf16 kernels (oneDNN needs AVX-512 for them; native "
                          "bf16 is AVX512-BF16 or AMX); use --precision fp32, or auto to take the fastest it has")
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    return _DTYPES[precision]


def machine(device: torch.device) -> str:
    """What a step's speed depends on besides the model: the GPU, or the CPU's model, the
    instruction sets its kernels use and the threads; and PyTorch's version."""
    if device.type == "cuda":
        where = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        model, kernels = _cpu()
        where = f"{device.type} {model} [{kernels}] threads={torch.get_num_threads()}"
    return f"{where} torch={torch.__version__}"


@functools.cache
def _cpu() -> tuple[str, str]:
    """The CPU's model and the kernel-picking flags it has, read once per process (the planner
    and every checkpoint ask)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return model, " ".join(f for f in _KERNEL_FLAGS if f in flags)
