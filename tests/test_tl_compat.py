"""TransformerLens' vocabulary on Gemma3: the W_* views recompute the hooked activations from
the cache, cfg matches the config, tokens round-trip, return_type / per-token loss (against
transformers' loss on the real 270M) and add_hook / reset_hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma3_lab.errors import Gemma3LabError


def _rms(x, norm):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight.float())


def close(a, b, tol):
    """Equal up to float32 rounding: the largest difference relative to b's largest magnitude."""
    assert a.shape == b.shape
    assert float((a.float() - b.float()).abs().max()) <= tol * float(b.float().abs().max()), (a - b).abs().max()


def _views_reproduce_the_cache(model, ids, tol):
    _, cache = model.run_with_cache(ids, full_logits=True, top_k=0)
    n_rep = model.config.text.n_rep
    W_Q, W_K, W_V, W_O = model.W_Q, model.W_K, model.W_V, model.W_O
    for i, block in enumerate(model.blocks):
        x = cache[f"blocks.{i}.pre_attention_norm.hook_normalized"]
        close(torch.einsum("bsd,ndh->bsnh", x, W_Q[i]), cache["q", i], tol)
        # W_K is repeated per query head: query head h reads kv head h // n_rep
        k = torch.einsum("bsd,ndh->bsnh", x, W_K[i])
        close(k, cache["k", i].repeat_interleave(n_rep, dim=2), tol)
        v = torch.einsum("bsd,ndh->bsnh", x, W_V[i])
        pattern = cache["pattern", i].to_dense()  # (B, N, S, T)
        z = torch.einsum("bnst,btnh->bsnh", pattern, v)
        close(z, cache["z", i], tol)
        o = torch.einsum("bsnh,nhd->bsd", cache["z", i], W_O[i])
        close(o, cache[f"blocks.{i}.attn.hook_out"], tol)
        close(_rms(o, block.post_attention_norm), cache["attn_out", i], tol)
        h = cache[f"blocks.{i}.pre_ffw_norm.hook_normalized"]
        post = F.gelu(h @ model.W_gate[i], approximate="tanh") * (h @ model.W_in[i])
        close(post, cache["post", i], tol)
        close(_rms(post @ model.W_out[i], block.post_ffw_norm), cache["mlp_out", i], tol)
    close(cache["final_norm.hook_normalized"] @ model.W_U, cache["hook_logits"], tol)
    e = model.W_E[ids] * torch.tensor(model.cfg.d_model**0.5, dtype=model.dtype)
    torch.testing.assert_close(e, cache["hook_inputs_embeds"], atol=0, rtol=0)


def test_weight_views_reproduce_the_cache_tiny(tiny_gqa):
    _views_reproduce_the_cache(tiny_gqa, torch.tensor([[2, 5, 9, 3, 7, 11, 4, 8]]), tol=1e-5)


def test_weight_view_shapes_and_cfg(tiny_gqa):
    m, c = tiny_gqa, tiny_gqa.config.text
    assert (m.cfg.n_layers, m.cfg.n_heads, m.cfg.n_key_value_heads, m.cfg.d_model, m.cfg.d_head, m.cfg.d_mlp,
            m.cfg.d_vocab, m.cfg.n_ctx) == (c.num_layers, c.num_heads, c.num_kv_heads, c.hidden_size, c.head_dim,
                                            c.intermediate_size, c.vocab_size, c.max_position_embeddings)
    L, N, K, D, H, I = 3, 4, 2, 32, 16, 48
    assert m.W_Q.shape == m.W_K.shape == m.W_V.shape == (L, N, D, H)
    assert m._W_K.shape == m._W_V.shape == (L, K, D, H)
    assert m.W_O.shape == (L, N, H, D) and m.W_U.shape == (D, 64) and m.W_E.shape == (64, D)
    assert m.W_gate.shape == m.W_in.shape == (L, D, I) and m.W_out.shape == (L, I, D)
    assert m.W_U.data_ptr() == m.embed.weight.data_ptr()  # tied: a view of the embedding


def test_return_types_and_per_token_loss(tiny_gqa):
    ids = torch.tensor([[2, 5, 9, 3, 7, 11], [2, 8, 8, 1, 6, 30]])
    with torch.no_grad():
        logits = tiny_gqa(ids, return_type="logits")
        per = tiny_gqa(ids, return_type="loss", loss_per_token=True)
        mean = tiny_gqa(ids, return_type="loss")
        both = tiny_gqa(ids, return_type="both")
    by_hand = -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(per, by_hand)
    torch.testing.assert_close(mean, by_hand.mean())
    torch.testing.assert_close(both[0], logits) and torch.testing.assert_close(both[1], mean)
    assert tiny_gqa(ids, return_type=None) is None
    torch.testing.assert_close(tiny_gqa(ids).logits, logits)  # the default still returns ModelOutput
    with pytest.raises(Gemma3LabError, match="return_type"):
        tiny_gqa(ids, return_type="logit")


def test_add_hook_stays_until_reset(tiny_gqa):
    ids = torch.tensor([[2, 5, 9, 3]])
    with torch.no_grad():
        before = tiny_gqa(ids, return_type="logits")
        tiny_gqa.add_hook("blocks.1.hook_resid_mid", lambda t, hook: t * 0)
        hooked = [tiny_gqa(ids, return_type="logits") for _ in range(2)]
        tiny_gqa.reset_hooks()
        after = tiny_gqa(ids, return_type="logits")
    assert not torch.allclose(hooked[0], before)
    torch.testing.assert_close(hooked[0], hooked[1])
    torch.testing.assert_close(after, before)


@pytest.mark.real
def test_weight_views_reproduce_the_cache_real(real_model):
    ids = real_model.to_tokens("The Eiffel Tower is in the city of Paris, which is the capital of France.")
    _views_reproduce_the_cache(real_model, ids, tol=1e-5)


@pytest.mark.real
def test_tokens_round_trip(real_model):
    text = "The Eiffel Tower is in the city of"
    ids = real_model.to_tokens(text)
    assert ids.shape[0] == 1 and int(ids[0, 0]) == real_model.config.text.bos_token_id
    assert real_model.to_tokens(text, prepend_bos=False).shape[1] == ids.shape[1] - 1
    pieces = real_model.to_str_tokens(text)
    assert pieces[0] == "<bos>" and pieces[2] == " Eiffel" and "".join(pieces[1:]) == text
    assert real_model.to_string(ids[0, 1:]) == text
    assert real_model.to_string(ids) == ["<bos>" + text]


@pytest.mark.real
@pytest.mark.oracle
def test_loss_matches_transformers(real_model, hf_eager):
    ids = real_model.to_tokens("The Eiffel Tower is in the city of Paris, which is the capital of France.")
    with torch.no_grad():
        ours = real_model(ids, return_type="loss")
        theirs = hf_eager(ids, labels=ids).loss
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
