"""Read and write Hugging Face Gemma 3 checkpoint folders (config.json + safetensors, single or
sharded) as state dicts in gemma3_lab's own parameter names, validated against the config."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gemma3_lab.config import Gemma3Config
from gemma3_lab.errors import Gemma3LabError, number
from gemma3_lab.loading.hf_names import Unmatched, expected_shapes, to_hf, to_internal

__all__ = ["load_hf_state_dict", "save_hf_folder", "find_tokenizer", "expected_shapes", "parse_dtype", "validate",
           "inside"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT_STORAGE = {"F64", "F32", "F16", "BF16"}  # safetensors dtype names the loader reads
_PROGRESS_BYTES = 10**9  # below this a single file loads too fast for a bar to help
_MAX_LISTED = 10


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"float32" | "bfloat16" | "float16" or the matching torch.dtype; anything else is a ValueError."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)} (or the matching torch.dtype)")


def inside(folder: str | Path, path: str | Path) -> Path:
    """`path` with symlinks resolved, if it stays inside `folder` (also resolved); else a
    Gemma3LabError naming the file. Every file the loader opens goes through here, so a symlink
    or a `../` shard name cannot reach weights outside the folder it was given (the one exception:
    a hub cache snapshot may reach its own repository's blobs)."""
    root = Path(folder).resolve()
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        root = root.parent.parent  # a Hugging Face hub cache: snapshots/<rev>/* link to ../../blobs/*
    real = (Path(folder) / path).resolve()
    if real != root and root not in real.parents:
        raise Gemma3LabError(f"{Path(folder) / path}: resolves to {real}, outside the model folder {root}; refused")
    return real


def find_tokenizer(folder: str | Path) -> Path:
    """tokenizer.json if present (fast tokenizers), else the SentencePiece tokenizer.model.

    It and the files read beside it (tokenizer_config.json, chat_template.jinja) must be inside `folder`."""
    folder = Path(folder)
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            for extra in ("tokenizer_config.json", "chat_template.jinja"):
                if (folder / extra).exists():
                    inside(folder, extra)
            inside(folder, name)
            return folder / name
    raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model")


def _shard_names(index: Path) -> list[str]:
    """The distinct file names an index's weight_map points to: relative names inside the folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError, RecursionError) as e:
        raise Gemma3LabError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise Gemma3LabError(f"{index}: weight_map must map tensor names to shard file names, "
                             f"got {type(weight_map).__name__}")
    names = sorted(set(weight_map.values()))
    for s in names:
        if not s or Path(s).is_absolute() or ".." in Path(s).parts or "\\" in s or "\0" in s:
            raise Gemma3LabError(f"{index}: shard name {s!r} must be a plain file name inside the folder")
    return names


def _checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files that hold the weights; a single file wins over an index, as in transformers."""
    if (folder / SINGLE_FILE).is_file():
        return [inside(folder, SINGLE_FILE)]
    index = folder / INDEX_FILE
    if index.is_file():
        inside(folder, INDEX_FILE)
        names = _shard_names(index)
        absent = [s for s in names if not (folder / s).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shard(s) that are not in {folder}: {_listing(absent)}")
        return [inside(folder, s) for s in names]
    present = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".safetensors", ".gguf", ".pth"})
    hint = f" (found {', '.join(present)}; only safetensors are read)" if present else ""
    raise FileNotFoundError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _check_finite(t: torch.Tensor, label: str) -> None:
    """Refuse NaN/inf weights by name: the fast (SDPA) and hooked (explicit) attention paths treat
    them differently, so the model would give two answers. One sum finds them (NaN and inf
    propagate); only a non-finite sum, or one that overflowed, looks closer."""
    if t.numel() and not torch.isfinite(t.sum(dtype=torch.float32)) and not bool(torch.isfinite(t).all()):
        raise Gemma3LabError(f"{label} holds NaN or inf values; refusing to load it")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise Gemma3LabError(f"{path}: not a readable safetensors file ({e})") from None


def _listing(items: list[str]) -> str:
    more = len(items) - _MAX_LISTED
    return ", ".join(items[:_MAX_LISTED]) + (f" ... and {more} more" if more > 0 else "")


def validate(
    config: Gemma3Config,
    found: Mapping[str, tuple[tuple[int, ...], str]],
    num_labels: int | None = None,
    unknown: Sequence[str] = (),
    where: str = "checkpoint",
) -> None:
    """Raise one Gemma3LabError describing every missing, unexpected and mis-shaped tensor.

    `found` maps internal name -> (shape, where it came from); `unknown` lists names no rename rule knows.
    Lists stop at ten names so a wrong config gives a readable error, not thousands of lines.
    """
    want = expected_shapes(config, num_labels)
    missing = [n for n in want if n not in found]
    unexpected = list(unknown) + [f"{n} ({src})" for n, (_, src) in found.items() if n not in want]
    wrong = [
        f"{n} ({src}): expected {want[n]} from the config, got {shape}"
        for n, (shape, src) in found.items()
        if n in want and tuple(shape) != want[n]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {_listing(wrong)}")
    if problems:
        raise Gemma3LabError(f"{where} does not match its config:\n  " + "\n  ".join(problems))


def _num_labels(raw: Mapping) -> int | None:
    """Only the (Text)ForSequenceClassification classes have a `score` head; its size is in the config."""
    if not any("ForSequenceClassification" in a for a in raw.get("architectures") or ()):
        return None
    n = raw.get("num_labels") or len(raw.get("id2label") or {}) or 2  # 2 = transformers' default
    return number("config field num_labels", n, integer=True, low=1, high=2**20)


def load_hf_state_dict(
    folder: str | Path,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    label: str | None = None,
) -> tuple[Gemma3Config, dict[str, torch.Tensor]]:
    """Read a Hugging Face Gemma 3 folder into (config, state dict in internal names).

    Tensors already in `dtype` on CPU are copied out of the memory-mapped file into the
    process's own memory where it has room (`_copy_pays`); others are cast or moved.
    Everything is checked against the config before any tensor is read. `label` names the
    model on the progress bar (default: the folder's name).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder not found")
    dtype = parse_dtype(dtype)
    if (folder / "config.json").exists():
        inside(folder, "config.json")
    config = Gemma3Config.from_json(folder / "config.json")  # validated, bounded: nothing is allocated yet
    num_labels = _num_labels(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    files = _checkpoint_files(folder)

    plan, found, unknown = _plan(files, config)
    validate(config, found, num_labels, unknown, where=str(folder))
    state = _read(plan, files, dtype, device, (label or folder.name) if progress else None)
    return config, {n: state[n] for n in expected_shapes(config, num_labels)}


def _plan(files: list[Path], config: Gemma3Config):
    """Pass 1: names and shapes from the headers only, so a bad checkpoint fails fast.
    Returns (file -> [(checkpoint name, internal name)], internal name -> (shape, where), unknown)."""
    plan: dict[Path, list[tuple[str, str]]] = {}  # file -> [(checkpoint name, internal name)]
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    unknown: list[str] = []
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                name = to_internal(key)
                if name is None:
                    continue
                if isinstance(name, Unmatched):
                    unknown.append(f"{key} in {path.name}")
                    continue
                if name == "lm_head.weight" and config.text.tie_word_embeddings:
                    continue  # a tied head is the embedding; a stored copy is redundant
                if name in found:
                    raise Gemma3LabError(f"{path}: {key} and {found[name][1]} both map to {name}")
                stored = f.get_slice(key).get_dtype()
                if stored not in FLOAT_STORAGE:  # casting integers or float8 codes would invent weights
                    raise Gemma3LabError(f"{path}: {key} is stored as {stored}; only float weights "
                                         f"({', '.join(sorted(FLOAT_STORAGE))}) are read, nothing is cast from it")
                found[name] = (tuple(f.get_slice(key).get_shape()), f"{key} in {path.name}")
                plan.setdefault(path, []).append((key, name))
    return plan, found, unknown


def _read(plan: dict, files: list[Path], dtype: torch.dtype, device, label: str | None) -> dict[str, torch.Tensor]:
    """Pass 2: the tensors, each checked finite; `.to` returns the mmapped tensor itself when
    nothing changes, and that one is copied where `_copy_pays`. `label` names the progress bar
    (None: no bar)."""
    total = sum(p.stat().st_size for p in files)
    copy = _copy_pays(total)
    bar = None
    if label is not None and (len(files) > 1 or total > _PROGRESS_BYTES):
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {label}", file=sys.stderr)
    state: dict[str, torch.Tensor] = {}
    try:
        for path, pairs in plan.items():
            done = 0
            with _open(path) as f:
                for key, name in pairs:
                    t = f.get_tensor(key)
                    _check_finite(t, f"{path}: {key}")
                    state[name] = t.to(device=device, dtype=dtype)
                    if copy and state[name].data_ptr() == t.data_ptr():  # still the file's pages
                        state[name] = state[name].clone()
                    if bar is not None:
                        bar.update(t.numel() * t.element_size())
                        done += t.numel() * t.element_size()
            if bar is not None:
                bar.update(path.stat().st_size - done)  # the header and any dropped tensors
    finally:
        if bar is not None:
            bar.close()
    return state


def _copy_pays(file_bytes: int) -> bool:
    """Whether weights read as they are stored leave the memory-mapped file for the process's
    own memory. A decode step reads every weight once per token, and on the 2-core Xeon the
    float32 270M's pages of the page cache read slower than a copy of them: its head at 18-20
    GB/s against 24-25, the compiled decode step 12.8-14.7 tokens/s against 15.6-18.5 (1.22-1.26x,
    two models in turns in one process). The copy costs 0.3 s of a warm load. A checkpoint that
    would take more than half the memory the system has available stays mapped, where the
    kernel can page it (GEMMA3_LAB_MAPPED_WEIGHTS=1 keeps every one mapped)."""
    if os.environ.get("GEMMA3_LAB_MAPPED_WEIGHTS") == "1":
        return False
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux: copy, as for a model that fits
        return True
    return file_bytes <= free // 2


def _shard_bytes(size: int | str | None) -> int | None:
    """50_000, "50KB", "5GB" or "2GiB" -> bytes (KB = 1000 as in transformers, KiB = 1024)."""
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '50KB', '5GB', '2GiB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def save_hf_folder(
    config: Gemma3Config,
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write config.json and safetensors in transformers 5.x's current layout (the inverse of loading).

    Shards as `model-0000i-of-0000n.safetensors` plus an index when the tensors exceed `max_shard_size`.
    """
    out = Path(out_dir)
    sd = dict(state_dict)
    if config.text.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # transformers re-ties it; storing it would share memory with embed
    num_labels = int(sd["score.weight"].shape[0]) if "score.weight" in sd else None
    validate(config, {n: (tuple(t.shape), "state_dict") for n, t in sd.items()}, num_labels, where="state_dict")

    tensors = {to_hf(n, config.is_multimodal): sd[n].detach().contiguous() for n in expected_shapes(config, num_labels)}
    limit = _shard_bytes(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += nbytes

    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model-*-of-*.safetensors"), out / SINGLE_FILE, out / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # leftovers from an earlier save would shadow or confuse this one
    hf_config = config.to_hf()
    text_cfg = hf_config.get("text_config", hf_config)
    scalar = text_cfg.get("query_pre_attn_scalar")
    if isinstance(scalar, float) and scalar.is_integer():
        text_cfg["query_pre_attn_scalar"] = int(scalar)  # transformers 5.x's strict config rejects 256.0
    if num_labels is not None:
        # transformers pairs a gemma3_text config with Gemma3TextForSequenceClassification;
        # Gemma3ForSequenceClassification expects the multimodal gemma3 config.
        cls = "Gemma3ForSequenceClassification" if config.is_multimodal else "Gemma3TextForSequenceClassification"
        hf_config["architectures"] = [cls]
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out
