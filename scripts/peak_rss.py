"""Run a command and sample the memory of its whole process tree (docs/SCALING.md's peak RSS figures).

    python scripts/peak_rss.py --log run.jsonl [--interval 2] -- COMMAND ...

Every --interval seconds one JSON line: elapsed seconds, the tree's summed RSS and PSS (PSS
shares a page between the processes that map it, so Ray's shared object store is not counted
twice), the largest single process's RSS and its VmHWM (the kernel's own peak of that
process), the number of processes, the load average and the 6 largest processes by PSS. At the
end one line with the peaks of all of them, the largest processes at the tree's PSS peak and the
command's exit status; the exit status is the command's.
The peak of a sum is only as fine as the interval; VmHWM of each process is exact.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _name(pid: int) -> str:
    """A short name: the Ray process title or the command's first words."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in cmd if w]
    short = [os.path.basename(w) if i == 0 else w for i, w in enumerate(words[:4])]
    return " ".join(short)[:60]


def sample(pid: int) -> dict:
    rss = pss = 0
    top_rss = top_hwm = n = 0
    procs = []
    for p in tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        n += 1
        r = _kib(status, "VmRSS")
        rss += r
        pss += _kib(rollup, "Pss")
        procs.append((_kib(rollup, "Pss"), _name(p)))
        top_rss = max(top_rss, r)
        top_hwm = max(top_hwm, _kib(status, "VmHWM"))
    mib = 1024
    return {"tree_rss_mib": round(rss / mib, 1), "tree_pss_mib": round(pss / mib, 1),
            "max_proc_rss_mib": round(top_rss / mib, 1), "max_proc_hwm_mib": round(top_hwm / mib, 1),
            "procs": n, "loadavg": os.getloadavg()[0],
            "top_pss_mib": [[name, round(k / mib)] for k, name in sorted(procs, reverse=True)[:6]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", required=True, help="JSON lines file to write")
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command")
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    peaks: dict[str, float] = {}
    with open(a.log, "a") as log:
        log.write(json.dumps({"command": cmd, "pid": proc.pid, "start": t0}) + "\n")
        at_peak: list = []
        while proc.poll() is None:
            s = sample(proc.pid)
            if s["tree_pss_mib"] >= peaks.get("tree_pss_mib", 0):
                at_peak = s["top_pss_mib"]
            for k in ("tree_rss_mib", "tree_pss_mib", "max_proc_rss_mib", "max_proc_hwm_mib", "procs"):
                peaks[k] = max(peaks.get(k, 0), s[k])
            log.write(json.dumps({"t": round(time.time() - t0, 1), **s}) + "\n")
            log.flush()
            time.sleep(a.interval)
        log.write(json.dumps({"done": True, "rc": proc.returncode, "seconds": round(time.time() - t0, 1),
                              "peak": peaks, "top_pss_at_peak_mib": at_peak, "loadavg": os.getloadavg()}) + "\n")
    print(json.dumps({"rc": proc.returncode, "seconds": round(time.time() - t0, 1), "peak": peaks}),
          file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
