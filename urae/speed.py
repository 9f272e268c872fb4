"""Speed options of inference, on diffusers' own machinery: step caches, attention backends, regional
compile, context parallelism (one image's tokens split across processes).

Everything here is glue: the caches are diffusers' hooks (`transformer.enable_cache`), the backends its
attention dispatcher (`set_attention_backend`), compile its `compile_repeated_blocks`, context parallelism
its `enable_parallelism` with a `ContextParallelConfig`. What is ours: checking a combination before any
model loads (one line each), counting the steps a cache reused, and labelling a cached image as
approximate. Proportional attention composes because it is a softmax `scale` handed to
`dispatch_attention_fn` (urae.runtime): every backend that takes a `scale` honours it, and under context
parallelism the scale is computed for the whole sequence, not a rank's shard.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from urae.config import ConfigError, Option

CACHES = ("none", "fbcache", "taylorseer", "magcache")
# diffusers 0.42's AttentionBackendName values (tests check this list against the installed registry)
ATTENTION_BACKENDS = (
    "native", "_native_math", "_native_cudnn", "_native_efficient", "_native_flash", "_native_npu", "_native_xla",
    "flex", "flash", "flash_hub", "flash_varlen", "flash_varlen_hub", "flash_4_hub", "_flash_3", "_flash_varlen_3",
    "_flash_3_hub", "_flash_3_varlen_hub", "aiter_fa2_hub", "sage", "sage_hub", "sage_blackwell_hub", "sage_varlen",
    "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton", "xformers",
)
CPU_BACKENDS = ("native", "_native_math", "flex")  # the others need CUDA (or an NPU/TPU) kernels
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
LOSSLESS = "exact up to floating-point rounding"

OPTIONS = [
    Option("cache", str, "none", "step cache from diffusers (approximate: reuses or predicts block outputs across "
           "steps): fbcache = first-block cache, taylorseer = TaylorSeer, magcache = MagCache with FLUX's ratios",
           choices=CACHES),
    Option("cache_threshold", float, None, "fbcache / magcache: how much change counts as 'the same' (larger = "
           "more steps reused, faster, further from the dense result; default diffusers': 0.05 fbcache, 0.06 magcache)"),
    Option("cache_interval", int, None, "taylorseer: full computation every N steps, predicted between "
           "(default diffusers': 5)"),
    Option("attention_backend", str, None, "diffusers attention backend (default: diffusers' own, native PyTorch "
           "SDPA); flash/sage/cuDNN need a GPU and their package", choices=ATTENTION_BACKENDS),
    Option("compile", bool, False, "torch.compile the repeated transformer blocks (diffusers' regional "
           "compile_repeated_blocks; the first image pays the compile time)"),
    Option("compile_backend", str, "inductor", "torch.compile backend for --compile (aot_eager/eager: trace "
           "only, to check a setup quickly)", choices=COMPILE_BACKENDS),
    Option("context_parallel", int, 1, "split each image's tokens across N processes, one GPU each (diffusers' "
           "context parallelism); run under torchrun --nproc_per_node N or accelerate launch --num_processes N; "
           "process 0 writes the images"),
    Option("context_parallel_mode", str, "ulysses", "ulysses (all-to-all over heads; any backend with context "
           "parallel support) or ring (needs a GPU backend that returns the log-sum-exp: flash, _native_cudnn, "
           "_native_flash, sage)", choices=("ulysses", "ring")),
]


@dataclasses.dataclass
class SpeedPlan:
    cache: str = "none"
    cache_threshold: float | None = None
    cache_interval: int | None = None
    backend: str | None = None
    compile: bool = False
    compile_backend: str = "inductor"
    cp: int = 1
    cp_mode: str = "ulysses"
    rank: int = 0
    device: str | None = None  # this process's device under context parallelism
    offload: str | None = None  # the offload mode context parallelism forces ("none"), else None
    previous_backend: object = None  # diffusers' process-wide backend before ours
    lines: list[str] = dataclasses.field(default_factory=list)

    @property
    def writes(self) -> bool:
        """Whether this process writes images (process 0 under context parallelism)."""
        return self.rank == 0

    def label(self) -> str | None:
        """'approximate (cache …)' for a cached run; None when the result is the dense one."""
        if self.cache == "none":
            return None
        knob = (f"interval {self.cache_interval or 5}" if self.cache == "taylorseer"
                else f"threshold {self.cache_threshold if self.cache_threshold is not None else _default_threshold(self.cache)}")
        return f"approximate (cache {self.cache}, {knob})"

    def record(self) -> dict:
        """What goes beside each image (PNG text, images.jsonl); empty when every option is off."""
        d = {}
        if self.cache != "none":
            d["cache"] = self.cache
            d["cache_threshold" if self.cache != "taylorseer" else "cache_interval"] = (
                self.cache_interval or 5 if self.cache == "taylorseer"
                else self.cache_threshold if self.cache_threshold is not None else _default_threshold(self.cache))
        if self.backend:
            d["attention_backend"] = self.backend
        if self.compile:
            d["compile"] = self.compile_backend
        if self.cp > 1:
            d["context_parallel"] = f"{self.cp_mode} {self.cp}"
        return d


def _default_threshold(cache: str) -> float:
    return {"fbcache": 0.05, "magcache": 0.06}[cache]


def _registry():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return AttentionBackendName, _AttentionBackendRegistry


def _backend_problem(name: str, device: torch.device, dtype: torch.dtype, proportional: bool) -> str | None:
    """Why `name` cannot run this generation, or None. Read from diffusers' registry, not a table of ours."""
    from diffusers.models import attention_dispatch as ad

    names, reg = _registry()
    backend = names(name)
    if proportional and "scale" not in reg._supported_arg_names[backend]:
        return ("takes no softmax scale, and proportional attention is one; use another backend or "
                "--no-proportional_attention")
    if device.type == "cpu" and name not in CPU_BACKENDS:
        return f"needs a GPU; on the CPU use one of {', '.join(CPU_BACKENDS)}"
    if dtype == torch.float32 and ad._check_qkv_dtype_bf16_or_fp16 in reg._constraints.get(backend, []):
        return "needs bf16 or fp16 (give --dtype bf16)"
    try:
        ad._check_attention_backend_requirements(backend)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def plan(cfg: dict, requests: list, proportional: bool, two_stage: bool) -> SpeedPlan:
    """Check the speed options against each other and the rest of the run; no model is loaded yet.

    `proportional`: whether any image runs with proportional attention. Raises ConfigError (one line)."""
    from urae.loading import default_device, parse_dtype

    p = SpeedPlan(cfg["cache"], cfg["cache_threshold"], cfg["cache_interval"], cfg["attention_backend"],
                  cfg["compile"], cfg["compile_backend"], cfg["context_parallel"], cfg["context_parallel_mode"])
    device = torch.device(cfg["device"]) if cfg["device"] else default_device()
    if p.cache_threshold is not None and p.cache not in ("fbcache", "magcache"):
        raise ConfigError(f"--cache_threshold applies to --cache fbcache or magcache, not {p.cache}")
    if p.cache_threshold is not None and not p.cache_threshold > 0:
        raise ConfigError(f"--cache_threshold must be > 0, got {p.cache_threshold}")
    if p.cache_interval is not None and p.cache != "taylorseer":
        raise ConfigError(f"--cache_interval applies to --cache taylorseer, not {p.cache}")
    if p.cache_interval is not None and p.cache_interval < 1:
        raise ConfigError(f"--cache_interval must be >= 1, got {p.cache_interval}")
    if p.cache != "none" and two_stage:
        raise ConfigError(f"--cache {p.cache} with --init_resolution: the draft and the refine pass would share one "
                          "cache state; generate at the target size directly, or drop --cache")
    if p.cache == "magcache":
        if any(r.init_image is not None for r in requests):
            raise ConfigError("--cache magcache follows a full schedule of --steps; it cannot run the partial "
                              "schedule of --init_image (use fbcache or taylorseer)")
        if len({r.steps for r in requests}) > 1:
            raise ConfigError("--cache magcache needs one step count for every image (the prompts file sets "
                              "several with --s)")
    if p.compile and cfg["offload"] == "sequential":
        raise ConfigError("--compile cannot trace through --offload sequential's per-layer weight moves; "
                          "use --offload model or none")
    if p.backend:
        why = _backend_problem(p.backend, device, parse_dtype(cfg["dtype"], device), proportional)
        if why:
            raise ConfigError(f"--attention_backend {p.backend}: {why}")
    if p.cp < 1:
        raise ConfigError(f"--context_parallel must be >= 1, got {p.cp}")
    if p.cp > 1:
        _plan_context_parallel(p, cfg, requests, device, two_stage)
    elif cfg["context_parallel_mode"] != "ulysses":
        raise ConfigError("--context_parallel_mode applies with --context_parallel N > 1")

    lines = []
    if p.cache != "none":
        lines.append(f"speed: {p.label()}: not the dense result; the PNG text and images.jsonl say so")
    exact = [s for s in (p.backend and f"attention backend {p.backend}",
                         p.compile and f"regional compile ({p.compile_backend}; the first image includes compiling)",
                         p.cp > 1 and f"context parallel {p.cp_mode} over {p.cp} processes (process 0 writes)") if s]
    if exact:
        lines.append(f"speed: {', '.join(exact)}: {LOSSLESS}")
    p.lines = lines
    return p


def _plan_context_parallel(p: SpeedPlan, cfg: dict, requests: list, device: torch.device, two_stage: bool) -> None:
    from urae.sampling import draft_size

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != p.cp:
        raise ConfigError(f"--context_parallel {p.cp} needs {p.cp} processes, this run has {world}: start it with "
                          f"torchrun --nproc_per_node {p.cp} flux_urae_infer.py … (or accelerate launch "
                          f"--num_processes {p.cp})")
    if p.cache == "fbcache":
        raise ConfigError("--cache fbcache decides from each process's own tokens, so the processes of "
                          "--context_parallel would disagree; use taylorseer or magcache (same steps everywhere)")
    if cfg["offload"] in ("model", "sequential"):
        raise ConfigError(f"--offload {cfg['offload']} with --context_parallel: each process holds the whole model "
                          "on its own GPU; use --offload none (or --fp8 for less memory)")
    if device.type == "cpu" and torch.accelerator.device_count() < 1:
        raise ConfigError("--context_parallel needs one GPU per process; this machine has none")
    if p.cp_mode == "ring":
        if device.type == "cpu":
            raise ConfigError("--context_parallel_mode ring needs a GPU attention backend that returns the "
                              "log-sum-exp; on the CPU use ulysses")
        if (p.backend or "native") in ("native", "_native_math", "_native_efficient", "flex", "xformers"):
            raise ConfigError(f"--context_parallel_mode ring: backend {p.backend or 'native'} returns no log-sum-exp; "
                              "give --attention_backend flash, _native_cudnn, _native_flash or sage (or use ulysses)")
    names, reg = _registry()
    backend = p.backend or reg.get_active_backend()[0].value
    if not reg._is_context_parallel_available(names(backend)):
        raise ConfigError(f"--attention_backend {backend} has no context parallel support in diffusers; use one of "
                          f"{', '.join(sorted(reg._supports_context_parallel))}")
    text = cfg["max_sequence_length"]
    if text is not None and text % p.cp:
        raise ConfigError(f"--max_sequence_length {text} must be a multiple of --context_parallel {p.cp}")
    for r in requests:  # diffusers splits the tokens into equal shares
        sizes = [(r.width, r.height)] + ([draft_size(r.width, r.height, cfg["init_resolution"])] if two_stage else [])
        for w, h in sizes:
            if (w // 16) * (h // 16) % p.cp:
                raise ConfigError(f"{w}x{h} has {(w // 16) * (h // 16)} image tokens, not a multiple of "
                                  f"--context_parallel {p.cp}; change the width or height by 16")
    p.rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    p.device = f"cuda:{local}" if device.type == "cuda" else "cpu"
    p.offload = "none"


def start(p: SpeedPlan) -> None:
    """Join the process group of a context-parallel run (torchrun's environment); other processes stay quiet."""
    if p.cp == 1:
        return
    import torch.distributed as dist

    cuda = p.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(p.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if p.rank != 0:  # one plan and one progress bar: process 0's
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def finish(p: SpeedPlan) -> None:
    if p.previous_backend is not None:
        _registry()[1].set_active_backend(p.previous_backend)
    if p.cp > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def apply(pipe, p: SpeedPlan, steps: int) -> StepCounter | None:
    """Backend, then parallelism (it checks the backend), then the cache's hooks, then compile (it traces
    what the hooks made). `steps`: the step count of every image (MagCache interpolates its ratios to it).
    Returns the counter of reused steps when a cache is on."""
    t = pipe.transformer
    if p.backend:
        p.previous_backend = _registry()[1].get_active_backend()[0]
        t.set_attention_backend(p.backend)  # also diffusers' process-wide default: put back by finish()
    if p.cp > 1:
        from diffusers import ContextParallelConfig

        heads = t.config.num_attention_heads
        if p.cp_mode == "ulysses" and heads % p.cp:
            raise ConfigError(f"--context_parallel {p.cp} (ulysses) splits the {heads} attention heads; give a "
                              f"divisor of {heads}")
        degree = {"ulysses_degree": p.cp} if p.cp_mode == "ulysses" else {"ring_degree": p.cp}
        t.enable_parallelism(config=ContextParallelConfig(**degree))
    counter = None
    if p.cache != "none":
        t.enable_cache(cache_config(p, steps))
        counter = StepCounter(t)
    if p.compile:
        t.compile_repeated_blocks(backend=p.compile_backend)
    return counter


def cache_config(p: SpeedPlan, steps: int):
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if p.cache == "fbcache":
        return FirstBlockCacheConfig(**({"threshold": p.cache_threshold} if p.cache_threshold is not None else {}))
    if p.cache == "magcache":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        kw = {"threshold": p.cache_threshold} if p.cache_threshold is not None else {}
        return MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps, **kw)
    kw = {"cache_interval": p.cache_interval} if p.cache_interval is not None else {}
    return TaylorSeerCacheConfig(**kw)


class StepCounter:
    """Transformer passes, and how many of them the cache answered without computing the last block's attention
    (its query projection did not run): a skipped pass under the block caches, a predicted one under TaylorSeer."""

    def __init__(self, transformer):
        self.passes = self.computed = 0
        self.transformer = transformer
        last = transformer.single_transformer_blocks[-1].attn.to_q
        self.handles = [transformer.register_forward_pre_hook(self._pass), last.register_forward_pre_hook(self._computed)]

    def _pass(self, *_):
        self.passes += 1

    def _computed(self, *_):
        self.computed += 1

    def start_image(self) -> None:
        """Forget the previous image: counts, and the cache's state (its first step must compute)."""
        self.passes = self.computed = 0
        self.transformer._reset_stateful_cache()

    @property
    def reused(self) -> int:
        return self.passes - self.computed

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def undo(pipe, p: SpeedPlan, counter: StepCounter | None) -> None:
    """Take `apply`'s cache, backend and compile off the transformer again (benchmark rows share one model).
    Context parallelism cannot be taken off: diffusers applies it once per model."""
    t = pipe.transformer
    if counter is not None:
        counter.close()
        t.disable_cache()
    if p.backend:
        t.reset_attention_backend()
        _registry()[1].set_active_backend(p.previous_backend)
        p.previous_backend = None
    if p.compile:
        for m in t.modules():
            if m.__class__.__name__ in t._repeated_blocks:
                m._compiled_call_impl = None  # what nn.Module.compile set
