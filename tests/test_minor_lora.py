"""networks.minor_lora on the tiny FLUX.1: exactness, files, layouts, the sd-scripts call sequence, bad input."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks import minor_lora as ml
from urae.flux_keys import diffusers_to_bfl, double_block_pairs, single_block_pairs

R, ALPHA = 4, 2.0  # alpha != rank so every scale factor is exercised


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices gain nothing from threads, and spinning OpenMP threads on a loaded 2-core box cost seconds.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed=0):
    from urae.tiny import build_transformer

    return build_transformer(2, 2, seed)


def flux_inputs(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
        timestep=torch.tensor([0.5], dtype=dtype),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([1.0], dtype=dtype),
        return_dict=False,
    )


def run(model, dtype=torch.float32, seed=1):
    with torch.no_grad():
        return model(**flux_inputs(seed, dtype))[0]


def module_tree(weights: dict) -> nn.Module:
    """An nn.Module tree with the given Linear names (e.g. the BFL layout sd-scripts uses)."""
    root = nn.Module()
    for name, w in weights.items():
        *path, leaf = name.split(".")
        node = root
        for p in path:
            if not hasattr(node, p):
                node.add_module(p, nn.Module())
            node = getattr(node, p)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        node.add_module(leaf, lin)
    return root


def bfl_tree(transformer) -> nn.Module:
    sd = diffusers_to_bfl(transformer.state_dict(), 2, 2)
    return module_tree({k[: -len(".weight")]: v for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2})


def make(model, init="minor", **kw):
    kw.setdefault("verbose", "False")
    net = ml.create_network(1.0, kw.pop("dim", R), kw.pop("alpha", ALPHA), None, [], model, init=init, **kw)
    net.apply_to([], model, False, True)
    return net


def perturb(net, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.get_trainable_params():
            p.add_(torch.randn(p.shape, generator=g) * std)


def linear_outputs(tree, dtype=torch.float32, seed=3):
    """Output of every Linear of a module tree on a fixed random input."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, m in tree.named_modules():
            if isinstance(m, nn.Linear):
                x = torch.randn(2, 5, m.in_features, generator=g).to(dtype)
                out[name] = m(x)
    return out


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---------------------------------------------------------------- layout table


def test_embedded_bfl_table_matches_urae_flux_keys():
    for i in range(3):
        for bfl, names in double_block_pairs(i) + single_block_pairs(i):
            assert ml.bfl_equivalents(bfl) == names


# ---------------------------------------------------------------- zero change at init


@pytest.mark.parametrize("init", ["minor", "major", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_change_at_init_diffusers_layout(init, dtype):
    t = tiny().to(dtype)
    y0 = run(t, dtype)
    net = make(t, init)
    net.to(dtype)
    net.prepare_grad_etc(None, t)
    assert len(net.unet_loras) == 2 * 4 + 2 * 3  # the URAE set: q, k, v, out per double block; q, k, v per single
    y1 = run(t, dtype)
    diff = (y1.float() - y0.float()).abs().max().item()
    print(f"diffusers {init} {dtype}: max abs diff at init = {diff}")
    assert diff == 0.0
    perturb(net)
    assert (run(t, dtype).float() - y0.float()).abs().max().item() > 1e-4  # the adapters are live


@pytest.mark.parametrize("init", ["minor", "major", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_change_at_init_bfl_layout(init, dtype):
    tree = bfl_tree(tiny()).to(dtype)
    before = linear_outputs(tree, dtype)
    net = make(tree, init)
    net.prepare_grad_etc(None, tree)
    names = sorted(lo.lora_name for lo in net.unet_loras)
    assert names == sorted(
        [f"lora_unet_double_blocks_{i}_img_attn_{p}" for i in range(2) for p in ("qkv", "proj")]
        + [f"lora_unet_single_blocks_{i}_linear1" for i in range(2)]
    )
    after = linear_outputs(tree, dtype)
    print(f"bfl {init} {dtype}: max abs diff at init = {max_diff(before, after)}")
    assert max_diff(before, after) == 0.0


# ---------------------------------------------------------------- SVD init


@pytest.mark.parametrize("init", ["minor", "major"])
def test_frozen_copies_are_exactly_the_selected_component(init):
    t = tiny()
    net = make(t, init)
    net.initialize()
    for lo in net.unet_loras:
        s = lo.slices[0]
        w = lo.org_module_ref[0].weight.detach().double()
        u, sv, vh = torch.linalg.svd(w)
        sel = slice(-R, None) if init == "minor" else slice(0, R)
        ref = u[:, sel] @ torch.diag(sv[sel]) @ vh[sel]
        d0, u0 = lo.frozen(0)
        got = (ALPHA / R) * u0.double() @ d0.double()  # the scale by hand, not the module's own number
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-5, (lo.lora_name, err)
        assert torch.equal(lo.lora_down[0], d0) and torch.equal(lo.lora_up[0], u0)
        assert s.scale == ALPHA / R
    # once trained, a layer's output changes by alpha / r * x (up down - up0 down0)^T, alpha and r by hand
    g = torch.Generator().manual_seed(3)
    lo = net.unet_loras[0]
    x = torch.randn(5, lo.in_features, generator=g)
    y0 = lo.org_forward(x)
    with torch.no_grad():
        lo.lora_up[0].add_(torch.randn(lo.lora_up[0].shape, generator=g) * 0.1)
        lo.lora_down[0].add_(torch.randn(lo.lora_down[0].shape, generator=g) * 0.1)
        d0, u0 = lo.frozen(0)
        hand = (ALPHA / R) * x.double() @ (lo.lora_up[0].double() @ lo.lora_down[0].double()
                                           - u0.double() @ d0.double()).T
        change = lo.forward(x).double() - y0.double()
    torch.testing.assert_close(change, hand, rtol=1e-5, atol=1e-6)


def test_minor_subspace_accurate_with_close_tail_singular_values():
    torch.manual_seed(0)
    n, r = 256, 8
    q1, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    s = torch.linspace(1.0, 0.05, n, dtype=torch.float64)
    s[-2 * r:] = 1e-3 * (1 + 1e-4 * torch.arange(2 * r, 0, -1, dtype=torch.float64))  # clustered tail, gap at r
    s[-r:] *= 0.5
    w = (q1 * s) @ q2.T
    ref = (q1[:, -r:] * s[-r:]) @ q2[:, -r:].T
    us, sv, sig = ml.svd_components(w.float(), r, "minor")
    # Reference from the fp32-stored weight, so only the decomposition's error is measured.
    w32 = w.float().double()
    u, sv64, vh = torch.linalg.svd(w32)
    ref32 = u[:, -r:] @ torch.diag(sv64[-r:]) @ vh[-r:]
    err = ((us @ sv) - ref32).norm().item() / ref32.norm().item()
    u32, s32, vh32 = torch.linalg.svd(w.float())
    err32 = ((u32[:, -r:] * s32[-r:]) @ vh32[-r:]).double().sub(ref32).norm().item() / ref32.norm().item()
    print(f"minor component relative error: fp64-eigh {err:.2e}, fp32 svd {err32:.2e}")
    assert err < 1e-7
    assert err32 > 100 * err  # why fp32 SVD is not used
    assert (ref32 - ref).norm() / ref.norm() < 1e-2  # the test spectrum survives fp32 storage


def test_svd_components_rectangular_both_orientations():
    torch.manual_seed(0)
    for shape in [(12, 40), (40, 12)]:
        w = torch.randn(*shape, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        for which, sel in (("minor", slice(-3, None)), ("major", slice(0, 3))):
            us, sv, sig = ml.svd_components(w, 3, which)
            ref = u[:, sel] @ torch.diag(s[sel]) @ vh[sel]
            assert torch.allclose(us @ sv, ref, atol=1e-10)
            assert torch.allclose(sig.sort().values, s[sel].sort().values, atol=1e-10)


# ---------------------------------------------------------------- forward == merged == diffusers' loader


@pytest.mark.parametrize("init", ["minor", "plain"])
def test_trained_forward_equals_merged_and_diffusers_loader(init, tiny_flux_dir, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    base = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer").eval()
    ours = copy.deepcopy(base)
    net = make(ours, init, alpha_pattern=r"attn\.to_k$:1.0")  # mixed alphas across modules
    perturb(net, seed=5)
    y_ours = run(ours)

    file = tmp_path / f"{init}.safetensors"
    net.save_weights(str(file), torch.float32, {})
    from safetensors.torch import load_file

    sd = load_file(str(file))
    merged = copy.deepcopy(base)
    merged.load_state_dict(ml.add_lora_to_state_dict(base.state_dict(), sd))
    y_merged = run(merged)

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(str(file))
    y_diffusers = run(pipe.transformer)

    change = (y_ours - run(base)).abs().max().item()
    d_merged = (y_ours - y_merged).abs().max().item()
    d_diffusers = (y_ours - y_diffusers).abs().max().item()
    print(f"{init}: output change {change:.3e}; ours vs merged {d_merged:.3e}; ours vs diffusers load_lora_weights "
          f"{d_diffusers:.3e}")
    assert change > 1e-3
    assert d_merged < 1e-5 * max(1.0, change) and d_diffusers < 1e-5 * max(1.0, change)
    rank = next(v for k, v in sd.items() if k.endswith("lora_A.weight")).shape[0]
    assert rank == (2 * R if init == "minor" else R)


# ---------------------------------------------------------------- save -> load -> resume


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_save_load_resume_exact(layout, tmp_path):
    model = tiny() if layout == "diffusers" else bfl_tree(tiny())
    net = make(model, "minor", rank_pattern="single.*to_v:2")
    params, _ = net.prepare_optimizer_params([1e-4], 1e-4, 1e-4)
    perturb(net, seed=2)
    file = tmp_path / "a.safetensors"
    net.save_weights(str(file), None, {"ss_network_dim": str(R)})
    meta = ml._read_file(str(file))[1]
    assert meta["ss_network_module"] == "networks.minor_lora" and meta["ss_base_model_version"] == "flux1"
    assert meta["urae_init"] == "minor" and meta["urae_rank"] == str(R) and meta["urae_targets"] == "urae"

    model2 = tiny() if layout == "diffusers" else bfl_tree(tiny())
    net2 = make(model2, "minor", rank_pattern="single.*to_v:2")
    net2.load_weights(str(file))
    params2, _ = net2.prepare_optimizer_params([1e-4], 1e-4, 1e-4)
    assert net2.svd_layers_computed == 0  # resuming does not redo the SVD
    a, b = _state(net), _state(net2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = lambda n: sorted(k for k, p in n.named_parameters() if p.requires_grad)  # noqa: E731
    assert names(net) == names(net2)
    assert [len(g["params"]) for g in params] == [len(g["params"]) for g in params2]
    assert sum(p.numel() for g in params2 for p in g["params"]) == sum(p.numel() for p in net.get_trainable_params())

    model3 = tiny() if layout == "diffusers" else bfl_tree(tiny())
    net3, _ = ml.create_network_from_weights(1.0, str(file), None, [], model3)
    net3.apply_to([], model3, False, True)
    c = _state(net3)
    assert all(torch.equal(a[k], c[k]) for k in a) and names(net3) == names(net)


# ---------------------------------------------------------------- BFL vs diffusers layout


def test_bfl_and_diffusers_files_describe_same_delta(tmp_path):
    t = tiny()
    tree = bfl_tree(t)
    net_d, net_b = make(t, "minor"), make(tree, "minor")
    net_d.initialize()
    net_b.initialize()
    perturb(net_d, seed=9)
    # Same random updates in the BFL network: copy each diffusers module's factors into its slice.
    by_equiv = {lo.slices[0].equiv: lo for lo in net_d.unet_loras}
    with torch.no_grad():
        for lo in net_b.unet_loras:
            for i, s in enumerate(lo.slices):
                src = by_equiv[s.equiv]
                d0, u0 = lo.frozen(i)
                sd0, su0 = src.frozen(0)
                assert torch.equal(d0, sd0) and torch.equal(u0, su0), s.label  # same SVD per slice
                lo.lora_down[i].copy_(src.lora_down[0])
                lo.lora_up[i].copy_(src.lora_up[0])
    fd, fb = tmp_path / "d.safetensors", tmp_path / "b.safetensors"
    net_d.save_weights(str(fd), None, {})
    net_b.save_weights(str(fb), None, {})
    sd_d, sd_b = ml._read_file(str(fd))[0], ml._read_file(str(fb))[0]

    k = "lora_unet_single_blocks_0_linear1"
    down, up = sd_b[f"{k}.lora_down.weight"], sd_b[f"{k}.lora_up.weight"]
    assert down.shape == (3 * 2 * R, 32) and up.shape == (32 * 3 + 128, 3 * 2 * R)
    assert (up[96:] == 0).all()  # MLP rows are not adapted
    assert (up[:32, 2 * R:] == 0).all() and (up[32:64, : 2 * R] == 0).all()  # block diagonal

    d_shapes = {n: tuple(m.weight.shape) for n, m in t.named_modules() if isinstance(m, nn.Linear)}
    b_shapes = {n: tuple(m.weight.shape) for n, m in tree.named_modules() if isinstance(m, nn.Linear)}
    dw_d = ml.lora_delta_weights(sd_d, d_shapes)
    dw_b = ml.lora_delta_weights(sd_b, b_shapes)
    worst = 0.0
    for i in range(2):
        for j, p in enumerate(("to_q", "to_k", "to_v")):
            rows = slice(32 * j, 32 * (j + 1))
            worst = max(worst, (dw_b[f"double_blocks.{i}.img_attn.qkv"][rows]
                                - dw_d[f"transformer_blocks.{i}.attn.{p}"]).abs().max().item())
            worst = max(worst, (dw_b[f"single_blocks.{i}.linear1"][rows]
                                - dw_d[f"single_transformer_blocks.{i}.attn.{p}"]).abs().max().item())
        assert (dw_b[f"single_blocks.{i}.linear1"][96:] == 0).all()
    # Each file read in the other layout gives the same deltas too.
    cross = ml.lora_delta_weights(sd_b, d_shapes)
    worst_cross = max((cross[k] - dw_d[k]).abs().max().item() for k in dw_d)
    print(f"BFL vs diffusers per-slice delta: max abs diff {worst:.3e}; BFL file read as diffusers {worst_cross:.3e}")
    assert worst < 1e-6 and worst_cross < 1e-6 and cross.keys() == dw_d.keys()


# ---------------------------------------------------------------- the sd-scripts call sequence


def test_sd_scripts_driver(tmp_path):
    """The calls sd-scripts' train_network.py / flux_train_network.py make, in their order and forms."""
    from urae.tiny import build_text_encoders

    clip, t5 = build_text_encoders(300, 120)
    flux = bfl_tree(tiny())
    flux.requires_grad_(False)
    base_weights = {k: v.clone() for k, v in flux.state_dict().items()}
    net_kwargs = {}
    for net_arg in ["init=minor", "targets=urae", "rank_dropout=0.1", "module_dropout=0.0", "verbose=False"]:
        key, value = net_arg.split("=")
        net_kwargs[key] = value
    if "dropout" not in net_kwargs:
        net_kwargs["dropout"] = None  # args.network_dropout
    import importlib

    network_module = importlib.import_module("networks.minor_lora")
    network = network_module.create_network(1.0, R, ALPHA, None, [clip, t5], flux, neuron_dropout=None, **net_kwargs)
    assert network.train_t5xxl is False
    assert hasattr(network, "set_multiplier") and hasattr(network, "apply_max_norm_regularization")
    network.apply_to([clip, t5], flux, False, True)  # --network_train_unet_only
    network.enable_gradient_checkpointing()
    results = network.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-3, 1e-3)
    assert type(results) is tuple
    trainable_params, lr_descriptions = results
    assert lr_descriptions == ["unet"] and trainable_params[0]["lr"] == 1e-3
    single = network.prepare_optimizer_params([1e-5], 1e-3, 1e-3)
    assert isinstance(single, tuple) and len(single[0]) == 1
    optimizer = torch.optim.AdamW(trainable_params, lr=1e-3)
    network.prepare_grad_etc([clip, t5], flux)
    network.on_epoch_start([clip, t5], flux)
    g = torch.Generator().manual_seed(0)
    targets = {lo.lora_name: lo.org_module_ref[0] for lo in network.unet_loras}
    for _ in range(3):
        network.on_step_start([clip, t5], flux)
        loss = sum(m(torch.randn(2, 4, m.in_features, generator=g)).square().mean() for m in targets.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        keys_scaled, mean_norm, maximum_norm = network.apply_max_norm_regularization(10.0, "cpu")
    assert maximum_norm > 0 and mean_norm <= maximum_norm
    assert all(torch.equal(v, base_weights[k]) for k, v in flux.state_dict().items())  # base never modified
    assert set(id(p) for p in network.get_trainable_params()) == set(id(p) for g in trainable_params for p in g["params"])
    network.eval()
    expected = linear_outputs(flux)

    metadata = {"ss_network_module": "networks.minor_lora", "ss_network_dim": str(R), "ss_network_alpha": str(ALPHA),
                "ss_network_args": json.dumps(net_kwargs), "ss_training_comment": "x"}
    file = tmp_path / "last.safetensors"
    network.save_weights(str(file), torch.float32, metadata)
    meta = ml._read_file(str(file))[1]
    assert meta["ss_network_dim"] == str(R) and meta["ss_training_comment"] == "x" and "sshs_model_hash" in meta

    fresh = bfl_tree(tiny())
    net2, weights_sd = network_module.create_network_from_weights(1.0, str(file), None, [clip, t5], fresh,
                                                                  for_inference=True)
    assert net2.is_mergeable()
    net2.merge_to([clip, t5], fresh, weights_sd, torch.float32, "cpu")
    got = linear_outputs(fresh)
    print(f"sd-scripts driver: merged model vs trained network max abs diff {max_diff(expected, got):.3e}")
    assert max_diff(expected, got) < 1e-5


# ---------------------------------------------------------------- runtime behaviour of the options


def test_multiplier_enable_and_dropouts():
    tree = bfl_tree(tiny())
    base = linear_outputs(tree)
    net = make(tree, "minor", dropout="0.5", rank_dropout="0.5", module_dropout="0.0")
    net.initialize()
    net.train()
    assert max_diff(base, linear_outputs(tree)) == 0.0  # dropout masks are shared by both halves: still zero
    perturb(net, seed=4)
    net.eval()
    full = linear_outputs(tree)
    net.set_multiplier(0.5)
    half = linear_outputs(tree)
    err = max((half[k] - base[k] - 0.5 * (full[k] - base[k])).abs().max().item() for k in base)
    assert err < 1e-6
    net.set_enabled(False)
    assert max_diff(base, linear_outputs(tree)) == 0.0
    net.set_enabled(True)
    net.set_multiplier(1.0)
    for lo in net.unet_loras:
        lo.module_dropout = 1.0
    net.train()
    assert max_diff(base, linear_outputs(tree)) == 0.0  # module dropout drops the whole change
    net.eval()
    assert max_diff(full, linear_outputs(tree)) == 0.0  # no dropout in eval


def test_targets_and_patterns():
    t = tiny()
    assert len(make(copy.deepcopy(t), "plain", targets="attn").unet_loras) == 2 * 8 + 2 * 3
    n_all = sum(1 for n, m in t.named_modules() if isinstance(m, nn.Linear) and "blocks." in n)
    assert len(make(copy.deepcopy(t), "plain", targets="all").unet_loras) == n_all
    net = make(copy.deepcopy(t), "plain", targets=r"single_transformer_blocks\.1\.attn\.to_q")
    assert [lo.lora_name for lo in net.unet_loras] == ["lora_unet_single_transformer_blocks_1_attn_to_q"]
    tree = bfl_tree(t)
    net = make(tree, "minor", targets=r"single_blocks\.0\.linear1:(q|v)", rank_pattern=":q$:2")
    (lo,) = net.unet_loras
    assert [(s.label, s.rank, s.start, s.stop) for s in lo.slices] == [
        ("single_blocks.0.linear1:q", 2, 0, 32), ("single_blocks.0.linear1:v", R, 64, 96)]
    net_all = make(bfl_tree(t), "plain", targets="all")
    linear1 = next(lo for lo in net_all.unet_loras if lo.lora_name.endswith("single_blocks_0_linear1"))
    assert [s.label.split(":")[1] for s in linear1.slices] == ["q", "k", "v", "mlp"]


def test_text_encoder_loras_when_asked():
    from urae.tiny import build_text_encoders

    clip, t5 = build_text_encoders(300, 120)
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        y0 = t5(ids).last_hidden_state
    net = ml.create_network(1.0, R, ALPHA, None, [clip, t5], tiny(), init="minor", train_t5xxl="True",
                            verbose="False")
    assert net.train_t5xxl is True
    net.apply_to([clip, t5], None, True, True)
    params, desc = net.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-4)
    assert desc == ["textencoder 1", "textencoder 2", "unet"] and [g["lr"] for g in params] == [1e-5, 2e-5, 1e-4]
    with torch.no_grad():
        assert torch.equal(t5(ids).last_hidden_state, y0)


# ---------------------------------------------------------------- 4K on top of 2K, cache, processes


def test_base_lora_stacking(tmp_path, tiny_flux_dir):
    t2k = tiny()
    y_base = run(t2k)
    net2k = make(t2k, "plain", dim=2, alpha=2.0)
    perturb(net2k, seed=1)
    f2k = tmp_path / "2k.safetensors"
    net2k.save_weights(str(f2k), None, {})
    sd2k = ml._read_file(str(f2k))[0]

    t = tiny()
    w_before = {k: v.clone() for k, v in t.state_dict().items()}
    merged2k = copy.deepcopy(t)
    merged2k.load_state_dict(ml.add_lora_to_state_dict(t.state_dict(), sd2k))
    net = make(t, "minor", base_lora=str(f2k))
    net.initialize()
    d_init = (run(t) - run(merged2k)).abs().max().item()
    assert d_init < 1e-5 and (run(merged2k) - y_base).abs().max() > 1e-3
    # The minor components are those of W + delta_2k.
    lo = net.unet_loras[0]
    w_fused = merged2k.get_submodule(lo.org_path)
    u, s, vh = torch.linalg.svd(w_fused.weight.double())
    d0, u0 = lo.frozen(0)
    ref = u[:, -R:] @ torch.diag(s[-R:]) @ vh[-R:]
    assert ((lo.slices[0].scale * u0.double() @ d0.double()) - ref).abs().max() < 1e-5
    perturb(net, seed=8)
    y4k = run(t)
    f = tmp_path / "2k+4k.safetensors"
    net.save_weights(str(f), None, {})
    sd = ml._read_file(str(f))[0]
    assert next(v for k, v in sd.items() if k.endswith("lora_A.weight")).shape[0] == 2 + 2 * R  # ranks add
    final = copy.deepcopy(tiny())
    final.load_state_dict(ml.add_lora_to_state_dict(w_before, sd))
    d_final = (run(final) - y4k).abs().max().item()
    print(f"2K+4K stacking: init vs merged 2K {d_init:.3e}; trained vs merged 2K+4K file {d_final:.3e}")
    assert d_final < 1e-5
    assert all(torch.equal(v, w_before[k]) for k, v in t.state_dict().items())
    # Resume keeps the frozen 2K part.
    net_r = make(tiny(), "minor", base_lora=str(f2k))
    net_r.load_weights(str(f))
    a, b = _state(net), _state(net_r)
    assert all(torch.allclose(a[k], b[k], atol=1e-7, rtol=0) for k in a)
    # The API form gives the same initialisation as the network argument.
    t_api = tiny()
    net_api = make(t_api, "minor")
    net_api.fuse_base_lora(str(f2k))
    net_api.initialize()
    net_arg = make(tiny(), "minor", base_lora=str(f2k))
    net_arg.initialize()
    a, b = _state(net_arg), _state(net_api)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError, match="before the SVD"):
        net_api.fuse_base_lora(str(f2k))


def test_init_cache(tmp_path):
    cache = tmp_path / "svd.safetensors"
    t = tiny()
    net1 = make(t, "minor", init_cache=str(cache))
    net1.initialize()
    assert net1.svd_layers_computed == 14 and cache.is_file()
    net2 = make(copy.deepcopy(t), "minor", init_cache=str(cache))
    net2.initialize()
    assert net2.svd_layers_computed == 0
    a, b = _state(net1), _state(net2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    net3 = make(copy.deepcopy(t), "minor", dim=3, init_cache=str(cache))  # other rank -> other key
    net3.initialize()
    assert net3.svd_layers_computed == 14
    t4 = tiny(seed=1)  # other weights -> other key
    net4 = make(t4, "minor", init_cache=str(cache))
    net4.initialize()
    assert net4.svd_layers_computed == 14


def _dist_worker(rank, world, rendezvous, weights, out_dir):
    import torch.distributed as dist

    # a rendezvous file, not a port: nothing another process on the machine can take first
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    net = ml.create_network(1.0, R, ALPHA, None, [], module_tree(weights), verbose="False")
    net.initialize()
    torch.save({"computed": net.svd_layers_computed, "state": net.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_svd_shared_across_processes(tmp_path):
    import torch.multiprocessing as mp

    t = tiny()
    weights = {n: m.weight.detach().clone() for n, m in t.named_modules() if isinstance(m, nn.Linear)}
    mp.spawn(_dist_worker, args=(2, tmp_path / "rendezvous", weights, str(tmp_path)), nprocs=2, join=True)
    single = ml.create_network(1.0, R, ALPHA, None, [], module_tree(weights), verbose="False")
    single.initialize()
    ref = single.state_dict()
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert r0["computed"] + r1["computed"] == 14 and min(r0["computed"], r1["computed"]) == 7
    for k in ref:
        assert torch.equal(r0["state"][k], ref[k]) and torch.equal(r1["state"][k], ref[k]), k


# ---------------------------------------------------------------- other files


def test_reads_plain_peft_and_kohya_files(tmp_path):
    from safetensors.torch import save_file

    t = tiny()
    g = torch.Generator().manual_seed(0)
    peft = {}
    for p in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_v"):
        peft[f"transformer.{p}.lora_A.weight"] = torch.randn(3, 32, generator=g)
        peft[f"transformer.{p}.lora_B.weight"] = torch.randn(32, 3, generator=g)
    peft["transformer.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(1.5)
    f = tmp_path / "peft.safetensors"
    save_file(peft, str(f))
    shapes = {n: tuple(m.weight.shape) for n, m in t.named_modules() if isinstance(m, nn.Linear)}
    want = ml.lora_delta_weights(peft, shapes)
    assert torch.allclose(want["transformer_blocks.0.attn.to_q"],
                          0.5 * peft["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
                          @ peft["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"])
    for model in (t, bfl_tree(t)):
        net, _ = ml.create_network_from_weights(1.0, str(f), None, [], model)
        got = net.delta_weights()
        if model is t:
            assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
        else:  # the same deltas land in the fused BFL rows
            assert torch.allclose(got["double_blocks.0.img_attn.qkv"][:32], want["transformer_blocks.0.attn.to_q"],
                                  atol=1e-5)
            assert torch.allclose(got["single_blocks.1.linear1"][64:96],
                                  want["single_transformer_blocks.1.attn.to_v"], atol=1e-5)
    # A kohya file as sd-scripts writes it for FLUX: fused qkv / linear1 with full-row factors.
    kohya = {}
    for name, rows in (("double_blocks_0_img_attn_qkv", 96), ("single_blocks_1_linear1", 224)):
        kohya[f"lora_unet_{name}.lora_down.weight"] = torch.randn(3, 32, generator=g)
        kohya[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, 3, generator=g)
        kohya[f"lora_unet_{name}.alpha"] = torch.tensor(6.0)
    fk = tmp_path / "kohya.safetensors"
    save_file(kohya, str(fk))
    tree = bfl_tree(t)
    b_shapes = {n: tuple(m.weight.shape) for n, m in tree.named_modules() if isinstance(m, nn.Linear)}
    want_b = ml.lora_delta_weights(kohya, b_shapes)
    assert torch.allclose(want_b["single_blocks.1.linear1"], 2.0 * kohya["lora_unet_single_blocks_1_linear1.lora_up.weight"]
                          @ kohya["lora_unet_single_blocks_1_linear1.lora_down.weight"])
    net_b, _ = ml.create_network_from_weights(1.0, str(fk), None, [], tree)
    got_b = net_b.delta_weights()
    assert all(torch.allclose(got_b[k], want_b[k], atol=1e-5) for k in want_b)
    net_d, _ = ml.create_network_from_weights(1.0, str(fk), None, [], copy.deepcopy(t))
    got_d = net_d.delta_weights()
    assert torch.allclose(got_d["single_transformer_blocks.1.proj_mlp"], want_b["single_blocks.1.linear1"][96:],
                          atol=1e-5)
    assert torch.allclose(got_d["transformer_blocks.0.attn.to_v"], want_b["double_blocks.0.img_attn.qkv"][64:],
                          atol=1e-5)
    # A plain network of the same shape loads it as a starting point.
    net = make(copy.deepcopy(t), "plain", dim=3, targets=r"(^transformer_blocks\.0\.attn\.to_q|single.*1\.attn\.to_v)$")
    net.load_weights(str(f))
    got = net.delta_weights()
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)


# ---------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path):
    from safetensors.torch import save_file

    t = tiny()
    with pytest.raises(ValueError, match=r"rank 32 >= min\(out, in\) = 32 .*transformer_blocks\.0\.attn\.to_q.*\(32, 32\)"):
        make(copy.deepcopy(t), "minor", dim=32)
    with pytest.raises(ValueError, match="matched no Linear"):
        make(copy.deepcopy(t), "minor", targets=r"nonexistent\.module")
    with pytest.raises(ValueError, match="rank_pattern entry 'nope' matches no targeted module"):
        make(copy.deepcopy(t), "minor", rank_pattern="nope:2")
    with pytest.raises(ValueError, match="init='svd'"):
        make(copy.deepcopy(t), "svd")

    bad_shape = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 48),
                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    save_file(bad_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch .*to_q.*down \(4, 48\).*\(32, 32\)"):
        ml.create_network_from_weights(1.0, str(tmp_path / "shape.safetensors"), None, [], copy.deepcopy(t))

    sdxl = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4),
            "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(4.0)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ValueError, match="another architecture.*input_blocks"):
        ml.create_network_from_weights(1.0, str(tmp_path / "sdxl.safetensors"), None, [], copy.deepcopy(t))
    with pytest.raises(ValueError, match="another architecture"):
        ml.add_lora_to_state_dict(t.state_dict(), sdxl)

    net = make(copy.deepcopy(t), "minor")
    net.save_weights(str(tmp_path / "ok.safetensors"), None, {})
    sd, meta = ml._read_file(str(tmp_path / "ok.safetensors"))
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    sd[key][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=f"{key.replace('.', '[.]')}.*NaN or Inf"):
        make(copy.deepcopy(t), "minor").load_weights(str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ml.add_lora_to_state_dict(t.state_dict(), sd)

    with pytest.raises(ValueError, match="base_lora"):  # a plain file cannot seed a minor network's factors
        make(copy.deepcopy(t), "minor").load_weights(str(tmp_path / "sdxl.safetensors"))
    other = make(copy.deepcopy(t), "minor", dim=3)
    with pytest.raises(ValueError, match=r"saved with slices .*32, 4, .*32, 3, "):
        other.load_weights(str(tmp_path / "ok.safetensors"))
    with pytest.raises(ValueError, match="not a FLUX transformer"):
        ml.create_network(1.0, 4, 4, None, [], nn.Sequential(nn.Linear(8, 8)))


def test_runtime_settings_round_trip(tmp_path):
    t = tiny()
    net = make(t, "minor", runtime='{"ntk_factor": 10, "proportional_attention": true}')
    f = tmp_path / "rt.safetensors"
    net.save_weights(str(f), torch.bfloat16, {})
    sd, meta = ml._read_file(str(f))
    assert json.loads(meta["urae_runtime"]) == {"ntk_factor": 10, "proportional_attention": True}
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    net2, _ = ml.create_network_from_weights(1.0, str(f), None, [], copy.deepcopy(t))
    assert net2.runtime_settings["ntk_factor"] == 10
    assert math.isclose(float(sd["transformer.transformer_blocks.0.attn.to_q.alpha"]), 2 * ALPHA)


def test_add_lora_to_state_dict_keeps_dtype_and_uses_fp32_maths(tmp_path):
    t = tiny()
    net = make(copy.deepcopy(t), "minor")
    perturb(net, seed=3)
    net.save_weights(str(tmp_path / "f.safetensors"), None, {})
    sd = ml._read_file(str(tmp_path / "f.safetensors"))[0]
    base = {k: v.to(torch.bfloat16) for k, v in t.state_dict().items()}
    out = ml.add_lora_to_state_dict(base, sd)
    deltas = net.delta_weights()
    shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in base.items() if v.dim() == 2}
    ref = ml.lora_delta_weights(sd, shapes)
    assert ref.keys() == deltas.keys()
    for name, dw in deltas.items():
        k = f"{name}.weight"
        assert out[k].dtype == torch.bfloat16
        assert torch.equal(out[k], (base[k].float() + ref[name]).to(torch.bfloat16))  # fp32 sum, one rounding
        assert torch.allclose(ref[name], dw, atol=1e-6)
    untouched = [k for k in base if k[: -len(".weight")] not in deltas]
    assert all(out[k] is base[k] for k in untouched)
    # BFL-prefixed single-file layout gets the same change in its fused rows.
    bfl = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_bfl(t.state_dict(), 2, 2).items()}
    out_b = ml.add_lora_to_state_dict(bfl, sd)
    qkv = out_b["model.diffusion_model.double_blocks.1.img_attn.qkv.weight"] - bfl[
        "model.diffusion_model.double_blocks.1.img_attn.qkv.weight"]
    assert torch.allclose(qkv[32:64], deltas["transformer_blocks.1.attn.to_k"], atol=1e-6)


def test_max_norm_and_loraplus():
    t = tiny()
    net = make(copy.deepcopy(t), "plain", loraplus_lr_ratio="4")
    params, desc = net.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-4, 1e-3)
    assert desc == ["unet", "unet plus"] and [g["lr"] for g in params] == [1e-4, 4e-4]
    perturb(net, seed=1, std=0.5)
    before = max(dw.norm().item() for dw in net.delta_weights().values())
    scaled, mean, mx = net.apply_max_norm_regularization(0.05, "cpu")
    assert scaled == 14 and mx <= 0.05 + 1e-6 and before > 0.05
    assert max(dw.norm().item() for dw in net.delta_weights().values()) <= 0.05 + 1e-6
    net = make(copy.deepcopy(t), "minor")
    perturb(net, seed=1, std=0.05)
    before = max(dw.norm().item() for dw in net.delta_weights().values())
    scaled, mean, mx = net.apply_max_norm_regularization(before / 4, "cpu")
    assert scaled > 0 and mx < before / 2  # deviations scaled: the change shrinks (first order exactly)


def test_fused_kohya_file_read_by_diffusers_converter_at_flux_width(tmp_path):
    """At FLUX.1's real width (3072) diffusers' kohya converter splits our fused qkv/linear1 files exactly."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    h = 3072
    shapes = {"double_blocks.0.img_attn.qkv": (3 * h, h), "double_blocks.0.img_attn.proj": (h, h),
              "single_blocks.0.linear1": (3 * h + 4 * h, h)}
    with torch.device("meta"):  # no weight values are needed to build, fill and export the adapters
        tree = module_tree({n: torch.empty(s) for n, s in shapes.items()})
    r = 2
    net = ml.MinorLoRANetwork([], tree, lora_dim=r, alpha=3.0, init="minor", verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lo in net.unet_loras:
            for i in range(len(lo.slices)):
                d0, u0 = lo.frozen(i)
                for t in (d0, u0, lo.lora_down[i], lo.lora_up[i]):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.02)
            lo.initialized = True
    file = tmp_path / "flux_width.safetensors"
    net.save_weights(str(file), None, {})
    sd = ml._read_file(str(file))[0]
    ours = ml.lora_delta_weights(sd, shapes)
    conv = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    targets = {
        "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", 0),
        "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", 1),
        "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", 2),
        "transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj", 0),
        "single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", 0),
        "single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1", 1),
        "single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1", 2),
    }
    worst = 0.0
    for dname, (bname, j) in targets.items():
        a, b = conv[f"transformer.{dname}.lora_A.weight"], conv[f"transformer.{dname}.lora_B.weight"]
        worst = max(worst, (b.double() @ a.double() - ours[bname][j * h: (j + 1) * h].double()).abs().max().item())
    mlp = conv.get("transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight")
    assert mlp is None or not mlp.any()
    print(f"diffusers kohya converter vs our delta at width 3072: max abs diff {worst:.3e}")
    assert worst < 1e-6


def test_resume_refuses_another_alpha_or_init(tmp_path):
    """Loading factors under another scale would silently rescale the learned change."""
    model = tiny()
    net = ml.create_network(1.0, R, ALPHA, None, [], model, init="minor", verbose="False")
    net.apply_to([], model, False, True)
    net.prepare_grad_etc(None, model)
    path = tmp_path / "a.safetensors"
    net.save_weights(str(path), None, {})
    for alpha, init in ((2 * ALPHA, "minor"), (ALPHA, "plain")):
        other = tiny()
        o = ml.create_network(1.0, R, alpha, None, [], other, init=init, verbose="False")
        o.apply_to([], other, False, True)
        with pytest.raises(ValueError, match="rank, alpha, init"):
            o.load_weights(str(path))


def test_autocast_keeps_no_fp32_copy_of_the_activation():
    """Under bf16 autocast the adapter must not save an extra input-sized copy for backward (GBs at 4096²)."""
    model = tiny()
    net = ml.create_network(1.0, R, ALPHA, None, [], model, init="minor", verbose="False")
    net.apply_to([], model, False, True)
    net.prepare_grad_etc(None, model)
    lin = model.transformer_blocks[0].attn.to_q
    x = torch.randn(5, 32, dtype=torch.bfloat16, requires_grad=True)  # 5 tokens: no weight has this shape
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        lin(x).float().sum().backward()
    inputs = [s for s in saved if s[1] == (5, 32)]
    assert not any(d == torch.float32 for d, _, _ in inputs), saved
    assert len({p for _, _, p in inputs}) == 1, "only x itself, no copy of it"


def test_sd_scripts_t5_keys_lora_te3_are_recognised():
    """sd-scripts' lora_flux names T5 modules lora_te3_* (older files: lora_te2_*); neither is 'another model'."""
    model = tiny()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    lora = {
        "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": torch.randn(2, 32, generator=g),
        "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight": torch.randn(32, 2, generator=g),
        "lora_unet_transformer_blocks_0_attn_to_q.alpha": torch.tensor(2.0),
    }
    for prefix in ("lora_te3", "lora_te2"):
        lora[f"{prefix}_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(2, 32)
        lora[f"{prefix}_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(32, 2)
    merged = ml.add_lora_to_state_dict(sd, lora)
    want = model.state_dict()["transformer_blocks.0.attn.to_q.weight"] + lora[
        "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight"] @ lora[
        "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"]
    assert torch.allclose(merged["transformer_blocks.0.attn.to_q.weight"], want, atol=1e-6)
    assert ml.PREFIX_TE == ("lora_te1", "lora_te3")


def test_fused_bfl_gradients_equal_the_per_projection_gradients():
    """linear1 (q, k, v, MLP rows) adds each slice's change in place; forward and gradients must match the
    diffusers layout's separate to_q/to_k/to_v adapters on the same weights."""
    model = tiny()
    tree = bfl_tree(model)
    nets = {"dif": make(model, "minor"), "bfl": make(tree, "minor")}
    for net, m in ((nets["dif"], model), (nets["bfl"], tree)):
        net.prepare_grad_etc(None, m)
    perturb(nets["dif"], seed=5)
    fused = next(lo for lo in nets["bfl"].unet_loras if lo.lora_name == "lora_unet_single_blocks_0_linear1")
    seps = [next(lo for lo in nets["dif"].unet_loras if lo.lora_name == f"lora_unet_single_transformer_blocks_0_attn_{p}")
            for p in ("to_q", "to_k", "to_v")]
    with torch.no_grad():  # the same trained factors in both layouts (the frozen copies agree by construction)
        for i, sep in enumerate(seps):
            fused.lora_down[i].copy_(sep.lora_down[0])
            fused.lora_up[i].copy_(sep.lora_up[0])
    blk = model.single_transformer_blocks[0]
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(0))
    lin1 = getattr(tree.single_blocks, "0").linear1
    def dif_out():
        return torch.cat([blk.attn.to_q(x), blk.attn.to_k(x), blk.attn.to_v(x), blk.proj_mlp(x)], -1)

    with torch.no_grad():  # the changes agree (the tree's Linears carry no biases, so compare changes)
        changes = []
        for net, f in ((nets["bfl"], lambda: lin1(x)), (nets["dif"], dif_out)):
            net.set_enabled(False)
            base = f()
            net.set_enabled(True)
            changes.append(f() - base)
        assert changes[0].abs().max() > 0 and (changes[0] - changes[1]).abs().max() < 1e-5
    y_bfl, y_dif = lin1(x), dif_out()
    w = torch.randn(y_bfl.shape, generator=torch.Generator().manual_seed(1))
    (y_bfl * w).sum().backward()
    (y_dif * w).sum().backward()
    for i, sep in enumerate(seps):
        for a, b in ((fused.lora_down[i], sep.lora_down[0]), (fused.lora_up[i], sep.lora_up[0])):
            assert a.grad is not None and b.grad.abs().max() > 0
            assert (a.grad - b.grad).abs().max() < 1e-5 * b.grad.abs().max() + 1e-7


# ---------------------------------------------------------------- plain_init, ranks, parsers


def _flux_width_tree(device="meta"):
    """One double and one single block's URAE targets at FLUX.1's real width, weights on `device`."""
    h = 3072
    shapes = {"transformer_blocks.0.attn.to_q": (h, h), "transformer_blocks.0.attn.to_k": (h, h),
              "transformer_blocks.0.attn.to_v": (h, h), "transformer_blocks.0.attn.to_out.0": (h, h),
              "single_transformer_blocks.0.attn.to_q": (h, h), "single_transformer_blocks.0.attn.to_k": (h, h),
              "single_transformer_blocks.0.attn.to_v": (h, h)}
    with torch.device(device):
        return module_tree({n: torch.empty(s) for n, s in shapes.items()})


def test_plain_init_gaussian_matches_peft_distribution():
    """PEFT's init_lora_weights="gaussian" (the public URAE 2K run): A ~ N(0, std 1/r), B = 0; kaiming stays the
    default (uniform, bound 1/sqrt(in)), about 6x smaller at width 3072."""
    r = 16
    torch.manual_seed(0)
    gauss = ml.create_network(1.0, r, r, None, [], _flux_width_tree(), init="plain", plain_init="gaussian",
                              verbose="False")
    kaiming = ml.create_network(1.0, r, r, None, [], _flux_width_tree(), init="plain", verbose="False")
    assert kaiming.plain_init == "kaiming"
    down = torch.cat([lo.lora_down[0].detach().flatten() for lo in gauss.unet_loras]).double()
    n, std = down.numel(), 1.0 / r
    assert n == 7 * r * 3072
    # mean within 5 standard errors; sample std within 2 % (its standard error is 0.3 % here)
    assert abs(down.mean().item()) < 5 * std / math.sqrt(n)
    assert abs(down.std().item() / std - 1) < 0.02
    # normal, not uniform: 68.3 % within one std (a uniform law of the same std gives 57.7 %)
    assert abs((down.abs() < std).double().mean().item() - 0.6827) < 0.01
    assert all(not lo.lora_up[0].any() for lo in gauss.unet_loras)  # up exactly zero
    k_down = torch.cat([lo.lora_down[0].detach().flatten() for lo in kaiming.unet_loras]).double()
    assert k_down.abs().max() <= 1 / math.sqrt(3072)
    ratio = down.std().item() / k_down.std().item()
    print(f"gaussian down std {down.std().item():.5f} (1/r = {std:.5f}); kaiming {k_down.std().item():.5f}; "
          f"ratio {ratio:.2f}")
    assert 5.5 < ratio < 6.5


def test_plain_init_gaussian_zero_change_recorded_and_checked_on_resume(tmp_path):
    t = tiny()
    y0 = run(t)
    net = make(t, "plain", plain_init="gaussian")
    assert run(t).sub(y0).abs().max().item() == 0.0  # up = 0: no change at init
    perturb(net, seed=2)
    assert run(t).sub(y0).abs().max().item() > 1e-4
    f = tmp_path / "g.safetensors"
    net.save_weights(str(f), None, {})
    meta = ml._read_file(str(f))[1]
    assert meta["urae_plain_init"] == "gaussian" and json.loads(meta["ss_network_args"])["plain_init"] == "gaussian"
    with pytest.raises(ValueError, match="plain_init=gaussian.*plain_init=kaiming"):
        make(tiny(), "plain").load_weights(str(f))
    again = make(tiny(), "plain", plain_init="gaussian")
    again.load_weights(str(f))
    assert all(torch.equal(a, b) for a, b in zip(_state(net).values(), _state(again).values()))
    net2, _ = ml.create_network_from_weights(1.0, str(f), None, [], tiny())
    assert net2.plain_init == "gaussian"
    with pytest.raises(ValueError, match="plain_init='normal'"):
        make(tiny(), "plain", plain_init="normal")
    # minor/major files carry no plain_init
    make(t2 := tiny(), "minor").save_weights(str(tmp_path / "m.safetensors"), None, {})
    assert "urae_plain_init" not in ml._read_file(str(tmp_path / "m.safetensors"))[1]
    assert t2 is not None


@pytest.mark.parametrize("init", ["minor", "plain"])
def test_rank_metadata_and_export_rank(init, tmp_path):
    """ss_network_dim/alpha as sd-scripts writes them (the trained rank); the file's tensors have rank 2r for
    minor/major (r trained + r frozen), which urae_export_rank states; both give the same scale."""
    net = make(tiny(), init)
    f = tmp_path / "r.safetensors"
    net.save_weights(str(f), None, {})
    sd, meta = ml._read_file(str(f))
    file_rank = next(v for k, v in sd.items() if k.endswith("lora_A.weight")).shape[0]
    file_alpha = float(next(v for k, v in sd.items() if k.endswith(".alpha")))
    want = 2 * R if init == "minor" else R
    assert file_rank == want and meta["urae_export_rank"] == str(want) and meta["urae_rank"] == str(R)
    assert meta["ss_network_dim"] == str(R) and float(meta["ss_network_alpha"]) == ALPHA
    assert math.isclose(float(meta["ss_network_alpha"]) / int(meta["ss_network_dim"]), file_alpha / file_rank)
    assert float(meta["urae_export_alpha"]) == file_alpha
    words = net.describe_rank()
    assert (f"rank {2 * R}" in words and f"{R} trained + {R} frozen" in words) if init == "minor" else \
        words == f"rank {R} (saved files: rank {R})"


def test_parameter_count_reads_well(caplog):
    assert [ml.format_count(n) for n in (512, 7168, 18_677_760, 1_200_000_000)] == ["512", "7.17 K", "18.7 M",
                                                                                     "1.2 B"]
    with caplog.at_level("INFO", logger="networks.minor_lora"):
        net = ml.MinorLoRANetwork([], _flux_width_tree(), lora_dim=16, alpha=16, init="minor")
    # the URAE set is 190 such layers: 190 * 16 * (3072 + 3072) = 18.7 M
    assert net.trainable_parameter_count() == 7 * 16 * 6144 == sum(p.numel() for lo in net.unet_loras
                                                                   for p in lo.parameters())
    line = next(r.getMessage() for r in caplog.records if "trainable parameters" in r.getMessage())
    assert "688 K trainable parameters" in line and "rank 32: 16 trained + 16 frozen minor components" in line


def test_one_boolean_parser_and_dtype_names(tmp_path):
    assert [ml.as_bool(v) for v in ("True", "false", " YES ", "0", True, 0)] == [True, False, True, False, True,
                                                                                False]
    with pytest.raises(ValueError, match="train_t5xxl='maybe': expected true or false"):
        make(tiny(), "plain", train_t5xxl="maybe")
    assert ml.as_dtype("bf16") is torch.bfloat16 and ml.as_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype 'fp4'"):
        ml.as_dtype("fp4")
    net = make(tiny(), "minor")
    net.save_weights(str(tmp_path / "h.safetensors"), "fp16", {})  # a name works where sd-scripts passes a dtype
    assert all(v.dtype == torch.float16 for v in ml._read_file(str(tmp_path / "h.safetensors"))[0].values())


# ---------------------------------------------------------------- base weights stored in fp8, moved by hooks


def _fp8_storage_hooks(model):
    """fp8 storage as a trainer's memory options do it by hand: each block Linear keeps its weight in
    float8_e4m3fn between forwards; a pre-hook upcasts it for the forward, a forward hook puts fp8 back.
    The weight tensor is a new object on every call (as with block swap moving it between devices)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "blocks." in name:
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
            m.register_forward_pre_hook(lambda mod, args: setattr(mod.weight, "data", mod.weight.data.float()))
            m.register_forward_hook(lambda mod, args, out: setattr(
                mod.weight, "data", mod.weight.data.to(torch.float8_e4m3fn)))


@pytest.mark.parametrize("storage", ["pre_hook", "diffusers_layerwise_casting"])
def test_adapter_on_fp8_stored_base(storage, tmp_path):
    from safetensors.torch import save_file

    ref_model = tiny()
    full = {n: m.weight.detach().clone() for n, m in ref_model.named_modules() if isinstance(m, nn.Linear)}
    ref = make(ref_model, "minor")
    ref.initialize()
    perturb(ref, seed=6)

    q_model = tiny()
    q = make(q_model, "minor")  # the adapter first, then the storage hooks (the trainer's order)
    if storage == "pre_hook":
        _fp8_storage_hooks(q_model)
    else:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(q_model, torch.float8_e4m3fn, torch.float32)
    lin = q_model.transformer_blocks[0].attn.to_q
    assert lin.weight.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="float8_e4m3fn.*svd_weights"):
        q.initialize()  # the SVD of the rounded weights would not find W's minor components
    # the full-precision model, as svd_weights= in network_args: one file, or a folder of shards (diffusers)
    tensors = {f"{n}.weight": w for n, w in full.items()}
    if storage == "pre_hook":
        source = tmp_path / "full.safetensors"
        save_file(tensors, str(source))
    else:
        source = tmp_path / "transformer"
        source.mkdir()
        keys = sorted(tensors)
        for j, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
            save_file({k: tensors[k] for k in part}, str(source / f"model-0000{j + 1}-of-00002.safetensors"))
    q.set_svd_weights(str(source))
    with pytest.raises(FileNotFoundError, match="svd_weights .*nope"):  # a wrong path fails before any work
        make(tiny(), "minor", svd_weights=str(tmp_path / "nope.safetensors"))
    q.initialize()
    perturb(q, seed=6)
    a, b = _state(ref), _state(q)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same SVD, same factors

    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    worst_change = worst_out = 0.0
    with torch.no_grad():
        for lo_ref, lo_q in zip(ref.unet_loras, q.unet_loras):
            m_ref, m_q = lo_ref.org_module_ref[0], lo_q.org_module_ref[0]
            y_ref, y_q = m_ref(x), m_q(x)
            for net in (ref, q):
                net.set_enabled(False)
            base_ref, base_q = m_ref(x), m_q(x)
            for net in (ref, q):
                net.set_enabled(True)
            assert m_q.weight.dtype == torch.float8_e4m3fn  # stored in fp8 again after each call
            stored_bias = None if m_q.bias is None else m_q.bias.float()  # layerwise casting stores it in fp8 too
            # what fp8 storage changes in the base output
            rounding = F.linear(x, m_q.weight.float(), stored_bias) - F.linear(x, m_ref.weight, m_ref.bias)
            worst_change = max(worst_change, ((y_q - base_q) - (y_ref - base_ref)).abs().max().item())
            worst_out = max(worst_out, (y_q - y_ref - rounding).abs().max().item())
            assert rounding.abs().max() > 1e-4  # fp8 really rounded the base
    print(f"fp8 base ({storage}): adapter change vs fp32 base {worst_change:.2e}; output minus fp8 rounding "
          f"{worst_out:.2e}")
    assert worst_change < 1e-5 and worst_out < 1e-5
