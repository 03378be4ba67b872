"""The Gemma 3 tokenizer: a `tokenizers.Tokenizer` read from a tokenizer.json exactly as transformers
reads it (docs/gemma3.md §5.6, §5.7), with Gemma's special ids by name. GGUF vocabularies are turned into one
by `gemma3_lab.loading.gguf_tokenizer`."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, normalizers, pre_tokenizers, processors

from gemma3_lab.errors import Gemma3LabError

# Gemma's own spellings; a tokenizer_config.json or the GGUF's special-token ids override them.
DEFAULT_SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                     "pad_token": "<pad>", "mask_token": "<mask>"}


def _post_processor(bos: str, bos_id: int | None, add_bos: bool) -> processors.TemplateProcessing:
    # the same templates transformers' `update_post_processor` writes, so a saved tokenizer.json
    # means the same thing to both libraries
    if add_bos and bos_id is not None:
        return processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])


def set_gemma_pipeline(tk: _Backend) -> _Backend:
    """`GemmaTokenizer`'s fixed pipeline around the BPE model (docs/gemma3.md §5.7). transformers imposes it
    on every Gemma tokenizer.json it loads too, whatever the file says."""
    # no dummy-prefix "▁" and no strip: Gemma 3 sees text exactly as written
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tk


def _special_id(name: str) -> property:
    """The id of a special token whose spelling comes from the file (`bos_token`, ...)."""
    return property(lambda self: self.token_to_id(self.specials[name]))


def _token_id(token: str) -> property:
    return property(lambda self: self.token_to_id(token))


class Tokenizer:
    """Gemma 3 text <-> ids. Build with `from_file` (tokenizer.json) or
    `gemma3_lab.loading.gguf_tokenizer.tokenizer_from_gguf`."""

    def __init__(self, backend: _Backend, add_bos: bool = True, chat_template: str | None = None,
                 specials: dict[str, str] | None = None) -> None:
        self.backend = backend
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.specials = {**DEFAULT_SPECIALS, **(specials or {})}
        # encode() adds BOS itself; the post-processor only matters to readers of the saved file
        backend.post_processor = _post_processor(self.specials["bos_token"], self.bos_id, add_bos)

    # --- building ------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, add_bos: bool | None = None) -> "Tokenizer":
        """Load a tokenizer.json (or a folder holding one) as transformers' GemmaTokenizer does:
        vocab, merges and added tokens from the file, the pipeline from Gemma. A tokenizer_config.json
        beside it supplies add_bos_token, the special-token spellings and the chat template (or a
        chat_template.jinja does)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "tokenizer file not found", str(path))
        try:
            backend = set_gemma_pipeline(_Backend.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
        cfg_path = path.with_name("tokenizer_config.json")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        specials = {k: v for k in DEFAULT_SPECIALS if isinstance(v := cfg.get(k), str)}
        if add_bos is None:
            add_bos = bool(cfg.get("add_bos_token", True))
        # transformers 5 saves the template as its own file, which wins over the config entry
        jinja = path.with_name("chat_template.jinja")
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else cfg.get("chat_template")
        return cls(backend, add_bos, template if isinstance(template, str) else None, specials)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json and tokenizer_config.json. `path` is a folder, or a *.json file
        whose folder receives the config. Returns the tokenizer.json path."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path), pretty=False)  # 14 MB, where transformers' indented copy is 33 MB
        # enough for transformers' AutoTokenizer to load the folder as a GemmaTokenizer
        cfg = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": self.add_bos, "add_eos_token": False,
               "padding_side": "left", **self.specials}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        path.with_name("tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False),
                                                           encoding="utf-8")
        return path

    # --- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids for `text`; special tokens written in the text become their ids. `add_bos=None`
        uses this tokenizer's setting (True for Gemma)."""
        _check_text(text)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._bos(add_bos) + ids

    def encode_batch(self, texts: Iterable[str], add_bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(ids, attention_mask)`, both LongTensor (B, T), padded on the LEFT with `pad_id` so
        every row's last token sits in the last column, ready for generation."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode() for one string")
        bos = self._bos(add_bos)
        texts = list(texts)
        for t in texts:
            _check_text(t)
        rows = [bos + e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        T = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), T), self.pad_id or 0, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
        for b, r in enumerate(rows):
            if r:
                ids[b, T - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[b, T - len(r):] = 1
        return ids, mask

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.backend.id_to_token(i) for i in _id_list(ids)]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __bool__(self) -> bool:  # `if tokenizer:` would otherwise call __len__: 4 ms over 262k pieces
        return True

    def _bos(self, add_bos: bool | None) -> list[int]:
        want = self.add_bos if add_bos is None else add_bos
        return [self.bos_id] if want and self.bos_id is not None else []

    # --- special ids (docs/gemma3.md §5.6); None when the vocabulary lacks the token -------------------
    bos_id = _special_id("bos_token")  # 2
    eos_id = _special_id("eos_token")  # 1
    pad_id = _special_id("pad_token")  # 0
    start_of_turn_id = _token_id("<start_of_turn>")  # 105
    end_of_turn_id = _token_id("<end_of_turn>")  # 106
    boi_id = _token_id("<start_of_image>")  # 255999
    eoi_id = _token_id("<end_of_image>")  # 256000
    # 262144 in multimodal checkpoints; absent from the 270M vocabulary, which stops before it
    image_token_id = _token_id("<image_soft_token>")

    @property
    def stop_ids(self) -> list[int]:
        # a chat reply ends with <end_of_turn>; the Hub generation_config lists both (docs/gemma3.md §5.6)
        return [i for i in (self.eos_id, self.end_of_turn_id) if i is not None]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, add_bos={self.add_bos})"


def _id_list(ids) -> list[int]:
    """One sequence of ids from a list, a (T,) or (1, T) tensor, or a single id."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1 and ids.shape[0] != 1:
            raise ValueError(f"expected one sequence of ids, got a tensor of shape {tuple(ids.shape)}")
        ids = ids.reshape(-1).tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _check_text(text) -> None:
    """Text the tokenizer can take: a str that is valid Unicode (no lone surrogate halves, which
    a browser or a bad decode can produce and which UTF-8 cannot represent)."""
    if not isinstance(text, str):
        raise Gemma3LabError(f"the prompt must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Gemma3LabError(f"the prompt holds a lone surrogate {text[e.start]!r} at character {e.start}; "
                             "it is not valid Unicode text") from None
