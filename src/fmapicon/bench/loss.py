"""``fmapicon bench loss``: the FeatureMapICON objective, tiled (``log_p``) vs dense.

For each pixel count N (square maps when N is a square; both frames N pixels), batch
B and C channels, four random feature maps of norm ``--scale`` (lambda, whose square
bounds the logits) go through forward + backward of ``fmapicon.core.objective.log_p`` (exact,
O(N) memory) and of ``log_p_dense`` (the quadratic reference). The table gives the
best wall time of ``--repeat`` alternating runs (fast, dense, fast, dense, ...: a
shared machine's load hits both alike), the process CPU time of those runs, the ratio
dense / fast, the peak extra memory of one fwd+bwd, and the largest differences of the
value and of the four gradients. The dense form is skipped, and the table says so,
where its estimated memory exceeds ``--dense-cap-gb``.

Memory: on CPU, the growth of the process's peak resident set (Linux VmHWM, reset
before the call) over its resident set before the call; on CUDA,
``torch.cuda.max_memory_allocated`` over the memory allocated before the call.
When pykeops (the original code's backend; not a dependency) is installed, the same
exact objective through KeOps is timed too, up to ``--keops-max-n``.
"""

from __future__ import annotations

import math

from fmapicon.cli._types import (device_name, int_list, non_negative_float, non_negative_int, positive_float,
                                  positive_int)
import os
import time

HELP = "the objective: tiled log_p vs the dense reference (time, memory, agreement)"

# Peak of the dense form in B x N x N matrices of the working dtype, measured (CPU,
# float32: 5.0 at N = 4,096, B = 2): the two softmaxes and their product in forward,
# their gradients in backward. Used only to decide whether to run it.
_DENSE_MATRICES = 5.5
_CPU_DENSE_CAP_GB = 4.0
_AUTO_BATCH_LIMIT = 10_000  # from this many pixels on, the default batch is 1


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=int_list(), default=[1024, 4096, 14400], metavar="N[,N...]",
                        help="pixels per frame, comma-separated (default 1024,4096,14400; "
                        "14400 = 120 x 120, the original training size)")
    parser.add_argument("--batch", type=int_list(), default=None, metavar="B[,B...]",
                        help="batch size: one value for every N, or one per N "
                        f"(default: 2, and 1 from {_AUTO_BATCH_LIMIT:,} pixels on)")
    parser.add_argument("--channels", type=positive_int, default=64, help="feature channels C (default 64)")
    parser.add_argument("--scale", type=positive_float, default=12.0,
                        help="norm of every feature vector, lambda (default 12, the initial "
                        "lambda of NormScale); logits reach scale^2")
    parser.add_argument("--eps", type=non_negative_float, default=0.0,
                        help="eps inside the log of both forms (default 0: the exact objective)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="dtype of the feature maps (default float32)")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="timed runs of each form after one warm-up; the best counts (default 3)")
    parser.add_argument("--dense-cap-gb", type=non_negative_float, default=None,
                        help="skip the dense form where its estimated memory exceeds this "
                        f"(default: {_CPU_DENSE_CAP_GB:g} on CPU, 80%% of the free memory on CUDA)")
    parser.add_argument("--block-rows", type=positive_int, default=None,
                        help="tile rows of log_p (default: fmapicon.core.objective.default_blocks)")
    parser.add_argument("--block-cols", type=positive_int, default=None,
                        help="tile columns of log_p (default: fmapicon.core.objective.default_blocks)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random features (default 0)")
    parser.add_argument("--keops-max-n", type=positive_int, default=2048,
                        help="when pykeops is installed, time it too up to this N (default 2048; "
                        "its CPU backend is slow, and it compiles each formula on first use)")
    parser.add_argument("--omp-wait-policy", choices=["passive", "active", "inherit"], default="passive",
                        help="OMP_WAIT_POLICY for torch's OpenMP threads, set before torch loads "
                        "(default passive: on a machine shared with other busy processes, threads "
                        "that spin at every barrier slow many-kernel code such as the tiled form "
                        "several times over; inherit: leave the environment as it is)")


def main(args) -> int:
    omp_policy = _set_omp_wait_policy(args.omp_wait_policy)
    import torch

    from fmapicon.bench import report
    from fmapicon.errors import UserError
    from fmapicon.runtime import resolve_device

    batches = args.batch or [2 if n < _AUTO_BATCH_LIMIT else 1 for n in args.n]
    if len(batches) == 1:
        batches = batches * len(args.n)
    if len(batches) != len(args.n):
        raise UserError(f"--batch has {len(batches)} values for {len(args.n)} values of --n; "
                        "give one value, or one per N")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cap_gb = args.dense_cap_gb if args.dense_cap_gb is not None else _default_cap_gb(device)
    rows = [_measure(n, batch, args, device, cap_gb) for n, batch in zip(args.n, batches)]
    notes = _notes(args, device, cap_gb) + [f"OMP_WAIT_POLICY: {omp_policy}"]
    extra = {"config": {k: v for k, v in vars(args).items() if k not in ("run", "json")}
             | {"device": str(device), "batch": batches, "dense_cap_gb": cap_gb},
             "memory_measure": _memory_measure(device), "omp_wait_policy": omp_policy}
    report("loss", rows, args.json, notes=notes, extra=extra)
    return 0


def _set_omp_wait_policy(policy: str) -> str:
    """Set OMP_WAIT_POLICY if asked and still possible (OpenMP reads it when torch loads)."""
    import sys

    current = os.environ.get("OMP_WAIT_POLICY") or "unset (OpenMP default)"
    if policy == "inherit":
        return f"{current}, inherited"
    if "torch" in sys.modules:
        return f"{current}: torch was already loaded, --omp-wait-policy {policy} not applied"
    os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return f"{policy.upper()}, set by the benchmark"


# ---------------------------------------------------------------------------------------
# one row


def _measure(n: int, batch: int, args, device, cap_gb: float) -> dict:
    import torch

    from fmapicon.core.objective import default_blocks, log_p, log_p_dense

    inputs = _features(n, batch, args, device)
    blocks = default_blocks(device, batch, n, n)
    blocks = (min(args.block_rows or blocks[0], n), min(args.block_cols or blocks[1], n))
    fast = _step(lambda *x: log_p(*x, eps=args.eps, block_rows=blocks[0], block_cols=blocks[1]), inputs)
    dense_gb = _DENSE_MATRICES * batch * n * n * inputs[0].element_size() / 1e9
    dense = _step(lambda *x: log_p_dense(*x, eps=args.eps), inputs) if dense_gb <= cap_gb else None
    keops = _keops_step(inputs, args.eps) if n <= args.keops_max_n else None
    steps = [step for step in (fast, dense, keops) if step is not None]
    times = dict(zip(steps, _alternate(steps, args.repeat, device)))
    none = (None, None)

    row = {"n": n, "batch": batch}
    row["fast_s"], row["fast_cpu_s"] = times[fast]
    row["dense_s"], row["dense_cpu_s"] = times.get(dense, none)
    row["ratio"] = row["dense_s"] / row["fast_s"] if dense else None
    row["fast_peak_mb"] = _peak_extra_mb(fast, device)
    row["dense_peak_mb"] = _peak_extra_mb(dense, device) if dense else None
    row["value_diff"], row["grad_diff"] = _differences(fast, dense) if dense else none
    if _has_pykeops():
        row["keops_s"] = times.get(keops, none)[0]
        row["keops_ratio"] = row["keops_s"] / row["fast_s"] if keops else None
        row["keops_value_diff"], row["keops_grad_diff"] = _differences(fast, keops) if keops else none
    row["blocks"] = f"{blocks[0]}x{blocks[1]}"
    row["dense"] = _dense_status(row["value_diff"], dense_gb, cap_gb)
    del inputs, fast, dense, keops, steps, times
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _has_pykeops() -> bool:
    import importlib.util

    return importlib.util.find_spec("pykeops") is not None


def _keops_step(inputs, eps: float):
    """The same exact objective through pykeops (the original code's backend), as three
    symbolic log-sum-exp reductions that KeOps compiles; None when it is not installed."""
    if not _has_pykeops():
        return None
    import torch
    from pykeops.torch import LazyTensor

    def keops_log_p(a1, b2, a3, b4):
        a1, b2, a3, b4 = (x.flatten(2).transpose(1, 2).contiguous() for x in (a1, b2, a3, b4))
        s1 = (LazyTensor(a1[:, :, None, :]) * LazyTensor(b2[:, None, :, :])).sum(3)
        s2 = (LazyTensor(a3[:, :, None, :]) * LazyTensor(b4[:, None, :, :])).sum(3)
        r = s1.logsumexp(dim=2)  # B x N_A x 1
        c = s2.logsumexp(dim=1)  # B x N_B x 1
        t = (s1 + s2 - LazyTensor(c[:, None, :, :])).logsumexp(dim=2)
        log_cycle = (t - r).squeeze(2)
        if eps:
            log_cycle = torch.logaddexp(log_cycle, log_cycle.new_tensor(math.log(eps)))
        return log_cycle.mean(dim=1)

    return _step(keops_log_p, inputs)


def _features(n: int, batch: int, args, device):
    """Four leaf feature maps ``B x C x H x W`` (H W = n), unit vectors times ``--scale``."""
    import torch

    height = math.isqrt(n)
    while n % height:
        height -= 1
    generator = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    maps = []
    for _ in range(4):
        x = torch.randn(batch, args.channels, height, n // height, generator=generator, dtype=dtype)
        x = x / x.norm(dim=1, keepdim=True) * args.scale
        maps.append(x.to(device).requires_grad_())
    return maps


def _step(form, inputs):
    """fwd + bwd of one form: returns (value, the four gradients)."""
    import torch

    def run():
        value = form(*inputs)
        return value.detach(), torch.autograd.grad(value.sum(), inputs)

    return run


def _alternate(steps, repeat: int, device) -> list[tuple[float, float]]:
    """Best (wall, process CPU) seconds of each step over ``repeat`` alternating rounds."""
    for step in steps:  # warm-up
        step()
    best = [(math.inf, math.inf)] * len(steps)
    for _ in range(repeat):
        for k, step in enumerate(steps):
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    return best


def _dense_status(value_diff: float | None, dense_gb: float, cap_gb: float) -> str:
    if value_diff is None:
        return f"skipped: needs ~{dense_gb:.3g} GB > cap {cap_gb:g} GB"
    if not math.isfinite(value_diff):
        # large logits: some pixel's cycle probability is below the dtype's range
        return "ran: its value underflowed to -inf (log 0)"
    return "ran"


def _differences(fast, dense) -> tuple[float, float]:
    value, grads = fast()
    value_ref, grads_ref = dense()
    value_diff = (value - value_ref).abs().max().item()
    grad_diff = max((g - h).abs().max().item() for g, h in zip(grads, grads_ref))
    return value_diff, grad_diff


# ---------------------------------------------------------------------------------------
# memory


def _peak_extra_mb(step, device) -> float | None:
    """Peak memory of one call of ``step`` above the memory in use before it, in MiB."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    _release_free_heap()
    before = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak resident set (VmHWM) to the current one
    except OSError:
        return None
    step()
    return (_proc_status_kib("VmHWM") - before) / 1024


def _release_free_heap() -> None:
    """Give freed heap back to the OS, so that reused memory counts as growth."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _memory_measure(device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus memory_allocated before the call"
    if os.path.exists("/proc/self/clear_refs"):
        return "growth of the peak resident set (VmHWM, reset before the call) over the resident set before it"
    return "not measured (needs Linux /proc)"


def _default_cap_gb(device) -> float:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return round(0.8 * free / 1e9, 1)
    return _CPU_DENSE_CAP_GB


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _notes(args, device, cap_gb) -> list[str]:
    import torch

    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
    return [
        f"device {device}, {args.dtype}, C = {args.channels}, feature norm {args.scale:g}, eps {args.eps:g}, "
        f"{torch.get_num_threads()} torch threads{load}",
        f"fast_s / dense_s: best wall seconds of fwd+bwd over {args.repeat} alternating runs; "
        "*_cpu_s: process CPU seconds of the same runs (all threads); ratio = dense_s / fast_s",
        f"*_peak_mb: extra memory of one fwd+bwd, {_memory_measure(device)}",
        f"dense skipped where its estimate ({_DENSE_MATRICES:g} B x N x N matrices) exceeds {cap_gb:g} GB",
        ("pykeops: keops_s is its fwd+bwd (first call, which compiles, untimed), "
         f"keops_ratio = keops_s / fast_s, up to N = {args.keops_max_n}"
         if _has_pykeops() else "pykeops: not installed (not a dependency), not measured"),
    ]
