"""What machine a benchmark ran on: CPU model, vector-ISA flags, torch's and fused_optim's ISA."""

from __future__ import annotations

import platform
import subprocess

import torch

ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")


def cpu_description() -> dict:
    """lscpu's model name and vector flags (a separate program: under a user-mode emulator it
    describes the host), torch's CPU capability and, where built, the C++ backend's builds."""
    model, flags = platform.processor() or "unknown", []
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            if key.strip() == "Flags":
                flags = value.split()
    except (OSError, subprocess.CalledProcessError):
        pass
    result = {
        "model": model,
        "machine": platform.machine(),
        "cores": torch.get_num_threads(),
        "flags": [f for f in ISA_FLAGS if f in flags] + (["asimd"] if "asimd" in flags else []),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    from fused_optim.backends import cpu

    if cpu.is_available(torch.device("cpu"))[0]:
        # From CPUID in this process, unlike lscpu.
        result["fused_optim_isas_supported"] = cpu.supported_isas()
        result["fused_optim_isa"] = cpu.cpu_isa()
    return result
