"""The shared option machinery (urae.config) and the shared parsers (urae.common), tested directly."""


import pytest
import torch

from urae.common import DTYPES, did_you_mean, dtype_from_name, has_guidance_embedding, parse_bool
from urae.config import ConfigError, Option, read_toml, resolve

OPTS = [
    Option("size", int, 64, "image size"),
    Option("mode", str, "fast", "how", choices=("fast", "exact")),
    Option("flag", bool, False, "a switch"),
    Option("ratio", float, None, "a ratio"),
    Option("items", list, [], "things", repeat=True),
    Option("table", dict, {}, "a table"),
]


@pytest.mark.parametrize(("text", "want"), [("true", True), ("On", True), ("1", True), ("yes", True),
                                            ("FALSE", False), ("off", False), ("0", False), (" no ", False),
                                            (True, True), (False, False)])
def test_parse_bool_accepts_the_usual_words(text, want):
    assert parse_bool(text) is want


@pytest.mark.parametrize("text", ["", "2", "maybe", "truee"])
def test_parse_bool_refuses_anything_else(text):
    with pytest.raises(ValueError, match="expected true or false"):
        parse_bool(text)


def test_dtype_names_and_aliases():
    assert dtype_from_name("bf16") is dtype_from_name("bfloat16") is torch.bfloat16
    assert dtype_from_name("fp16") is torch.float16 and dtype_from_name("no") is torch.float32
    assert set(DTYPES) == {"fp32", "fp16", "bf16"}
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        dtype_from_name("fp8")


def test_did_you_mean_names_the_closest_or_nothing():
    assert did_you_mean("learnig_rate", ["learning_rate", "seed"]) == " (did you mean 'learning_rate'?)"
    assert did_you_mean("zzz", ["learning_rate", "seed"]) == ""


def test_dev_or_schnell_from_a_transformer_config_or_dict():
    from urae.tiny import build_transformer

    assert has_guidance_embedding(build_transformer(1, 1, guidance=True))
    assert not has_guidance_embedding(build_transformer(1, 1, guidance=False))
    assert has_guidance_embedding({"guidance_embeds": True}) and not has_guidance_embedding({})


def test_precedence_default_then_toml_then_command_line(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('size = 128\nmode = "exact"\nflag = "on"\n[extra]\nratio = 0.5\n')
    cfg = resolve(OPTS, ["--config", str(f), "--size", "256"], "prog", "d", sections=("extra",))
    assert (cfg["size"], cfg["mode"], cfg["flag"], cfg["ratio"]) == (256, "exact", True, 0.5)
    assert cfg["_sources"]["size"] == "command line" and cfg["_sources"]["mode"] == "config"
    assert cfg["_sources"]["items"] == "default"
    cfg = resolve(OPTS, ["--no-flag", "--items", "a", "--items", "b", "--table", "{k = 1}"], "prog", "d")
    assert cfg["flag"] is False and cfg["items"] == ["a", "b"] and cfg["table"] == {"k": 1}


@pytest.mark.parametrize(("argv", "toml", "want"), [
    ([], "sise = 1\n", "unknown key 'sise' (did you mean 'size'?)"),
    ([], 'mode = "slow"\n', "choose one of fast, exact"),
    ([], 'size = "big"\n', "size = 'big' is not a valid int"),
    ([], 'size = "128"\n', "size = '128' is not a valid int (a number is written without quotes in TOML)"),
    ([], 'ratio = "1e-3"\n', "ratio = '1e-3' is not a valid float (a number is written without quotes"),
    ([], "flag = 3\n", "flag = 3 is not a valid bool"),
    (["--table", "{k = "], None, "not an inline TOML table"),
    ([], "size = = 1\n", "is not valid TOML"),
])
def test_bad_values_are_config_errors(tmp_path, argv, toml, want):
    if toml is not None:
        f = tmp_path / "c.toml"
        f.write_text(toml)
        argv = ["--config", str(f), *argv]
    with pytest.raises(ConfigError, match=want.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        resolve(OPTS, argv, "prog", "d")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "nope.toml")


def test_unknown_flag_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        resolve(OPTS, ["--sise", "3"], "prog", "d")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: unknown option --sise (did you mean 'size'?) (see prog --help)\n"


def test_sd_scripts_flags_say_what_they_mean_here(tmp_path, capsys):
    """The trainer's map of sd-scripts' flags: each says what to use instead, on the command line and in TOML,
    and no mapped name is a key of ours (it would never be reached)."""
    from urae.train_options import OPTIONS as TRAIN
    from urae.train_options import SD_SCRIPTS_FLAGS
    from urae.trainer import parse

    assert not set(SD_SCRIPTS_FLAGS) & ({o.name for o in TRAIN} | {a for o in TRAIN for a in o.aliases})
    for flag, want in (("--sdpa", "scaled_dot_product_attention"), ("--cache_latents", "always cached on disk"),
                       ("--network_weights", "resume = auto")):
        with pytest.raises(SystemExit) as e:
            parse([flag])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: unknown option {flag}: ") and want in err, err
        assert "did you mean" not in err
    (tmp_path / "c.toml").write_text("max_train_epochs = 4\n")
    with pytest.raises(ConfigError, match="unknown key 'max_train_epochs': use max_train_steps"):
        parse(["--config", str(tmp_path / "c.toml")])


def test_toml_writer_round_trips_a_resolved_config(tmp_path):
    from urae import tomlfile
    from urae.config import to_toml

    cfg = {"name": 'a "quoted" path\\with\nnewline ü', "n": 3, "x": 1e-4, "big": float("inf"), "on": False,
           "args": ["init=minor", "targets=urae"], "empty": [], "table": {"a": 1, "b c": "d"}, "unset": None,
           "_sources": {"n": "default"}}
    text = to_toml(cfg)
    back = tomlfile.loads(text)
    assert back == {k: v for k, v in cfg.items() if v is not None and not k.startswith("_")}
    f = tmp_path / "c.toml"
    f.write_text(text, encoding="utf-8")
    assert read_toml(f) == back


@pytest.mark.parametrize("command", ["infer", "train"])
def test_help_shows_every_options_choices_and_default(command, capsys):
    import re

    from urae import inference, train_options

    options = (inference if command == "infer" else train_options).OPTIONS
    with pytest.raises(SystemExit):
        resolve(options, ["--help"], "prog", "d")
    out = capsys.readouterr().out
    entries = {e.split()[0]: re.sub(r"\s+", " ", e)
               for e in re.split(r"\n  (?=-)", out.split("options:")[1]) if e.strip()}
    for o in options:
        entry = entries[f"--{o.name}"]
        assert "default" in entry, f"--{o.name}: no default shown"
        for c in o.choices or ():
            assert str(c) in entry, f"--{o.name}: choice {c} not shown"
    text = re.sub(r"\s+", " ", out)
    if command == "train":
        assert "--optimizer_type {prodigy,adamw,adamw8bit,adafactor,sgd}" in text and "default: prodigy" in text
    else:
        assert "--dtype {auto,bf16,fp16,fp32}" in text and "default: 4096" in text
