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


def trained_minor(net, step):
    """A minor-init network as after some training: its trained factors moved away from the frozen copies."""
    net.initialize()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lo in net.unet_loras:  # not registered as submodules before apply_to, so not in net.parameters()
            for p in [*lo.lora_down, *lo.lora_up]:
                p.add_(step * torch.randn(p.shape, generator=g))
    assert min(d.norm() for d in net.delta_weights().values()) > step / 10


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
    assert info["form"] == "peft" and info["written_by"] == "minor_lora" and info["urae_layers"] == 14
    assert info["ranks"] == {8: 14}  # rank-r minor adapter saved as an exact rank-2r LoRA
    assert info["urae_metadata"]["urae_init"] == "minor" and info["urae_metadata"]["urae_rank"] == "4"
    assert info["urae_metadata"]["urae_runtime"] == {"ntk_factor": 10, "proportional_attention": True}
    assert info["ss_metadata"]["ss_network_module"] == "networks.minor_lora"
    assert info["dtypes"] == {"float16": 28}


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------


def test_inspect_into_a_closed_pipe_is_not_an_error(tmp_path, shapes):
    """`inspect_lora FILE | head`: the reader has gone before the report is written; quiet, exit 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    save_file(peft_lora(shapes, urae_names(shapes)), tmp_path / "p.safetensors")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "networks.inspect_lora", str(tmp_path / "p.safetensors")],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # closed before the tool (still importing torch) writes a line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err


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
    trained_minor(net, 0.01)
    net.save_weights(tmp_path / "ours.safetensors", None, {"ss_output_name": "x"})
    for src, dst, form in (("ours", "k", "kohya"), ("k", "back", "peft")):
        assert run(convert_lora, [tmp_path / f"{src}.safetensors", tmp_path / f"{dst}.safetensors", "--to", form],
                   capsys)[0] == 0
    rc, out, _ = run(inspect_lora, [tmp_path / "k.safetensors"], capsys)
    assert rc == 0 and out.startswith(f"{tmp_path / 'k.safetensors'}: kohya LoRA (bfl layout, written by minor_lora, "
                                      f"converted from its diffusers layout)"), out
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


def test_merge_counts_only_weights_that_actually_changed(tmp_path, shapes, tiny_bfl_checkpoint, capsys):
    names = urae_names(shapes)
    save_file(peft_lora(shapes, names, rank=2, seed=1), tmp_path / "p.safetensors")
    rc, stdout, _ = run(merge_lora, [tiny_bfl_checkpoint, tmp_path / "zero.safetensors", "--lora",
                                     f"{tmp_path / 'p.safetensors'}:0", "--no-progress"], capsys)
    merged, src = load_file(tmp_path / "zero.safetensors"), load_file(tiny_bfl_checkpoint)
    assert rc == 0 and all(torch.equal(merged[k], src[k]) for k in src)
    assert "0 weights changed" in stdout and "came out bit-identical" in stdout, stdout
    rc, stdout, _ = run(merge_lora, [tiny_bfl_checkpoint, tmp_path / "one.safetensors", "--lora",
                                     f"{tmp_path / 'p.safetensors'}:1", "--no-progress"], capsys)
    changed = sum(not torch.equal(v, src[k]) for k, v in load_file(tmp_path / "one.safetensors").items())
    assert rc == 0 and changed > 0 and f"wrote {tmp_path / 'one.safetensors'}: {changed} weights changed" in stdout
    assert "bit-identical" not in stdout


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
    # A rank above the layers' smaller side is capped there, and the run says so.
    rc, out, _ = run(extract_lora, [tuned, tiny_flux_dir, tmp_path / "big.safetensors", "--rank", 100,
                                    "--no-progress"], capsys)
    side = min(min(shapes[n]) for n in names)
    assert rc == 0 and f"written at rank {side}, not 100" in out and f"rank-{side} LoRA" in out, out
    with safe_open(str(tmp_path / "big.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] == str(side)
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


# --------------------------------------------------------------------------------------------
# one error style, interrupts, outputs
# --------------------------------------------------------------------------------------------


def test_no_import_loop_between_the_networks_modules():
    import ast
    from pathlib import Path

    folder = Path(merge_lora.__file__).parent
    graph = {}
    for f in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("networks."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "networks":
                deps |= {a.name for a in node.names}
        graph[f.stem] = deps
    assert graph["lora_files"] <= {"minor_lora"} and graph["minor_lora"] == set()

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m)] == []


def test_user_mistakes_are_one_line_and_exit_2_while_bugs_keep_their_traceback(tmp_path, capsys):
    import subprocess
    import sys

    def bug():
        raise ValueError("internal inconsistency")

    with pytest.raises(ValueError, match="internal inconsistency"):
        lora_files.run_cli(bug)
    assert lora_files.run_cli(lambda: (_ for _ in ()).throw(lora_files.UserError("bad input"))) == 2
    assert capsys.readouterr().err == "error: bad input\n"
    r = subprocess.run([sys.executable, "-m", "networks.merge_lora", str(tmp_path / "nope"), str(tmp_path / "o"),
                        "--lora", str(tmp_path / "missing.safetensors")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.safetensors: no such LoRA file" in r.stderr
    rc, _, err = run(extract_lora, [tmp_path / "nope", tmp_path / "nope", tmp_path / "x.safetensors", "--rank", 1],
                     capsys)
    assert rc == 2 and err == f"error: {tmp_path / 'nope'}: no such file or folder\n"


def test_a_misspelt_target_preset_gets_a_did_you_mean(tmp_path, tiny_flux_dir, tiny_bfl_checkpoint, capsys):
    rc, _, err = run(extract_lora, [tiny_flux_dir, tiny_bfl_checkpoint, tmp_path / "x.safetensors", "--rank", 1,
                                    "--targets", "urea", "--no-progress"], capsys)
    assert rc == 2 and "matches none of the" in err and "(did you mean 'urae'?)" in err


_SLOW_MERGE = """
import sys, time
from networks import merge_lora

original, calls = merge_lora._merged, []


def merged(*args):
    calls.append(1)
    if len(calls) == 3:  # two tensors are in the temporary output: the signal arrives mid-write
        print("writing", flush=True)
        time.sleep(120)
    return original(*args)


merge_lora._merged = merged
sys.exit(merge_lora.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signame, folder", [("SIGTERM", False), ("SIGINT", True)])
def test_merge_interrupted_by_a_signal_removes_its_partial_output(tmp_path, shapes, tiny_flux_dir,
                                                                  tiny_bfl_checkpoint, signame, folder):
    import os
    import signal
    import subprocess
    import sys
    import threading
    from pathlib import Path

    save_file(peft_lora(shapes, urae_names(shapes), rank=2), tmp_path / "a.safetensors")
    out = tmp_path / ("merged" if folder else "merged.safetensors")
    model = tiny_flux_dir if folder else tiny_bfl_checkpoint
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, str(model), str(out), "--lora",
                             str(tmp_path / "a.safetensors"), "--no-progress"],
                            cwd=Path(merge_lora.__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    watchdog = threading.Timer(120, proc.kill)  # a merge that never reaches the write must not hang the suite
    watchdog.start()
    try:
        while (line := proc.stdout.readline()) and line.strip() != "writing":
            pass
        assert line.strip() == "writing", proc.stderr.read()
        assert list(tmp_path.glob(f".{out.name}*")), "the merge writes to a temporary name"
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + getattr(signal, signame)
    assert err == f"interrupted by {signame}: stopped; no partial output is left\n"
    assert not out.exists() and os.listdir(tmp_path) == ["a.safetensors"]


def test_merge_checks_free_space_before_any_work(tmp_path, shapes, tiny_bfl_checkpoint, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    save_file(peft_lora(shapes, urae_names(shapes), rank=2), tmp_path / "a.safetensors")
    size = tiny_bfl_checkpoint.stat().st_size
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - size // 2, size // 2))
    rc, _, err = run(merge_lora, [tiny_bfl_checkpoint, tmp_path / "m.safetensors", "--lora", tmp_path / "a.safetensors",
                                  "--no-progress"], capsys)
    assert rc == 2 and f"needs about {size / 1e6:.1f} MB beside the output" in err
    assert lora_files.human_size(23.8e9) == "23.8 GB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_one_overwrite_rule_for_files_and_folders_and_a_trailing_slash_means_a_folder(
        tmp_path, shapes, tiny_flux_dir, tiny_bfl_checkpoint, capsys):
    save_file(peft_lora(shapes, urae_names(shapes), rank=2), tmp_path / "a.safetensors")
    lora = ["--lora", tmp_path / "a.safetensors", "--no-progress"]
    # The README's `merged/` with a single-file model: a file of the model's name inside that folder.
    rc, out, _ = run(merge_lora, [tiny_bfl_checkpoint, f"{tmp_path / 'merged'}/", *lora], capsys)
    inside = tmp_path / "merged" / tiny_bfl_checkpoint.name
    assert rc == 0 and inside.is_file() and f"wrote {inside}" in out
    for target in (f"{tmp_path / 'merged'}/", tmp_path / "merged", inside):
        rc, _, err = run(merge_lora, [tiny_bfl_checkpoint, target, *lora], capsys)
        assert rc == 2 and f"{inside} already exists; pass --overwrite to replace it" in err
    inside.write_bytes(b"old")
    assert run(merge_lora, [tiny_bfl_checkpoint, inside, *lora, "--overwrite"], capsys)[0] == 0
    assert load_file(inside).keys() == load_file(tiny_bfl_checkpoint).keys()

    # A diffusers folder gives a folder: refused when it exists, replaced as a whole with --overwrite.
    folder = tmp_path / "folder"
    (folder / "stale").mkdir(parents=True)
    rc, _, err = run(merge_lora, [tiny_flux_dir, folder, *lora], capsys)
    assert rc == 2 and "already exists; pass --overwrite" in err and (folder / "stale").is_dir()
    assert run(merge_lora, [tiny_flux_dir, folder, *lora, "--overwrite"], capsys)[0] == 0
    assert (folder / "model_index.json").is_file() and not (folder / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "folder", "merged"]
    rc, _, err = run(merge_lora, [tiny_flux_dir, tmp_path / "x.safetensors", *lora], capsys)
    assert rc == 2 and "the output is one too; give a folder name" in err

    # The LoRA-writing tools follow the same rule.
    o = tmp_path / "k.safetensors"
    assert run(convert_lora, [tmp_path / "a.safetensors", o, "--to", "kohya"], capsys)[0] == 0
    rc, _, err = run(convert_lora, [tmp_path / "a.safetensors", o, "--to", "kohya"], capsys)
    assert rc == 2 and "already exists; pass --overwrite" in err
    assert run(convert_lora, [tmp_path / "a.safetensors", o, "--to", "kohya", "--overwrite"], capsys)[0] == 0
    rc, _, err = run(merge_lora, ["--lora-only", o, "--lora", tmp_path / "a.safetensors"], capsys)
    assert rc == 2 and "already exists; pass --overwrite" in err
    rc, _, err = run(extract_lora, [inside, tiny_bfl_checkpoint, o, "--rank", 2, "--no-progress"], capsys)
    assert rc == 2 and "already exists; pass --overwrite" in err
    rc, _, err = run(convert_lora, [tmp_path / "a.safetensors", f"{tmp_path}/", "--to", "peft"], capsys)
    assert rc == 2 and "output would overwrite an input" in err


# --------------------------------------------------------------------------------------------
# what the numbers mean: rounding floor, 2r ranks, refreshed metadata
# --------------------------------------------------------------------------------------------


def test_extract_reports_the_rounding_floor_of_bf16_weights_beside_its_error(tmp_path, shapes, tiny_bfl_checkpoint,
                                                                             capsys):
    names = urae_names(shapes)
    sd = peft_lora(shapes, names, rank=3, seed=11)
    save_file(sd, tmp_path / "true.safetensors")
    tuned = tmp_path / "tuned.safetensors"
    assert run(merge_lora, [tiny_bfl_checkpoint, tuned, "--lora", tmp_path / "true.safetensors", "--save_dtype", "bf16",
                            "--no-progress"], capsys)[0] == 0
    rc, out, _ = run(extract_lora, [tuned, tiny_bfl_checkpoint, tmp_path / "x.safetensors", "--rank", 3,
                                    "--report", tmp_path / "r.json", "--no-progress"], capsys)
    assert rc == 0 and "rounding floor of the stored tuned weights" in out
    report = json.loads((tmp_path / "r.json").read_text())
    # At the true rank all that is left is the bf16 rounding: the error sits at its floor (the rank-3 fit
    # absorbs a little of the rounding noise, hence below 1) and far above fp32 accuracy.
    for name, r in report.items():
        assert 0.6 < r["error"] / r["rounding_floor"] < 1.1 and r["error"] > 1e-4, (name, r)
    # Measured against the true change, the extracted LoRA is closer than the reported number says.
    x, true = deltas(load_file(tmp_path / "x.safetensors"), shapes), deltas(sd, shapes)
    for name in names:
        assert (x[name] - true[name]).norm() / true[name].norm() < 0.8 * report[name]["error"]
    # Unrounded fp32 weights have a floor near zero.
    _, _, errors = extract_lora.extract(tmp_path / "tuned.safetensors", tiny_bfl_checkpoint, 3, progress=False)
    assert all(f > 1e-4 for _, _, f in errors)
    fp32 = tmp_path / "fp32.safetensors"
    assert run(merge_lora, [tiny_bfl_checkpoint, fp32, "--lora", tmp_path / "true.safetensors", "--no-progress"],
               capsys)[0] == 0
    _, _, errors = extract_lora.extract(fp32, tiny_bfl_checkpoint, 3, progress=False)
    assert all(f < 1e-6 and e < 1e-6 for _, e, f in errors)
    with pytest.raises(SystemExit):
        extract_lora.main(["--help"])
    assert "rounding floor" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_floor_is_the_expected_rounding_error_of_the_stored_values(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=g, dtype=torch.float64) * 0.02
    floor = extract_lora.rounding_floor(x.to(dtype))
    assert abs(floor / float((x.to(dtype).double() - x).norm()) - 1) < 0.03
    assert extract_lora.rounding_floor(torch.zeros(4, 4, dtype=dtype)) == 0.0


def test_minor_adapter_ranks_explained_in_inspect_and_extract(tmp_path, base, tiny_bfl_checkpoint, capsys):
    net = create_network(1.0, 2, 2, None, None, base, init="minor", verbose="False")
    trained_minor(net, 0.05)
    net.save_weights(tmp_path / "minor.safetensors", None, {})
    rc, out, _ = run(inspect_lora, [tmp_path / "minor.safetensors"], capsys)
    assert rc == 0 and "ranks:     4\n" in out and "parameters: 3.6 K" in out  # 14 layers x (4x32 + 32x4)
    assert "trained at rank 2 with init=minor: each adapted layer holds 2 trained + 2 frozen minor components" in out
    assert "extract_lora needs --rank 4" in out
    assert "2 trained + 2 frozen" in inspect_lora.describe(tmp_path / "minor.safetensors")["rank_note"]

    tuned = tmp_path / "tuned.safetensors"
    assert run(merge_lora, [tiny_bfl_checkpoint, tuned, "--lora", tmp_path / "minor.safetensors", "--no-progress"],
               capsys)[0] == 0
    rc, _, err = run(extract_lora, [tuned, tiny_bfl_checkpoint, tmp_path / "x2.safetensors", "--rank", 2,
                                    "--no-progress"], capsys)
    assert rc == 0 and "hint: tuned.safetensors holds merged LoRAs of total rank 4" in err
    assert "minor.safetensors was trained at rank 2 with init=minor: its change is rank 4 (2 trained + 2 frozen" in err
    rc, out, err = run(extract_lora, [tuned, tiny_bfl_checkpoint, tmp_path / "x4.safetensors", "--rank", 4,
                                      "--no-progress"], capsys)
    assert rc == 0 and "hint" not in err
    assert float(re.search(r"max ([0-9.e+-]+)", out).group(1)) < 1e-5  # rank 2r holds the change exactly


def test_convert_refreshes_rank_metadata_and_keeps_a_stale_structure_only_as_the_source_one(tmp_path, base, capsys):
    net = create_network(1.0, 2, 2, None, None, base, init="minor", verbose="False")
    net.save_weights(tmp_path / "ours.safetensors", None, {})
    for src, dst, form in (("ours", "k", "kohya"), ("k", "p", "peft")):
        assert run(convert_lora, [tmp_path / f"{src}.safetensors", tmp_path / f"{dst}.safetensors", "--to", form],
                   capsys)[0] == 0
    meta = {n: safe_open(str(tmp_path / f"{n}.safetensors"), "pt").metadata() for n in ("ours", "k", "p")}
    # trained rank 2 (as sd-scripts writes it); the file's tensors are rank 2r = 4
    assert meta["ours"]["ss_network_dim"] == "2" and meta["ours"]["urae_export_rank"] == "4"
    # Fused qkv/linear1 hold 3 (or 3 + MLP) slices of rank 4 side by side.
    ranks = inspect_lora.describe(tmp_path / "k.safetensors")["ranks"]
    assert meta["k"]["ss_network_dim"] == str(max(ranks)) == "12" and meta["k"]["ss_network_alpha"] == "12.0"
    assert "urae_structure" not in meta["k"] and meta["k"]["urae_source_structure"] == meta["ours"]["urae_structure"]
    assert "urae_source_structure" in inspect_lora.describe(tmp_path / "k.safetensors")["urae_metadata"]
    assert meta["k"]["urae_export_rank"] == "12"
    assert meta["p"]["ss_network_dim"] == "2" and meta["p"]["urae_structure"] == meta["ours"]["urae_structure"]
    assert meta["p"]["urae_export_rank"] == "4"
    assert "urae_source_structure" not in meta["p"]
    # --no_metadata keeps what minor_lora resumes from.
    from networks.minor_lora import create_network_from_weights

    assert run(convert_lora, [tmp_path / "ours.safetensors", tmp_path / "n.safetensors", "--to", "peft",
                              "--no_metadata"], capsys)[0] == 0
    assert not any(k.startswith("ss_") for k in safe_open(str(tmp_path / "n.safetensors"), "pt").metadata())
    assert create_network_from_weights(1.0, str(tmp_path / "n.safetensors"), None, None, base)[0].init == "minor"
    # and a Gaussian plain adapter keeps its init, so resuming it with plain_init=gaussian is not refused
    g = create_network(1.0, 2, 2, None, None, base, init="plain", plain_init="gaussian", verbose="False")
    g.save_weights(tmp_path / "g.safetensors", None, {})
    assert run(convert_lora, [tmp_path / "g.safetensors", tmp_path / "gn.safetensors", "--to", "peft",
                              "--no_metadata"], capsys)[0] == 0
    assert safe_open(str(tmp_path / "gn.safetensors"), "pt").metadata()["urae_plain_init"] == "gaussian"


def test_tools_write_names_and_hashes_not_paths_and_offer_no_metadata(tmp_path, shapes, tiny_bfl_checkpoint,
                                                                      capsys):
    import hashlib

    names = urae_names(shapes)
    recipe = {"base_lora": "/home/someone/runs/urae_2k.safetensors", "network_dim": 2, "data": ["/srv/photos/", "x"]}
    save_file(peft_lora(shapes, names, rank=2), tmp_path / "a.safetensors",
              {"urae_recipe": json.dumps(recipe), "ss_sd_model_name": "/models/FLUX.1-dev", "urae_runtime": "{}",
               "ss_network_dim": "2"})
    sha = hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()

    def metadata(name):
        with safe_open(str(tmp_path / name), "pt") as f:
            return f.metadata() or {}

    def no_paths(meta):
        return not any(v.startswith("/") or "/home/" in v or "/srv/" in v or str(tmp_path) in v for v in meta.values())

    assert run(convert_lora, [tmp_path / "a.safetensors", tmp_path / "k.safetensors", "--to", "kohya"], capsys)[0] == 0
    meta = metadata("k.safetensors")
    assert no_paths(meta) and meta["ss_sd_model_name"] == "FLUX.1-dev"
    assert json.loads(meta["urae_recipe"]) == {"base_lora": "urae_2k.safetensors", "network_dim": 2,
                                               "data": ["photos", "x"]}
    assert run(merge_lora, ["--lora-only", tmp_path / "c.safetensors", "--lora", f"{tmp_path / 'a.safetensors'}:0.5"],
               capsys)[0] == 0
    meta = metadata("c.safetensors")
    assert no_paths(meta) and json.loads(meta["urae_merged_from"]) == [
        {"file": "a.safetensors", "sha256": sha, "scale": 0.5}]
    assert run(merge_lora, [tiny_bfl_checkpoint, tmp_path / "m.safetensors", "--lora", tmp_path / "a.safetensors",
                            "--no-progress"], capsys)[0] == 0
    meta = metadata("m.safetensors")
    assert no_paths(meta) and json.loads(meta["urae_merged_loras"]) == [
        {"file": "a.safetensors", "sha256": sha, "scale": 1.0, "rank": 2}]

    # --no_metadata: what readers act on (runtime settings, the fused split for the way back), nothing else.
    for mod, args in ((convert_lora, [tmp_path / "a.safetensors", tmp_path / "k0.safetensors", "--to", "kohya"]),
                      (merge_lora, ["--lora-only", tmp_path / "c0.safetensors", "--lora", tmp_path / "a.safetensors"]),
                      (extract_lora, [tmp_path / "m.safetensors", tiny_bfl_checkpoint, tmp_path / "x0.safetensors",
                                      "--rank", 2, "--no-progress"]),
                      (merge_lora, [tiny_bfl_checkpoint, tmp_path / "m0.safetensors", "--lora",
                                    tmp_path / "a.safetensors", "--no-progress"])):
        assert run(mod, [*args, "--no_metadata"], capsys)[0] == 0
    assert sorted(metadata("k0.safetensors")) == ["urae_fused_split", "urae_runtime"]
    assert metadata("c0.safetensors") == {"urae_runtime": "{}"} and metadata("x0.safetensors") == {}
    assert metadata("m0.safetensors") == metadata(tiny_bfl_checkpoint)
