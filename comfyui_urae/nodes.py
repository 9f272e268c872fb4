"""ComfyUI nodes that run FLUX.1 with URAE's high-resolution runtime.

Everything goes through ComfyUI's model patcher on a clone of the input model, so the input model and
every other branch of a workflow keep stock behaviour:
- RoPE theta (`ntk`, `none`): an object patch of the diffusion model's `pe_embedder.theta` (put back on unpatch);
- the other position schemes (`yarn`, `dype-*`): an object patch of `pe_embedder` by `SchemeEmbedND`, with a
  diffusion-model wrapper that hands it each call's sigmas (`transformer_options["sigmas"]`);
- proportional attention: an `optimized_attention_override` in the clone's transformer_options;
- static shift: an object patch of `model_sampling`.
ComfyUI modules are imported inside the functions, so `settings` (and this module) import without ComfyUI.
"""

from __future__ import annotations

import logging
import math

from . import settings as S

log = logging.getLogger(__name__)

CATEGORY = "URAE"
# simple/normal schedulers index ComfyUI's sigma table; a length divisible by the usual step counts
# (2^4 * 3^2 * 5^2 * 7: every count up to 10, and 12, 14, 15, 16, 18, 20, 24, 25, 28, 30, 40, 50, ...)
# makes "simple" land on sigma = shift(1 - i / steps) exactly, as diffusers' FLUX pipeline does.
SIGMA_TABLE_LENGTH = 25200
AUTO = "auto"


class ProportionalAttention:
    """Attention override: softmax scale sqrt(log N / log N0) / sqrt(d) for a call over N tokens.

    ComfyUI's attention kernels all use 1/sqrt(d); multiplying q by sqrt(log N / log N0) gives URAE's
    scale on every backend (PyTorch, xformers, sage, flash, sub-quadratic). Another override already in
    the model options (another node's) still runs, with the scaled q.
    """

    def __init__(self, base_seq_len: int = S.DEFAULT_BASE_SEQ_LEN, inner=None):
        self.base_seq_len = base_seq_len
        self.inner = inner

    def __call__(self, func, q, k, v, *args, **kwargs):
        heads = args[0] if args else kwargs["heads"]
        if kwargs.get("skip_reshape", False):  # [B, heads, N, d]
            n, d = k.shape[2], q.shape[-1]
        else:  # [B, N, heads * d]
            n, d = k.shape[1], q.shape[-1] // heads
        q = q * (S.attention_scale(n, d, self.base_seq_len) * math.sqrt(d))
        if self.inner is not None:
            return self.inner(func, q, k, v, *args, **kwargs)
        return func(q, k, v, *args, **kwargs)


def flux_variant(model) -> str:
    """"dev" (guidance embedding) or "schnell"; anything but FLUX.1 is a clear error."""
    unet_config = model.model.model_config.unet_config
    if unet_config.get("image_model") != "flux":
        raise ValueError(f"URAE's high-res runtime is for FLUX.1 models; this one is "
                         f"{unet_config.get('image_model') or type(model.model).__name__!r}")
    return "dev" if unet_config.get("guidance_embed", False) else "schnell"


def static_shift_sampling(model, shift: float):
    """A FLUX model-sampling object with a static shift (no resolution-dependent mu)."""
    import comfy.model_sampling

    class ModelSamplingStaticShift(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        pass

    sampling = ModelSamplingStaticShift(model.model.model_config)
    # ComfyUI's FLUX sigma is exp(mu) t / (exp(mu) t + 1 - t): a static shift s is mu = ln s
    sampling.set_parameters(shift=math.log(shift), timesteps=SIGMA_TABLE_LENGTH)
    return sampling


ROPE_WRAPPER_KEY = "urae_rope"
TABLE_SCHEMES = ("yarn", "dype-yarn", "dype-ntk")


def scheme_embedder(stock, runtime: dict):
    """A `pe_embedder` for a table scheme: the project's tables (rope.py) in ComfyUI's layout."""
    import torch

    from .rope import RopeParams, batch_tables

    params = RopeParams(int(runtime["rope_base_resolution"]), float(runtime["dype_lambda"]),
                        tuple(runtime["yarn_beta"]), tuple(runtime["yarn_gamma"]))

    class SchemeEmbedND(torch.nn.Module):
        """ComfyUI's EmbedND output ([B, 1, L, D/2, 2, 2] rotation matrices) from (cos, sin) tables; DyPE's
        time is `sigmas`, set per call by the wrapper (one per sample)."""

        def __init__(self):
            super().__init__()
            self.dim, self.theta, self.axes_dim = stock.dim, S.FLUX_ROPE_THETA, list(stock.axes_dim)
            self.sigmas: list[float] = [1.0]

        def forward(self, ids):
            b = ids.shape[0]
            sig = self.sigmas if len(self.sigmas) == b else self.sigmas[:1] * b
            cos, sin = batch_tables(ids[0], self.axes_dim, runtime["rope"], sig, params, self.theta)
            c, s = cos[..., ::2], sin[..., ::2]  # the tables repeat each pair's value
            out = torch.stack([c, -s, s, c], dim=-1).reshape(*c.shape, 2, 2)
            if out.dim() == 4:
                out = out.expand(b, *out.shape)
            return out.unsqueeze(1).to(ids.device)

    return SchemeEmbedND()


def _sigma_wrapper(embedder):
    def wrapper(executor, *args, **kwargs):
        to = args[7] if len(args) > 7 else kwargs.get("transformer_options", {})
        sig = to.get("sigmas", args[1] if len(args) > 1 else None)
        embedder.sigmas = [1.0] if sig is None else sig.detach().float().reshape(-1).tolist()
        return executor(*args, **kwargs)

    return wrapper


def apply_runtime(model, runtime: dict):
    """A clone of a ComfyUI FLUX.1 MODEL with `runtime` (a `settings.resolve` result) applied."""
    import comfy.patcher_extension

    m = model.clone()
    # a URAE node earlier in the chain: this one's scheme replaces its scheme
    m.object_patches.pop("diffusion_model.pe_embedder", None)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, ROPE_WRAPPER_KEY)
    if runtime.get("rope", "ntk") in TABLE_SCHEMES:
        m.object_patches.pop("diffusion_model.pe_embedder.theta", None)
        embedder = scheme_embedder(m.get_model_object("diffusion_model.pe_embedder"), runtime)
        m.add_object_patch("diffusion_model.pe_embedder", embedder)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, ROPE_WRAPPER_KEY,
                               _sigma_wrapper(embedder))
    else:
        m.add_object_patch("diffusion_model.pe_embedder.theta", S.rope_theta(runtime["ntk_factor"]))
    to = m.model_options.setdefault("transformer_options", {})
    other = to.pop("optimized_attention_override", None)
    if isinstance(other, ProportionalAttention):  # from a URAE node earlier in the chain: this one replaces it
        other = other.inner
    if runtime["proportional_attention"]:
        to["optimized_attention_override"] = ProportionalAttention(runtime["base_seq_len"], other)
    elif other is not None:
        to["optimized_attention_override"] = other
    m.add_object_patch("model_sampling", static_shift_sampling(model, runtime["shift"]))
    return m


def read_lora_metadata(lora_name: str) -> dict:
    """The header metadata of a file in ComfyUI's `loras` folder (no tensors are read)."""
    import folder_paths
    from safetensors import safe_open

    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    if not path.lower().endswith((".safetensors", ".sft")):
        return {}
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def _explicit(ntk_factor: float, proportional_attention: str, shift: float, rope: str = AUTO) -> dict:
    """Widget values -> resolve() arguments (0 and "auto" mean "not given")."""
    return {"ntk_factor": ntk_factor if ntk_factor > 0 else None,
            "proportional_attention": None if proportional_attention == AUTO else proportional_attention == "on",
            "shift": shift if shift > 0 else None, "rope": None if rope == AUTO else rope}


def _describe(runtime: dict, source: str) -> str:
    rope = runtime.get("rope", "ntk")
    pos = (f"RoPE NTK x{runtime['ntk_factor']:g} (theta {S.rope_theta(runtime['ntk_factor']):g})" if rope == "ntk"
           else "stock RoPE" if rope == "none" else f"RoPE {rope} (base {runtime['rope_base_resolution']})")
    return (f"URAE runtime ({source}): {pos}, "
            f"proportional attention {'on' if runtime['proportional_attention'] else 'off'}, "
            f"static shift {runtime['shift']:g}")


def _runtime_inputs():
    return {
        "width": ("INT", {"default": 2048, "min": 16, "max": 16384, "step": 16,
                          "tooltip": "Target image width; decides the defaults when neither a value nor LoRA metadata does."}),
        "height": ("INT", {"default": 2048, "min": 16, "max": 16384, "step": 16,
                           "tooltip": "Target image height; from 2048 px on the defaults are NTK 10 and proportional attention."}),
        "ntk_factor": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.5,
                                 "tooltip": "RoPE theta = 10000 x this. 0 = auto (LoRA metadata, else 10 at >= 2048 px, 1 below)."}),
        "proportional_attention": ([AUTO, "on", "off"], {
            "tooltip": "Softmax scale sqrt(log N / log 4608) / sqrt(d) for N tokens. auto = LoRA metadata, else on at >= 2048 px."}),
        "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.05,
                            "tooltip": "Static timestep shift. 0 = auto (3.0 dev, 1.0 schnell). Replaces ModelSamplingFlux."}),
    }


def _rope_input():
    """Last among the inputs, so that workflows saved before it keep their widget values in place."""
    return {"rope": ([AUTO, *S.ROPE_SCHEMES], {
        "tooltip": "Position scheme. auto = LoRA metadata, else ntk (URAE's). yarn: NTK-by-parts per axis; "
                   "dype-yarn / dype-ntk: DyPE, strongest at high noise (patent pending for commercial use, "
                   "see docs/runtime.md); none: stock RoPE."})}


class URAEHighResRuntime:
    """MODEL -> MODEL: FLUX.1 with URAE's RoPE, attention scale and static shift."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {"model": ("MODEL",), **_runtime_inputs()},
            "optional": {
                "settings_from_lora": (["none", *folder_paths.get_filename_list("loras")], {
                    "tooltip": "Take auto settings from this LoRA's URAE metadata (the file is not applied here)."}),
                **_rope_input(),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs FLUX.1 as URAE adapters were trained for 2K/4K: NTK-scaled RoPE, proportional attention, "
                   "static timestep shift. Settings left on auto come from the LoRA metadata, else from the size.")

    def patch(self, model, width, height, ntk_factor, proportional_attention, shift, settings_from_lora="none",
              rope=AUTO):
        meta_runtime = None
        if settings_from_lora and settings_from_lora != "none":
            meta_runtime = S.runtime_from_metadata(read_lora_metadata(settings_from_lora))
        runtime = S.resolve(width, height, flux_variant(model), metadata_runtime=meta_runtime,
                            **_explicit(ntk_factor, proportional_attention, shift, rope))
        log.info(_describe(runtime, "from LoRA metadata" if meta_runtime else f"defaults for {width}x{height}"))
        return (apply_runtime(model, runtime),)


class URAELoraLoader:
    """MODEL -> MODEL: ComfyUI's LoRA loading plus the runtime the LoRA was trained with."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A URAE adapter (any LoRA file works)."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                **_runtime_inputs(),
                **_rope_input(),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a LoRA onto FLUX.1 with ComfyUI's own loader and applies URAE's high-res runtime; "
                   "auto settings come from the file's URAE metadata, else from the size.")

    def load(self, model, lora_name, strength_model, width, height, ntk_factor, proportional_attention, shift,
             rope=AUTO):
        import comfy.sd
        import comfy.utils
        import folder_paths

        variant = flux_variant(model)  # before the slow load: a wrong model fails at once
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora, meta = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        model_lora = model
        if strength_model != 0:
            model_lora, _ = comfy.sd.load_lora_for_models(model, None, lora, strength_model, 0)
        meta_runtime = S.runtime_from_metadata(meta)
        runtime = S.resolve(width, height, variant, metadata_runtime=meta_runtime,
                            **_explicit(ntk_factor, proportional_attention, shift, rope))
        log.info(_describe(runtime, f"from {lora_name}" if meta_runtime else f"defaults for {width}x{height}"))
        return (apply_runtime(model_lora, runtime),)
