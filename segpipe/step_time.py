"""How long one training step takes on this machine, measured once per device and kind of step.

The plan turns a time budget into a number of steps with it, so the figure must not wobble: it is
measured on random data (the fastest of a few steps after a warm-up), rounded up to a quarter octave
(2 ** (k / 4) seconds), and cached in a JSON file per user, keyed by the device (CPU model and threads,
or GPU name), torch's version and the step's shape. Re-planning on the same machine reads the cache,
so it gives the same plan; a machine of another kind measures its own.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from segpipe import losses, models

log = logging.getLogger(__name__)

WARMUP, TIMED = 2, 5
PARALLEL_EFFICIENCY = 0.8  # what each thread past the first adds to a training step's speed


def cache_path() -> Path:
    """$SEGPIPE_CACHE_DIR/step_times.json, else ~/.cache/segpipe/step_times.json."""
    folder = os.environ.get("SEGPIPE_CACHE_DIR") or Path.home() / ".cache" / "segpipe"
    return Path(folder) / "step_times.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_model()} x{torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "cpu")


def quarter_octave(seconds: float) -> float:
    """`seconds` rounded up to the next 2 ** (k / 4): coarse enough that noise rarely crosses a step."""
    # The tolerance keeps a value already rounded (to 9 digits, up or down) in its own quarter octave.
    return round(2 ** (math.ceil(4 * math.log2(max(seconds, 1e-4)) - 1e-4) / 4), 9)


def measure(step: dict[str, Any], device: torch.device) -> float:
    """Seconds of a training step (forward, Dice+BCE, backward, AdamW) of `step`'s network:
    {arch, in_channels, classes, channels, res_units, image_size, batch_size}."""
    torch.manual_seed(0)
    model = models.build(step["arch"], step["in_channels"], step["classes"], tuple(step["channels"]),
                         res_units=step["res_units"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = losses.build("bce_dice")
    x = torch.randn(step["batch_size"], step["in_channels"], *step["image_size"], device=device)
    y = (torch.rand(step["batch_size"], step["classes"], *step["image_size"], device=device) > 0.5).float()
    times = []
    for i in range(WARMUP + TIMED):
        start, cpu = time.perf_counter(), time.thread_time()
        optimizer.zero_grad(set_to_none=True)
        losses.output_loss(loss_fn, model(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP:
            times.append(time.perf_counter() - start if device.type == "cuda" else time.thread_time() - cpu)
    return min(times)


def cpu_step_seconds(step: dict[str, Any]) -> float:
    """A CPU step's wall time on this process's threads, from its CPU time on one thread.

    Wall time on a busy machine is whatever the other processes leave (a test run doubled it), and
    the CPU time of several threads counts their spinning while they wait for each other; one
    thread's own CPU time is the work itself. PARALLEL_EFFICIENCY turns it into the wall time of
    `threads` threads (measured on the 2-core development machine: docs/architecture.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = measure(step, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    return seconds / (1 + (threads - 1) * PARALLEL_EFFICIENCY)


def step_seconds(step: dict[str, Any], device: torch.device) -> float:
    """The rounded step time of `step` on `device`: from the cache, or measured now and cached."""
    key = json.dumps({"device": device_name(device), "torch": torch.__version__, **step}, sort_keys=True)
    path = cache_path()
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key in cache:
        return cache[key]
    seconds = quarter_octave(measure(step, device) if device.type == "cuda" else cpu_step_seconds(step))
    log.info("a training step of %s takes %.3g s on %s (cached in %s)", step, seconds, device_name(device), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), key: seconds}, indent=1))
    os.replace(tmp, path)
    return seconds
