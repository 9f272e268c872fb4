"""The ComfyUI nodes (comfyui_urae/) against ComfyUI's own FLUX model, LoRA loader, patcher and sampler.

ComfyUI v0.8.0 is vendored in ../shared/vendor (it is not on the package registry); tests that need it
skip where that folder is absent, and fail at collection when URAE_REQUIRE_COMFYUI=1 (CI sets it). Equality is with our diffusers forward under `apply_highres`.
"""

import json
import os
import sys
from pathlib import Path

# diffusers and transformers decide at import whether torchvision exists: import them before ComfyUI's
# import-only torchvision stand-in can be on sys.path
import diffusers.loaders.peft  # noqa: F401
import diffusers.models.transformers.transformer_flux  # noqa: F401
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from comfyui_urae import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_urae import settings as S
from comfyui_urae.nodes import URAEHighResRuntime, URAELoraLoader, apply_runtime
from networks import minor_lora
from urae import adapters, inference, rope, runtime
from urae.flow import pack_latents, unpack_latents
from urae.runtime import HighResSettings, apply_highres, shifted_scheduler
from urae.sampling import SampleRequest
from urae.tiny import (
    FLUX_DEV_SCHEDULER,
    FLUX_SCHNELL_SCHEDULER,
    build_transformer,
    transformer_config,
    write_bfl_checkpoint,
)

VENDOR = Path(__file__).resolve().parents[1].parent / "shared" / "vendor"
# a ComfyUI v0.8.0 checkout elsewhere: URAE_COMFYUI_DIR=/path/to/ComfyUI
COMFYUI = Path(os.environ.get("URAE_COMFYUI_DIR") or VENDOR / "ComfyUI-0.8.0")
# CI sets URAE_REQUIRE_COMFYUI=1: there a missing vendor folder fails these tests instead of skipping them
if not COMFYUI.is_dir() and os.environ.get("URAE_REQUIRE_COMFYUI", "") not in ("", "0"):
    raise RuntimeError(f"URAE_REQUIRE_COMFYUI is set but ComfyUI's code is not at {COMFYUI}")
needs_comfyui = pytest.mark.skipif(not COMFYUI.is_dir(), reason=f"ComfyUI's code is not at {COMFYUI}")
TOL = 1e-5  # fp32 rounding of two implementations of the same network (stock: ~5e-7)
SEED = 1
RUNTIME = {"ntk_factor": 7.0, "proportional_attention": True}


# ---- the node's formulas and priority against the command line's (no ComfyUI needed) ----

def test_formulas_match_the_command_line():
    assert S.DEFAULT_BASE_SEQ_LEN == runtime.DEFAULT_BASE_SEQ_LEN and S.FLUX_ROPE_THETA == runtime.FLUX_ROPE_THETA
    assert S.RUNTIME_METADATA_KEY == adapters.RUNTIME_METADATA_KEY
    assert S.DEFAULT_SHIFT == {"dev": FLUX_DEV_SCHEDULER["shift"], "schnell": FLUX_SCHNELL_SCHEDULER["shift"]}
    for n, d, n0 in [(72, 16, 4608), (4608, 128, 4608), (16896, 128, 4608), (66048, 128, 4608), (300, 64, 1000)]:
        assert S.attention_scale(n, d, n0) == runtime.attention_scale(n, d, n0)
    t = build_transformer(seed=SEED)
    for f in (1.0, 7.0, 10.0):
        with apply_highres(t, HighResSettings(ntk_factor=f)):
            assert S.rope_theta(f) == t.pos_embed.theta
    assert S.ROPE_SCHEMES == rope.SCHEMES
    assert S.ROPE_DEFAULTS == {k: list(v) if isinstance(v, tuple) else v for k, v in HighResSettings().to_dict().items()
                               if k in S.ROPE_DEFAULTS}
    # the node package installs alone, so it carries the position schemes' code: the same file
    root = Path(__file__).resolve().parents[1]
    assert (root / "comfyui_urae" / "rope.py").read_text() == (root / "urae" / "rope.py").read_text()
    sched = shifted_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), HighResSettings())
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10))
    ours = torch.tensor([S.shifted_sigma(u, 3.0) for u in np.linspace(1.0, 0.1, 10)])
    torch.testing.assert_close(sched.sigmas[:-1], ours.float(), rtol=0, atol=1e-7)


DYPE_META = {"ntk_factor": 1.0, "proportional_attention": True, "rope": "dype-yarn", "rope_base_resolution": 512,
             "dype_lambda": 1.5, "yarn_beta": [1.0, 0.5], "yarn_gamma": [8.0, 1.0]}


@pytest.mark.parametrize("size", [(1024, 1024), (2048, 2048), (4096, 1024), (4096, 2304), (1536, 1536)])
@pytest.mark.parametrize("meta", [None, RUNTIME, {"ntk_factor": 1.0, "proportional_attention": False, "base_seq_len": 1000},
                                  DYPE_META])
@pytest.mark.parametrize("explicit", [{}, {"ntk_factor": 3.0}, {"proportional_attention": False, "shift": 1.5},
                                      {"rope": "yarn"}, {"rope": "none", "proportional_attention": True}])
def test_priority_matches_the_command_line(size, meta, explicit):
    cfg = {"ntk_factor": None, "proportional_attention": None, "shift": None, "dynamic_shift": False, **explicit}
    try:
        cli = inference.runtime_settings(cfg, SampleRequest("p", *size), meta)
    except inference.ConfigError as e:  # ntk_factor with another scheme: refused by both
        with pytest.raises(ValueError, match="ntk_factor 3 is for rope = ntk"):
            S.resolve(*size, "dev", metadata_runtime=meta, **explicit)
        assert "ntk_factor 3 is for rope = ntk" in str(e)
        return
    node = S.resolve(*size, "dev", metadata_runtime=meta, **explicit)
    want = {k: v for k, v in cli.to_dict().items() if k in node}
    want["shift"] = cli.shift or FLUX_DEV_SCHEDULER["shift"]
    want["yarn_beta"], want["yarn_gamma"] = list(want["yarn_beta"]), list(want["yarn_gamma"])
    assert node == want and set(node) == {"ntk_factor", "proportional_attention", "base_seq_len", "shift", "rope",
                                          *S.ROPE_DEFAULTS}


def test_mappings_follow_comfyui_conventions():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    assert NODE_DISPLAY_NAME_MAPPINGS["URAEHighResRuntime"] == "URAE high-res runtime"
    for cls in NODE_CLASS_MAPPINGS.values():
        assert cls.RETURN_TYPES == ("MODEL",) and callable(getattr(cls, cls.FUNCTION))


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="ntk_factor"):
        S.resolve(2048, 2048, "dev", ntk_factor=-1.0)
    assert S.runtime_from_metadata({"urae_runtime": "{not json"}) is None


# ---- against ComfyUI's code ----

@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI's modules, imported the way ../shared/vendor/README.md says (CPU, torchvision stand-in)."""
    sys.path.insert(0, str(COMFYUI))
    stub = False
    try:
        import torchvision  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(VENDOR / "torchvision-stub"))
        stub = True
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    # folder_paths creates input/ etc. under its base directory: keep the read-only vendored tree untouched
    comfy.cli_args.args.base_directory = str(tmp_path_factory.mktemp("comfyui-base"))
    import comfy.model_detection
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    import folder_paths

    if stub:  # ComfyUI keeps its reference; later imports elsewhere see no torchvision, as before
        sys.path.remove(str(VENDOR / "torchvision-stub"))
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    yield comfy, folder_paths
    sys.path.remove(str(COMFYUI))  # its top-level names (utils, app, nodes) must not shadow others later


def load_comfy_flux(comfy, path):
    """ComfyUI's diffusion-model loader on a BFL file; detection is told the tiny model's heads and axes."""
    mod = comfy[0]
    cfg = transformer_config()
    detect = mod.model_detection.detect_unet_config

    def tiny_detect(*args, **kwargs):
        unet_config = detect(*args, **kwargs)
        unet_config.update(num_heads=cfg["num_attention_heads"], axes_dim=list(cfg["axes_dims_rope"]))
        return unet_config

    mod.model_detection.detect_unet_config = tiny_detect
    try:
        return mod.sd.load_diffusion_model_state_dict(mod.utils.load_torch_file(str(path)),
                                                      model_options={"dtype": torch.float32})
    finally:
        mod.model_detection.detect_unet_config = detect


@pytest.fixture(scope="module")
def dev(comfy, tmp_path_factory):
    path = write_bfl_checkpoint(build_transformer(seed=SEED), tmp_path_factory.mktemp("comfy") / "tiny-dev.safetensors")
    return load_comfy_flux(comfy, path)


@pytest.fixture(scope="module")
def schnell(comfy, tmp_path_factory):
    t = build_transformer(seed=SEED, guidance=False)
    return load_comfy_flux(comfy, write_bfl_checkpoint(t, tmp_path_factory.mktemp("comfy") / "tiny-schnell.safetensors"))


def inputs(seed=0, h=16, w=24, text=8):
    g = torch.Generator().manual_seed(seed)
    return {"noise": torch.randn(1, 16, h, w, generator=g), "context": torch.randn(1, text, 32, generator=g),
            "pooled": torch.randn(1, 32, generator=g), "sigma": 0.7, "guidance": 3.5}


def comfy_velocity(comfy, model, x):
    """One Euler step of ComfyUI's sampler from sigma to 0; the callback sees its input and x0 prediction."""
    mod = comfy[0]
    seen = {}

    def callback(step, x0, xt, total):
        seen["x0"], seen["x"] = x0.clone(), xt.clone()

    cond = [[x["context"], {"pooled_output": x["pooled"], "guidance": x["guidance"]}]]
    mod.sample.sample_custom(model, x["noise"], 1.0, mod.samplers.sampler_object("euler"),
                             torch.tensor([x["sigma"], 0.0]), cond, cond, torch.zeros_like(x["noise"]),
                             callback=callback, disable_pbar=True, seed=0)
    return (seen["x"] - seen["x0"]) / x["sigma"], seen["x"]


@torch.no_grad()
def diffusers_velocity(transformer, xt, x, settings):
    """Our diffusers forward under apply_highres on the same noisy latent, sigma, text and ids."""
    _, _, h, w = xt.shape
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    with apply_highres(transformer, settings):
        v = transformer(hidden_states=pack_latents(xt), encoder_hidden_states=x["context"],
                        pooled_projections=x["pooled"], timestep=torch.tensor([x["sigma"]]),
                        guidance=torch.tensor([x["guidance"]]), img_ids=img_ids.reshape(-1, 3),
                        txt_ids=torch.zeros(x["context"].shape[1], 3), return_dict=False)[0]
    return unpack_latents(v, h, w)


def node(model, ntk_factor, proportional_attention, shift=0.0, width=2048, height=2048, lora="none"):
    return URAEHighResRuntime().patch(model, width, height, ntk_factor, proportional_attention, shift, lora)[0]


CASES = [(1.0, False), (10.0, False), (1.0, True), (10.0, True)]


@needs_comfyui
@pytest.mark.slow
@pytest.mark.parametrize("ntk,prop", CASES)
def test_comfyui_forward_with_the_node_equals_apply_highres(comfy, dev, ntk, prop):
    ref_model = build_transformer(seed=SEED)
    x = inputs()
    v_node, xt = comfy_velocity(comfy, node(dev, ntk, "on" if prop else "off"), x)
    v_ref = diffusers_velocity(ref_model, xt, x, HighResSettings(ntk_factor=ntk, proportional_attention=prop))
    with_node = (v_node - v_ref).abs().max().item()
    v_stock, xt_stock = comfy_velocity(comfy, dev, x)
    assert torch.equal(xt_stock, xt)
    without = (v_stock - v_ref).abs().max().item()
    print(f"ntk {ntk:g}, proportional attention {prop}: max |diff| with node {with_node:.2e}, without {without:.2e}"
          f" (|v| max {v_ref.abs().max().item():.2f})")
    assert with_node < TOL
    if (ntk, prop) != (1.0, False):
        assert without > 100 * TOL, "the stock model must differ, or this test could not fail"


# position scheme x proportional attention; base 64 px (4 tokens per axis) so the 8 x 12 token grid is past it
SCHEME_ROWS = [("ntk", False), ("ntk", True), ("yarn", False), ("yarn", True), ("dype-yarn", False),
               ("dype-yarn", True), ("dype-ntk", False), ("dype-ntk", True), ("none", True)]
ROPE_TOL = 1e-6


@needs_comfyui
@pytest.mark.slow
@pytest.mark.parametrize("scheme,prop", SCHEME_ROWS)
def test_every_position_scheme_in_comfyui_equals_apply_highres(comfy, dev, scheme, prop):
    """The node's scheme (DyPE's sigma read from ComfyUI's transformer_options) against our diffusers runtime."""
    meta = {"rope": scheme, "rope_base_resolution": 64, "proportional_attention": prop,
            "ntk_factor": 10.0 if scheme == "ntk" else 1.0}
    rt = S.resolve(2048, 2048, "dev", metadata_runtime=meta)
    x = inputs(seed=4)
    m = apply_runtime(dev, rt)
    v_node, xt = comfy_velocity(comfy, m, x)
    v_ref = diffusers_velocity(build_transformer(seed=SEED), xt, x, HighResSettings.from_dict(rt))
    v_stock, _ = comfy_velocity(comfy, dev, x)
    with_node, without = (v_node - v_ref).abs().max().item(), (v_stock - v_ref).abs().max().item()
    print(f"rope {scheme}, proportional attention {prop}: max |diff| with node {with_node:.2e}, stock {without:.2e}")
    assert with_node <= ROPE_TOL
    assert without > 100 * ROPE_TOL, "the stock model must differ, or this test could not fail"
    if scheme in ("yarn", "dype-yarn", "dype-ntk"):  # the call's sigma, from transformer_options, reached the tables
        assert m.object_patches["diffusion_model.pe_embedder"].sigmas == [pytest.approx(x["sigma"], abs=1e-7)]


@needs_comfyui
@pytest.mark.slow
def test_equal_above_flux_training_length(comfy, dev):
    """5,192 tokens (> N0 = 4,608): the attention scale grows above 1/sqrt(d), as at 2K/4K."""
    x = inputs(seed=2, h=144, w=144)
    v_node, xt = comfy_velocity(comfy, node(dev, 10.0, "on"), x)
    v_ref = diffusers_velocity(build_transformer(seed=SEED), xt, x, HighResSettings(ntk_factor=10, proportional_attention=True))
    v_stock, _ = comfy_velocity(comfy, dev, x)
    with_node, without = (v_node - v_ref).abs().max().item(), (v_stock - v_ref).abs().max().item()
    print(f"5192 tokens, ntk 10, proportional attention: max |diff| with node {with_node:.2e}, without {without:.2e}")
    assert with_node < TOL and without > 100 * TOL


@needs_comfyui
@pytest.mark.slow
@pytest.mark.parametrize("variant,steps", [("dev", 28), ("dev", 20), ("dev", 50), ("schnell", 28), ("schnell", 4)])
def test_sigma_schedule_equals_our_static_shift(comfy, dev, schnell, variant, steps):
    mod = comfy[0]
    model, config = (dev, FLUX_DEV_SCHEDULER) if variant == "dev" else (schnell, FLUX_SCHNELL_SCHEDULER)
    patched = node(model, 0.0, "auto")  # shift auto: 3.0 dev, 1.0 schnell
    ours = mod.samplers.calculate_sigmas(patched.get_model_object("model_sampling"), "simple", steps)
    sched = shifted_scheduler(FlowMatchEulerDiscreteScheduler(**config), HighResSettings())
    retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps))  # as FluxPipeline calls it
    assert ours.shape == sched.sigmas.shape
    assert (ours - sched.sigmas).abs().max().item() < 1e-6
    if variant == "dev":  # ComfyUI's own FLUX sampling (mu 1.15 here; ~11.5 via ModelSamplingFlux at 4096²)
        stock = mod.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
        assert (stock - sched.sigmas).abs().max().item() > 1e-2


@pytest.fixture(scope="module")
def urae_lora(comfy, tmp_path_factory):
    """A minor-init adapter with random updates and runtime metadata, saved by our network module."""
    t = build_transformer(seed=SEED)
    net = minor_lora.create_network(1.0, 4, 4.0, None, [], t, init="minor", targets="urae", verbose="False",
                                    runtime=json.dumps(RUNTIME))
    net.apply_to([], t, False, True)
    net.prepare_grad_etc(None, t)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("loras")
    net.save_weights(str(folder / "urae_tiny.safetensors"), None, {})
    comfy[1].add_model_folder_path("loras", str(folder))
    return folder / "urae_tiny.safetensors"


@needs_comfyui
@pytest.mark.slow
def test_lora_with_the_node_equals_our_pipeline_with_the_adapter(comfy, dev, urae_lora):
    mod = comfy[0]
    x = inputs(seed=3)
    name = urae_lora.name
    lora_sd = mod.utils.load_torch_file(str(urae_lora), safe_load=True)
    comfy_lora, _ = mod.sd.load_lora_for_models(dev, None, lora_sd, 1.0, 0)  # ComfyUI's own LoRA loader
    via_runtime, xt = comfy_velocity(comfy, node(comfy_lora, 0.0, "auto", lora=name), x)
    via_loader, _ = comfy_velocity(comfy, URAELoraLoader().load(dev, name, 1.0, 2048, 2048, 0.0, "auto", 0.0)[0], x)

    ref_model = build_transformer(seed=SEED)  # as flux_urae_infer.py: adapter attached, settings from metadata
    meta = adapters.check_adapter_file(urae_lora)
    adapters.attach_adapters(ref_model, [str(urae_lora)], [1.0])
    cfg = {"ntk_factor": None, "proportional_attention": None, "shift": None, "dynamic_shift": False}
    settings = inference.runtime_settings(cfg, SampleRequest("p", 2048, 2048), adapters.runtime_from_metadata(meta))
    assert (settings.ntk_factor, settings.proportional_attention) == (7.0, True)
    v_ref = diffusers_velocity(ref_model, xt, x, settings)
    no_lora, _ = comfy_velocity(comfy, node(dev, 0.0, "auto", lora=name), x)
    print(f"LoRA: max |diff| runtime node {(via_runtime - v_ref).abs().max().item():.2e}, loader node "
          f"{(via_loader - v_ref).abs().max().item():.2e}, without the LoRA {(no_lora - v_ref).abs().max().item():.2e}")
    assert (via_runtime - v_ref).abs().max().item() < TOL
    assert (via_loader - v_ref).abs().max().item() < TOL
    assert (no_lora - v_ref).abs().max().item() > 100 * TOL


@needs_comfyui
@pytest.mark.slow
def test_a_file_trained_under_dype_drives_the_loader_node_as_the_command_line(comfy, dev, tmp_path_factory):
    """The metadata training writes for rope = dype-yarn (its `inference_settings(...).to_dict()`) makes the
    loader node (rope auto) run DyPE as flux_urae_infer.py does, on a 5:2 grid."""
    t = build_transformer(seed=SEED)
    trained = HighResSettings(rope="dype-yarn", rope_base_resolution=64)
    net = minor_lora.create_network(1.0, 4, 4.0, None, [], t, init="minor", targets="urae", verbose="False",
                                    runtime=json.dumps(trained.to_dict()))
    net.apply_to([], t, False, True)
    net.prepare_grad_etc(None, t)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    folder = tmp_path_factory.mktemp("dype-loras")
    net.save_weights(str(folder / "urae_dype.safetensors"), None, {})
    comfy[1].add_model_folder_path("loras", str(folder))
    x = inputs(seed=6, h=16, w=40)
    v_node, xt = comfy_velocity(comfy, URAELoraLoader().load(dev, "urae_dype.safetensors", 1.0, 4096, 1664, 0.0,
                                                             "auto", 0.0, "auto")[0], x)
    ref_model = build_transformer(seed=SEED)
    meta = adapters.check_adapter_file(folder / "urae_dype.safetensors")
    adapters.attach_adapters(ref_model, [str(folder / "urae_dype.safetensors")], [1.0])
    cfg = {"ntk_factor": None, "proportional_attention": None, "shift": None, "dynamic_shift": False}
    settings = inference.runtime_settings(cfg, SampleRequest("p", 4096, 1664), adapters.runtime_from_metadata(meta))
    assert settings == trained
    v_ref = diffusers_velocity(ref_model, xt, x, settings)
    other, _ = comfy_velocity(comfy, URAELoraLoader().load(dev, "urae_dype.safetensors", 1.0, 4096, 1664, 0.0,
                                                           "auto", 0.0, "ntk")[0], x)
    diff, off = (v_node - v_ref).abs().max().item(), (other - v_ref).abs().max().item()
    print(f"dype-yarn adapter, 5:2: loader node {diff:.2e}, loader node with rope ntk {off:.2e}")
    assert diff < TOL and off > 100 * TOL


@needs_comfyui
@pytest.mark.slow
def test_clones_leave_the_input_model_alone_and_do_not_interfere(comfy, dev):
    x = inputs(seed=5)
    options_before = repr(dev.model_options)
    sampling_before = dev.get_model_object("model_sampling")
    a = node(dev, 10.0, "on", shift=3.0)
    b = node(dev, 4.0, "off", shift=1.5)
    v_a, xt = comfy_velocity(comfy, a, x)
    v_b, _ = comfy_velocity(comfy, b, x)
    v_a2, _ = comfy_velocity(comfy, a, x)
    v_stock, _ = comfy_velocity(comfy, dev, x)

    ref = build_transformer(seed=SEED)
    assert torch.equal(v_a, v_a2)
    assert (v_a - diffusers_velocity(ref, xt, x, HighResSettings(ntk_factor=10, proportional_attention=True))).abs().max() < TOL
    assert (v_b - diffusers_velocity(ref, xt, x, HighResSettings(ntk_factor=4))).abs().max() < TOL
    assert (v_stock - diffusers_velocity(ref, xt, x, HighResSettings())).abs().max() < TOL
    assert dev.object_patches == {} and repr(dev.model_options) == options_before
    assert dev.get_model_object("model_sampling") is sampling_before
    assert dev.get_model_object("diffusion_model.pe_embedder.theta") == S.FLUX_ROPE_THETA
    # the shared module holds the patches of the model that ran last (ComfyUI's way): the stock one here
    assert dev.model.diffusion_model.pe_embedder.theta == S.FLUX_ROPE_THETA
    assert dev.model.model_sampling is sampling_before
    for m, shift in ((a, 3.0), (b, 1.5)):
        assert m.get_model_object("model_sampling").sigma(torch.tensor(0.5)).item() == pytest.approx(
            S.shifted_sigma(0.5, shift), abs=1e-7)
    # a later URAE node replaces an earlier one's settings (the attention scale is not applied twice)
    v_chain, _ = comfy_velocity(comfy, node(node(b, 4.0, "on", shift=1.5), 10.0, "on", shift=3.0), x)
    assert (v_chain - v_a).abs().max() < TOL
    assert "optimized_attention_override" not in node(a, 1.0, "off").model_options["transformer_options"]


@needs_comfyui
@pytest.mark.slow
def test_another_nodes_attention_override_still_runs(comfy, dev):
    """Other nodes (attention backends, ...) set the same override; ours wraps it with the scaled query."""
    x = inputs(seed=7)
    calls = []

    def other(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    m = dev.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = other
    v, xt = comfy_velocity(comfy, node(m, 1.0, "on"), x)
    cfg = transformer_config()
    assert len(calls) == cfg["num_layers"] + cfg["num_single_layers"]  # one forward (cfg 1), every block
    ref = diffusers_velocity(build_transformer(seed=SEED), xt, x, HighResSettings(proportional_attention=True))
    assert (v - ref).abs().max() < TOL
    assert dev.model_options["transformer_options"].get("optimized_attention_override") is None


# ---- example workflows ----

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "comfyui_urae" / "workflows").glob("*.json"))


def comfyui_node_types() -> set:
    """Node ids ComfyUI registers: nodes.py's NODE_CLASS_MAPPINGS keys and comfy_extras' node_id=... schemas."""
    import ast
    import re

    tree = ast.parse((COMFYUI / "nodes.py").read_text())
    types = {"Note"}  # the front end's own comment node
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == "NODE_CLASS_MAPPINGS":
            types |= {k.value for k in stmt.value.keys}
    for f in (COMFYUI / "comfy_extras").glob("*.py"):
        types |= set(re.findall(r'node_id="([^"]+)"', f.read_text()))
    return types


def _widget_inputs(cls):
    spec = cls.INPUT_TYPES()
    return [(k, v) for part in ("required", "optional") for k, v in spec.get(part, {}).items()
            if isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]


def test_there_are_the_four_workflows():
    assert [p.name for p in WORKFLOWS] == ["urae_2048.json", "urae_4096.json", "urae_dype_4096.json",
                                           "urae_two_stage.json"]


@needs_comfyui
@pytest.mark.slow
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_load_and_use_the_urae_settings(comfy, path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] == max(nodes)
    assert {n["type"] for n in wf["nodes"]} <= comfyui_node_types() | set(NODE_CLASS_MAPPINGS)
    for lid, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert lid in nodes[src]["outputs"][src_slot]["links"] and nodes[src]["outputs"][src_slot]["type"] == typ
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid and nodes[dst]["inputs"][dst_slot]["type"] == typ
    for n in wf["nodes"]:
        assert all(i["link"] is not None for i in n["inputs"]), f"{n['type']} {n['id']} has an unconnected input"
        if n["type"] in NODE_CLASS_MAPPINGS:
            widgets = _widget_inputs(NODE_CLASS_MAPPINGS[n["type"]])
            assert len(n["widgets_values"]) == len(widgets)
            for (name, spec), value in zip(widgets, n["widgets_values"]):
                if isinstance(spec[0], list) and name not in ("lora_name", "settings_from_lora"):
                    assert value in spec[0], (name, value)
                elif not isinstance(spec[0], list):
                    assert spec[1]["min"] <= value <= spec[1]["max"], (name, value)
    urae = [n for n in wf["nodes"] if n["type"] in NODE_CLASS_MAPPINGS]
    samplers = [n for n in wf["nodes"] if n["type"].startswith("KSampler")]
    assert urae and samplers and "ModelSamplingFlux" not in {n["type"] for n in wf["nodes"]}
    for ks in samplers:  # euler, simple, 28 steps, cfg 1: the schedule the tests above check
        first = 2 if ks["type"] == "KSampler" else 3  # after the seed and its control_after_generate value
        assert ks["widgets_values"][first:first + 4] == [28, 1.0, "euler", "simple"]
        model_src = nodes[next(lk[1] for lk in wf["links"] if lk[0] == ks["inputs"][0]["link"])]
        assert model_src["type"] in NODE_CLASS_MAPPINGS, "every sampler runs a model through a URAE node"
    sizes = {tuple(n["widgets_values"][:2]) for n in wf["nodes"] if n["type"] in ("EmptySD3LatentImage",)}
    sizes |= {tuple(n["widgets_values"][1:3]) for n in wf["nodes"] if n["type"] == "ImageScale"}
    node_sizes = {tuple(n["widgets_values"][2:4] if n["type"] == "URAELoraLoader" else n["widgets_values"][:2])
                  for n in urae}
    assert node_sizes == sizes, "each URAE node's size is the size its sampler generates"
