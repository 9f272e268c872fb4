"""Latent and text caches on the tiny FLUX pipeline: round trip, reuse, staleness, corruption, resume."""

import copy
import json
from contextlib import contextmanager

import pytest
import torch

from urae.data import DataOptions, build_caches, make_dataloader
from urae.data.images import bucket_pixels
from urae.data.latent_cache import check_latent_file, load_latent_file
from urae.data.loader import BucketBatchSampler, CachedDataset
from urae.data.synthetic import write_image
from urae.data.vae_encode import encode_posterior
from urae.io import load_safetensors, read_safetensors_header

# Split (row-chunked) encode vs whole encode on the tiny VAE, fp32: stated tolerance.
SPLIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def pipe(tiny_flux_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux_dir)


@contextmanager
def count_calls(p):
    """Forward calls of the VAE encoder and both text encoders while the block runs."""
    calls = {"vae": 0, "clip": 0, "t5": 0}
    handles = [m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
               for n, m in (("vae", p.vae.encoder), ("clip", p.text_encoder), ("t5", p.text_encoder_2))]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def make_data(root):
    """4 images: two 1:1, one 2:1, one 1:2 with .txt captions (one missing)."""
    for i, (w, h) in enumerate([(80, 80), (96, 100), (160, 80), (70, 150)]):
        p = write_image(root / f"img{i}.png", w, h, seed=i)
        if i != 3:
            p.with_suffix(".txt").write_text(f"caption number {i}")
    return root


def opts(tmp_path, **kw):
    return DataOptions(**{"train_data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"),
                          "resolution": 64, **kw})


def test_batches_from_cache_equal_on_the_fly(tmp_path, pipe):
    make_data(tmp_path / "data")
    plan = build_caches(opts(tmp_path), pipe.components, progress=False)
    loader = make_dataloader(plan, batch_size=2, shuffle=False, sample_posterior=False)
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    seen = set()
    for batch in loader:
        for i, image in enumerate(batch["image"]):
            entry = next(e for e in plan.entries if str(e.image) == image)
            assert entry.bucket == batch["bucket"]
            px, _ = bucket_pixels(entry.image, entry.bucket)
            with torch.no_grad():  # (grad mode picks other attention kernels: ~1e-5 differences)
                z = pipe.vae.encode(px[None]).latent_dist.mean[0]
                t5, pooled, _ = pipe.encode_prompt(prompt=batch["caption"][i], prompt_2=None, max_sequence_length=512)
            torch.testing.assert_close(batch["latents"][i], (z - shift) * scale, atol=1e-6, rtol=0)
            torch.testing.assert_close(batch["t5_embeds"][i], t5[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(batch["clip_pooled"][i], pooled[0], atol=1e-6, rtol=0)
            seen.add(image)
    assert len(seen) == 4
    assert batch["latents"].shape[1] == 16 and batch["t5_embeds"].shape[1] == 512


def test_second_run_encodes_nothing_and_changed_bucket_invalidates(tmp_path, pipe):
    make_data(tmp_path / "data")
    with count_calls(pipe) as first:
        build_caches(opts(tmp_path), pipe.components, progress=False)
    assert first["vae"] == 4 and first["clip"] >= 1 and first["t5"] >= 1
    with count_calls(pipe) as second:
        plan = build_caches(opts(tmp_path), pipe.components, progress=False)
    assert second == {"vae": 0, "clip": 0, "t5": 0}
    assert plan.latents.reused == 4 and plan.texts.reused == 4

    with count_calls(pipe) as bigger:
        plan = build_caches(opts(tmp_path, resolution=128), pipe.components, progress=False)
    assert bigger == {"vae": 4, "clip": 0, "t5": 0}  # new buckets re-encode images, captions are reused
    shapes = {e.bucket: load_latent_file(e.latent_file)[0].shape for e in plan.entries}
    assert shapes[(128, 128)] == (16, 16, 16) and shapes[(128, 64)] == (16, 8, 16)


def test_stale_inputs_are_detected(tmp_path, pipe):
    data = make_data(tmp_path / "data")
    build_caches(opts(tmp_path), pipe.components, progress=False)
    write_image(data / "img1.png", 96, 100, seed=99)      # same name, new pixels
    (data / "img2.txt").write_text("an edited caption")
    with count_calls(pipe) as calls:
        build_caches(opts(tmp_path), pipe.components, progress=False)
    assert calls["vae"] == 1 and calls["t5"] == 1

    other = dict(pipe.components)
    other["vae"] = copy.deepcopy(pipe.vae)
    with torch.no_grad():
        other["vae"].encoder.conv_in.weight.add_(0.01)  # a fine-tuned VAE
    with count_calls(pipe) as calls:
        plan = build_caches(opts(tmp_path), other, progress=False)
    assert plan.latents.encoded == 4 and plan.latents.rebuilt == {"stale": 4}


def test_corrupt_files_are_rebuilt_and_a_killed_run_resumes(tmp_path, pipe):
    make_data(tmp_path / "data")
    plan = build_caches(opts(tmp_path), pipe.components, progress=False)
    lat = plan.entries[0].latent_file
    lat.write_bytes(lat.read_bytes()[:-100])                             # truncated
    txt = plan.entries[1].text_files["prompt"]
    txt.write_bytes(b"garbage")
    with count_calls(pipe) as calls:
        plan2 = build_caches(opts(tmp_path), pipe.components, progress=False)
    assert calls["vae"] == 1 and plan2.latents.rebuilt == {"corrupt": 1} and plan2.texts.encoded == 1
    load_safetensors(lat)

    # Kill the caching run after two encodes: finished files stay valid, no temp files are left.
    fresh = tmp_path / "fresh"
    calls = {"n": 0}
    real = pipe.vae.encode

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    pipe.vae.encode = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            build_caches(opts(tmp_path, cache_dir=str(fresh)), pipe.components, progress=False)
    finally:
        del pipe.vae.encode
    files = list(fresh.rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    assert len([f for f in files if f.suffix == ".safetensors"]) == 2
    with count_calls(pipe) as resumed:
        build_caches(opts(tmp_path, cache_dir=str(fresh)), pipe.components, progress=False)
    assert resumed["vae"] == 2


def test_split_encode_matches_whole_encode(tmp_path, pipe, monkeypatch):
    # Row chunks with whole-image GroupNorm statistics, query-chunked attention, activations in the
    # "host" store: equal to the whole encode up to float rounding.
    import urae.data.vae_encode as ve

    monkeypatch.setattr(ve, "ATTN_CHUNK_SCORES", 700 * 768)  # 768 latent tokens -> 2 query chunks
    px, _ = bucket_pixels(write_image(tmp_path / "x.png", 256, 192, 3), (256, 192))
    whole_m, whole_s = encode_posterior(pipe.vae, px[None], split_threshold=10**9)
    split_m, split_s = encode_posterior(pipe.vae, px[None], split_threshold=64 * 64, chunk_pixels=20 * 256,
                                        offload=True)
    assert (split_m - whole_m).abs().max() < SPLIT_ATOL and (split_s - whole_s).abs().max() < SPLIT_ATOL
    assert whole_m.abs().max() > 0.5  # the tolerance is small relative to the values

    # Through the cache as well: a split-encoded cache equals a whole-encoded one.
    make_data(tmp_path / "data")
    a = build_caches(opts(tmp_path), pipe.components, progress=False)
    b = build_caches(opts(tmp_path, cache_dir=str(tmp_path / "c2")), pipe.components, progress=False, split_threshold=1)
    for ea, eb in zip(a.entries, b.entries):
        ma, sa, _ = load_latent_file(ea.latent_file)
        mb, sb, _ = load_latent_file(eb.latent_file)
        assert (ma - mb).abs().max() < SPLIT_ATOL and (sa - sb).abs().max() < SPLIT_ATOL


def test_metadata_records_what_is_stored(tmp_path, pipe):
    make_data(tmp_path / "data")
    plan = build_caches(opts(tmp_path, random_crop=True), pipe.components, progress=False)
    e = next(e for e in plan.entries if e.bucket == (64, 32))
    keys, meta = read_safetensors_header(e.latent_file)
    assert set(keys) == {"mean", "std"} and meta["stored"] == "posterior_mean_std"
    assert meta["bucket"] == "64x32" and meta["crop_mode"] == "random" and meta["dtype"] == "float32"
    assert float(meta["scaling_factor"]) == pytest.approx(0.3611) and float(meta["shift_factor"]) == pytest.approx(0.1159)
    assert meta["crop"].startswith("160x80->")
    # centre crop is a different cache fact: switching makes the file stale
    facts = {k: meta[k] for k in ("format", "vae", "bucket", "source", "dtype")}
    assert check_latent_file(e.latent_file, {**facts, "crop_mode": "center"}).startswith("stale")


def test_image_that_fails_to_decode_is_skipped(tmp_path, pipe):
    data = make_data(tmp_path / "data")
    p = write_image(data / "truncated.jpg", 256, 256, 5)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # header readable, pixel data cut
    plan = build_caches(opts(tmp_path), pipe.components, progress=False)
    assert [x.name for x, _ in plan.latents.failed] == ["truncated.jpg"]
    assert len(plan.entries) == 4 and all(e.image.name != "truncated.jpg" for e in plan.entries)


def test_caption_variant_probability_and_posterior_samples(tmp_path, pipe):
    data = tmp_path / "data"
    write_image(data / "a.png", 64, 64)
    (data / "a.json").write_text(json.dumps({"prompt": "the original prompt", "generated_prompt": "a VLM caption"}))
    plan = build_caches(opts(tmp_path, caption_extension=".json", real_prompt_ratio=0.2), pipe.components,
                        progress=False)
    ds = CachedDataset(plan.entries, seed=123)
    n = 1500
    draws = [ds[(0, epoch)] for epoch in range(n)]
    k = sum(d["caption_variant"] == "prompt" for d in draws)
    # Binomial(1500, 0.2): mean 300, sd 15.5; 4 sd bounds.
    assert abs(k - 0.2 * n) < 4 * (n * 0.2 * 0.8) ** 0.5
    t5_of = {v: load_safetensors(f)[0]["t5"] for v, f in plan.entries[0].text_files.items()}
    for d in draws[:20]:
        assert torch.equal(d["t5_embeds"], t5_of[d["caption_variant"]])
        assert d["caption"] == {"prompt": "the original prompt", "generated_prompt": "a VLM caption"}[d["caption_variant"]]

    # Posterior samples: reproducible per (seed, epoch, index), fresh each epoch, N(0, 1) noise around the mean.
    mean, std, meta = load_latent_file(plan.entries[0].latent_file)
    scale, shift = float(meta["scaling_factor"]), float(meta["shift_factor"])
    assert torch.equal(ds[(0, 7)]["latents"], ds[(0, 7)]["latents"])
    assert not torch.equal(ds[(0, 7)]["latents"], ds[(0, 8)]["latents"])
    assert not torch.equal(ds[(0, 7, 0)]["latents"], ds[(0, 7, 1)]["latents"])  # a repeat in the same epoch
    noise = torch.stack([(d["latents"] / scale + shift - mean) / std for d in draws[:50]])
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def _entries(buckets, repeats=lambda i: 1):
    from pathlib import Path

    from urae.data.loader import CacheEntry

    return [CacheEntry(Path(f"{i}.png"), b, Path("x"), {}, {}, 0.5, num_repeats=repeats(i)) for i, b in enumerate(buckets)]


def test_batches_never_mix_buckets():
    entries = _entries([(64, 64)] * 7 + [(64, 32)] * 3 + [(32, 64)] * 2, repeats=lambda i: 1 + i % 3)
    sampler = BucketBatchSampler(entries, batch_size=4, seed=1)
    orders = []
    for epoch in range(5):
        batches = list(sampler)  # each pass advances the epoch
        orders.append(batches)
        counts = {}
        for batch in batches:
            assert len(batch) == 4 and len({entries[i].bucket for i, _, _ in batch}) == 1
            assert len(set(batch)) == 4  # repeats and top-ups are distinct draws
            assert all(e == epoch for _, e, _ in batch)
            for i, _, _ in batch:
                counts[i] = counts.get(i, 0) + 1
        # every image at least num_repeats times; extras only from topping up a bucket's last batch
        assert all(counts[i] >= e.num_repeats for i, e in enumerate(entries))
        assert sum(counts.values()) - sum(e.num_repeats for e in entries) < 4 * 3
    assert orders[0] != orders[1]
    sampler.set_epoch(0)
    assert list(sampler) == orders[0]
    dropped = list(BucketBatchSampler(entries, batch_size=4, seed=1, drop_last=True))
    assert all(len(b) == 4 for b in dropped) and len(dropped) < len(orders[0])


def test_accelerate_sharding_keeps_buckets_pure():
    from accelerate.data_loader import BatchSamplerShard

    entries = _entries([(64, 64)] * 5 + [(64, 32)] * 3 + [(32, 64)] * 1)
    shards = [list(BatchSamplerShard(BucketBatchSampler(entries, 2, seed=3), 2, r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    seen = set()
    for shard in shards:
        for batch in shard:
            assert len(batch) == 2 and len({entries[i].bucket for i, _, _ in batch}) == 1
            seen.update(i for i, _, _ in batch)
    assert seen == set(range(len(entries)))


def test_schnell_uses_t5_length_256(tmp_path, tiny_schnell_dir):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(tiny_schnell_dir)
    make_data(tmp_path / "data")
    plan = build_caches(opts(tmp_path), p.components, progress=False)
    batch = next(iter(make_dataloader(plan)))
    assert batch["t5_embeds"].shape[1] == 256 and batch["t5_mask"].shape[1] == 256


def test_default_cache_lives_in_the_image_folder(tmp_path, pipe):
    data = make_data(tmp_path / "data")
    plan = build_caches(DataOptions(train_data_dir=str(data), resolution=64), pipe.components, progress=False)
    assert all(e.latent_file.is_relative_to(data / ".urae_cache" / "latents") for e in plan.entries)
    with count_calls(pipe) as calls:
        again = build_caches(DataOptions(train_data_dir=str(data), resolution=64), pipe.components, progress=False)
    assert calls["vae"] == 0 and len(again.entries) == 4  # the cache folder is not scanned as data


def test_rank_pairs_split_the_work(tmp_path, pipe):
    # (process_index, num_processes) without an Accelerator: each call caches its own share only.
    make_data(tmp_path / "data")
    with count_calls(pipe) as r0:
        build_caches(opts(tmp_path), pipe.components, (0, 2), progress=False)
    with count_calls(pipe) as r1:
        build_caches(opts(tmp_path), pipe.components, (1, 2), progress=False)
    assert r0["vae"] == 2 and r1["vae"] == 2
    with count_calls(pipe) as after:
        build_caches(opts(tmp_path), pipe.components, progress=False)
    assert after == {"vae": 0, "clip": 0, "t5": 0}
