"""What the LoRA file tools (inspect, convert, merge, extract) share: reading a checkpoint tensor by tensor,
writing one the same way, dtype names, output rules, metadata hygiene and the one way a tool reports an error.

Errors: a `UserError` (or an OSError: missing file, permission, full disk) is the user's to fix and prints
one line with exit code 2; SIGINT and SIGTERM remove partial output and exit 130 / 143 with one line; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import sys
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from networks.minor_lora import bfl_equivalents, detect_layout, slice_places
from urae.common import DTYPES
from urae.common import did_you_mean as _did_you_mean
from urae.flux_keys import BFL_PREFIXES, linear_pairs
from urae.io import atomic_path

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
# BFL's final AdaLN Linear; diffusers' norm_out.linear holds the same rows with its halves swapped.
FINAL_BFL, FINAL_DIFFUSERS = "final_layer.adaLN_modulation.1", "norm_out.linear"
_DEFAULT_WEIGHTS = re.compile(r"^diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors$")
_OTHER_WEIGHTS = re.compile(r"\.(safetensors|bin|pt|pth|ckpt)$|\.index\..+\.json$")


class UserError(ValueError):
    """A mistake the user can fix (bad path, wrong file, refused overwrite): one line, exit code 2."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM during a tool: a BaseException so `except Exception` blocks let it reach the cleanup."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def did_you_mean(name: str, choices) -> str:
    return _did_you_mean(name, choices, cutoff=0.5)


def parse_dtype(name: str | None):
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}{did_you_mean(name, DTYPES)}")
    return DTYPES[name]


@contextmanager
def user_errors(source: str = ""):
    """Turn the ValueErrors that file checks in minor_lora and urae.io raise (bad shapes, NaN, corrupt file)
    into UserErrors; used only around calls that validate user files, so other ValueErrors stay bugs."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise UserError(f"{source}: {e}" if source and not str(e).startswith(source) else str(e)) from e


def run_cli(body) -> int:
    """Run a tool's `body()` (returns the exit code) in the one error style of the LoRA tools."""
    def stop(signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not signal.SIG_IGN:  # nohup and friends ignore on purpose
                previous[s] = signal.signal(s, stop)
    try:
        return body()
    except BrokenPipeError:  # `… | head` closed the pipe: the reader has what it wanted; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        return 0
    except (UserError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted by {e}: stopped; no partial output is left", file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split())


def progress_bar(items=None, desc: str = "", enabled: bool = True, total: int | None = None):
    """tqdm over `items` (or a manual bar of `total` steps); a no-op stand-in without tqdm or when disabled."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(items, desc=desc, total=total, leave=False)
        except ImportError:
            pass
    if items is not None:
        return items

    class _Null:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return _Null()


# --------------------------------------------------------------------------------------------
# Outputs: one overwrite rule, a trailing slash means a folder, enough free space
# --------------------------------------------------------------------------------------------


def output_path(out, *, overwrite: bool, name_in_folder: str | None = None, inputs=()) -> Path:
    """Where a tool writes. OUT ending in a slash, or an existing folder, is a folder: the file goes inside
    it as `name_in_folder` (a tool without a natural name refuses). An existing output is replaced only
    with --overwrite; an output that is one of the inputs never."""
    text = os.fspath(out)
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        if name_in_folder is None:
            raise UserError(f"{text} is a folder; give a file name for the output")
        path = path / name_in_folder
    if any(path.resolve() == Path(os.fspath(p)).expanduser().resolve() for p in inputs):
        raise UserError(f"{path}: output would overwrite an input; choose another path")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    return path


def output_folder(out, *, overwrite: bool, inputs=()) -> Path:
    """Like output_path for a tool whose output is a folder (a diffusers model)."""
    path = Path(os.fspath(out)).expanduser()
    if path.suffix in (".safetensors", ".sft"):
        raise UserError(f"{out}: the input is a diffusers folder, so the output is one too; give a folder name")
    if any(path.resolve() == Path(os.fspath(p)).expanduser().resolve() for p in inputs):
        raise UserError(f"{path}: output would overwrite an input; choose another path")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    return path


def replace_folder(tmp: Path, dest: Path) -> None:
    """Rename a finished temp folder into place, moving an existing `dest` (allowed by --overwrite) aside first."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def human_size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_free_space(dest: Path, needed: int, what: str = "the output") -> None:
    """Refuse before any work when the folder that will hold `dest` has less than `needed` bytes free."""
    folder = dest.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(f"{folder}: {human_size(free)} free, but {what} needs about {human_size(needed)} "
                        f"beside the output (written to a temporary name, then renamed)")


# --------------------------------------------------------------------------------------------
# Metadata the tools write: names and hashes, never paths
# --------------------------------------------------------------------------------------------

# What readers of a LoRA file act on: the inference runtime settings, minor_lora's resume structure,
# convert_lora's fused split. --no_metadata keeps only these.
LOADER_KEYS = ("urae_format", "urae_init", "urae_plain_init", "urae_rank", "urae_alpha", "urae_export_rank",
               "urae_export_alpha", "urae_targets", "urae_layout", "urae_structure", "urae_source_structure",
               "urae_runtime", "urae_fused_split")


def file_sha256(path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path) -> dict:
    """How metadata names an input file: its name and content hash, not where it lay on this machine."""
    return {"file": os.path.basename(os.fspath(path)), "sha256": file_sha256(path)}


def _strip_path(v):
    if isinstance(v, str):
        return os.path.basename(v.rstrip("/\\")) if (os.path.isabs(v) or v.startswith("~")) and len(v) > 1 else v
    if isinstance(v, dict):
        return {k: _strip_path(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_strip_path(x) for x in v]
    return v


def without_paths(meta: dict) -> dict:
    """Metadata with every absolute path (also inside JSON values) cut to its file name: files are shared."""
    out = {}
    for k, v in meta.items():
        v = str(v)
        try:
            parsed = json.loads(v)
        except ValueError:
            out[k] = _strip_path(v)
            continue
        cleaned = _strip_path(parsed)
        out[k] = v if cleaned == parsed else json.dumps(cleaned, sort_keys=isinstance(parsed, dict))
    return out


def output_metadata(meta: dict, no_metadata: bool) -> dict:
    """The metadata a tool writes: without paths; with --no_metadata only what loaders read."""
    meta = without_paths(meta)
    return {k: v for k, v in meta.items() if k in LOADER_KEYS} if no_metadata else meta


# --------------------------------------------------------------------------------------------
# Reading a checkpoint tensor by tensor
# --------------------------------------------------------------------------------------------


class Checkpoint:
    """A FLUX transformer checkpoint (diffusers folder, sharded or not, or one .safetensors file) read lazily."""

    def __init__(self, path):
        self.path = Path(os.fspath(path)).expanduser()
        self.root = self.weights_dir = None
        self.other_weights: list[Path] = []
        if self.path.is_dir():
            self.root = self.path
            tdir = self.path / "transformer" if (self.path / "model_index.json").is_file() else self.path
            # The default weights only: variants (.fp16.safetensors) and .bin copies hold the same tensors.
            files = sorted(f for f in tdir.glob("*.safetensors") if _DEFAULT_WEIGHTS.match(f.name))
            if not files:
                raise UserError(f"{self.path}: no transformer .safetensors files in {tdir}; expected a "
                                f"diffusers FLUX.1 folder or a single-file checkpoint")
            self.weights_dir = tdir
            self.other_weights = sorted(f for f in tdir.iterdir() if f not in files and _OTHER_WEIGHTS.search(f.name))
        elif self.path.is_file():
            files = [self.path]
        else:
            raise FileNotFoundError(2, "no such file or folder", str(self.path))
        self.files = files
        self._stack = ExitStack()
        self._handles = {}
        self.key_file: dict[str, Path] = {}
        self.info: dict[str, tuple[str, list[int]]] = {}
        self.metadata: dict[Path, dict] = {}
        from safetensors import safe_open

        for f in files:
            try:
                h = self._stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as e:
                self._stack.close()
                raise UserError(f"{f}: not a readable .safetensors file (truncated or corrupt?): {e}") from e
            self._handles[f] = h
            self.metadata[f] = dict(h.metadata() or {})
            for k in h.keys():
                sl = h.get_slice(k)
                self.info[k] = (sl.get_dtype(), list(sl.get_shape()))
                self.key_file[k] = f
        self.prefix = next((p for p in BFL_PREFIXES if any(k.startswith(p) for k in self.info)), "")
        try:
            self.layout = detect_layout(self.strip(k) for k in self.info)
        except ValueError as e:
            self._stack.close()
            raise UserError(f"{self.path}: {e}") from e
        self._cache = (None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._stack.close()

    def keys(self, f: Path) -> list[str]:
        return list(self._handles[f].keys())

    def strip(self, key: str) -> str:
        """A key without the single-file prefix some BFL checkpoints carry (`model.diffusion_model.`)."""
        return key[len(self.prefix):] if self.prefix and key.startswith(self.prefix) else key

    def tensor(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self.key_file[key]].get_tensor(key)
        except Exception as e:
            raise UserError(f"{self.key_file[key]}: could not read {key} (truncated or corrupt file?): {e}") from e

    def output_bytes(self, dtype=None) -> int:
        """Bytes of the tensors as a merge writes them (floating tensors in `dtype` when given)."""
        total = 0
        for st, shape in self.info.values():
            d = ST_NAMES[st]
            d = dtype if dtype is not None and d.is_floating_point else d
            total += torch.Size(shape).numel() * torch.empty(0, dtype=d).element_size()
        return total

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """{module (checkpoint layout, prefix stripped): (out, in)} of every 2-D `.weight`."""
        return {self.strip(k)[: -len(".weight")]: (s[0], s[1]) for k, (_, s) in self.info.items()
                if k.endswith(".weight") and len(s) == 2}

    def _diffusers_map(self) -> dict[str, tuple[str, int, int]]:
        """diffusers Linear -> (checkpoint module, first row, last row) in this checkpoint's layout."""
        shapes = self.linear_shapes()
        if self.layout == "diffusers":
            return {m: (m, 0, s[0]) for m, s in shapes.items()}
        res = {}
        for bfl, names in linear_pairs(0, 0):
            if bfl in shapes:
                res[names[0]] = (bfl, 0, shapes[bfl][0])
        if FINAL_BFL in shapes:  # read back with its halves swapped, see diffusers_weight
            res[FINAL_DIFFUSERS] = (FINAL_BFL, 0, shapes[FINAL_BFL][0])
        for m, (out, inn) in shapes.items():
            if bfl_equivalents(m):
                res.update({sl.equiv: (m, sl.start, sl.stop) for sl in slice_places(m, out, inn, "bfl")})
        return res

    def diffusers_linear_shapes(self) -> dict[str, tuple[int, int]]:
        shapes = self.linear_shapes()
        return {d: (b - a, shapes[m][1]) for d, (m, a, b) in self._diffusers_map().items()}

    def diffusers_weight(self, name: str) -> torch.Tensor:
        """The weight of one diffusers-named Linear (a row slice of a fused BFL weight in that layout)."""
        if not hasattr(self, "_dmap"):
            self._dmap = self._diffusers_map()
        m, a, b = self._dmap[name]
        if self._cache[0] != m:  # q, k, v of a fused weight come one after another: read it once
            self._cache = (m, self.tensor(self.prefix + m + ".weight"))
        w = self._cache[1][a:b]
        if m == FINAL_BFL and self.layout == "bfl":  # BFL (shift, scale) vs diffusers (scale, shift)
            w = torch.cat(w.chunk(2)[::-1])
        return w


# --------------------------------------------------------------------------------------------
# Writing a .safetensors file one tensor at a time
# --------------------------------------------------------------------------------------------


def write_safetensors_streaming(path, entries: list[tuple[str, torch.dtype, list[int]]], produce,
                                metadata: dict | None = None) -> None:
    """Write `entries` (name, dtype, shape) in order, asking `produce(name)` for each tensor only when
    it is written, so memory holds one tensor at a time. Atomic: a temp file renamed at the end."""
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in entries:
            t = produce(name)
            if t.dtype != dtype or list(t.shape) != list(shape):
                raise RuntimeError(f"{name}: produced {t.dtype} {tuple(t.shape)}, header says {dtype} {shape}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
