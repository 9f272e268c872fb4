"""LoRA file tools (networks.inspect_lora / convert_lora / merge_lora / extract_lora) on the tiny FLUX.1."""

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from networks import convert_lora, extract_lora, inspect_lora, lora_files, merge_lora
from networks.minor_lora import TARGET_PRESETS, bfl_row_sizes, create_network, lora_delta_weights

URAE_RE = re.compile(TARGET_PRESETS["urae"])
TOL = 1e-6


@pytest.fixture(scope="module")
def base(tiny_flux_dir):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def shapes(base):
    return {n: (m.out_features, m.in_features) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}


def urae_names(shapes):
    return sorted(n for n in shapes if URAE_RE.match(n))


def peft_lora(shapes, names, rank=4, seed=0, alphas=None):
    """A PEFT-form LoRA with random non-zero factors; alphas per module name (default: rank)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in names:
        out, inn = shapes[n]
        sd[f"transformer.{n}.lora_A.weight"] = torch.randn(rank, inn, generator=g) * 0.1
        sd[f"transformer.{n}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
        sd[f"transformer.{n}.alpha"] = torch.tensor(float((alphas or {}).get(n, rank)))
    return sd


def deltas(sd, shapes):
    return lora_delta_weights(sd, shapes)


def assert_same_deltas(a, b, tol=TOL):
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=tol, rtol=0), (n, (a[n] - b[n]).abs().max())


def bfl_shapes(path):
    with lora_files.Checkpoint(path) as ck:
        return ck.linear_shapes()


def to_diffusers_deltas(bfl_deltas):
    """Split dense BFL-layout deltas into diffusers names (the slices a fused weight concatenates)."""
    from networks.minor_lora import bfl_equivalents
    from urae.flux_keys import linear_pairs

    out, globals_ = {}, dict(linear_pairs(0, 0))
    for m, d in bfl_deltas.items():
        if m == "final_layer.adaLN_modulation.1":  # diffusers' norm_out.linear has the halves swapped
            out["norm_out.linear"] = torch.cat(d.chunk(2)[::-1])
            continue
        eq = bfl_equivalents(m) or globals_.get(m, [m])
        pos = 0
        for name, size in zip(eq, bfl_row_sizes(m, *d.shape) if len(eq) > 1 else [d.shape[0]]):
            if d[pos: pos + size].any():
                out[name] = d[pos: pos + size]
            pos += size
    return out


def run(mod, args, capsys):
    rc = mod.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def test_inspect_reports_form_ranks_scales_targets(tmp_path, shapes, capsys):
    names = urae_names(shapes)
    assert len(names) == 2 * 4 + 2 * 3
    sd = peft_lora(shapes, names, rank=4, alphas={n: 2.0 for n in names})
    save_file(sd, tmp_path / "p.safetensors", {"ss_network_dim": "4"})
    info = inspect_lora.describe(tmp_path / "p.safetensors")
    assert info["form"] == "peft" and info["layout"] == "diffusers"
    assert info["modules"] == 14 and info["ranks"] == {4: 14} and info["scales"] == {"0.5": 14}
    assert info["urae_layers"] == 14 and info["other_layers"] == 0 and info["dtypes"] == {"float32": 28}
    assert info["ss_metadata"] == {"ss_network_dim": "4"}

    k, meta = convert_lora.to_kohya(sd, {})
    save_file(k, tmp_path / "k.safetensors", meta)
    rc, out, _ = run(inspect_lora, [tmp_path / "k.safetensors", "--json"], capsys)
    info = json.loads(out)
    # 2 x (qkv, proj) + 2 x linear1; the fused ones still cover q, k, v each.
    assert rc == 0 and info["form"] == "kohya" and info["layout"] == "bfl"
    assert info["modules"] == 6 and info["fused_modules"] == 4 and info["urae_layers"] == 14
    assert info["ranks"] == {"4": 2, "12": 4}


def test_inspect_counts_the_190_urae_layers_of_flux1_and_reads_our_metadata(tmp_path, base, capsys):
    names = [f"transformer_blocks.{i}.attn.{p}" for i in range(19) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    names += [f"single_transformer_blocks.{i}.attn.{p}" for i in range(38) for p in ("to_q", "to_k", "to_v")]
    sd = peft_lora({n: (2, 3) for n in names}, names, rank=1)
    save_file(sd, tmp_path / "full.safetensors")
    rc, out, _ = run(inspect_lora, [tmp_path / "full.safetensors"], capsys)
    assert rc == 0 and "190 URAE layers (the full FLUX.1 URAE set)" in out

    net = create_network(1.0, 4, 4, None, None, base, init="minor", verbose="False",
                         runtime='{"ntk_factor": 10, "proportional_attention": true}')
    net.save_weights(tmp_path / "ours.safetensors", torch.float16, {"ss_output_name": "x"})
    info = inspect_lora.describe(tmp_path / "ours.safetensors")
    assert info["form"] == "ours" and info["urae_layers"] == 14
    assert info["ranks"] == {8: 14}  # rank-r minor adapter saved as an exact rank-2r LoRA
    assert info["urae_metadata"]["urae_init"] == "minor" and info["urae_metadata"]["urae_rank"] == "4"
    assert info["urae_metadata"]["urae_runtime"] == {"ntk_factor": 10, "proportional_attention": True}
    assert info["ss_metadata"]["ss_network_module"] == "networks.minor_lora"
    assert info["dtypes"] == {"float16": 28}


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------


def test_convert_peft_kohya_peft_is_lossless(tmp_path, shapes, tiny_bfl_checkpoint, capsys):
    names = urae_names(shapes) + ["single_transformer_blocks.1.proj_mlp", "transformer_blocks.0.ff.net.2",
                                  "norm_out.linear", "x_embedder"]
    alphas = {n: (1.0 + i % 3) for i, n in enumerate(names)}  # different scales within one fused qkv
    sd = peft_lora(shapes, names, rank=3, alphas=alphas)
    save_file(sd, tmp_path / "p.safetensors", {"ss_network_dim": "3", "urae_runtime": "{}"})
    rc, out, _ = run(convert_lora, [tmp_path / "p.safetensors", tmp_path / "k.safetensors", "--to", "kohya"], capsys)
    assert rc == 0 and "peft LoRA" in out
    k = load_file(tmp_path / "k.safetensors")
    assert all(key.startswith("lora_unet_") for key in k)
    assert k["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (32 * 3 + 128, 12)  # q, k, v, mlp ranks
    # The kohya file applies the same ΔW to every q/k/v (and MLP) slice of the fused BFL weights.
    assert_same_deltas(to_diffusers_deltas(deltas(k, bfl_shapes(tiny_bfl_checkpoint))), deltas(sd, shapes))

    rc, _, _ = run(convert_lora, [tmp_path / "k.safetensors", tmp_path / "p2.safetensors", "--to", "peft"], capsys)
    assert rc == 0
    p2 = load_file(tmp_path / "p2.safetensors")
    assert sorted(p2) == sorted(sd)
    assert_same_deltas(deltas(p2, shapes), deltas(sd, shapes))
    for key in sd:  # the recorded split gives back the very factors
        assert torch.allclose(p2[key], sd[key], atol=TOL), key
    with safe_open(str(tmp_path / "p2.safetensors"), "pt") as f:
        assert f.metadata() == {"ss_network_dim": "3", "urae_runtime": "{}"}

    # Without the recorded split a block-diagonal up is split by its columns: same ΔW.
    p3, _ = convert_lora.to_peft(k, {})
    assert_same_deltas(deltas(p3, shapes), deltas(sd, shapes))


def test_minor_lora_file_round_trip_through_kohya_still_resumes(tmp_path, base, capsys):
    from networks.minor_lora import create_network_from_weights

    net = create_network(1.0, 4, 4, None, None, base, init="minor", verbose="False")
    net.initialize()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.save_weights(tmp_path / "ours.safetensors", None, {"ss_output_name": "x"})
    for src, dst, form in (("ours", "k", "kohya"), ("k", "back", "peft")):
        assert run(convert_lora, [tmp_path / f"{src}.safetensors", tmp_path / f"{dst}.safetensors", "--to", form],
                   capsys)[0] == 0
    net2, _ = create_network_from_weights(1.0, str(tmp_path / "back.safetensors"), None, None, base)
    assert net2.init == "minor"  # the layout matches again, so the recorded structure is used
    assert_same_deltas(net2.delta_weights(), net.delta_weights())
    with safe_open(str(tmp_path / "back.safetensors"), "pt") as f, safe_open(str(tmp_path / "ours.safetensors"), "pt") as g:
        assert f.metadata()["sshs_model_hash"] == g.metadata()["sshs_model_hash"]  # the very same tensors again


def test_convert_refuses_a_fused_lora_that_is_not_block_diagonal(tmp_path, tiny_bfl_checkpoint, capsys):
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 32),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 4),
          "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}
    save_file(sd, tmp_path / "dense.safetensors")
    rc, _, err = run(convert_lora, [tmp_path / "dense.safetensors", tmp_path / "o.safetensors", "--to", "peft"], capsys)
    assert rc == 2 and "not block-diagonal" in err and "4 of its 4 ranks" in err
    assert not (tmp_path / "o.safetensors").exists()
    # ... while it stays usable as it is: merge_lora applies it.
    rc, _, _ = run(merge_lora, [tiny_bfl_checkpoint, tmp_path / "m.safetensors", "--lora", tmp_path / "dense.safetensors",
                                "--no-progress"], capsys)
    assert rc == 0


def _minor(w, r):
    """Reference minor component (full fp64 SVD, as the official code does in fp32)."""
    u, s, vh = torch.linalg.svd(w.double())
    return u[:, -r:] * s[-r:].sqrt(), s[-r:].sqrt()[:, None] * vh[-r:]


def _official_file(path, base_weights, r, seed):
    """An official-format 4K adapter trained from the minor init; returns the true ΔW per layer."""
    g = torch.Generator().manual_seed(seed)
    sd, true = {}, {}
    for name, w in base_weights.items():
        b0, a0 = _minor(w, r)
        a = a0 + 0.05 * torch.randn(a0.shape, generator=g, dtype=torch.float64)
        b = b0 + 0.05 * torch.randn(b0.shape, generator=g, dtype=torch.float64)
        blk, proj = re.match(r"(.+)\.attn\.(to_q|to_k|to_v|to_out)", name).groups()
        sd[f"{blk}.attn.processor.{proj}_a.weight"] = a.float().contiguous()
        sd[f"{blk}.attn.processor.{proj}_b.weight"] = b.float().contiguous()
        true[name] = (b.float() @ a.float() - b0 @ a0).float()
    save_file(sd, path)
    return true


def test_import_official_urae_4k_adapter(tmp_path, base, shapes, tiny_flux_dir, tiny_bfl_checkpoint, capsys):
    names = urae_names(shapes)
    weights = {n: base.get_submodule(n).weight.detach() for n in names}
    true = _official_file(tmp_path / "urae_4k.safetensors", weights, r=2, seed=1)
    info = inspect_lora.describe(tmp_path / "urae_4k.safetensors")
    assert info["form"] == "urae-official" and info["urae_layers"] == 14 and info["ranks"] == {2: 14}

    rc, out, _ = run(convert_lora, [tmp_path / "urae_4k.safetensors", tmp_path / "std.safetensors",
                                    "--from-urae-official", "--base", tiny_flux_dir], capsys)
    assert rc == 0 and "official URAE adapter, 14 modules" in out
    got = deltas(load_file(tmp_path / "std.safetensors"), shapes)
    assert_same_deltas(got, true, tol=1e-5)

    # On top of a 2K LoRA: the minor part is taken of W + ΔW_2K, and the output holds ΔW_2K + ΔW_4K.
    lora2k = peft_lora(shapes, names, rank=3, seed=2)
    save_file(lora2k, tmp_path / "urae_2k.safetensors")
    d2k = deltas(lora2k, shapes)
    true = _official_file(tmp_path / "urae_4k.safetensors", {n: weights[n] + d2k[n] for n in names}, r=2, seed=3)
    rc, _, _ = run(convert_lora, [tmp_path / "urae_4k.safetensors", tmp_path / "std2.safetensors",
                                  "--from-urae-official", "--base", tiny_bfl_checkpoint,
                                  "--base-lora", tmp_path / "urae_2k.safetensors", "--to", "kohya"], capsys)
    assert rc == 0
    got = to_diffusers_deltas(deltas(load_file(tmp_path / "std2.safetensors"), bfl_shapes(tiny_bfl_checkpoint)))
    assert_same_deltas(got, {n: true[n] + d2k[n] for n in names}, tol=1e-5)
    # A rank-2 minor adapter on top of a rank-3 2K LoRA: an exact rank 2 + 2 + 3 LoRA per slice.
    with safe_open(str(tmp_path / "std2.safetensors"), "pt") as f:
        assert f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight").shape == (21, 32)


# --------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------


def test_merge_into_diffusers_folder_equals_base_plus_delta_and_merge_to(tmp_path, base, shapes, tiny_flux_dir,
                                                                        capsys):
    from diffusers import FluxTransformer2DModel

    from networks.minor_lora import create_network_from_weights

    names = urae_names(shapes) + ["single_transformer_blocks.0.proj_mlp"]
    sd = peft_lora(shapes, names, rank=4, alphas={n: 8.0 for n in names})
    save_file(sd, tmp_path / "a.safetensors")
    out = tmp_path / "merged"
    rc, stdout, _ = run(merge_lora, [tiny_flux_dir, out, "--lora", f"{tmp_path / 'a.safetensors'}:0.5",
                                     "--no-progress"], capsys)
    assert rc == 0 and "15 weights changed" in stdout
    assert (out / "model_index.json").is_file() and (out / "vae" / "config.json").is_file()
    merged = FluxTransformer2DModel.from_pretrained(out, subfolder="transformer").state_dict()
    d = deltas(sd, shapes)
    for key, w in base.state_dict().items():
        n = key[: -len(".weight")]
        expected = w + 0.5 * d[n] if n in d else w
        assert torch.allclose(merged[key], expected, atol=TOL, rtol=0), key
    # sd-scripts' path: the network built from the file merged into the loaded model.
    ref = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    net, weights = create_network_from_weights(0.5, str(tmp_path / "a.safetensors"), None, None, ref)
    net.merge_to(None, ref, weights)
    for key, w in ref.state_dict().items():
        assert torch.allclose(merged[key], w, atol=TOL, rtol=0), key


def test_merge_into_sharded_transformer_folder(tmp_path, base, shapes, capsys):
    from diffusers import FluxTransformer2DModel

    src = tmp_path / "transformer"
    base.save_pretrained(src, max_shard_size="100KB")
    copy.deepcopy(base).half().save_pretrained(src, variant="fp16")  # a variant copy must not survive unmerged
    shards = sorted(p.name for p in src.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2
    names = urae_names(shapes)
    sd = peft_lora(shapes, names, rank=2, seed=9)
    # kohya form with diffusers names (some trainers write these) plus a text-encoder module.
    k = {f"lora_unet_{key[len('transformer.'):].replace('.lora_A.weight', '').replace('.', '_')}.lora_down.weight": v
         for key, v in sd.items() if key.endswith("lora_A.weight")}
    k |= {key.replace("lora_down", "lora_up"): sd[f"transformer.{n}.lora_B.weight"]
          for key, n in zip(list(k), names)}
    k["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 32)
    k["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(37, 2)
    save_file(k, tmp_path / "k.safetensors")
    info = inspect_lora.describe(tmp_path / "k.safetensors")
    assert info["form"] == "kohya" and info["urae_layers"] == 14 and info["text_encoder_modules"] == 1
    rc, _, err = run(merge_lora, [src, tmp_path / "out", "--lora", tmp_path / "k.safetensors", "--save_dtype", "bf16",
                                  "--no-progress"], capsys)
    assert rc == 0 and "1 text-encoder modules are not merged" in err and "fp16" in err, err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in base.state_dict().values())
    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    assert {v.dtype for f in shards for v in load_file(tmp_path / "out" / f).values()} == {torch.bfloat16}
    d = deltas(sd, shapes)
    for key, w in base.state_dict().items():
        n = key[: -len(".weight")]
        assert torch.equal(merged[key], (w + d[n] if n in d else w).bfloat16()), key


def test_merge_into_bfl_single_file_keeps_layout_and_dtype(tmp_path, base, shapes, tiny_flux_dir,
                                                           tiny_bfl_checkpoint, capsys):
    from urae.loading import load_transformer

    names = urae_names(shapes)
    sd1, sd2 = peft_lora(shapes, names, rank=2, seed=4), peft_lora(shapes, names[:5], rank=3, seed=5)
    save_file(sd1, tmp_path / "p.safetensors")
    k, meta = convert_lora.to_kohya(sd2, {})
    save_file(k, tmp_path / "k.safetensors", meta)
    out = tmp_path / "merged.safetensors"
    rc, _, _ = run(merge_lora, [tiny_bfl_checkpoint, out, "--lora", tmp_path / "p.safetensors",
                                "--lora", f"{tmp_path / 'k.safetensors'}:-2", "--no-progress"], capsys)
    assert rc == 0
    with safe_open(str(out), "pt") as f, safe_open(str(tiny_bfl_checkpoint), "pt") as g:
        assert list(f.keys()) == list(g.keys())  # same BFL names, same order
    merged = load_transformer(str(tiny_flux_dir), str(out), dtype="fp32").state_dict()
    d1, d2 = deltas(sd1, shapes), deltas(sd2, shapes)
    for key, w in base.state_dict().items():
        n = key[: -len(".weight")]
        expected = w + d1.get(n, 0) - 2 * d2.get(n, 0)
        assert torch.allclose(merged[key], expected, atol=TOL, rtol=0), key

    rc, _, _ = run(merge_lora, [tiny_bfl_checkpoint, tmp_path / "bf16.safetensors", "--lora", tmp_path / "p.safetensors",
                                "--save_dtype", "bf16", "--no-progress"], capsys)
    assert rc == 0
    half = load_file(tmp_path / "bf16.safetensors")
    assert {v.dtype for v in half.values()} == {torch.bfloat16}
    full = load_file(tmp_path / "merged.safetensors")
    key = "double_blocks.0.img_attn.proj.weight"
    assert torch.allclose(half[key].float(), (full[key] + 2 * to_bfl(d2, key)).bfloat16().float(), atol=0)


def to_bfl(d, key):
    """The dense delta of one BFL weight made of diffusers deltas (only the proj case is needed here)."""
    idx = re.match(r"double_blocks\.(\d+)\.img_attn\.proj\.weight", key).group(1)
    return d.get(f"transformer_blocks.{idx}.attn.to_out.0", 0)


def test_lora_only_combine_is_the_sum_of_deltas(tmp_path, shapes, capsys):
    names = urae_names(shapes)
    sd1 = peft_lora(shapes, names, rank=4, seed=6, alphas={n: 2.0 for n in names})
    sd2 = peft_lora(shapes, names[3:], rank=2, seed=7)
    save_file(sd1, tmp_path / "a.safetensors")
    k, meta = convert_lora.to_kohya(sd2, {})
    save_file(k, tmp_path / "b.safetensors", meta)
    rc, out, _ = run(merge_lora, ["--lora-only", tmp_path / "ab.safetensors", "--lora",
                                  f"{tmp_path / 'a.safetensors'}:0.7", "--lora", f"{tmp_path / 'b.safetensors'}:-1.5"],
                     capsys)
    assert rc == 0 and "combining 2 LoRA files" in out
    ab = load_file(tmp_path / "ab.safetensors")
    assert ab[f"transformer.{names[5]}.lora_A.weight"].shape[0] == 6  # ranks add
    d1, d2, d = deltas(sd1, shapes), deltas(sd2, shapes), deltas(ab, shapes)
    assert_same_deltas(d, {n: 0.7 * d1[n] - 1.5 * d2.get(n, 0) for n in names})
    # kohya output: the same sum, fused per BFL module.
    combined, _ = merge_lora.combine_loras([(tmp_path / "a.safetensors", 0.7), (tmp_path / "b.safetensors", -1.5)],
                                           "kohya")
    assert all(key.startswith("lora_unet_") for key in combined)
    assert_same_deltas(deltas(convert_lora.to_peft(combined, {})[0], shapes), d)


# --------------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------------


def test_extract_recovers_a_low_rank_delta_exactly_and_loads_in_diffusers(tmp_path, shapes, tiny_flux_dir,
                                                                         tiny_bfl_checkpoint, capsys):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    names = urae_names(shapes)
    sd = peft_lora(shapes, names, rank=3, seed=8)
    save_file(sd, tmp_path / "true.safetensors")
    tuned = tmp_path / "tuned"
    assert run(merge_lora, [tiny_flux_dir, tuned, "--lora", tmp_path / "true.safetensors", "--no-progress"],
               capsys)[0] == 0
    # Tuned as a diffusers folder, base as a BFL single file: layouts may differ.
    rc, out, _ = run(extract_lora, [tuned, tiny_bfl_checkpoint, tmp_path / "x.safetensors", "--rank", 3,
                                    "--report", tmp_path / "err.json", "--no-progress"], capsys)
    assert rc == 0 and "14 layers" in out
    errors = json.loads((tmp_path / "err.json").read_text())
    assert sorted(errors) == names and max(e["error"] for e in errors.values()) < 1e-6
    x = load_file(tmp_path / "x.safetensors")
    assert_same_deltas(deltas(x, shapes), deltas(sd, shapes), tol=1e-5)

    # The full fp64 SVD gives the same factors' product; a rank below the delta's rank is an
    # approximation, and the report says how far off it is (the same for both methods).
    x2, _, errs = extract_lora.extract(tuned, tiny_flux_dir, 3, progress=False, method="exact")
    assert max(e for _, e, _ in errs) < 1e-6
    assert_same_deltas(deltas(x2, shapes), deltas(sd, shapes), tol=1e-5)
    _, _, fast = extract_lora.extract(tuned, tiny_flux_dir, 1, progress=False)
    _, _, exact = extract_lora.extract(tuned, tiny_flux_dir, 1, progress=False, method="exact")
    assert min(e for _, e, _ in fast) > 0.05
    assert all(abs(a[1] - b[1]) < 1e-3 * b[1] for a, b in zip(fast, exact))

    # diffusers' own loader applies the extracted file: the fused pipeline equals the tuned model.
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(str(tmp_path / "x.safetensors"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    want = FluxTransformer2DModel.from_pretrained(tuned, subfolder="transformer").state_dict()
    for key, w in pipe.transformer.state_dict().items():
        assert torch.allclose(w, want[key], atol=1e-5, rtol=0), key


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors_and_no_output(tmp_path, shapes, tiny_flux_dir, tiny_bfl_checkpoint, capsys):
    good = peft_lora(shapes, urae_names(shapes), rank=2)
    save_file(good, tmp_path / "good.safetensors")
    raw = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    nan = dict(good)
    nan["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.full((32, 2), float("nan"))
    save_file(nan, tmp_path / "nan.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)},
              tmp_path / "sd15.safetensors")
    wide = peft_lora({n: (2 * o, 2 * i) for n, (o, i) in shapes.items()}, urae_names(shapes), rank=2)
    save_file(wide, tmp_path / "wide.safetensors")
    o = tmp_path / "out.safetensors"
    cases = [
        (inspect_lora, [tmp_path / "missing.safetensors"], "no such file"),
        (inspect_lora, [tmp_path / "trunc.safetensors"], "truncated or corrupt"),
        (inspect_lora, [tmp_path / "nan.safetensors"], "NaN"),
        (inspect_lora, [tmp_path / "sd15.safetensors"], "LoRA for another model"),
        (convert_lora, [tmp_path / "sd15.safetensors", o, "--to", "kohya"], "LoRA for another model"),
        (convert_lora, [tmp_path / "nan.safetensors", o, "--to", "kohya"], "NaN"),
        (convert_lora, [tmp_path / "good.safetensors", o, "--from-urae-official", "--base", tiny_flux_dir],
         "not an official URAE adapter"),
        (merge_lora, [tiny_bfl_checkpoint, o, "--lora", tmp_path / "wide.safetensors"], "shape mismatch"),
        (merge_lora, [tiny_bfl_checkpoint, o, "--lora", tmp_path / "sd15.safetensors"], "LoRA for another model"),
        (merge_lora, [tiny_bfl_checkpoint, o, "--lora", tmp_path / "trunc.safetensors"], "truncated or corrupt"),
        (merge_lora, [tmp_path / "trunc.safetensors", o, "--lora", tmp_path / "good.safetensors"],
         "truncated or corrupt"),
        (merge_lora, [tmp_path / "nope", o, "--lora", tmp_path / "good.safetensors"], "no such file"),
        (merge_lora, [tiny_bfl_checkpoint, o, "--lora", tmp_path / "nan.safetensors"], "NaN"),
        (merge_lora, ["--lora-only", o, "--lora", tmp_path / "good.safetensors", "--lora", tmp_path / "wide.safetensors"],
         "different models"),
        (extract_lora, [tiny_bfl_checkpoint, tiny_flux_dir, o, "--rank", 2], "identical weights"),
        (extract_lora, [tmp_path / "good.safetensors", tiny_flux_dir, o, "--rank", 2], "not a FLUX transformer"),
    ]
    for mod, args, message in cases:
        rc, _, err = run(mod, args + (["--no-progress"] if mod in (merge_lora, extract_lora) else []), capsys)
        assert rc == 2 and message in err, (mod.__name__, args, err)
        assert not o.exists() and not list(tmp_path.glob(".out*")), (mod.__name__, args)
    # A merge into a folder that fails part-way leaves neither the folder nor its temporary sibling.
    rc, _, err = run(merge_lora, [tiny_flux_dir, tmp_path / "m", "--lora", tmp_path / "wide.safetensors"], capsys)
    assert rc == 2 and not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
