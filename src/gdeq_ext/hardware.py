"""What a measurement ran on: the CPU model (or GPU name), cores and torch threads, for benchmark and training logs."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["cpu_name", "describe"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> str:
    """One line: the GPU's name for a CUDA device, else "<CPU model>, <n> cores, <t> torch threads"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch thread{'s' if threads != 1 else ''}"
