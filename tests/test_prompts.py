"""The prompts-file parser: sd-scripts' inline flags mean what they mean in sd-scripts."""

import logging

import pytest

from urae.prompts import parse_line, read_prompts


def test_sd_scripts_flags():
    rec = parse_line("a cat on a mat --w 2048 --h 1024 --d 7 --s 20 --g 2.5 --l 4.0 --n blurry, low quality")
    assert rec == {"prompt": "a cat on a mat", "width": 2048, "height": 1024, "seed": 7, "steps": 20,
                   "guidance": 2.5, "cfg_scale": 4.0, "negative_prompt": "blurry, low quality"}


def test_g_is_embedded_guidance_and_l_is_cfg_not_the_other_way_round():
    assert parse_line("x --g 2.5") == {"prompt": "x", "guidance": 2.5}
    assert parse_line("x --l 1.0") == {"prompt": "x", "cfg_scale": 1.0}  # sd-scripts' "no CFG", not guidance 1


def test_flags_are_case_insensitive_and_order_free():
    assert parse_line("x --H 512 --W 768") == {"prompt": "x", "width": 768, "height": 512}


def test_other_sd_scripts_flags_are_skipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="urae"):
        rec = parse_line("x --ss euler_a --cn cond.png --w 64", where="p.txt:3")
    assert rec == {"prompt": "x", "width": 64}
    assert "p.txt:3: ignoring --ss, --cn" in caplog.text


@pytest.mark.parametrize(("line", "want"), [
    ("x --w wide", "width = 'wide' is not an integer"),
    ("x --w 64.5", "width = '64.5' is not an integer"),
    ("x --g much", "guidance = 'much' is not a number"),
    ("x --s 0", "steps = 0 must be >= 1"),
    ("x --l 0.5", r"CFG scale \(--l\) = 0.5 must be >= 1"),
    ("x --n", "--n needs a value"),
    ("--w 64", "no prompt text"),
])
def test_bad_values_name_the_line(line, want):
    with pytest.raises(ValueError, match=f"p.txt:2: .*{want}|p.txt:2: {want}"):
        parse_line(line, where="p.txt:2")


def test_files_skip_comments_and_blank_lines_and_mix_jsonl(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('# samples\n\na dog --g 3 --d 1\n{"prompt": "a cat", "cfg_scale": 2, "negative_prompt": "dull"}\n')
    assert read_prompts(f) == [{"prompt": "a dog", "guidance": 3.0, "seed": 1},
                               {"prompt": "a cat", "cfg_scale": 2.0, "negative_prompt": "dull"}]


@pytest.mark.parametrize(("text", "want"), [
    ('{"prompt": "x", "cfg": 2}\n', r"unknown keys \['cfg'\]"),
    ('{"prompt": 3}\n', "needs a \"prompt\" string"),
    ('{"prompt": "x", "width": true}\n', "is not an integer"),
    ("{not json\n", "not valid JSON"),
    ("\n# only a comment\n", "has no prompts"),
])
def test_bad_jsonl_and_empty_files(tmp_path, text, want):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(ValueError, match=want):
        read_prompts(f)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


def test_sample_prompts_help_names_every_flag_the_parser_reads():
    from urae.inference import OPTIONS as INFER
    from urae.prompts import FLAGS
    from urae.train_options import OPTIONS as TRAIN

    for opts, name in ((TRAIN, "sample_prompts"), (INFER, "prompts_file")):
        text = next(o.help for o in opts if o.name == name)
        assert all(f"--{k}" in text for k in FLAGS), (name, text)
