"""The processor equals transformers' Gemma3Processor configured like the real 4B one (ids,
token types, pixels), records where every soft token came from, and refuses bad input clearly."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gemma3_lab.config import PRESETS
from gemma3_lab.prompt import images as img_ops
from gemma3_lab.prompt.processor import Processor

SOFT, BOI, EOI = 262144, 255999, 256000
SIZES = {"wide": (1600, 500), "tall": (300, 1200), "tiny": (10, 10)}

# Gemma 3's chat template (google/gemma-3-4b-it tokenizer_config.json; docs/gemma3.md §5.5)
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: resizing it exercises both the filter and the rounding."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pics():
    return {k: picture(*wh, seed=i) for i, (k, wh) in enumerate(SIZES.items())}


@pytest.fixture(scope="module")
def tokenizer_4b(real_folder, tmp_path_factory):
    """The 262144-piece vocabulary plus <image_soft_token> = 262144, as in the 4B tokenizer."""
    from tokenizers import AddedToken

    from gemma3_lab.prompt.tokenizer import Tokenizer

    tok = Tokenizer.from_file(real_folder / "tokenizer.json")
    tok.backend.add_special_tokens([AddedToken("<image_soft_token>", normalized=False, special=True)])
    folder = tmp_path_factory.mktemp("tokenizer-4b")
    tok.save(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["extra_special_tokens"] = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                   "eoi_token": "<end_of_image>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok, folder


@pytest.fixture(scope="module")
def hf_processor(tokenizer_4b):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, GemmaTokenizer

    # torchvision does not run here, so transformers' PIL backend is the one that runs
    images = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, resample=2, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3)
    return Gemma3Processor(image_processor=images, tokenizer=GemmaTokenizer.from_pretrained(tokenizer_4b[1]),
                           image_seq_length=256, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def ours(tokenizer_4b):
    return Processor(tokenizer_4b[0], PRESETS["gemma-3-4b"])  # the default image backend, "pil"


def _same(ref, got, pixels: bool = True):
    assert torch.equal(ref["input_ids"], got.input_ids)
    assert torch.equal(ref["attention_mask"], got.attention_mask)
    assert torch.equal(ref["token_type_ids"], got.token_types)
    if pixels:
        assert ref["pixel_values"].shape == got.pixel_values.shape
        assert torch.equal(ref["pixel_values"], got.pixel_values)  # bit for bit


@pytest.mark.oracle
@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_chat_with_system_prompt_and_two_images(hf_processor, ours, pics, pan_and_scan):
    messages = [
        {"role": "system", "content": "You are a careful observer."},
        {"role": "user", "content": [{"type": "image", "image": pics["wide"]}, {"type": "text", "text": "and"},
                                     {"type": "image", "image": pics["tall"]},
                                     {"type": "text", "text": " What differs? "}]},
        {"role": "assistant", "content": "The shape."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": pics["tiny"]}]},
    ]
    ref = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"do_pan_and_scan": pan_and_scan})
    got = ours(messages, pan_and_scan=pan_and_scan)
    _same(ref, got)
    assert got.pixel_values.shape[0] == (1 + 3 + 1 + 4 + 1 if pan_and_scan else 3)


@pytest.mark.oracle
@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_left_padded_batch(hf_processor, ours, pics, pan_and_scan):
    texts = ["A tiny one: <start_of_image>", "Two: <start_of_image><start_of_image> - compare them."]
    images = [[pics["tiny"]], [pics["wide"], pics["tall"]]]
    ref = hf_processor(text=texts, images=images, padding=True, return_tensors="pt", do_pan_and_scan=pan_and_scan)
    got = ours(texts, images=images, pan_and_scan=pan_and_scan)
    _same(ref, got)
    assert got.attention_mask[0, 0] == 0  # row 0 is the short one
    flat = ours(texts, images=[pics["tiny"], pics["wide"], pics["tall"]], pan_and_scan=pan_and_scan)
    assert torch.equal(flat.input_ids, got.input_ids)  # a flat list is shared out by marker counts


@pytest.mark.oracle
def test_images_without_text(hf_processor, ours, pics):
    ref = hf_processor(images=[[pics["tiny"], pics["wide"]]], return_tensors="pt")
    _same(ref, ours(None, images=[pics["tiny"], pics["wide"]]))


def test_spans_say_where_every_soft_token_came_from(ours, pics):
    got = ours(["x", "Look <start_of_image> then <start_of_image>"], images=[[], [pics["tiny"], pics["wide"]]],
               pan_and_scan=True)
    ids = got.input_ids
    spans = got.image_spans
    assert [(s.image, s.crop) for s in spans] == [(0, 0), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert [s.box for s in spans] == [(0, 0, 10, 10), (0, 0, 1600, 500), (0, 0, 534, 500), (534, 0, 1068, 500),
                                      (1068, 0, 1600, 500)]
    assert [s.pixel_index for s in spans] == list(range(5)) and got.pixel_values.shape[0] == 5
    for s in spans:
        assert s.batch == 1 and s.end - s.start == 256 and s.grid == 16
        assert (ids[1, s.start:s.end] == SOFT).all() and ids[1, s.start - 1] == BOI and ids[1, s.end] == EOI
    assert int((got.token_types == 1).sum()) == 5 * 256
    assert spans[0].cell(spans[0].start + 17) == (1, 1)
    assert [im.size for im in got.images] == [(10, 10), (1600, 500)]


def test_pan_and_scan_arithmetic():
    boxes = img_ops.pan_and_scan_boxes
    assert boxes(1800, 600) == [(0, 0, 600, 600), (600, 0, 1200, 600), (1200, 0, 1800, 600)]
    assert boxes(1000, 700) == [(0, 0, 500, 700), (500, 0, 1000, 700)]
    assert boxes(300, 1200) == [(0, 0, 300, 300), (0, 300, 300, 600), (0, 600, 300, 900), (0, 900, 300, 1200)]
    assert boxes(1100, 1000) == []  # ratio 1.1 < 1.2
    assert boxes(500, 300) == []  # two crops of 250 < 256 px
    assert len(boxes(5000, 500)) == 4  # at most 4 crops
    assert boxes(1601, 500)[-1] == (1068, 0, 1601, 500)  # ceil: the last crop is the narrow one


@pytest.mark.oracle
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P-transparent", "P", "L", "1", "CMYK", "I;16"])
def test_rgb_conversion_matches_transformers(mode):
    from transformers.image_transforms import convert_to_rgb

    rgba = picture(20, 12)
    alpha = np.linspace(0, 255, 20 * 12, dtype=np.uint8).reshape(12, 20)
    rgba = Image.fromarray(np.dstack([np.asarray(rgba), alpha]))
    if mode == "P-transparent":
        img = rgba.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=16)
        img.info["transparency"] = 3
    elif mode == "I;16":
        img = Image.fromarray((np.asarray(rgba.convert("L"), dtype=np.uint16) * 200))
    else:
        img = rgba.convert(mode)
    got = np.asarray(img_ops.to_rgb(img))
    assert np.array_equal(got, convert_to_rgb(img, return_numpy=True))
    assert got.shape == (12, 20, 3)
    if mode == "RGBA":
        assert (got[0, 0] == 255).all()  # fully transparent -> white


def test_every_source_kind_gives_the_same_pixels(ours, tmp_path):
    pic = picture(40, 30)
    path = tmp_path / "pic.png"
    pic.save(path)
    sources = [pic, path, str(path), path.read_bytes(), np.asarray(pic)]
    outs = [ours("<start_of_image>", images=s).pixel_values for s in sources]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


# ----------------------------------------------------------------------------- bad input
def test_marker_and_image_counts_must_agree(ours, pics):
    with pytest.raises(ValueError, match=r"prompt 0: 2 marker\(s\), 1 image\(s\)"):
        ours("<start_of_image> and <start_of_image>", images=[pics["tiny"]])
    with pytest.raises(ValueError, match=r"prompt 0: 1 marker\(s\), 2 image\(s\)"):
        ours("only <start_of_image>", images=[pics["tiny"], pics["tiny"]])
    with pytest.raises(ValueError, match=r"prompt 0: 1 marker\(s\), 0 image\(s\)"):
        ours("a marker but no image: <start_of_image>")
    with pytest.raises(ValueError, match=r"hold 2 <start_of_image> marker\(s\) in all \(1, 1\) but 3 image"):
        ours(["<start_of_image>", "<start_of_image>"], images=[pics["tiny"]] * 3)
    with pytest.raises(ValueError, match="do not write <image_soft_token>"):
        ours("<start_of_image><image_soft_token>", images=[pics["tiny"]])


def test_non_image_and_empty_files(ours, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes\.png: not an image file"):
        ours("<start_of_image>", images=text)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.jpg: the file is empty \(0 bytes\)"):
        ours("<start_of_image>", images=empty)
    truncated = tmp_path / "cut.png"
    buf = io.BytesIO()
    picture(64, 64).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:200])
    with pytest.raises(ValueError, match=r"cut\.png: could not decode"):
        ours("<start_of_image>", images=truncated)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ours("<start_of_image>", images=tmp_path / "missing.png")
    with pytest.raises(ValueError, match="URLs are not fetched"):
        ours("<start_of_image>", images="https://example.com/cat.png")


def _huge_png(path, side: int = 20000) -> None:
    """A valid 1-bit side×side PNG of ~50 KB: decoding it would take side² bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + side // 8)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_huge_image_is_refused_without_decoding(ours, tmp_path):
    path = tmp_path / "huge.png"
    _huge_png(path)
    with pytest.raises(ValueError, match=r"huge\.png: 20000×20000 is 400 megapixels, over the 34 MP decoding budget"):
        ours("<start_of_image>", images=path)


def test_huge_jpeg_is_decoded_at_reduced_scale(ours, tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    picture(3000, 2000).save(path, quality=80)
    monkeypatch.setattr(img_ops, "MAX_PIXELS", 2_000_000)  # stands in for 179 MP
    got = ours("<start_of_image>", images=path)
    assert got.images[0].size == (1500, 1000)  # libjpeg 1/2 scale, short side still >= 896
    assert got.pixel_values.shape == (1, 3, 896, 896)


def test_images_for_a_text_only_model(tokenizer_4b, pics):
    text_only = Processor(tokenizer_4b[0], PRESETS["gemma-3-270m"])
    with pytest.raises(ValueError, match="gemma-3-270m is a text-only model: it cannot take images"):
        text_only("<start_of_image>", images=pics["tiny"])
    plain = text_only("the marker stays text here: <start_of_image>")
    assert plain.input_ids[0, -1] == BOI and plain.pixel_values is None
