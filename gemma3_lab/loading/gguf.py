"""Gemma 3 GGUF files (llama.cpp's format): the config from the metadata, float32 weights under
transformers' `Gemma3ForCausalLM` names, and a cached conversion to a Hugging Face folder (docs/gemma3.md §7)."""

from __future__ import annotations

import errno
import mmap
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as np_dequantize

from gemma3_lab.config import LIMITS, Gemma3Config, RopeConfig, TextConfig, pattern_layer_types
from gemma3_lab.errors import Gemma3LabError, number


class GGUFError(Gemma3LabError):
    """A GGUF file that is truncated, corrupt, or not a Gemma 3 text model."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: ggml lists the fastest-varying dim first, we reverse it
    raw: np.ndarray  # the stored bytes, uint8, a view into the memory-mapped file


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


# --- reading the file --------------------------------------------------------------------
# Our own parser rather than gguf.GGUFReader: the reader builds numpy views per array element,
# which takes 30-45 s on the 262,144-entry token arrays; this takes well under a second.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9  # GGUF value types; the rest are the scalars above


class _Cursor:
    """Bounds-checked reads, so a cut file fails with a GGUFError and never a struct.error."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF (needs byte {start + n:,}, file has {len(self.buf):,})")
        self.pos += n
        return start

    def scalar(self, vtype: int) -> Any:
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise GGUFError(f"{self.path}: corrupt GGUF (unknown value type {vtype} at byte {self.pos:,})")
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(10)
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.scalar(vtype)
        etype, count = self.scalar(4), self.scalar(10)
        if etype == _STRING:
            return [self.string() for _ in range(count)]
        if etype not in _SCALARS:
            raise GGUFError(f"{self.path}: corrupt GGUF (array of unknown type {etype})")
        dt = np.dtype(_SCALARS[etype])
        return np.frombuffer(self.buf, dt, count, self.take(count * dt.itemsize)).tolist()


def open_gguf(reader_or_path: str | os.PathLike | GGUFReader | GGUFFile) -> GGUFFile:
    """Parse the header, metadata and tensor table; the tensor bytes stay memory-mapped."""
    if isinstance(reader_or_path, GGUFFile):
        return reader_or_path
    if isinstance(reader_or_path, GGUFReader):
        return _from_reader(reader_or_path)
    path = Path(reader_or_path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "GGUF file not found", str(path))
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise GGUFError(f"{path}: truncated or corrupt GGUF (empty file)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path)
    try:
        if bytes(buf[cur.take(4) : 4]) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        version = cur.scalar(4)
        if version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version} (big-endian or corrupt?)")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar(10) for _ in range(cur.scalar(4))]
            infos.append((name, cur.scalar(4), dims, cur.scalar(10)))
    except UnicodeDecodeError:
        raise GGUFError(f"{path}: corrupt GGUF (a string is not UTF-8 at byte {cur.pos:,})") from None
    align = metadata.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or not 1 <= align <= 1 << 16 or align & (align - 1):
        raise GGUFError(f"{path}: general.alignment = {align!r} must be a power of two (GGUF uses 32)")
    data_start = -(-cur.pos // align) * align
    tensors = {}
    for name, qtype, dims, offset in infos:
        try:
            qtype = GGMLQuantizationType(qtype)
        except ValueError:
            raise GGUFError(f"{path}: corrupt GGUF (tensor {name} has unknown type {qtype})") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
        cur.pos = data_start + offset
        raw = np.frombuffer(buf, np.uint8, nbytes, cur.take(nbytes))  # checks the data is all there
        tensors[name] = GGUFTensor(name, qtype, tuple(int(d) for d in reversed(dims)), raw)
    return GGUFFile(path, metadata, tensors)


def _from_reader(r: GGUFReader) -> GGUFFile:
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {
        t.name: GGUFTensor(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                           np.asarray(t.data).reshape(-1).view(np.uint8))
        for t in r.tensors
    }
    return GGUFFile(Path(r.data.filename), meta, tensors)


# --- config ------------------------------------------------------------------------------
def _f32(x: float) -> float:
    """The shortest decimal that is the same float32: GGUF stores 1e-6 as 9.99999997e-07."""
    return float(str(np.float32(x)))


def read_gguf_config(reader_or_path) -> Gemma3Config:
    """The text config from `gemma3.*` metadata, plus the keys transformers drops (docs/gemma3.md §7 "Gaps").

    Metadata of the wrong type or out of range is a GGUFError naming the file."""
    g = open_gguf(reader_or_path)
    try:
        return _config(g)
    except GGUFError:
        raise
    except Gemma3LabError as e:  # the config's own checks (sizes, heads, ...)
        raise GGUFError(f"{g.path}: {e}") from None
    except (TypeError, ValueError, ArithmeticError, AttributeError) as e:  # e.g. int() of a list
        raise GGUFError(f"{g.path}: malformed gemma3 metadata ({type(e).__name__}: {e})") from None


def _config(g: GGUFFile) -> Gemma3Config:
    m, path = g.metadata, g.path
    arch = m.get("general.architecture")
    if arch != "gemma3":
        raise GGUFError(f"{path}: architecture is {arch!r}; gemma3_lab reads 'gemma3' GGUF files only")

    def key(k: str, default: Any = None) -> Any:
        if f"gemma3.{k}" not in m and default is None:
            raise GGUFError(f"{path}: metadata key gemma3.{k} is missing")
        return m.get(f"gemma3.{k}", default)

    n_layers, hidden, heads = int(key("block_count")), int(key("embedding_length")), int(key("attention.head_count"))
    number("gemma3.block_count", n_layers, integer=True, low=1, high=LIMITS["num_layers"])  # before per-layer lists
    head_dim = int(key("attention.key_length"))
    # transformers drops the attention scale; llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3) reads
    # `attention.scale` if set, else uses hidden/heads for the 27B (62 layers) and head_dim otherwise.
    if "gemma3.attention.scale" in m:
        qpas = round(_f32(m["gemma3.attention.scale"]) ** -2, 3)
    else:
        qpas = hidden // heads if n_layers == 62 else head_dim
    # transformers also drops RoPE scaling; Gemma 3 4B+ scale the global table only (linear x8).
    scaling = m.get("gemma3.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not used by Gemma 3 (expected none or linear)")
    rope_global = RopeConfig(_f32(key("rope.freq_base", 1e6)))
    if scaling == "linear":
        rope_global = RopeConfig(rope_global.theta, "linear", _f32(m.get("gemma3.rope.scaling.factor", 1.0)))
    pattern = m.get("gemma3.attention.sliding_window_pattern", 6)
    layer_types = (  # an int period, or (newer llama.cpp) one bool per layer, True = sliding
        pattern_layer_types(n_layers, int(pattern)) if isinstance(pattern, int)
        else tuple("sliding_attention" if s else "full_attention" for s in pattern)
    )
    tokens = m.get("tokenizer.ggml.tokens") or []
    eos = [int(m.get("tokenizer.ggml.eos_token_id", 1))]
    # llama.cpp stops on <end_of_turn> too, and the Hub generation_config lists it as eos ([1, 106]).
    eot = m.get("tokenizer.ggml.eot_token_id", tokens.index("<end_of_turn>") if "<end_of_turn>" in tokens else None)
    eos += [int(eot)] if eot is not None and int(eot) not in eos else []
    softcap = m.get("gemma3.final_logit_softcapping")
    text = TextConfig(
        vocab_size=int(m.get("gemma3.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        query_pre_attn_scalar=qpas,
        sliding_window=int(key("attention.sliding_window")),
        layer_types=layer_types,
        rope_local=RopeConfig(_f32(m.get("gemma3.rope.freq_base_swa", 10_000.0))),
        rope_global=rope_global,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        final_logit_softcapping=_f32(softcap) if softcap else None,
        tie_word_embeddings="output.weight" not in g.tensors,
        pad_token_id=int(m.get("tokenizer.ggml.padding_token_id", 0)),
        bos_token_id=int(m.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_ids=tuple(eos),
    )
    if not text.vocab_size:
        raise GGUFError(f"{path}: no tokenizer.ggml.tokens and no gemma3.vocab_size")
    return Gemma3Config(text=text, name=path.stem)


# --- dequantization ----------------------------------------------------------------------
# gguf.quants itself, the code transformers runs, so the result is bit-identical by construction.
# It is fed flat runs of ~1M values: on the 2-D array transformers passes it loops over groups of
# 16 rows, ~10 s of Python overhead on the 262,144-row embedding, vs ~0.6 s flat; bounded runs keep
# temporaries small for big models and let threads share the work (numpy drops the GIL in kernels).
_CHUNK_VALUES = 1 << 20
_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="gguf-dequant")


def dequantize(t: GGUFTensor) -> torch.Tensor:
    """One tensor as float32 in torch order (a fresh tensor, not a view of the file)."""
    if t.qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(t.raw.view(np.float32).copy()).reshape(t.shape)
    block, type_size = GGML_QUANT_SIZES[t.qtype]
    blocks = t.raw.reshape(-1, type_size)
    out = np.empty(blocks.shape[0] * block, np.float32)
    step = max(1, _CHUNK_VALUES // block)

    def run(i: int) -> None:
        out[i * block : (i + step) * block] = np_dequantize(blocks[i : i + step].reshape(1, -1), t.qtype).reshape(-1)

    list(_POOL.map(run, range(0, blocks.shape[0], step)))
    return torch.from_numpy(out).reshape(t.shape)


# --- state dict --------------------------------------------------------------------------
# The one GGUF -> transformers rename table (docs/gemma3.md §7). Per-layer names sit under blk.{i} / model.layers.{i}.
GGUF_TO_HF = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
}
GGUF_TO_HF_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm",
}


def hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GGUF_TO_HF:
        return f"{GGUF_TO_HF[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_TO_HF_LAYER:
        return f"model.layers.{parts[1]}.{GGUF_TO_HF_LAYER[parts[2]]}.{suffix}"
    return None


def read_gguf_state_dict(reader_or_path, progress: bool = True) -> dict[str, torch.Tensor]:
    """All weights as float32 under `Gemma3ForCausalLM` names; no lm_head when the head is tied."""
    from tqdm.auto import tqdm

    g = open_gguf(reader_or_path)
    unknown = [n for n in g.tensors if hf_name(n) is None]
    if unknown:
        raise GGUFError(f"{g.path}: tensors with no Gemma 3 name: {', '.join(unknown[:5])}")
    out: dict[str, torch.Tensor] = {}
    total = sum(t.raw.nbytes for t in g.tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"dequantizing {g.path.name}",
              file=sys.stderr, disable=not progress) as bar:
        for name, t in g.tensors.items():
            w = dequantize(t)
            if name.endswith("norm.weight"):
                w -= 1  # llama.cpp's converter stores Gemma's RMSNorm scale as 1 + w (docs/gemma3.md §7)
            out[hf_name(name)] = w
            bar.update(t.raw.nbytes)
    return out
