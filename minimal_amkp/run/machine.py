"""Where a measurement ran and on what code: the machine and the commit, named for results files
(bench/results, study/results) and for the walkthrough's figures."""
import os
import platform
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    return f"CPU {model} ({os.cpu_count()} cores)"


def git_commit(outputs=()):
    """The checkout's commit (+"-dirty" with uncommitted changes outside `outputs`, the paths the
    caller is rewriting, so that redrawing committed figures does not mark them dirty);
    $AMKP_COMMIT where the tree was copied without its .git (a lent GPU machine); else "unknown"."""
    if os.environ.get("AMKP_COMMIT"):
        return os.environ["AMKP_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){os.path.relpath(os.path.abspath(p), ROOT)}" for p in outputs)],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
