"""The high-resolution FLUX runtime: NTK-scaled RoPE, proportional attention, static timestep shift.

One place turns a stock diffusers FLUX transformer (or pipeline) into the URAE runtime, for training,
sampling and inference alike. Every change is undone on exit (diffusers' attention dispatch function is
replaced only while a block with proportional attention is open; the attention modules keep two inert
hooks), and with the settings off the model is bit-identical to stock diffusers (the original RoPE theta
and processor objects are put back).

    settings = HighResSettings(ntk_factor=10, proportional_attention=True)
    with apply_highres(pipe, settings):
        pipe(...)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from contextlib import ExitStack, contextmanager

import torch

from urae.common import did_you_mean
from urae.rope import DYNAMIC_SCHEMES, SCHEMES, TABLE_SCHEMES, RopeParams, batch_tables

FLUX_ROPE_THETA = 10000
# N0 = 512 text tokens + 64 x 64 image tokens: the sequence length FLUX.1 was trained at (1024²).
DEFAULT_BASE_SEQ_LEN = 512 + 64 * 64
# The HighResSettings fields that make up the position scheme (carried together, e.g. to a two-stage draft).
ROPE_KEYS = ("rope", "rope_base_resolution", "dype_lambda", "yarn_beta", "yarn_gamma")


@dataclasses.dataclass(frozen=True)
class HighResSettings:
    """What the URAE runtime changes. Defaults are stock FLUX (every change off)."""

    ntk_factor: float = 1.0  # RoPE theta = 10000 * ntk_factor on all axes
    proportional_attention: bool = False  # softmax scale sqrt(log N / log N0) / sqrt(d)
    base_seq_len: int = DEFAULT_BASE_SEQ_LEN  # N0
    shift: float | None = None  # static timestep shift; None = the scheduler config's `shift`
    dynamic_shift: bool = False  # FLUX's resolution-dependent mu (off for URAE: it saturates at 4K)
    rope: str = "ntk"  # position scheme (urae.rope): ntk | yarn | dype-yarn | dype-ntk | none
    rope_base_resolution: int = 1024  # yarn/dype: the trained size (base grid = this / 16 tokens per axis)
    dype_lambda: float = 2.0  # dype: kappa(sigma) = sigma ** dype_lambda
    yarn_beta: tuple[float, float] = (1.25, 0.75)  # yarn/dype: linear <-> NTK ramp, in rotations
    yarn_gamma: tuple[float, float] = (16.0, 2.0)  # yarn/dype: ramp back to the base frequencies

    def __post_init__(self):
        for k in ("yarn_beta", "yarn_gamma"):  # JSON metadata gives lists
            v = getattr(self, k)
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)):
                raise ValueError(f"{k} must be two numbers, got {v!r}")
            object.__setattr__(self, k, tuple(float(x) for x in v))
        if self.rope not in SCHEMES:
            raise ValueError(f"unknown rope {self.rope!r}{did_you_mean(str(self.rope), SCHEMES)}; "
                             f"choose one of {', '.join(SCHEMES)}")
        if self.rope != "ntk" and self.ntk_factor != 1:
            raise ValueError(f"ntk_factor {self.ntk_factor:g} is for rope = ntk; rope = {self.rope} sets its own "
                             f"frequencies (leave ntk_factor at 1)")
        if not (isinstance(self.rope_base_resolution, int) and self.rope_base_resolution >= 32
                and self.rope_base_resolution % 16 == 0):
            raise ValueError(f"rope_base_resolution must be a multiple of 16 from 32 on, got {self.rope_base_resolution!r}")
        if not (isinstance(self.dype_lambda, (int, float)) and self.dype_lambda > 0):
            raise ValueError(f"dype_lambda must be positive, got {self.dype_lambda!r}")
        if not (isinstance(self.ntk_factor, (int, float)) and math.isfinite(self.ntk_factor) and self.ntk_factor > 0):
            raise ValueError(f"ntk_factor must be a positive number, got {self.ntk_factor!r}")
        if int(self.base_seq_len) < 2:
            raise ValueError(f"base_seq_len must be >= 2, got {self.base_seq_len!r}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift!r}")
        if self.shift is not None and self.dynamic_shift:
            raise ValueError("give either a static shift or dynamic_shift, not both")

    @classmethod
    def from_dict(cls, d: dict) -> HighResSettings:
        known = [f.name for f in dataclasses.fields(cls)]
        for k in d:
            if k not in known:
                raise ValueError(f"unknown high-res runtime option {k!r}{did_you_mean(k, known)}; "
                                 f"known: {', '.join(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe_rope(self) -> str:
        """The position scheme in words, for plan lines."""
        if self.rope == "ntk":
            return f"ntk x{self.ntk_factor:g}" if self.ntk_factor != 1 else "ntk x1 (stock RoPE)"
        if self.rope == "none":
            return "none (stock RoPE)"
        extra = f", lambda {self.dype_lambda:g}" if self.rope in DYNAMIC_SCHEMES else ""
        return f"{self.rope} (base {self.rope_base_resolution}{extra})"

    @property
    def rope_params(self) -> RopeParams:
        return RopeParams(self.rope_base_resolution, float(self.dype_lambda), self.yarn_beta, self.yarn_gamma)

    def with_scheduler_shift(self, scheduler) -> HighResSettings:
        """These settings with the static shift filled in from the scheduler config when unset, so that what is
        recorded beside an image is the value used (dynamic shifting has no single value)."""
        if self.dynamic_shift or self.shift is not None:
            return self
        return dataclasses.replace(self, shift=float(scheduler.config.get("shift", 1.0)))

    @classmethod
    def for_resolution(cls, width: int, height: int, **overrides) -> HighResSettings:
        """URAE's inference settings by target size: NTK 10 + proportional attention from 2048² on. Another
        position scheme brings its own frequencies and attention temperature: nothing else is switched on."""
        check_resolution(width, height)
        hi = width * height >= 2048 * 2048 or max(width, height) >= 2048
        ntk = overrides.get("rope") in (None, "ntk")
        base = {"ntk_factor": 10.0, "proportional_attention": True} if hi and ntk else {}
        return cls.from_dict({**base, **{k: v for k, v in overrides.items() if v is not None}})


def check_resolution(width: int, height: int) -> None:
    """FLUX packs 2x2 latent patches of an 8x VAE: pixel sizes must be multiples of 16."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % 16:
            near = max(16, round((v if isinstance(v, (int, float)) else 16) / 16) * 16)
            raise ValueError(f"{name}={v!r} is not a positive multiple of 16 (FLUX needs multiples of 16); "
                             f"the nearest valid {name} is {near}")


def attention_scale(seq_len: int, head_dim: int, base_seq_len: int = DEFAULT_BASE_SEQ_LEN) -> float:
    """Proportional attention's softmax scale for a sequence of seq_len tokens."""
    return math.sqrt(math.log(seq_len) / math.log(base_seq_len)) / math.sqrt(head_dim)


def image_seq_len(width: int, height: int) -> int:
    """Image tokens of a width x height picture: 8x VAE then 2x2 patches."""
    return (height // 16) * (width // 16)


def _attention_modules(transformer):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    return [m for m in transformer.modules() if isinstance(m, FluxAttention)]


def _context_parallel_degree(module) -> int:
    """How many ranks share one sequence under diffusers' context parallelism (1 without it): each rank's
    attention module sees an equal shard of the tokens, but the softmax scale is for the whole sequence."""
    pc = getattr(getattr(module, "processor", None), "_parallel_config", None)
    cp = getattr(pc, "context_parallel_config", None)
    return cp.ring_degree * cp.ulysses_degree if cp is not None else 1


def _proportional_pre(module, args, kwargs):
    base = module._urae_base_seq_len
    if base is None:  # installed earlier, not inside an apply_highres block now
        return
    hs = kwargs.get("hidden_states", args[0] if args else None)
    ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    seq = (hs.shape[1] + (ehs.shape[1] if ehs is not None else 0)) * _context_parallel_degree(module)
    _scale_stack.append(attention_scale(seq, module.head_dim, base))


def _proportional_post(module, args, kwargs, output):
    if module._urae_base_seq_len is not None:
        _scale_stack.pop()


def _add_proportional_hooks(transformer, base_seq_len: int) -> list:
    """Turn on, on every FLUX attention module, the hooks that set the softmax scale for the length of each call.

    The processors stay the installed diffusers' own (IP-adapter and backend settings included); the scale
    reaches the attention kernel through `dispatch_attention_fn` (see `_scaled_dispatch`), so every backend
    (SDPA, flash, …) that takes a `scale` honours it. The hooks are registered once per module and stay, inert
    outside a block: the same hook functions at every call let a `torch.compile`d block be reused from one image
    to the next instead of being traced again. Returns (module, previous setting) pairs to put back on exit.
    """
    before = []
    for m in _attention_modules(transformer):
        if not hasattr(m, "_urae_base_seq_len"):
            m.register_forward_pre_hook(_proportional_pre, with_kwargs=True)
            m.register_forward_hook(_proportional_post, with_kwargs=True, always_call=True)
            m._urae_base_seq_len = None
        before.append((m, m._urae_base_seq_len))
        m._urae_base_seq_len = base_seq_len
    return before


# Softmax scales of the attention calls in progress (innermost last); empty outside them.
_scale_stack: list[float] = []
# FLUX-module functions replaced while a block needs them: name -> [diffusers' own function, open blocks].
_patch_lock = threading.Lock()
_patches: dict[str, list] = {}


@functools.cache  # one wrapper per original: a compiled block's guard on it keeps holding
def _with_active_scale(original):
    def dispatch_attention_fn(*args, **kwargs):
        if _scale_stack and kwargs.get("scale") is None:
            kwargs["scale"] = _scale_stack[-1]
        return original(*args, **kwargs)

    return dispatch_attention_fn


@functools.cache  # as _with_active_scale
def _with_per_sample_tables(original):
    """diffusers' `apply_rotary_emb`, which broadcasts one [S, D] table over the batch, extended to [B, S, D]
    tables (one per sample: DyPE in a batch of several noise levels). Two-dimensional tables go to diffusers'."""

    def apply_rotary_emb(x, freqs_cis, *args, **kwargs):
        cos, sin = freqs_cis if isinstance(freqs_cis, tuple) else (freqs_cis, None)
        if sin is None or cos.dim() != 3 or args or set(kwargs) - {"sequence_dim"}:
            return original(x, freqs_cis, *args, **kwargs)
        if kwargs.get("sequence_dim", 2) == 1:  # x [B, S, H, D]
            cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        else:  # x [B, H, S, D]
            cos, sin = cos[:, None, :, :], sin[:, None, :, :]
        x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        return (x.float() * cos.to(x.device) + x_rotated.float() * sin.to(x.device)).to(x.dtype)

    return apply_rotary_emb


@contextmanager
def _patched_flux_function(name: str, make):
    """Route the FLUX module's function `name` through `make(original)` for the duration of the block only;
    nested and concurrent blocks share one installation, and the last to leave puts diffusers' function back."""
    from diffusers.models.transformers import transformer_flux as tf

    with _patch_lock:
        entry = _patches.get(name)
        if entry is None:
            entry = _patches[name] = [getattr(tf, name), 0]
            ours = make(entry[0])
            ours._urae_patch = True
            setattr(tf, name, ours)
        entry[1] += 1
    try:
        yield
    finally:
        with _patch_lock:
            entry[1] -= 1
            if entry[1] == 0:
                if getattr(getattr(tf, name), "_urae_patch", False):  # unless someone replaced it since
                    setattr(tf, name, entry[0])
                del _patches[name]


def _scaled_dispatch():
    """Inside, only attention calls made within a hooked attention module see a scale."""
    return _patched_flux_function("dispatch_attention_fn", _with_active_scale)


class SchemePosEmbed(torch.nn.Module):
    """FLUX's position embedding under a table scheme (yarn, dype-*): the tables of `urae.rope` for the
    positions of each call and, for DyPE, the time of that call (`sigmas`, set from the transformer's
    `timestep` by a hook; one per sample)."""

    def __init__(self, stock, settings: HighResSettings):
        super().__init__()
        self.theta, self.axes_dim = stock.theta, stock.axes_dim
        self.scheme, self.params = settings.rope, settings.rope_params
        self.sigmas: list[float] = [1.0]

    def forward(self, ids: torch.Tensor):
        return batch_tables(ids, self.axes_dim, self.scheme, self.sigmas, self.params, self.theta)


def _add_time_hook(transformer, pos: SchemePosEmbed):
    """Before each forward, the call's flow-matching time(s): diffusers' FLUX pipelines and the trainer pass
    sigma in [0, 1] (after the shift) as `timestep`."""

    def pre(module, args, kwargs):
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        pos.sigmas = [1.0] if t is None else t.detach().float().reshape(-1).tolist()

    return transformer.register_forward_pre_hook(pre, with_kwargs=True)


def _transformer_of(model):
    t = getattr(model, "transformer", model)
    if not hasattr(t, "pos_embed") or not hasattr(t, "attn_processors"):
        raise TypeError(f"expected a FLUX transformer or pipeline, got {type(model).__name__}")
    return t


@contextmanager
def apply_highres(model, settings: HighResSettings | dict | None = None):
    """Apply `settings` to a FLUX transformer or pipeline for the duration of the block.

    For a pipeline, the scheduler is replaced by one with the requested shift and restored afterwards.
    """
    if settings is None:
        settings = HighResSettings()
    elif isinstance(settings, dict):
        settings = HighResSettings.from_dict(settings)
    transformer = _transformer_of(model)
    old_pos, old_theta = transformer.pos_embed, transformer.pos_embed.theta
    hooks: list = []
    scaled: list = []
    scheduler = getattr(model, "scheduler", None)
    with ExitStack() as stack:
        try:
            if settings.ntk_factor != 1:
                transformer.pos_embed.theta = FLUX_ROPE_THETA * settings.ntk_factor
            if settings.rope in TABLE_SCHEMES:
                transformer.pos_embed = SchemePosEmbed(old_pos, settings)
                if settings.rope in DYNAMIC_SCHEMES:
                    hooks.append(_add_time_hook(transformer, transformer.pos_embed))
                    stack.enter_context(_patched_flux_function("apply_rotary_emb", _with_per_sample_tables))
            if settings.proportional_attention:
                stack.enter_context(_scaled_dispatch())
                scaled = _add_proportional_hooks(transformer, settings.base_seq_len)
            if scheduler is not None:
                model.scheduler = shifted_scheduler(scheduler, settings)
            yield model
        finally:
            transformer.pos_embed = old_pos
            old_pos.theta = old_theta
            for h in hooks:
                h.remove()
            for m, previous in reversed(scaled):
                m._urae_base_seq_len = previous
            if scheduler is not None:
                model.scheduler = scheduler


def shifted_scheduler(scheduler, settings: HighResSettings):
    """A copy of a flow-matching scheduler with URAE's timestep shift (static unless dynamic is asked)."""
    if settings.dynamic_shift:
        if not scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError("dynamic_shift needs a scheduler config with base/max_shift (FLUX.1-dev's)")
        return scheduler
    shift = settings.with_scheduler_shift(scheduler).shift
    return type(scheduler).from_config(scheduler.config, use_dynamic_shifting=False, shift=shift)


def rope_frequencies(transformer, axis: int = 0) -> torch.Tensor:
    """The base angular frequencies of one RoPE axis as the transformer computes them (for checks)."""
    dim = transformer.pos_embed.axes_dim[axis]
    theta = transformer.pos_embed.theta
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
