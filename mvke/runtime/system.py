"""The machine a stage runs on: usable CPUs, BLAS threads, load average."""
from __future__ import annotations

import os


def container_cpus() -> float:
    """CPUs this process may use: the smallest of the cgroup quota (v2 cpu.max, or v1
    cfs_quota/cfs_period) and the affinity mask (taskset, cpusets), at least 1."""
    limits = []
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda t: t.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):
        try:
            if parse is not None:
                quota, period = parse(open(path).read())
            else:
                quota = open(path).read().strip()
                period = open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read().strip()
            if quota not in ("max", "-1"):
                limits.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
    try:
        limits.append(float(len(os.sched_getaffinity(0))))
    except AttributeError:
        limits.append(float(os.cpu_count() or 1))
    return max(1.0, min(limits))


def limit_blas_threads(n: int) -> list[str]:
    """Cap the BLAS behind numpy (the scoring GEMMs) to `n` threads in this process -> libraries capped.

    OpenBLAS starts one busy-waiting thread per core. Next to an event loop, ONNX Runtime and other
    worker processes on a small machine those threads only contend: on 2 busy cores a [64 x 96] @
    [96 x 1,780] product took 55 ms with the default threads and 3 ms with one.
    """
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(limits=n, user_api="blas")   # kept for the life of the process (not a `with` block)
    return sorted(f"{lib['filepath'].rsplit('/', 1)[-1]}:{lib['internal_api']}={lib['num_threads']}"
                  for lib in threadpool_info() if lib["user_api"] == "blas")


def limit_threads(n: int) -> list[str]:
    """Where a process starts (a service worker, a tag-all actor, a benchmark): numpy's BLAS and FAISS
    (its OpenMP team and its own OpenBLAS, if it is loaded; else `load_faiss` caps it when it loads)
    to `n` threads -> the BLAS libraries as capped. ONNX Runtime takes its threads per session
    (`make_session`)."""
    from mvke.runtime.ann import limit_faiss_threads
    limit_faiss_threads(n)
    return limit_blas_threads(n)


def freeze_startup_heap(gen0_threshold: int = 50_000) -> None:
    """Where a long-running loop starts (the event consumer), after its imports and set-up: the objects
    that live for the whole process leave the garbage collector's view (`gc.freeze`), and the youngest
    generation is collected every `gen0_threshold` allocations instead of 700. A batch of thousands of
    events, their commands and replies otherwise survives several young collections and triggers full
    ones over every module's objects: 7% of the consumer's instructions per event (valgrind). For a process
    of its own (the CLI's): the freeze is process-wide, and start-up objects that become cyclic garbage
    later are never freed (a bounded amount)."""
    import gc
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages, rounded (printed beside every benchmark figure)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name (printed beside every benchmark figure); "" when /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
