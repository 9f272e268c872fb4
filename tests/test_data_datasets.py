"""Dataset forms (folder + .txt, folder + .json, sd-scripts TOML), captions, skips, options."""

import json
import logging

import pytest

from urae.data.datasets import scan
from urae.data.options import DataOptions
from urae.data.synthetic import write_image


def _opts(**kw):
    return DataOptions(**{"resolution": 128, **kw})


def test_folder_with_txt_nested_and_all_extensions(tmp_path):
    for i, ext in enumerate(["jpg", "jpeg", "png", "webp"]):
        p = write_image(tmp_path / f"d{i % 2}" / "deeper" / f"img{i}.{ext}", 64 + 16 * i, 64, seed=i)
        p.with_suffix(".txt").write_text(f"caption {i}\nsecond line\n")
    (tmp_path / "notes.md").write_text("not an image")
    write_image(tmp_path / ".urae_cache" / "hidden.png", 32, 32)  # hidden folders (caches) are not data
    res = scan(_opts(train_data_dir=str(tmp_path)))
    assert sorted(it.path.name for it in res.items) == ["img0.jpg", "img1.jpeg", "img2.png", "img3.webp"]
    caps = {it.path.name: it.captions for it in res.items}
    assert caps["img2.png"] == {"prompt": "caption 2 second line"}
    assert all(it.bucket is not None for it in res.items)


def test_json_side_files_give_both_variants(tmp_path):
    write_image(tmp_path / "a.png", 64, 64)
    (tmp_path / "a.json").write_text(json.dumps({"prompt": "short", "generated_prompt": "a long VLM caption"}))
    write_image(tmp_path / "b.png", 64, 64, 1)
    (tmp_path / "b.json").write_text(json.dumps({"generated_prompt": "only generated"}))
    res = scan(_opts(train_data_dir=str(tmp_path), caption_extension="json"))
    caps = {it.path.name: it.captions for it in res.items}
    assert caps == {"a.png": {"prompt": "short", "generated_prompt": "a long VLM caption"},
                    "b.png": {"generated_prompt": "only generated"}}


def test_captions_found_by_whichever_side_file_exists_unless_an_extension_is_given(tmp_path, caplog):
    # the public URAE data: .json with prompt / generated_prompt, read with no caption_extension set
    write_image(tmp_path / "a.jpg", 64, 64)
    (tmp_path / "a.json").write_text(json.dumps({"prompt": "short", "generated_prompt": "long"}))
    write_image(tmp_path / "b.png", 64, 64, 1)
    (tmp_path / "b.caption").write_text("from .caption")
    write_image(tmp_path / "c.png", 64, 64, 2)
    (tmp_path / "c.txt").write_text("from .txt")
    (tmp_path / "c.json").write_text(json.dumps({"prompt": "not read: .txt comes first"}))
    res = scan(_opts(train_data_dir=str(tmp_path)))
    assert {it.path.name: it.captions for it in res.items} == {
        "a.jpg": {"prompt": "short", "generated_prompt": "long"}, "b.png": {"prompt": "from .caption"},
        "c.png": {"prompt": "from .txt"}}
    assert res.missing_captions == 0 and res.bad_captions == []
    # an explicit extension narrows the search to it
    res = scan(_opts(train_data_dir=str(tmp_path), caption_extension=".json"))
    assert {it.path.name: it.captions["prompt"] for it in res.items} == {
        "a.jpg": "short", "b.png": "", "c.png": "not read: .txt comes first"}
    assert res.missing_captions == 1


def test_captions_that_exist_but_give_nothing_are_named(tmp_path, caplog):
    for i, (name, text) in enumerate({"e.txt": " \n\n", "j.json": "{not json", "k.json": '{"tags": "x"}',
                                      "u.txt": b"\xff\xfe\xfa bad utf-8", "ok.txt": "fine"}.items()):
        write_image(tmp_path / f"{name.split('.')[0]}.png", 48, 48, i)
        side = tmp_path / name
        side.write_bytes(text) if isinstance(text, bytes) else side.write_text(text)
    with caplog.at_level(logging.WARNING):
        res = scan(_opts(train_data_dir=str(tmp_path)))
    assert {p.name: why for p, why in res.bad_captions} == {
        "e.txt": "empty", "j.json": "not valid JSON", "k.json": "no prompt or generated_prompt in it",
        "u.txt": "unreadable (UnicodeDecodeError)"}
    assert res.missing_captions == 0
    warning = next(r.getMessage() for r in caplog.records if "give no caption" in r.getMessage())
    assert warning.startswith("4 caption file(s) give no caption") and all(
        str(tmp_path / n) in warning for n in ("e.txt", "j.json", "k.json", "u.txt"))
    assert {it.path.name: it.captions["prompt"] for it in res.items}["ok.png"] == "fine"


def test_missing_captions_one_warning_with_count(tmp_path, caplog):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", 48, 48, i)
    (tmp_path / "0.txt").write_text("has one")
    with caplog.at_level(logging.WARNING):
        res = scan(_opts(train_data_dir=str(tmp_path)))
    warnings = [r.getMessage() for r in caplog.records if "no caption" in r.getMessage()]
    assert warnings == ["2 image(s) have no caption file; an empty caption is used for them"]
    assert sorted(it.captions["prompt"] for it in res.items) == ["", "", "has one"]


def test_images_much_smaller_than_their_bucket_one_warning(tmp_path, caplog):
    # at 128: 128² fits as is, 96² is enlarged 1.33x (quiet), 80² and 40x80 (bucket 64x128) 1.6x (counted)
    for name, (w, h) in {"a": (128, 128), "b": (96, 96), "c": (80, 80), "d": (40, 80), "e": (32, 128)}.items():
        write_image(tmp_path / f"{name}.png", w, h)
    with caplog.at_level(logging.WARNING):
        res = scan(_opts(train_data_dir=str(tmp_path)))
    assert sorted((p.name, round(f, 2)) for p, f in res.upscaled) == [("c.png", 1.6), ("d.png", 1.6)]
    warnings = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("2 of 5 images are upscaled more than 1.5× to fit their bucket (most: 1.60×")
    assert "use images at least that large" in warnings[0] and "4K recipe" not in warnings[0].split(";")[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = scan(_opts(train_data_dir=str(tmp_path), bucket_no_upscale=True))
    assert res.upscaled == [] and "upscaled" not in caplog.text


def test_undecodable_files_skipped_and_listed(tmp_path, caplog):
    write_image(tmp_path / "ok.png", 48, 48)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (tmp_path / "empty.webp").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        res = scan(_opts(train_data_dir=str(tmp_path)))
    assert [it.path.name for it in res.items] == ["ok.png"]
    assert sorted(p.name for p, _ in res.undecodable) == ["broken.jpg", "empty.webp"]
    assert "broken.jpg" in caplog.text and "empty.webp" in caplog.text


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty dataset"):
        scan(_opts(train_data_dir=str(tmp_path)))
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="empty dataset"):
        scan(_opts(train_data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="train_data_dir .* or dataset_config"):
        scan(DataOptions())


def test_sd_scripts_dataset_toml(tmp_path, caplog, monkeypatch):
    for d, n in (("set_a", 2), ("set_b", 1)):
        for i in range(n):
            p = write_image(tmp_path / d / f"{i}.png", 200, 100, i)
            p.with_suffix(".caption").write_text(f"{d} {i}")
    write_image(tmp_path / "set_c" / "0.png", 100, 100)
    (tmp_path / "set_c" / "0.json").write_text(json.dumps({"prompt": "p", "generated_prompt": "g"}))
    toml = tmp_path / "data.toml"
    toml.write_text("""
[general]
caption_extension = ".caption"
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 128
batch_size = 2
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = "set_a"
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = "set_b"
  random_crop = true

[[datasets]]
resolution = 64
bucket_reso_steps = 32

  [[datasets.subsets]]
  image_dir = "set_c"
  caption_extension = ".json"
  real_prompt_ratio = 0.2
""")
    monkeypatch.chdir(tmp_path)  # image_dir is relative to the current folder, as every path
    with caplog.at_level(logging.WARNING):
        res = scan(DataOptions(dataset_config=str(toml), resolution=2048))
    by_dir = {}
    for it in res.items:
        by_dir.setdefault(it.path.parent.name, []).append(it)
    assert {k: len(v) for k, v in by_dir.items()} == {"set_a": 2, "set_b": 1, "set_c": 1}
    a, b, c = by_dir["set_a"][0], by_dir["set_b"][0], by_dir["set_c"][0]
    assert a.subset.num_repeats == 3 and a.captions == {"prompt": "set_a 0"} and not a.subset.random_crop
    assert b.subset.random_crop and b.subset.num_repeats == 1
    assert a.bucket == (128, 64) and a.subset.spec.no_upscale        # dataset-level resolution wins over options
    assert c.bucket == (64, 64) and c.subset.real_prompt_ratio == 0.2
    assert c.captions == {"prompt": "p", "generated_prompt": "g"}
    assert "general.shuffle_caption" in caplog.text and "datasets[0].batch_size" in caplog.text


def test_options_unknown_key_is_clear():
    with pytest.raises(ValueError, match=r"'resolutoin' \(did you mean 'resolution'\?\).*valid keys: train_data_dir"):
        DataOptions.from_dict({"resolutoin": 1024})
    keys = set(DataOptions().to_dict())
    assert keys == {"train_data_dir", "dataset_config", "caption_extension", "real_prompt_ratio", "resolution",
                    "bucket_mode", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
                    "random_crop", "cache_dir", "cache_only"}
    with pytest.raises(ValueError, match="multiple of 16"):
        DataOptions(bucket_reso_steps=40)
    with pytest.raises(ValueError, match="real_prompt_ratio"):
        DataOptions(real_prompt_ratio=1.5)
    with pytest.raises(ValueError, match="bucket_mode"):
        DataOptions(bucket_mode="square")
    assert DataOptions.from_dict({"caption_extension": "json"}).caption_extension == ".json"


def test_exif_rotation_and_pixels(tmp_path):
    from PIL import Image

    from urae.data.images import bucket_pixels
    from urae.data.synthetic import image_array

    im = Image.fromarray(image_array(160, 80, 1))
    exif = im.getexif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees: portrait
    im.save(tmp_path / "rot.jpg", exif=exif)
    (res,) = scan(_opts(train_data_dir=str(tmp_path), resolution=64)).items
    assert res.size == (80, 160) and res.bucket == (32, 64)
    px, crop = bucket_pixels(res.path, res.bucket)
    assert px.shape == (3, 64, 32) and px.min() >= -1 and px.max() <= 1 and px.dtype.is_floating_point
    assert crop.original == (80, 160) and crop.resized == (32, 64)


def test_dataset_config_paths_follow_the_one_rule_relative_to_the_current_folder(tmp_path, monkeypatch):
    """image_dir is relative to the folder the command runs in, like every other path; one that only exists
    beside the TOML is an error that says so and gives the path to write."""
    (tmp_path / "cfg" / "imgs").mkdir(parents=True)
    write_image(tmp_path / "cfg" / "imgs" / "a.png", 64, 64).with_suffix(".txt").write_text("a")
    toml = tmp_path / "cfg" / "data.toml"
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"relative to the current folder .* write .*cfg/imgs"):
        scan(DataOptions(dataset_config=str(toml), resolution=64))
    monkeypatch.chdir(tmp_path / "cfg")
    assert [it.path.name for it in scan(DataOptions(dataset_config=str(toml), resolution=64)).items] == ["a.png"]
