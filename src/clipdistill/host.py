"""The machine a result was measured on, recorded beside the result.

The trainer is deterministic for a fixed thread count on one kind of CPU, not across CPUs: their math
kernels differ (AVX2 against AVX-512, say), and so do a lab run's digits. A result that names its host
says where its digits reproduce.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The first CPU's model name, family, model and stepping from /proc/cpuinfo (Linux; a virtual
    machine's model name can be as vague as "Intel(R) Xeon(R) Processor"), else what `platform` knows."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            break  # the first processor's block ends here
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if not fields.get("model name"):
        return platform.processor() or platform.machine()
    ids = ", ".join(f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields)
    return f"{fields['model name']} ({ids})" if ids else fields["model name"]


def host_info() -> dict[str, object]:
    """CPU model, the kernels torch picked for it, cores usable, threads, torch version, GPU if any."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
