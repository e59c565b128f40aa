"""GPU check of the serving maths (run through loadtest/gpu_check.sh; a few minutes at most).

Reports, as text and as JSON (--json):
1. the machine: nvidia-smi, onnxruntime and its *available* providers, torch and CUDA;
2. which ONNX Runtime providers a session *actually* runs (`session.get_providers()`; an
   onnxruntime-gpu build lists CUDA as available even where it cannot run), through the
   service's own `make_session`;
3. parity GPU vs CPU: expert values of the user tower, all-tag scores and top-20 overlap,
   with ONNX Runtime's CUDA provider (TF32 on, its default, and off) and/or PyTorch on CUDA;
4. users/s of user tower + all-tag scoring (2 tasks x T tags, top 20) at batch sizes
   1..4096: ORT CUDA tower + numpy scoring on the CPU, ORT CUDA tower + scoring on the GPU in
   torch (when torch has CUDA), and the CPU path (ORT CPU + numpy) for comparison. When this
   onnxruntime has no usable CUDA provider, the same towers are timed in PyTorch on CUDA, and
   the report says so.

Model: --bundle and --ckpt if given; else `mvke pipeline` builds one in --work: a small synthetic
dataset (2,000 users, 1,780 tags), mvke-mt trained one epoch, exported (needs torch + onnxscript).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 4, 16, 64, 256, 1024, 4096)


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({e})"


def environment() -> dict:
    env = {"python": sys.version.split()[0], "nvidia_smi": sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                                                "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None}
    try:
        import onnxruntime as ort
        env.update(onnxruntime=ort.__version__, ort_device=ort.get_device(), ort_available=ort.get_available_providers())
    except ImportError as e:
        env["onnxruntime"] = f"missing ({e})"
    try:
        import torch
        env.update(torch=torch.__version__, torch_cuda=torch.cuda.is_available(),
                   torch_cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError as e:
        env["torch"] = f"missing ({e})"
    return env


def small_model(work: Path) -> dict:
    """`mvke pipeline` (2,000 synthetic users, mvke-mt, 1 epoch) under `work`, built when missing ->
    its summary (data, checkpoint, bundle)."""
    out = subprocess.run([sys.executable, "-m", "mvke.cli", "pipeline", "--data-source", "synth", "--users", "2000",
                          "--model", "mvke-mt", "--epochs", "1", "--work", str(work)],
                         check=True, capture_output=True, text=True, timeout=480).stdout
    return json.loads(out.strip().splitlines()[-1])


def build_model(work: Path, log) -> tuple[Path | None, Path | None]:
    """-> (checkpoint, bundle) of `small_model` (both None if this machine cannot build them: no
    torch or onnxscript)."""
    log("mvke pipeline: synthetic data (2,000 users, 1,780 tags) -> mvke-mt (1 epoch) -> export")
    try:
        summary = small_model(work)
    except Exception as e:  # noqa: BLE001 - report, do not stop
        log(f"cannot build a model here: {getattr(e, 'stderr', '') or e}"[-2000:])
        return None, None
    return Path(summary["checkpoint"]), Path(summary["bundle"])


def random_inputs(schema, n: int, seed: int = 0):
    from mvke.runtime.features import random_users
    return random_users(schema, n, np.random.default_rng(seed))


def tile(x: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n])


def timeit(fn, budget_s: float = 1.5, max_iter: int = 200) -> float:
    """Median seconds per call (after one warm-up call)."""
    fn()
    times, t_end = [], time.perf_counter() + budget_s
    while (time.perf_counter() < t_end or len(times) < 3) and len(times) < max_iter:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


class TorchScorer:
    """The service's scoring (mvke/runtime/scoring.py) as torch ops on one device, plus top-k."""

    def __init__(self, sides, device):
        import torch
        self.torch, self.device = torch, device
        self.parts = [(side.slice[0], side.slice[1], torch.from_numpy(side.W).to(device),
                       torch.from_numpy(side.Q).to(device), side.scale, side.bias) for side in sides]

    def __call__(self, values, k: int = 20):
        torch = self.torch
        out = []
        for a, b, W, Q, scale, bias in self.parts:
            v = values[:, a:b]
            B, K, D = v.shape
            num = v.reshape(B, K * D) @ W
            norm = torch.sqrt(torch.clamp((v @ v.transpose(1, 2)).reshape(B, K * K) @ Q, min=0.0)).clamp(min=1e-8)
            logits = scale * (num / norm) + bias
            top, idx = torch.topk(logits, min(k, logits.shape[1]), dim=1)
            out.append((torch.sigmoid(top), idx))
        return out

    def scores(self, values):
        torch = self.torch
        res = []
        for a, b, W, Q, scale, bias in self.parts:
            v = values[:, a:b]
            B, K, D = v.shape
            num = v.reshape(B, K * D) @ W
            norm = torch.sqrt(torch.clamp((v @ v.transpose(1, 2)).reshape(B, K * K) @ Q, min=0.0)).clamp(min=1e-8)
            res.append(torch.sigmoid(scale * (num / norm) + bias))
        return res


def run(a: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    log = lambda m: print(f"[gpu_check {time.perf_counter() - t_start:6.1f}s] {m}", flush=True)  # noqa: E731
    report: dict = {"environment": environment()}
    log(f"environment: {json.dumps(report['environment'])}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ck, bundle = (Path(a.ckpt) if a.ckpt else None), (Path(a.bundle) if a.bundle else None)
    if ck is None and bundle is None:
        ck, bundle = build_model(work, log)
    report["checkpoint"], report["bundle"] = str(ck) if ck else None, str(bundle) if bundle else None

    from mvke.runtime.contract import ONNX_FILE, ONNX_INPUTS, read_bundle
    from mvke.runtime.features import FeatureSchema
    from mvke.runtime.model import make_session, tag_sides
    from mvke.runtime.scoring import rank, task_scores, top_k
    from mvke.runtime.system import limit_blas_threads
    limit_blas_threads(1)  # as in the service: numpy scoring on one BLAS thread
    torch = None
    try:
        import torch as _torch
        torch = _torch if _torch.cuda.is_available() else None
    except ImportError:
        pass

    manifest = sides = schema = None
    if bundle:
        manifest, blobs = read_bundle(bundle)
        sides = list(tag_sides(manifest, blobs).values())
        schema = FeatureSchema.from_dict(manifest.features)
        cat0, multi0 = random_inputs(schema, 4096)
        T = manifest.num_tags

        # -- 2. providers: the service's own session factory, then a plain CUDA session
        import onnxruntime as ort
        cpu_sess, _ = make_session(blobs[ONNX_FILE], "cpu", a.cpu_threads)
        svc_sess, svc_used = make_session(blobs[ONNX_FILE], "auto", a.cpu_threads)
        report["service_session"] = {"provider_chosen": svc_used, "session.get_providers()": svc_sess.get_providers()}
        log(f"service make_session('auto') -> {svc_used}, get_providers() = {svc_sess.get_providers()}")
        cuda_sessions = {}
        if "CUDAExecutionProvider" in ort.get_available_providers():
            for tf32 in (1, 0):
                try:
                    s = ort.InferenceSession(blobs[ONNX_FILE],
                                             providers=[("CUDAExecutionProvider", {"use_tf32": str(tf32)}),
                                                        "CPUExecutionProvider"])
                    if s.get_providers()[0] == "CUDAExecutionProvider":
                        cuda_sessions[f"ort-cuda tf32={tf32}"] = s
                    report.setdefault("cuda_session_providers", {})[f"tf32={tf32}"] = s.get_providers()
                except Exception as e:  # noqa: BLE001
                    report.setdefault("cuda_session_errors", []).append(f"tf32={tf32}: {e}")
            if not cuda_sessions:  # an onnxruntime without the use_tf32 option: its defaults
                try:
                    s = ort.InferenceSession(blobs[ONNX_FILE],
                                             providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
                    report.setdefault("cuda_session_providers", {})["default"] = s.get_providers()
                    if s.get_providers()[0] == "CUDAExecutionProvider":
                        cuda_sessions["ort-cuda"] = s
                except Exception as e:  # noqa: BLE001
                    report.setdefault("cuda_session_errors", []).append(f"default options: {e}")
        report["ort_cuda_runs"] = bool(cuda_sessions)
        log(f"ONNX Runtime CUDA provider actually runs: {bool(cuda_sessions)}")

        # -- 3. parity GPU vs CPU (ORT)
        feed = dict(zip(ONNX_INPUTS, (cat0[:1024], multi0[:1024])))
        ref = cpu_sess.run(None, feed)[0]
        ref_scores = [task_scores(ref[:, side.slice[0]:side.slice[1]], side) for side in sides]
        parity = {}
        for name, s in cuda_sessions.items():
            got = s.run(None, feed)[0]
            sc = [task_scores(got[:, side.slice[0]:side.slice[1]], side) for side in sides]
            overlap = []
            for r_, g_ in zip(ref_scores, sc):
                ri, gi = top_k(r_, 20)[0], top_k(g_, 20)[0]
                overlap.append(float(np.mean([len(set(x) & set(y)) / 20 for x, y in zip(ri.tolist(), gi.tolist())])))
            parity[name] = {"max_abs_diff_expert_values": float(np.abs(got - ref).max()),
                            "max_abs_diff_scores": max(float(np.abs(x - y).max()) for x, y in zip(sc, ref_scores)),
                            "top20_overlap": overlap}
        report["parity_ort"] = parity
        for k, v in parity.items():
            log(f"parity {k} vs ORT CPU: {v}")

        # -- 4. users/s: tower + scoring
        timing: dict[str, dict[int, float]] = {}

        def bench(label, tower, score):
            timing[label] = {}
            for B in BATCHES:
                c, m = tile(cat0, B), tile(multi0, B)
                sec = timeit(lambda: score(tower(c, m)), budget_s=a.budget)
                timing[label][B] = B / sec
            log(f"{label}: " + ", ".join(f"B={b}: {v:,.0f}/s" for b, v in timing[label].items()))

        def numpy_score(values):
            rank(values, sides, 20)

        def ort_tower(sess):
            return lambda c, m: sess.run(None, dict(zip(ONNX_INPUTS, (c, m))))[0]
        bench("CPU: ORT CPU tower + numpy scoring", ort_tower(cpu_sess), numpy_score)
        for name, s in cuda_sessions.items():
            if "tf32=0" in name and len(cuda_sessions) > 1:
                continue  # timing once is enough
            bench(f"GPU: {name} tower + numpy scoring (CPU)", ort_tower(s), numpy_score)
            if torch is not None:
                scorer = TorchScorer(sides, "cuda")

                def gpu_score(values, scorer=scorer):
                    out = scorer(torch.from_numpy(values).to("cuda"))
                    torch.cuda.synchronize()
                    return [(p.cpu(), i.cpu()) for p, i in out]
                bench(f"GPU: {name} tower + torch scoring on GPU", ort_tower(s), gpu_score)
        report["users_per_s"] = timing

    # -- PyTorch on CUDA (always when available; the fallback when ORT cannot use the GPU)
    if torch is not None and ck is not None:
        from mvke.training.trainer import load_checkpoint
        res = load_checkpoint(ck)
        schema = schema or res.schema
        cat0, multi0 = random_inputs(schema, 4096)
        model_cpu, model_gpu = res.model.eval(), load_checkpoint(ck).model.eval().to("cuda")
        with torch.no_grad():   # the exported graph's output: every task's expert values on axis 1
            c_t, m_t = torch.from_numpy(cat0[:1024]), torch.from_numpy(multi0[:1024])
            ref = torch.cat(model_cpu.user_vectors(c_t, m_t), 1).numpy()
            got = torch.cat(model_gpu.user_vectors(c_t.cuda(), m_t.cuda()), 1).cpu().numpy()
        tp = {"max_abs_diff_expert_values": float(np.abs(got - ref).max()),
              "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
        if sides is not None:
            scorer = TorchScorer(sides, "cuda")
            with torch.no_grad():
                g = [x.cpu().numpy() for x in scorer.scores(torch.from_numpy(got).cuda())]
            r = [task_scores(ref[:, side.slice[0]:side.slice[1]], side) for side in sides]
            tp["max_abs_diff_scores"] = max(float(np.abs(x - y).max()) for x, y in zip(g, r))
        report["parity_torch_cuda"] = tp
        log(f"parity PyTorch CUDA vs CPU: {tp}")
        timing = report.setdefault("users_per_s", {})
        label = "GPU: PyTorch CUDA tower" + (" + torch scoring on GPU" if sides is not None else " only")
        timing[label] = {}
        scorer = TorchScorer(sides, "cuda") if sides is not None else None
        for B in BATCHES:
            c, m = torch.from_numpy(tile(cat0, B)), torch.from_numpy(tile(multi0, B))

            def step(c=c, m=m):
                with torch.no_grad():
                    v = tower_gpu(c.to("cuda", non_blocking=True), m.to("cuda", non_blocking=True))
                    out = scorer(v) if scorer is not None else v
                    torch.cuda.synchronize()
                    return out
            timing[label][B] = B / timeit(step, budget_s=a.budget)
        log(f"{label}: " + ", ".join(f"B={b}: {v:,.0f}/s" for b, v in timing[label].items()))
    elif torch is None:
        report["torch_cuda"] = "not available: no PyTorch CUDA timing"
    if not report.get("ort_cuda_runs"):
        report["note"] = ("this onnxruntime has no usable CUDA provider: the service would run on the CPU here; "
                          + ("GPU figures are PyTorch on CUDA" if torch is not None else "and torch has no CUDA either"))
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", help="an exported bundle directory (default: build a small one)")
    p.add_argument("--ckpt", help="its checkpoint (for PyTorch timings and parity)")
    p.add_argument("--work", default=os.environ.get("MVKE_GPU_WORK", "/tmp/mvke-gpu-check"))
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per batch size")
    p.add_argument("--cpu-threads", type=int, default=1, help="intra-op threads of the CPU session")
    p.add_argument("--json", help="write the report here too")
    a = p.parse_args(argv)
    report = run(a)
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
