"""The machine a measurement ran on, named for results files (bench/results, study/results)."""
import os
import platform

import torch


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    return f"CPU {model} ({os.cpu_count()} cores)"
