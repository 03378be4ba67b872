"""A Gemma 3 tokenizer from a GGUF file's metadata, built the way transformers'
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` builds it (docs/gemma3.md §7): the SentencePiece pieces
become a byte-fallback BPE whose merges are implied by the vocabulary."""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from gemma3_lab.loading.gguf import GGUFError, open_gguf
from gemma3_lab.prompt.tokenizer import DEFAULT_SPECIALS, Tokenizer, set_gemma_pipeline

# SentencePiece piece types as llama.cpp writes them to `tokenizer.ggml.token_type`.
_CONTROL, _USER_DEFINED = 3, 4
_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}
_GGUF_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                     "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def gemma_merges(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, ranked like transformers' `generate_merges`
    with `vocab_scores = {token: -index}` (docs/gemma3.md §7 step 3).

    Every split of a token into two vocabulary pieces is a merge. They are ranked by the token's
    position in the file (Gemma's scores do not follow merge order, its token order does), then by
    the longer left piece. That sort key is unique per merge, so ordering the loop this way gives
    the same list as transformers' global sort, with no sort at all.
    """
    out: list[tuple[str, str]] = []
    extend = out.extend
    # the last index wins for a duplicated string, as in transformers' dict comprehension
    for tok in sorted(vocab, key=vocab.__getitem__) if len(vocab) != len(tokens) else tokens:
        extend([(tok[:k], tok[k:]) for k in range(len(tok) - 1, 0, -1) if tok[k:] in vocab and tok[:k] in vocab])
    return out


def gemma_backend(metadata: dict[str, Any], specials: dict[str, str]) -> _Backend:
    """`GemmaTokenizer(vocab, merges)` plus the GGUF's control and user-defined added tokens."""
    raw = list(metadata["tokenizer.ggml.tokens"])
    # llama.cpp stores a run of spaces as real spaces, but the normalizer turns text spaces into
    # "▁" before lookup, so such a token could never match; transformers respells it (docs/gemma3.md §7)
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in raw]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    else:
        merges = gemma_merges(tokens, vocab)

    tk = set_gemma_pipeline(_Backend(BPE(vocab=vocab, merges=merges, unk_token=specials["unk_token"],
                                          fuse_unk=True, byte_fallback=True, dropout=None)))

    # Without these, "<start_of_turn>" would be cut into pieces. Matching uses the file's own
    # spelling (not the respelled one), so the 30 space-run user-defined tokens stay plain vocab.
    types = list(metadata.get("tokenizer.ggml.token_type") or ())
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, ty in zip(raw, types) if ty == _CONTROL])
    tk.add_tokens([AddedToken(t, normalized=False, special=False)
                   for t, ty in zip(raw, types) if ty == _USER_DEFINED and tk.token_to_id(t) is not None])
    return tk


def tokenizer_from_gguf(source, add_bos: bool | None = None) -> Tokenizer:
    """Build from a GGUF path, a `gguf.GGUFReader` or an opened `GGUFFile`, the way
    transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)` does (docs/gemma3.md §7).
    `add_bos=None` follows the file's `tokenizer.ggml.add_bos_token` (default True)."""
    g = open_gguf(source)
    m = g.metadata
    if "tokenizer.ggml.tokens" not in m:
        raise GGUFError(f"{g.path}: GGUF has no tokenizer metadata (no tokenizer.ggml.tokens)")
    kind, arch = m.get("tokenizer.ggml.model"), m.get("general.architecture")
    # transformers sends only these to its Gemma builder; anything else gets another tokenizer
    if kind != "llama" or arch not in _GEMMA_ARCHS:
        raise GGUFError(f"{g.path}: tokenizer {kind!r} for architecture {arch!r} is not a Gemma SentencePiece "
                        f"vocabulary (expected tokenizer.ggml.model 'llama' and one of {sorted(_GEMMA_ARCHS)})")
    raw = m["tokenizer.ggml.tokens"]
    specials = {name: raw[int(m[f"tokenizer.ggml.{key}"])]
                for name, key in _GGUF_SPECIAL_IDS.items() if f"tokenizer.ggml.{key}" in m}
    specials = {**DEFAULT_SPECIALS, **specials}
    if add_bos is None:
        add_bos = bool(m.get("tokenizer.ggml.add_bos_token", True))
    return Tokenizer(gemma_backend(m, specials), add_bos, m.get("tokenizer.chat_template"), specials)
