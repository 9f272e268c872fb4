"""Measurements a GPU benchmark needs besides its own subject, each reusable by any benchmark script.

- `Device`: the CUDA device (or the CPU for smoke runs), its synchronisation and peak memory, allocated and
  reserved.
- `matmul_ceiling`: the device's own dense matmul rate in the benchmark's dtype, measured in the same run, so
  efficiencies are quoted against this GPU rather than a datasheet peak.
- `KernelProbe`: torch.profiler over one step, reporting which scaled-dot-product-attention backend ran
  (flash, cuDNN, memory-efficient, math) and the attention GPU kernels, and the first SDPA call's q/k/v layout;
  `probe_backends` then forces each backend on that exact layout.
"""

from __future__ import annotations

import collections
import gc
import os
import platform
import re
import time
import warnings

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class Device:
    def __init__(self, cpu: bool, dtype: str | None = None):
        self.cuda = torch.cuda.is_available() and not cpu
        self.torch = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            dtype or ("bf16" if self.cuda else "fp32")]
        self.name = torch.cuda.get_device_name() if self.cuda else f"CPU ({platform.processor() or 'unknown'}, " \
                                                                    f"{os.cpu_count()} cores)"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> tuple[float | None, float | None]:
        """GiB since the last reset: peak allocated by tensors, and peak reserved by the caching allocator
        (what the card must really hold: allocated plus the allocator's cached, fragmented blocks)."""
        if not self.cuda:
            return None, None
        return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated() / 2**30 if self.cuda else None

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def matmul_ceiling(dev: Device, warmup: int = 3, reps: int = 10) -> dict:
    """This device's dense matmul rate in the benchmark's dtype: the denominator of every efficiency figure.

    A square product and one at FLUX's MLP shape (2048² tokens x 3072 -> 12288); the faster is the ceiling."""
    shapes = [(8192, 8192, 8192), (16896, 3072, 12288)] if dev.cuda else [(512, 512, 512)]
    g = torch.Generator(dev.torch).manual_seed(0)
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=g, device=dev.torch, dtype=dev.dtype)
        b = torch.randn(k, n, generator=g, device=dev.torch, dtype=dev.dtype)
        for _ in range(warmup):
            c = a @ b
        dev.sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            c = a @ b
        dev.sync()
        dt = (time.perf_counter() - t0) / reps
        rows.append({"m": m, "k": k, "n": n, "seconds": dt, "tflops": 2 * m * k * n / dt / 1e12})
        del a, b, c
    dev.free()
    return {"dtype": str(dev.dtype).removeprefix("torch."), "shapes": rows, "tflops": max(r["tflops"] for r in rows)}


# aten op names of the SDPA backends (torch.profiler and the dispatcher use them), most specific first
SDPA_BACKENDS = (("cudnn", "cuDNN"), ("flash", "flash"), ("efficient", "memory-efficient"), ("math", "math"),
                 ("overrideable", "overrideable"))
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|cudnn|sdpa|softmax", re.I)


def sdpa_backend(op_name: str) -> str | None:
    """'aten::_scaled_dot_product_flash_attention' -> 'flash'; None for the dispatching op and everything else."""
    if "_scaled_dot_product" not in op_name:
        return None
    for key, label in SDPA_BACKENDS:
        if key in op_name:
            return label + (" (CPU)" if "for_cpu" in op_name else "")
    return None


class SdpaCall(TorchFunctionMode):
    """Keeps the first F.scaled_dot_product_attention call's inputs as diffusers passed them (permuted views)."""

    def __init__(self):
        super().__init__()
        self.call: dict | None = None
        self.args: tuple | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.call is None and func is F.scaled_dot_product_attention:
            qkv = [t for t in (*args[:3], *(kwargs.get(n) for n in ("query", "key", "value"))) if torch.is_tensor(t)]
            other = {k: v for k, v in kwargs.items() if k not in ("query", "key", "value")}
            self.call = {"shapes": [list(t.shape) for t in qkv], "strides": [list(t.stride()) for t in qkv],
                         "contiguous": [t.is_contiguous() for t in qkv], "dtype": str(qkv[0].dtype).removeprefix("torch."),
                         "positional": len(args), "kwargs": {k: (v if not torch.is_tensor(v) else f"tensor {list(v.shape)}")
                                                           for k, v in other.items()}}
            self.args = (args[3:], other)  # mask and flags beyond q/k/v, for the backend probe
        return func(*args, **kwargs)


class KernelProbe:
    """torch.profiler plus the SDPA call's layout, over one denoising step; reports which attention kernel ran."""

    def __init__(self, dev: Device):
        self.dev = dev
        self.prof = None
        self.mode: SdpaCall | None = None
        self.error: str | None = None
        self.active = False

    def start(self):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.cuda else [])
        try:
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        except Exception as e:  # a profiler that cannot start must not cost the row its timings
            self.prof, self.error = None, f"profiler failed: {e}"
        self.mode = SdpaCall()
        self.mode.__enter__()
        self.active = True

    def stop(self):
        """Idempotent: the step callback stops it, or the row's clean-up when the row ended before that step."""
        if not self.active:
            return
        self.active = False
        self.dev.sync()
        self.mode.__exit__(None, None, None)
        if self.prof is not None:
            try:
                self.prof.__exit__(None, None, None)
            except Exception as e:
                self.prof, self.error = None, f"profiler failed: {e}"

    def summary(self) -> dict:
        backends: collections.Counter = collections.Counter()
        kernels: dict[str, float] = collections.defaultdict(float)
        if self.prof is not None:
            from torch.autograd import DeviceType

            for e in self.prof.events():
                if e.device_type == DeviceType.CUDA:
                    if ATTENTION_KERNEL.search(e.name):
                        kernels[e.name] += e.time_range.elapsed_us() / 1e3
                elif label := sdpa_backend(e.name):
                    backends[label] += 1
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:4]
        return {"backends": dict(backends), "kernel": " + ".join(f"{k} x{n}" for k, n in backends.items()) or
                ("no SDPA call seen" if self.error is None else self.error),
                "gpu_kernels_ms": [[name[:160], round(ms, 3)] for name, ms in top],
                "sdpa_call": self.mode.call if self.mode else None, "error": self.error}


def probe_backends(mode: SdpaCall, dev: Device, reps: int = 2) -> dict:
    """Each SDPA backend forced on q/k/v of exactly the captured shapes, strides and dtype: runs (ms) or why not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    call = mode.call
    extra, kwargs = mode.args
    if any(torch.is_tensor(x) for x in (*extra, *kwargs.values())):
        return {"skipped": "the call passed a tensor beyond q/k/v (a mask); not reproduced"}
    g = torch.Generator(dev.torch).manual_seed(0)

    def like(shape, stride):
        t = torch.empty_strided(shape, stride, dtype=getattr(torch, call["dtype"]), device=dev.torch)
        return t.normal_(generator=g)

    q, k, v = (like(s, st) for s, st in zip(call["shapes"], call["strides"]))
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION),
                          ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        with warnings.catch_warnings(record=True) as seen, torch.no_grad():
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, *extra, **kwargs)  # first call: kernel selection
                    dev.sync()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        F.scaled_dot_product_attention(q, k, v, *extra, **kwargs)
                    dev.sync()
                out[name] = {"status": "ok", "ms": (time.perf_counter() - t0) / reps * 1e3}
            except RuntimeError as e:  # "no viable backend" (torch warns why), or out of memory
                why = [str(w.message).strip().splitlines()[0] for w in seen] or [str(e).strip().splitlines()[0]]
                out[name] = {"status": "OOM" if is_oom(e) else "unavailable", "why": why[0][:200]}
        dev.free()
    return out
