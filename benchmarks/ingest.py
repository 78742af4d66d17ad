"""Ingest throughput against a decode-only baseline, both measured in this run on one Dask cluster.

    python -m benchmarks.ingest [--kvasir ../shared/data/kvasir-seg] [--hand-patients 10] [--repeats 5]
                                (from the repo root)

Prints one JSON line. For each dataset (the real Kvasir pairs; synthetic 2048x2048 hand X-rays
with 29-channel masks written by segpipe/datasets/demo_hand.py into a temporary folder):
    decode   the dataset's reader decodes every file of every case to its arrays (decode_case:
             images to pixels, masks and polygons to masks, videos to frames) on the cluster (same
             workers, same tasks of one or more cases as ingest's, same bound on tasks in flight)
             and drops them: what a script reading the dataset does, nothing written
    ingest   segpipe.ingest.ingest into a fresh store: hash, read (load_case: what ingest stores,
             a Kvasir image kept as its JPEG file, checked to decode), and write every case
    rerun    ingest again over the unchanged files (hashing only; the store is left untouched)
Rates are images/s and MB/s of raw files read; ratio = ingest rate / decode rate (goal >= 0.5).
`*_worker_cpu_ms_per_image` is the CPU time the workers spent, user and system (kernel), per
image, averaged over the runs: ingest's minus decode's is what hashing and writing cost.
Each figure is the best of --repeats runs, the decode and ingest runs alternating, so that load
from other processes distorts the ratio less; `run_ratios` lists each pair's ratio, to show the
spread. Run it on a quiet machine, not within minutes of deleting many files (ext4 is then slow
to create new ones).
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client

from segpipe.config import HandXrayDemo, IngestConfig, load_params
from segpipe.datasets import RawCase, demo_hand, reader
from segpipe.ingest import in_flight_limit, ingest, map_bounded, task_batches
from benchmarks.common import emit
from segpipe.parallel import dask_client

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.5


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> tuple[float, float]:
    """This process's user and system CPU time so far, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def workers_cpu_seconds(client: Client) -> tuple[float, float]:
    """User and system CPU time of all the cluster's workers so far, in seconds."""
    per_worker = client.run(cpu_seconds).values()
    return sum(user for user, _ in per_worker), sum(system for _, system in per_worker)


def timed(client: Client, work: Callable[[], Any]) -> tuple[Any, float, np.ndarray]:
    """work()'s result, its wall time in seconds, and the workers' (user, system) CPU seconds meanwhile."""
    before, start = workers_cpu_seconds(client), time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    return result, seconds, np.subtract(workers_cpu_seconds(client), before)


def decode_only(cases: list[RawCase], dataset: str) -> None:
    """The baseline's work for one task: every file of each case decoded to its arrays, as a
    script reading the dataset does (the reader's decode_case)."""
    for case in cases:
        reader(dataset).decode_case(case)


def measure(client: Client, dataset: str, raw: Path, cfg: IngestConfig, repeats: int, work: Path) -> dict:
    cases = reader(dataset).scan(raw).strict()
    megabytes = sum(path.stat().st_size for case in cases for path in case.files()) / 1e6
    limit = in_flight_limit(cfg, client)
    tasks = task_batches(cases, limit)
    best = {"decode": float("inf"), "ingest": float("inf"), "rerun": float("inf")}
    run_ratios = []
    cpu = {"decode": np.zeros(2), "ingest": np.zeros(2)}  # workers' user and system seconds, all runs
    for _ in map_bounded(client, decode_only, tasks, limit, dataset=dataset):  # warm-up: files cached, imports done
        pass
    for run in range(repeats):
        _, decode_s, decode_cpu = timed(client, lambda: list(map_bounded(client, decode_only, tasks, limit,
                                                                          dataset=dataset)))
        out = work / f"{dataset}-{run}.zarr"
        report, ingest_s, ingest_cpu = timed(client, lambda: ingest(dataset, raw, out, cfg, client))
        cpu["decode"] += decode_cpu
        cpu["ingest"] += ingest_cpu
        best["decode"], best["ingest"] = min(best["decode"], decode_s), min(best["ingest"], ingest_s)
        run_ratios.append(round(decode_s / ingest_s, 3))
        assert report.ingested == len(cases), report.summary()
        start = time.perf_counter()
        report = ingest(dataset, raw, out, cfg, client)
        best["rerun"] = min(best["rerun"], time.perf_counter() - start)
        assert report.unchanged == len(cases), report.summary()
    result = {"images": len(cases), "tasks": len(tasks), "MB": round(megabytes, 1)}
    for name, seconds in best.items():
        result[f"{name}_s"] = round(seconds, 3)
        result[f"{name}_images_per_s"] = round(len(cases) / seconds, 2)
        result[f"{name}_MB_per_s"] = round(megabytes / seconds, 2)
    per_image = 1000 / (repeats * len(cases))  # seconds over all runs -> ms per image
    for name, (user, system) in cpu.items():
        result[f"{name}_worker_cpu_ms_per_image"] = {"user": round(user * per_image, 2),
                                                     "sys": round(system * per_image, 2)}
    result["ratio"] = round(best["decode"] / best["ingest"], 3)
    result["run_ratios"] = run_ratios
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kvasir", type=Path, default=ROOT.parent / "shared" / "data" / "kvasir-seg")
    # 10 patients, 20 hands: the run's last case leaves a worker idle, which over fewer cases swings the ratio.
    p.add_argument("--hand-patients", type=int, default=10, help="two hands each, 2048x2048 (at least 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="its dask and ingest sections")
    args = p.parse_args()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, dask_client(params.dask) as client:
        work = Path(tmp)
        demo_hand.write(work, HandXrayDemo(n_patients=args.hand_patients, n_test_patients=0, size=2048), seed=0)
        results = {
            "benchmark": "ingest",
            "workers": len(client.nthreads()),
            "threads": sum(client.nthreads().values()),
            "max_in_flight": in_flight_limit(params.ingest, client),
            "goal_ratio": GOAL,
            "kvasir": measure(client, "kvasir", args.kvasir, params.ingest, args.repeats, work),
            "hand_xray": measure(client, "hand_xray", work / "hand_xray", params.ingest, args.repeats, work),
            # The client only submits and collects small outcomes; decoded cases live on the workers,
            # whose peak holds a few cases at most (max_in_flight tasks queued, one case decoding per thread).
            "client_peak_rss_MB": round(peak_rss_mb(), 1),
            "worker_peak_rss_MB": round(max(client.run(peak_rss_mb).values()), 1),
        }
    emit(results)


if __name__ == "__main__":
    main()
