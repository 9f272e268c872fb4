"""Bucket sets and assignment: URAE shapes, sd-scripts area buckets, no-upscale, extremes."""

import pytest

from urae.data.buckets import BucketSpec, area_buckets, bucket_table, crop_offset, resize_plan, urae_buckets


def test_urae_buckets_long_side_is_base_and_multiples_of_16():
    for base in (1024, 2048, 4096):
        got = urae_buckets(base)
        assert len(got) == 7
        for w, h in got:
            assert max(w, h) == base and w % 16 == 0 and h % 16 == 0
    assert set(urae_buckets(4096)) == {(4096, 4096), (4096, 3072), (3072, 4096), (4096, 2048), (2048, 4096),
                                       (4096, 1024), (1024, 4096)}


# (image w, h) -> bucket at base 2048, upscaling allowed
URAE_TABLE = [
    ((3000, 3000), (2048, 2048)),
    ((4000, 3000), (2048, 1536)),
    ((3000, 4000), (1536, 2048)),
    ((1920, 1080), (2048, 1024)),   # 16:9 is nearer 2:1 than 4:3 in log-aspect
    ((1600, 1300), (2048, 1536)),
    ((2560, 1080), (2048, 1024)),   # 2.37:1 -> 2:1
    ((8000, 2000), (2048, 512)),    # exactly 4:1
    ((20000, 1000), (2048, 512)),   # 20:1 still goes to the most extreme bucket
    ((1000, 20000), (512, 2048)),
    ((12, 9), (2048, 1536)),        # tiny image, upscaled because that is allowed
    ((1, 1), (2048, 2048)),
]


@pytest.mark.parametrize("size,expected", URAE_TABLE)
def test_urae_assignment(size, expected):
    assert BucketSpec("urae", (2048, 2048)).assign(*size) == expected


# bucket_no_upscale: an image smaller than its bucket gets a smaller bucket of the same shape
NO_UPSCALE_TABLE = [
    ((3000, 3000), (2048, 2048)),   # large enough: unchanged
    ((1000, 1000), (992, 992)),     # 1:1 shrunk to a multiple of 16
    ((1000, 750), (960, 720)),      # 4:3 kept exactly (64k x 48k)
    ((1000, 250), (960, 240)),      # 4:1 kept exactly
    ((70, 17), (64, 16)),           # smallest 4:1
    ((60, 16), None),               # too small for 4:1 without upscaling -> skipped
    ((12, 9), None),                # tiny -> skipped
    ((20, 20), (16, 16)),
]


@pytest.mark.parametrize("size,expected", NO_UPSCALE_TABLE)
def test_urae_no_upscale(size, expected):
    got = BucketSpec("urae", (2048, 2048), no_upscale=True).assign(*size)
    assert got == expected
    if got:
        assert got[0] <= size[0] and got[1] <= size[1] and got[0] % 16 == 0 and got[1] % 16 == 0


def test_urae_no_upscale_respects_min_bucket_reso():
    spec = BucketSpec("urae", (2048, 2048), min_bucket_reso=256, no_upscale=True)
    assert spec.assign(300, 300) == (288, 288)
    assert spec.assign(200, 200) is None


def test_area_buckets_match_sd_scripts_rule():
    got = area_buckets(1024 * 1024, 256, 2048, 64)
    assert (1024, 1024) in got and (2048, 512) in got and (512, 2048) in got
    for w, h in got:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 and 256 <= min(w, h) and max(w, h) <= 2048


AREA_TABLE = [
    ((1000, 1000), (1024, 1024)),
    ((1600, 900), (1344, 768)),
    ((4000, 1000), (2048, 512)),
    ((100, 1000), (256, 2048)),     # 1:10 goes to the most extreme bucket
]


@pytest.mark.parametrize("size,expected", AREA_TABLE)
def test_area_assignment(size, expected):
    spec = BucketSpec("area", (1024, 1024), min_bucket_reso=256, max_bucket_reso=2048, steps=64)
    assert spec.assign(*size) == expected


def test_area_no_upscale_is_per_image_like_sd_scripts():
    spec = BucketSpec("area", (1024, 1024), steps=64, no_upscale=True)
    assert spec.assign(700, 500) == (640, 448)        # smaller than the area: floored to steps
    w, h = spec.assign(4000, 3000)                     # larger: reduced to the area, then floored
    assert w * h <= 1024 * 1024 and abs(w / h - 4 / 3) < 0.1 and w % 64 == 0 and h % 64 == 0
    assert spec.assign(50, 50) is None


def test_resize_and_crop_geometry():
    assert resize_plan(4000, 3000, (2048, 1536)) == (2048, 1536)
    rw, rh = resize_plan(1920, 1080, (2048, 1536))
    assert rh == 1536 and rw == 2731                   # covers the bucket, aspect kept
    assert crop_offset((2731, 1536), (2048, 1536), False) == ((2731 - 2048) // 2, 0)
    a = crop_offset((2731, 1536), (2048, 1536), True, "x.png")
    assert a == crop_offset((2731, 1536), (2048, 1536), True, "x.png")  # seeded: same on every rank/run
    assert 0 <= a[0] <= 683 and a[1] == 0


def test_bucket_table_counts_images_and_repeats():
    text = bucket_table([((2048, 2048), 1), ((2048, 2048), 3), ((2048, 512), 2)], skipped=1)
    assert "2048x2048" in text and "2048x512" in text
    row = next(line for line in text.splitlines() if "2048x2048" in line)
    assert row.split()[-2:] == ["2", "4"]
    assert "skipped" in text
