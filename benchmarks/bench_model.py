"""Model speed side by side: PyTorch eager vs onnxruntime (CPU, CUDA where present, int8 where given),
against the model's FLOPs and this CPU's fp32 peak.

Every engine runs the same input in turn, round after round, so that a busy machine slows all of them
alike and the ratios stay meaningful even when the absolute times do not. The physical limit is given
two ways: the CPU's theoretical fp32 peak (cores × FLOPs per cycle × clock) and a large fp32 matrix
product that takes its turn with the engines, which is what a convolution can reach at best in practice
under the load of the moment.

    .venv/bin/python benchmarks/bench_model.py --model weights/model.onnx --int8 weights/model.int8.onnx \\
        --sizes 256 512 --batches 1 8 --json runs/bench-model/result.json
    # two models side by side (the shipped one and 2.1.0, one of its two networks; fp32 and int8 each)
    .venv/bin/python benchmarks/bench_model.py --compare weights/2.1.0/model.onnx --sizes 224 --batches 1 8
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Idle OpenMP threads of PyTorch otherwise spin, which on a shared machine (more runnable threads than
# cores) makes eager runs tens of times slower; onnxruntime's spinning is off as in the service.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from model_training.ensemble import build_network
from model_training.export import load_checkpoint

Runner = Callable[[np.ndarray], object]

#: fp32 FLOPs per cycle and core: two FMA pipes × lanes × 2. Zen 4 runs AVX-512 on two 256-bit pipes,
#: so AVX-512 doubles the width of an instruction but not the FLOPs per cycle there.
FP32_FLOPS_PER_CYCLE = {"zen4-avx512": 32, "avx512-2fma": 64, "avx2-2fma": 32}


def cpu_facts() -> dict[str, Any]:
    """CPU model, cores, clock and the instruction-set flags that matter for fp32, int8 and bf16."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    vendor = fields.get("vendor_id", "")
    family = int(fields.get("cpu family", "0") or 0)
    if vendor == "AuthenticAMD" and family == 25 and "avx512f" in flags:
        kind = "zen4-avx512"
    else:
        kind = "avx512-2fma" if "avx512f" in flags else "avx2-2fma"
    return {"model": fields.get("model name", platform.processor()), "cores": len(os.sched_getaffinity(0)),
            "mhz": float(fields.get("cpu MHz", "0") or 0), "flags": {f: f in flags for f in wanted},
            "fp32_flops_per_cycle": FP32_FLOPS_PER_CYCLE[kind], "core_kind": kind}


def theoretical_peak_gflops(cpu: dict[str, Any]) -> float:
    """cores × fp32 FLOPs per cycle × the clock the OS reports (a VM reports its base clock)."""
    return float(cpu["cores"] * cpu["fp32_flops_per_cycle"] * cpu["mhz"] / 1000)


GEMM_N = 2048


def gemm_runner() -> Runner:
    """An fp32 `GEMM_N`² matrix product in PyTorch: the best case of dense fp32 arithmetic on this CPU,
    run in turn with the engines so that it sees the same load they do."""
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    return lambda x: torch.mm(a, b)


def model_gflops(module: torch.nn.Module, size: int) -> float:
    """Convolution and matrix FLOPs (2 per multiply-add) of one image of `size`×`size`."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def torch_runner(module: torch.nn.Module, bf16: bool = False) -> Runner:
    def run(x: np.ndarray) -> object:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return module(torch.from_numpy(x))
    return run


def ort_runner(path: Path, threads: int, provider: str = "CPUExecutionProvider") -> Runner:
    """A session set up as the service sets up its own."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[provider])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def interleaved(runners: dict[str, Runner], x: np.ndarray, rounds: int, budget_s: float) -> dict[str, float]:
    """Median seconds of each runner on `x`, the runners taking turns; stops early past `budget_s`."""
    for run in runners.values():
        run(x)  # allocations and kernel choice
    times: dict[str, list[float]] = {label: [] for label in runners}
    deadline = time.monotonic() + budget_s
    for _ in range(rounds):
        for label, run in runners.items():
            times[label].append(_timed(lambda run=run: run(x)))  # type: ignore[misc]
        if time.monotonic() > deadline:
            break
    return {label: float(np.median(t)) for label, t in times.items()}


def load_torch_model(meta: dict[str, Any], checkpoint: str | None) -> torch.nn.Module:
    """The checkpoint's model, or the architecture of `model.json` with random weights (same speed)."""
    if checkpoint:
        return load_checkpoint(checkpoint)[0]
    train = meta.get("training", {})
    return build_network({"model": meta["architecture"], "base_channels": 16, "depth": 4, **train}).eval()


def cuda_usable() -> bool:
    """onnxruntime has its CUDA provider and an NVIDIA driver is there to run it."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def build_runners(args: argparse.Namespace, module: torch.nn.Module) -> dict[str, Runner]:
    runners: dict[str, Runner] = {"torch-eager": torch_runner(module),
                                  "ort-cpu": ort_runner(args.model, args.threads)}
    if args.bf16:
        runners["torch-bf16"] = torch_runner(module, bf16=True)
    if args.int8 and Path(args.int8).is_file():
        runners["ort-cpu-int8"] = ort_runner(Path(args.int8), args.threads)
    if args.cuda and cuda_usable():
        runners["ort-cuda"] = ort_runner(args.model, args.threads, "CUDAExecutionProvider")
    if args.compare:
        runners["other-ort-cpu"] = ort_runner(args.compare, args.threads)
        other_int8 = args.compare.with_name("model.int8.onnx")
        if other_int8.is_file():
            runners["other-ort-cpu-int8"] = ort_runner(other_int8, args.threads)
    return runners


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every engine at every size and batch, plus FLOPs and peaks; the document `--json` writes."""
    meta = json.loads(Path(args.model).with_name("model.json").read_text())
    torch.set_num_threads(args.threads)
    cpu = cpu_facts()
    module = load_torch_model(meta, args.checkpoint)
    runners = build_runners(args, module)
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
        "load_before": os.getloadavg(), "threads": args.threads, "model": str(args.model),
        "compare": str(args.compare) if args.compare else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
        "providers": ort.get_available_providers(), "engines": list(runners),
        "theoretical_peak_gflops": theoretical_peak_gflops(cpu), "cases": []}
    rng = np.random.default_rng(0)
    for size in args.sizes:
        gflops = model_gflops(module, size)
        for batch in args.batches:
            x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
            seconds = interleaved({**runners, "gemm": gemm_runner()}, x, args.rounds, args.budget_s)
            gemm = 2 * GEMM_N**3 / seconds.pop("gemm") / 1e9
            result["cases"].append({"size": size, "batch": batch, "gflop_per_image": gflops,
                                    "gemm_gflops": gemm,
                                    "ms_per_image": {k: v * 1000 / batch for k, v in seconds.items()},
                                    "gflops": {k: gflops * batch / v for k, v in seconds.items()}})
    result["load_after"] = os.getloadavg()
    return result


def render(result: dict[str, Any]) -> str:
    """A Markdown report: speed per engine, ratios to PyTorch eager, and the share of the peaks."""
    engines, cpu = result["engines"], result["cpu"]
    peak = result["theoretical_peak_gflops"]
    lines = [f"{result['date']}, {result['cpu']['model']}, {result['cpu']['cores']} cores, "
             f"{result['threads']} threads; load average {_load(result['load_before'])} before, "
             f"{_load(result['load_after'])} after",
             f"fp32 peak: theoretical {peak:.0f} GFLOP/s ({cpu['core_kind']}, "
             f"{cpu['fp32_flops_per_cycle']} FLOP/cycle/core at {cpu['mhz']:.0f} MHz)", "",
             "| size | batch | GFLOP/img | " + " | ".join(f"{e} ms/img" for e in engines)
             + " | " + " | ".join(f"{e} ×" for e in engines[1:])
             + " | GEMM GFLOP/s | best fp32 GFLOP/s (% GEMM, % peak) |",
             "|" + " --- |" * (3 + 2 * len(engines) - 1 + 2)]
    for case in result["cases"]:
        ms, gemm = case["ms_per_image"], case["gemm_gflops"]
        fp32 = {k: v for k, v in case["gflops"].items() if k in ("torch-eager", "ort-cpu")}
        best = max(fp32.values())
        lines.append(f"| {case['size']} | {case['batch']} | {case['gflop_per_image']:.2f} | "
                     + " | ".join(f"{ms[e]:.1f}" for e in engines) + " | "
                     + " | ".join(f"{ms[engines[0]] / ms[e]:.2f}" for e in engines[1:])
                     + f" | {gemm:.0f} | {best:.0f} ({100 * best / gemm:.0f} %, {100 * best / peak:.0f} %) |")
    return "\n".join(lines)


def _load(load: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in load)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("weights/model.onnx"), help="fp32 ONNX + model.json")
    p.add_argument("--checkpoint", help="best.pt for PyTorch (default: the architecture, random weights)")
    p.add_argument("--int8", default="weights/model.int8.onnx", help="int8 ONNX, where it exists")
    p.add_argument("--compare", type=Path, help="another model.onnx (and the model.int8.onnx beside it) "
                   "timed in the same rounds, as other-ort-cpu(-int8)")
    p.add_argument("--bf16", action="store_true", help="also PyTorch eager under bf16 autocast")
    p.add_argument("--no-cuda", dest="cuda", action="store_false", help="skip the CUDA provider")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget-s", type=float, default=60.0, help="at most this long per size and batch")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = benchmark(args)
    if not any("cuda" in e for e in result["engines"]):
        result["cuda"] = "no CUDA provider or no GPU on this machine: no CUDA numbers"
    print(render(result))
    if "cuda" in result:
        print(result["cuda"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
