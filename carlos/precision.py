"""The numeric precision a run trains in: what trainer.precision=auto (conf/precision/auto.yaml) picks for
this hardware and model, and the choices a device cannot take."""

from __future__ import annotations

import torch

from carlos.errors import CarlosError

# the narrowest model for which CPU bf16 autocast pays: below it the casts around every op cost more
# than the bf16 matmuls save (measured on an AMD EPYC with AVX512-BF16, batch 16 x 256, tokens/s
# fp32 vs bf16-mixed: d_model 64: 95K vs 80K; d_model 128: 18K vs 22K; d_model 256: 6.3K vs 10.6K)
CPU_BF16_MIN_WIDTH = 128


def cpu_has_bf16() -> bool:
    """Native bf16 instructions (AVX512-BF16 or AMX), which make CPU bf16 matmuls faster than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(asked: str, device: str, d_model: int, stored: str | None = None) -> tuple[str, str]:
    """(Lightning precision, why). auto: bf16-mixed on GPUs with bf16, 16-mixed on older GPUs; on the CPU,
    bf16-mixed when it has bf16 instructions and the model is wide enough for them to pay, else 32-true.
    Decided from the hardware's features, never by timing; a resumed run keeps its stored choice."""
    if asked == "auto":
        if stored:
            return stored, "kept from the checkpoint being resumed"
        if device == "cuda":
            if torch.cuda.is_bf16_supported():
                return "bf16-mixed", "GPU supports bf16"
            return "16-mixed", "GPU without bf16"
        if device != "cpu":
            return "32-true", f"{device.upper()}: mixed precision is not used there"
        if not cpu_has_bf16():
            return "32-true", "CPU without bf16 instructions"
        if d_model < CPU_BF16_MIN_WIDTH:
            return "32-true", f"CPU bf16 autocast is slower than fp32 below d_model={CPU_BF16_MIN_WIDTH}"
        return "bf16-mixed", f"CPU with bf16 instructions, d_model >= {CPU_BF16_MIN_WIDTH}"
    if device == "cpu" and asked in ("16-mixed", "16", "16-true"):
        raise CarlosError(
            f"trainer.precision={asked} needs a CUDA GPU and this run is on the CPU; use bf16-mixed, 32-true or auto"
        )
    if device == "cpu" and asked.startswith("bf16") and not cpu_has_bf16():
        # emulated bf16 runs several times slower than fp32; auto would not choose it
        return (
            asked,
            "asked for; warning: this CPU has no bf16 instructions, expect it several times slower than 32-true",
        )
    if device == "cpu" and asked.startswith("bf16") and d_model < CPU_BF16_MIN_WIDTH:
        return asked, f"asked for; warning: CPU bf16 autocast is slower than 32-true below d_model={CPU_BF16_MIN_WIDTH}"
    return asked, "asked for"
