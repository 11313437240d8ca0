"""The attention mixer's options: sliding window, ALiBi / CoPE positions, top-k decode, the
convolution over q, k and v."""

import math

import pytest
import torch
from mixer_checks import (
    ATTENTION_VARIANTS,
    assert_close,
    check_decode_matches_full,
    make_mixer,
    random_input,
)

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.attention import Attention, sparse_decode_gap
from lmlab.layers.features import feature_counters
from lmlab.layers.position import alibi_slopes
from lmlab.model.lm import LanguageModel


def make_attention(position: str = "rope", kv_heads: int = 0, **options) -> Attention:
    """A float64 attention mixer with 4 heads and randomised CoPE embeddings (``mixer_checks``)."""
    model = {"position": position, "n_kv_heads": kv_heads}
    return make_mixer("attention", n_heads=4, model=model, perturb=True, **options)


def naive_attention(mixer: Attention, x: torch.Tensor) -> torch.Tensor:
    """Reference by loops: per query and head, an explicit softmax over the allowed keys."""
    batch, time, _ = x.shape
    heads, dim, groups = mixer.n_heads, mixer.head_dim, mixer.n_heads // mixer.n_kv_heads
    kv_width = mixer.n_kv_heads * dim
    qkv = mixer.qkv(x)
    if mixer.qkv_conv is not None:  # each channel: a weighted sum of its last W inputs
        width = mixer.qkv_conv.shape[1]
        qkv = torch.stack(
            [
                sum(
                    mixer.qkv_conv[:, j] * qkv[:, t - (width - 1) + j]
                    for j in range(width)
                    if t - (width - 1) + j >= 0
                )
                for t in range(time)
            ],
            1,
        )
    q, k, v = qkv.split([heads * dim, kv_width, kv_width], -1)
    q = q.view(batch, time, heads, dim)
    k = k.view(batch, time, -1, dim)
    v = v.view(batch, time, -1, dim)
    if mixer.rotary is not None:
        q, k = mixer.rotary(q), mixer.rotary(k)
    slopes = alibi_slopes(heads).double()
    out = torch.zeros(batch, time, heads, dim, dtype=x.dtype)
    for i in range(time):
        first = max(0, i - mixer.window + 1) if mixer.window else 0
        keys = range(first, i + 1)
        for h in range(heads):
            kh = k[:, list(keys), h // groups]
            logits = (kh @ q[:, i, h, :, None]).squeeze(-1) / math.sqrt(dim)
            if mixer.alibi_slopes.numel():
                logits = logits - slopes[h] * torch.tensor([i - j for j in keys], dtype=x.dtype)
            if mixer.cope is not None:
                gates = torch.sigmoid(logits)
                for n, _ in enumerate(keys):
                    p = gates[:, n:].sum(-1).clamp(max=mixer.cope.max_positions - 1)
                    lo, hi = p.floor().long(), p.ceil().long()
                    e = q[:, i, h] @ mixer.cope.embedding
                    e_lo, e_hi = e.gather(-1, lo[:, None])[:, 0], e.gather(-1, hi[:, None])[:, 0]
                    logits[:, n] = logits[:, n] + e_lo + (p - lo) * (e_hi - e_lo)
            out[:, i, h] = (logits.softmax(-1)[:, None, :] @ v[:, list(keys), h // groups])[:, 0]
    return mixer.out(out.reshape(batch, time, heads * dim))


@pytest.mark.parametrize(
    "position,kv_heads,window,qkv_conv",
    [(*variant, 0) for variant in ATTENTION_VARIANTS] + [("rope", 2, 0, 3), ("alibi", 0, 4, 2)],
)
def test_matches_naive_reference(position, kv_heads, window, qkv_conv):
    mixer = make_attention(position, kv_heads, window=window, qkv_conv=qkv_conv)
    x = random_input(2, 11, 32)
    with torch.no_grad():
        y, _ = mixer(x)
        expected = naive_attention(mixer, x)
    assert_close(y, expected, 1e-10, f"{position} window={window} conv={qkv_conv} vs naive loops")


def test_qkv_conv_lets_one_layer_recall_the_token_after_a_match():
    """The point of the convolution: a single attention layer learns associative recall
    (MQAR, 4 pairs) that the same layer without it cannot, as keys then see their preceding
    token."""
    from lmlab.eval.probes import mqar
    from lmlab.experiments.probe import train_probe

    train, test = mqar(64, 40, 4, 2000, seed=0), mqar(64, 40, 4, 200, seed=1)
    scores = {}
    for width in (0, 3):
        cfg = ModelConfig(
            vocab_size=64,
            d_model=32,
            n_layers=1,
            n_heads=2,
            channel_mixer="none",
            mixer_options={"attention": {"qkv_conv": width}},
        )
        scores[width] = train_probe(cfg, train, {"test": test}, lr=1e-2, epochs=8)["accuracy"]
    assert scores[3]["test"] > 0.9 > scores[0]["test"] + 0.3, scores


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]
    six = alibi_slopes(6).tolist()
    assert six[:4] == [2.0 ** (-2 * (i + 1)) for i in range(4)]
    assert six[4:] == [2.0**-1, 2.0**-3]


def test_window_decode_cache_stays_flat():
    mixer = make_attention("rope", window=8)
    x = random_input(1, 60, 32)
    sizes = []
    with torch.no_grad():
        _, state = mixer(x[:, :20])
        for t in range(20, 60):
            _, state = mixer(x[:, t : t + 1], state)
            sizes.append(state["k"].numel() + state["v"].numel())
            assert state["k"].shape[1] <= 8
    assert len(set(sizes)) == 1
    assert state["length"] == 60


def test_window_limits_what_a_query_sees():
    mixer = make_attention("none", window=4)
    x = random_input(1, 12, 32)
    changed = x.clone()
    changed[:, 3] += 1.0
    with torch.no_grad():
        y, _ = mixer(x)
        y_changed, _ = mixer(changed)
    moved = (y - y_changed).abs().amax(-1)[0]
    assert (moved[3:7] > 1e-6).all()
    assert (moved[:3] == 0).all() and (moved[7:] == 0).all()


def test_top_k_decode_is_exact_for_large_k_and_picks_the_best_key_for_k1():
    exact = make_attention("rope")
    x = random_input(2, 12, 32)
    wide = make_attention("rope", decode_top_k=20)
    check_decode_matches_full(wide, time=12, prefix=4)
    one = make_attention("rope", decode_top_k=1)
    with torch.no_grad():
        _, state = exact(x[:, :11])
        _, state_one = one(x[:, :11])
        y_exact, _ = exact(x[:, 11:], state)
        y_one, _ = one(x[:, 11:], state_one)
        batch, heads, dim = 2, 4, 8
        q = exact.qkv(x[:, 11:])[..., : heads * dim].view(batch, 1, heads, dim)
        q = exact.rotary(q, 11)
        keys, values = state["k"][:, :12], state["v"][:, :12]
        best = torch.einsum("bhd,bthd->bht", q[:, 0], keys).argmax(-1)
        chosen = values[torch.arange(batch)[:, None], best, torch.arange(heads)[None, :]]
        expected = exact.out(chosen.reshape(batch, 1, heads * dim))
    assert_close(y_one, expected, 1e-10, "top-1 decode vs value of the best key")
    assert (y_one - y_exact).abs().max() > 1e-4


def test_sparse_decode_gap_reports_zero_for_exact_and_positive_for_sparse():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=30, d_model=32, n_layers=2, n_heads=4)).eval()
    tokens = torch.randint(0, 30, (2, 40))
    wide = sparse_decode_gap(model, tokens, prefix=8, top_k=64)
    assert wide["max_abs_logit_diff"] == 0 and wide["loss_gap"] == 0
    narrow = sparse_decode_gap(model, tokens, prefix=8, top_k=2)
    assert narrow["max_abs_logit_diff"] > 0
    assert all(m.decode_top_k == 0 for m in model.modules() if isinstance(m, Attention))


@pytest.mark.parametrize(
    "position,options",
    [("alibi", {"window": 8}), ("cope", {}), ("rope", {"window": 8})],
)
def test_model_decode_equals_full_recompute(position, options):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        position=position,
        mixer_options={"attention": options},
    )
    model = LanguageModel(cfg).eval()
    for module in model.modules():
        if isinstance(module, Attention) and module.cope is not None:
            torch.nn.init.normal_(module.cope.embedding, std=0.5)
    tokens = torch.randint(0, 50, (2, 23))
    with torch.no_grad():
        full, _ = model(tokens)
        logits, state = model(tokens[:, :9])
        pieces = [logits]
        logits, state = model(tokens[:, 9:14], state)
        pieces.append(logits)
        for t in range(14, 23):
            logits, state = model(tokens[:, t : t + 1], state)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_sliding_window_counts_its_training_calls():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=20, d_model=16, n_layers=2, n_heads=2, mixer_options={"attention": {"window": 4}}
    )
    model = LanguageModel(cfg)
    model(torch.randint(0, 20, (1, 10)))
    assert feature_counters(model) == {"sliding_window": 2}
    plain = LanguageModel(ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2))
    plain(torch.randint(0, 20, (1, 10)))
    assert feature_counters(plain) == {}


def test_bad_options_and_positions_are_rejected():
    with pytest.raises(LmlabError, match="window"):
        make_attention(window=-1)
    with pytest.raises(LmlabError, match="qkv_conv"):
        make_attention(qkv_conv=-2)
    with pytest.raises(LmlabError, match="alibi"):
        ModelConfig(position="alibu").validate()


@pytest.mark.parametrize("position", ["alibi", "cope"])
def test_positions_train_without_nan(position):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=4, position=position)
    model = LanguageModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.arange(33).remainder(5).repeat(4, 1)
    losses = []
    for _ in range(30):
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
