"""One clock for every measurement: seconds per stage with the device's queue drained first, and
peak memory (torch's allocator on a GPU, the process's peak resident set on a CPU)."""

import time
from contextlib import contextmanager
from pathlib import Path

import torch


def sync(device: "str | torch.device") -> None:
    """Wait for the device's queued work, so the clock measures it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds per named stage, added up over repeated entries: `with watch("denoise"): ...`."""

    def __init__(self, device: "str | torch.device"):
        self.device, self.seconds = torch.device(device), {}

    @contextmanager
    def __call__(self, stage: str):
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def timed(fn, device: "str | torch.device", repeat: int = 1):
    """(fn()'s last result, mean seconds per call over `repeat` calls)."""
    watch = Stopwatch(device)
    with watch("fn"):
        for _ in range(repeat):
            out = fn()
    return out, watch.seconds["fn"] / repeat


def peak_rss() -> int | None:
    """This process's peak resident set (VmHWM), in bytes, or None where /proc is not there.
    (resource's ru_maxrss would also count the parent's memory at fork time, which Linux carries
    across exec.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(device: "str | torch.device") -> dict:
    """Peak GPU memory allocated by torch (CUDA), or this process's peak resident set (CPU), in GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"gpu_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    rss = peak_rss()
    return {} if rss is None else {"host_peak_gb": rss / 2**30}
