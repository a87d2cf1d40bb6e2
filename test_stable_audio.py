"""Tests for stable_audio.py, in the module's order. Each compares with something independent:
a closed form, an exact solution, or a property that must hold."""
import argparse
import copy
import dataclasses
import json
import math
import os
import re
import struct
import types
import zlib
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

import bench
import sample
import released
import sound_world
import stable_audio as sa
import train
import training

# A tiny model with a 3-second window keeps generate() tests fast on 2 CPU cores.
SHORT = replace(sa.SIZES["tiny"], window=2 ** 17)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sa.build_model(SHORT).eval()


# ---------------------------------------------------------------------------------- configs
def test_sizes_share_the_algorithm_and_differ_in_width():
    full, tiny = sa.SIZES["full"], sa.SIZES["tiny"]
    assert math.prod(full.vae.strides) == math.prod(tiny.vae.strides) == 1024
    assert full.unet.factors == tiny.unet.factors == (1, 2, 2, 4)
    assert tiny.unet.widths[0] < full.unet.widths[0]
    # The one departure: tiny feeds the padding mask to the U-Net; full is the paper's.
    assert (full.unet.padding_mask, tiny.unet.padding_mask) == (False, True)


def test_build_model_rejects_window_not_divisible_by_vae_and_unet_strides():
    with pytest.raises(ValueError, match="multiple of 16384"):
        sa.build_model(replace(sa.SIZES["tiny"], window=2 ** 17 + 1024))
    with pytest.raises(ValueError, match="unknown size"):
        sa.build_model("huge")
    for bad in (0, -1.0, float("nan"), float("inf"), "2"):    # e.g. a damaged checkpoint's config
        with pytest.raises(ValueError, match="latent_scale must be a positive number"):
            sa.build_model(replace(sa.SIZES["tiny"], latent_scale=bad))


# ---------------------------------------------------------------------------------- Snake
def test_snake_matches_formula():
    snake = sa.Snake(3)
    with torch.no_grad():
        snake.alpha.copy_(torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1))
    x = torch.linspace(-4, 4, 50).repeat(2, 3, 1)
    for c, a in enumerate([0.5, 1.0, 3.0]):
        expected = x[:, c] + torch.sin(a * x[:, c]) ** 2 / a
        torch.testing.assert_close(snake(x)[:, c], expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- VAE
@pytest.mark.parametrize("n_frames", [1, 3, 8])
def test_vae_downsamples_by_1024(model, n_frames):
    audio = torch.randn(2, 2, 1024 * n_frames)
    mean, std = model.vae.encode(audio)
    assert mean.shape == std.shape == (2, 64, n_frames)
    assert model.vae.decode(mean).shape == (2, 2, 1024 * n_frames)


@pytest.mark.parametrize("N", [1, 1023, 1025, 3000])
def test_vae_zero_pads_audio_to_the_next_multiple_of_1024(model, N):
    audio = torch.randn(1, 2, N)
    mean, _ = model.vae.encode(audio)
    assert mean.shape[-1] == math.ceil(N / 1024)
    padded = F.pad(audio, (0, math.ceil(N / 1024) * 1024 - N))
    torch.testing.assert_close(mean, model.vae.encode(padded)[0])


def test_kl_is_nonnegative_and_zero_for_a_standard_normal_posterior():
    assert sa.kl_divergence(torch.zeros(2, 64, 5), torch.ones(2, 64, 5)).item() == 0
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        mean = torch.randn(2, 64, 5, generator=g)
        std = torch.rand(2, 64, 5, generator=g) * 3 + 1e-3
        assert sa.kl_divergence(mean, std).item() > 0
    # closed form for one channel: KL(N(1, 2^2) || N(0, 1)) = (1 + 4 - log 4 - 1) / 2
    kl = sa.kl_divergence(torch.ones(1, 1, 1), torch.full((1, 1, 1), 2.0))
    assert kl.item() == pytest.approx((4 - math.log(4)) / 2)


def test_kl_sums_channels_and_averages_batch_and_frames():
    # Several channels, batch rows and frames, none of size 1, so that a sum and a mean differ.
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(3, 5, 7, generator=g), torch.rand(3, 5, 7, generator=g) + 0.2
    each = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                             torch.distributions.Normal(0.0, 1.0))
    assert sa.kl_divergence(mean, std).item() == pytest.approx(each.sum(1).mean().item(), rel=1e-5)


def test_full_size_parameter_counts_match_the_paper():
    with torch.device("meta"):
        full = sa.build_model("full")
    assert all(p.is_meta for p in full.parameters())        # nothing was allocated
    unet, vae = sa.count(full.unet), sa.count(full.vae)
    assert abs(unet - 907e6) / 907e6 < 0.01                  # paper: 907 M
    assert abs(vae - 133e6) / 133e6 < 0.01                   # paper: 133 M
    assert full.latent_frames == 4096                         # 2^22 samples / 1024


def test_vae_runs_under_bf16_autocast(model):
    with torch.autocast("cpu", torch.bfloat16):
        mean, std = model.vae.encode(torch.randn(1, 2, 4096))
        audio = model.vae.decode(mean)
    assert torch.isfinite(audio).all() and audio.shape == (1, 2, 4096)


def test_chunked_decode_equals_one_shot_decode(model):
    z = torch.randn(1, 64, 150)
    with torch.no_grad():
        whole = model.vae.decode(z)
        for chunk in (40, 64, 149):
            torch.testing.assert_close(model.vae.decode(z, chunk=chunk, overlap=32), whole,
                                       rtol=1e-4, atol=1e-5)


def test_elu_activation_replaces_every_snake_and_keeps_the_shapes():
    elu = sa.build_model(replace(SHORT, vae=replace(SHORT.vae, activation="elu"))).vae
    snake = sa.build_model(SHORT).vae
    assert not any(isinstance(m, sa.Snake) for m in elu.modules())
    n_alpha = sum(m.alpha.numel() for m in snake.modules() if isinstance(m, sa.Snake))
    assert sa.count(elu) == sa.count(snake) - n_alpha                 # only the alphas go
    assert elu.decode(elu.encode(torch.randn(1, 2, 4096))[0]).shape == (1, 2, 4096)


def test_the_audible_init_is_tinys_and_full_size_keeps_the_released_defaults():
    full = sa.SIZES["full"]
    assert not (full.vae.audible_init or full.timing.sinusoid_init or full.unet.padding_mask
                or full.unet.symmetric_downsample)
    torch.manual_seed(0)
    audible = sa.VAE(sa.SIZES["tiny"].vae)
    released = sa.VAE(replace(sa.SIZES["tiny"].vae, audible_init=False))
    silence = torch.zeros(1, 2, 4096)
    with torch.no_grad():
        # the posterior std at silence: softplus(-5) + 1e-4 (biases 0, scale bias -5) ...
        torch.testing.assert_close(audible.encode(silence)[1],
                                   torch.full((1, 64, 4), F.softplus(torch.tensor(-5.0)) + 1e-4))
        # ... while PyTorch's default init leaves it near softplus(0) = 0.69
        assert 0.5 < released.encode(silence)[1].mean() < 0.9


def test_strides_set_the_compression_ratio():
    vae = sa.build_model(replace(SHORT, vae=replace(SHORT.vae, strides=(2, 4, 8, 8)))).vae
    mean, _ = vae.encode(torch.randn(1, 2, 8192))
    assert vae.hop == 512 and mean.shape == (1, 64, 16)


# ---------------------------------------------------------------------------------- CLAP
def detokenize(tokens):
    """Inverse of `tokenize` (a multi-byte character cut by truncation is dropped)."""
    return [bytes(t for t in row.tolist() if t < 256).decode("utf-8", errors="ignore")
            for row in tokens]


def test_tokenizer_round_trip_and_truncation():
    prompts = ["ambient rain", "Café, 120 BPM | Mood: 😊", ""]
    tokens, mask = sa.tokenize(prompts, 64)
    assert detokenize(tokens) == prompts
    assert mask.sum(1).tolist() == [len(p.encode()) + 2 for p in prompts]   # + BOS, EOS
    long = "x" * 500
    tokens, mask = sa.tokenize([long], 128)
    assert tokens.shape == (1, 128) and bool(mask.all())
    assert detokenize(tokens) == ["x" * 126] and tokens[0, -1] == sa.EOS


def test_clap_loss_matches_closed_form_and_prefers_matched_pairs():
    clap = sa.CLAP(sa.SIZES["tiny"].clap, 44100)
    with torch.no_grad():
        clap.logit_scale.fill_(math.log(2.0))
    B, s = 4, 2.0
    emb = torch.eye(B, 16)                          # orthonormal: matched pairs have cosine 1
    matched = clap.loss(emb, emb)
    shuffled = clap.loss(emb, emb.roll(1, dims=0))
    # matched: -log(e^s / (e^s + B - 1)); shuffled: the true pair scores 0, one wrong pair s
    assert matched.item() == pytest.approx(math.log(1 + (B - 1) * math.exp(-s)), rel=1e-4)
    assert shuffled.item() == pytest.approx(math.log(math.exp(s) + B - 1), rel=1e-4)
    assert matched < shuffled


def test_clap_loss_averages_both_directions_on_asymmetric_logits():
    # Random unit embeddings give logits L = 10 T A^T with L != L^T. The loss by hand: the mean
    # over captions of -log softmax(row i)[i], the mean over clips of -log softmax(column j)[j],
    # then their average.
    clap = sa.CLAP(sa.SIZES["tiny"].clap, 44100)
    with torch.no_grad():
        clap.logit_scale.fill_(math.log(10.0))
    g = torch.Generator().manual_seed(1)
    text, audio = (F.normalize(torch.randn(5, 16, generator=g), dim=-1) for _ in range(2))
    L = 10.0 * text.double().numpy() @ audio.double().numpy().T
    B = len(L)
    rows = sum(math.log(sum(math.exp(L[i, k]) for k in range(B))) - L[i, i] for i in range(B))
    cols = sum(math.log(sum(math.exp(L[k, j]) for k in range(B))) - L[j, j] for j in range(B))
    assert abs(rows - cols) / B > 0.2                      # so one direction alone would show
    assert clap.loss(text, audio).item() == pytest.approx((rows + cols) / (2 * B), rel=1e-5)


def test_text_embedding_pools_the_real_tokens_only():
    # Padding is masked out of attention, so the real tokens' states, and their mean, cannot
    # depend on how much padding follows or on what the padded positions hold.
    torch.manual_seed(0)
    clap = sa.CLAP(sa.SIZES["tiny"].clap, 44100).eval()
    tokens, mask = clap.tokenize(["rain on a tin roof", "bells"])
    with torch.no_grad():
        full = clap.embed_text(tokens, mask)
        for n in (20, 40, 128):                    # "rain on a tin roof" is 20 tokens
            torch.testing.assert_close(clap.embed_text(tokens[:, :n], mask[:, :n]), full)
        alone = clap.embed_text(*clap.tokenize(["bells"]))
        junk = torch.where(mask, tokens, torch.randint(0, 256, tokens.shape))
        torch.testing.assert_close(clap.embed_text(junk, mask), full)
    torch.testing.assert_close(alone[0], full[1])


def test_log_mel_of_a_sine_peaks_in_the_band_holding_its_frequency(model):
    config, sr = model.clap.config, 44100
    n = torch.arange(sr) / sr
    for f in (300.0, 2000.0, 9000.0):
        mel = model.clap.log_mel(torch.sin(2 * math.pi * f * n).repeat(1, 2, 1))
        band = mel[0, :, 10:-10].mean(1).argmax().item()
        centres = 700 * (10 ** (torch.linspace(0, 2595 * math.log10(1 + sr / 2 / 700),
                                               config.n_mels + 2) / 2595) - 1)[1:-1]
        assert abs(band - (centres - f).abs().argmin().item()) <= 1


def test_log_mel_is_of_the_mono_mix(model):
    # Different left and right channels: the log-mel is the one of their average in both.
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(2, 1, 1, 8192, generator=g)
    mix = (left + right) / 2
    torch.testing.assert_close(model.clap.log_mel(torch.cat([left, right], 1)),
                               model.clap.log_mel(torch.cat([mix, mix], 1)))


def test_text_features_come_from_the_next_to_last_layer(model):
    tokens, mask = model.clap.tokenize(["bells"])
    h = model.clap.text_hidden(tokens, mask, len(model.clap.text_layers) - 1)
    torch.testing.assert_close(model.clap.text_features(tokens, mask), h)


# ---------------------------------------------------------------------------------- timing
def test_timing_embeddings_differ_for_different_seconds(model):
    tokens = model.timing(torch.tensor([0, 0, 14]), torch.tensor([30, 31, 30]))   # (3, 2, C)
    assert not torch.equal(tokens[0, 1], tokens[1, 1])       # total 30 vs 31
    assert not torch.equal(tokens[0, 0], tokens[2, 0])       # start 0 vs 14
    torch.testing.assert_close(tokens[0, 1], tokens[2, 1])   # same total, same token


def test_the_context_carries_the_start_token_then_the_total_token(model):
    # Each token is its own table's row: seconds_start indexes `start`, seconds_total `total`.
    context, _ = model.condition(["rain", "rain"], [3, 20], [30, 25])
    for b, (start, total) in enumerate([(3, 30), (20, 25)]):
        torch.testing.assert_close(context[b, -2], model.timing.start.weight[start])
        torch.testing.assert_close(context[b, -1], model.timing.total.weight[total])


def test_timing_tokens_drop_fractions_of_a_second(model):
    tokens = model.timing(torch.tensor([2.7]), torch.tensor([30.9]))
    torch.testing.assert_close(tokens[0, 0], model.timing.start.weight[2])
    torch.testing.assert_close(tokens[0, 1], model.timing.total.weight[30])


def test_context_is_text_plus_two_timing_tokens_and_the_mask_hides_padding(model):
    context, mask = model.condition(["rain"], [0], [30])
    S = model.config.clap.text_len
    assert context.shape == (1, S + 2, model.config.clap.text_width)
    assert mask[0].tolist() == [True] * 6 + [False] * (S - 6) + [True, True]  # BOS rain EOS
    z, t = torch.randn(1, 64, 32), torch.tensor([0.3])
    noisy = context.clone()
    noisy[~mask] = 100 * torch.randn(int((~mask).sum()), context.shape[-1])
    with torch.no_grad():
        torch.testing.assert_close(model.unet(z, t, noisy, mask), model.unet(z, t, context, mask))


def test_without_timing_the_context_is_the_text_alone_and_ignores_seconds():
    torch.manual_seed(0)
    plain = sa.build_model(replace(SHORT, timing=sa.TimingConfig(enabled=False))).eval()
    context, mask = plain.condition(["rain", "rain"], [0, 3], [10, 30])
    assert context.shape[1] == mask.shape[1] == plain.config.clap.text_len
    assert plain.unet.null_context.shape[0] == plain.config.clap.text_len
    torch.testing.assert_close(context[0], context[1])               # seconds are not seen


# ---------------------------------------------------------------------------------- U-Net
@pytest.mark.parametrize("L", [16, 48, 128])
def test_unet_output_shape_equals_input_shape(model, L):
    context, mask = model.condition(["wind", "fire"], [0, 3], [10, 20])
    x = torch.randn(2, 64, L)
    with torch.no_grad():
        assert model.unet(x, torch.rand(2), context, mask).shape == x.shape


def test_the_unet_starts_from_half_of_pytorchs_initial_parameters():
    # As the released wrapper: a Linear's weights are U(-1/sqrt(fan_in), 1/sqrt(fan_in)) halved,
    # the null context N(0, 1) halved.
    torch.manual_seed(0)
    unet = sa.UNet(SHORT.unet, 64, 64, 130)
    w = unet.to_mapping[0].weight                                # (128, 128)
    assert 0.49 < w.abs().max().item() * math.sqrt(w.shape[1]) <= 0.5
    assert unet.null_context.std().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("groups", [1, 16])
def test_groupnorm_gpu_path_equals_the_definition(groups):
    """The var_mean path (used on CUDA) against mean/variance over each group, written out."""
    torch.manual_seed(2)
    norm = sa.GroupNorm(groups, 64)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = 3 * torch.randn(2, 64, 40) + 1.5
    g = x.reshape(2, groups, -1)
    ref = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True)
                                                       + norm.eps)).reshape_as(x)
    ref = ref * norm.weight[:, None] + norm.bias[:, None]
    torch.testing.assert_close(norm.spread(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)      # the CPU path


def test_generate_with_half_precision_unet_weights_matches_float32():
    """sample.py --dtype bfloat16 casts the U-Net; generate then runs it without autocast."""
    torch.manual_seed(0)
    model = sa.build_model(SHORT).eval()
    ref = sa.generate(model, ["rain"], seconds_total=1, steps=4, seed=3)
    model.unet.to(torch.bfloat16)
    half = sa.generate(model, ["rain"], seconds_total=1, steps=4, seed=3, dtype=torch.bfloat16)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - ref).norm() / ref.norm() < 0.1     # measured 0.036; another seed: 0.85


def bottleneck_twins(config):
    """Bottleneck frames of a U-Net fed a constant latent whose features equal another frame's:
    a frame with a twin cannot know where in the window it is (nothing but the zero padding at
    the edges tells frames apart; there is no positional encoding)."""
    torch.manual_seed(0)
    model = sa.build_model(config).eval()
    seen = {}
    model.unet.mid2.register_forward_hook(lambda module, inputs, out: seen.update(h=out[0]))
    context = torch.randn(1, config.context_len, config.clap.text_width)
    with torch.no_grad():
        model.unet(torch.full((1, 64, model.latent_frames), 0.3), torch.tensor([0.5]), context,
                   torch.ones(1, config.context_len, dtype=torch.bool))
    h = seen["h"]                                                    # (C, L / downsampling)
    d = (h[:, :, None] - h[:, None, :]).abs().amax(0) / h.abs().max()
    return h.shape[-1], int(((d + torch.eye(len(d))).min(1).values < 1e-6).sum())


def test_the_papers_downsampling_leaves_the_middle_of_a_long_window_blind_to_position():
    tiny = sa.SIZES["tiny"]
    paper = replace(tiny, unet=replace(tiny.unet, padding_mask=False))
    frames, twins = bottleneck_twins(paper)    # the paper's factors 1, 2, 2, 4 at 2048 frames
    assert frames == 128 and twins > 64        # measured: 105 of 128
    # Downsampling 1, 4, 4, 8 leaves 16 bottleneck frames, each of which sees both edges.
    assert bottleneck_twins(replace(paper, unet=replace(paper.unet, factors=(1, 4, 4, 8)))) == (16, 0)


def test_timing_tables_start_smooth_in_the_second():
    timing = sa.TimingEmbedding(sa.TimingConfig(sinusoid_init=True), 64)   # tiny's choice
    row = F.normalize(timing.total.weight, dim=1)
    near, far = (row[20] * row[21]).sum(), (row[20] * row[200]).sum()
    assert near > 0.9 and far < near - 0.2
    torch.testing.assert_close(timing.start.weight, timing.total.weight)


def test_content_frames_are_the_requested_seconds_at_the_latent_rate(model):
    frames = model.content_frames(torch.tensor([0, 0, 14, 3]), torch.tensor([30, 1, 44, 3]))
    rate = 44100 / 1024                                   # latent frames per second
    assert frames.tolist() == [math.ceil(30 * rate), math.ceil(rate), math.ceil(30 * rate), 0]


def test_the_padding_mask_tells_the_unet_where_the_request_ends():
    torch.manual_seed(0)
    x, t = torch.randn(1, 64, 64), torch.tensor([0.9])
    for on in (True, False):
        m = sa.build_model(replace(SHORT, unet=replace(SHORT.unet, padding_mask=on))).eval()
        context, mask = m.condition(["rain"], [0], [30])
        with torch.no_grad():
            out = {n: m.unet(x, t, context, mask, None if n is None else torch.tensor([n]))
                   for n in (None, 64, 40, 20)}
        torch.testing.assert_close(out[None], out[64])           # None: the whole window
        assert (not torch.allclose(out[40], out[20], atol=1e-6)) == on   # ignored when off
        # The mask is an input, so frames far before both ends barely see the change (the
        # receptive field of the first level is local); the change is largest past frame 20.
        if on:
            change = (out[40] - out[20]).abs().amax(1)[0]
            assert change[20:40].mean() > 10 * change[:4].mean()


def test_the_padding_mask_marks_exactly_the_first_length_frames():
    inside = sa.content_mask(torch.tensor([0, 3, 8, 20]), 8, "cpu")
    assert inside.tolist() == [[False] * 8, [True] * 3 + [False] * 5, [True] * 8, [True] * 8]


def test_generate_gives_the_unet_the_requested_extent(monkeypatch):
    torch.manual_seed(0)
    m = sa.build_model(SHORT).eval()
    seen, forward = [], m.unet.forward
    monkeypatch.setattr(m.unet, "forward", lambda *a: seen.append(a[4]) or forward(*a))
    sa.generate(m, ["rain"], seconds_total=1.2, seconds_start=0, steps=2, seed=0)
    frames = math.ceil(2 * 44100 / 1024)                  # whole seconds: 1.2 s -> total 2 s
    assert seen and all(s.tolist() == [frames, frames] for s in seen)   # conditional + guided


@pytest.mark.parametrize("flags, padding_mask", [([], True), (["--paper-timing"], False),
                                                 (["--no-timing"], False)])
def test_train_flags_choose_the_timing_path(flags, padding_mask):
    config = train.model_config(train.parse_args(["diffusion", "--size", "tiny", *flags]))
    assert config.unet.padding_mask == padding_mask
    assert config.timing.enabled == ("--no-timing" not in flags)
    sa.build_model(replace(config, window=2 ** 17))            # a consistent config builds


@pytest.mark.parametrize("seconds", [0.5, 1.5])
def test_window_seconds_is_rounded_up_to_a_whole_number_of_strides(seconds):
    config = train.model_config(train.parse_args(["diffusion", "--window-seconds", str(seconds)]))
    stride = math.prod(config.vae.strides) * math.prod(config.unet.factors)
    assert config.window % stride == 0
    assert config.window >= seconds * config.sample_rate > config.window - stride


def test_sdpa_attention_equals_a_plain_softmax_reference():
    torch.manual_seed(1)
    attn = sa.Attention(32, heads=4, context_features=24)
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 5, 24)
    mask = torch.tensor([[True] * 5, [True, True, False, False, True]])
    q = attn.to_q(attn.norm(x)).view(2, 7, 4, 8).transpose(1, 2)
    k, v = attn.to_kv(attn.norm_context(ctx)).view(2, 5, 2, 4, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8)
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(attn(x, ctx, mask), attn.to_out(ref), rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    context, mask = model.condition(["rain"], [0], [10])
    z, t = torch.randn(2, 64, 32), torch.rand(2)
    grads = []
    for on in (False, True):
        model.unet.set_checkpointing(on)
        model.train()
        model.zero_grad()
        v = model.unet(z, t, context.expand(2, -1, -1).detach(), mask.expand(2, -1))
        v.square().sum().backward()
        grads.append(model.unet.to_in.block1[2].weight.grad.clone())
    model.unet.set_checkpointing(False)
    model.eval()
    model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------- diffusion
class OracleUNet(torch.nn.Module):
    """Knows the clean latent, so it can return the exact v = (alpha z_t - z) / sigma."""
    def __init__(self, z, context_shape):
        super().__init__()
        self.z, self.null_context = z, torch.nn.Parameter(torch.zeros(context_shape))

    def forward(self, z_t, t, context, mask, length=None):
        alpha, sigma = (a[:, None, None] for a in sa.alpha_sigma(t))
        return (alpha * z_t - self.z) / sigma


def test_diffusion_loss_is_zero_for_the_true_v_and_one_for_zero_output():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 8, 32, generator=g)
    context, mask = torch.zeros(64, 5, 4), torch.ones(64, 5, dtype=torch.bool)
    oracle = OracleUNet(z, (5, 4))
    assert sa.diffusion_loss(oracle, z, context, mask, g).item() < 1e-8
    zero = OracleUNet(z, (5, 4))
    zero.forward = lambda z_t, *rest: torch.zeros_like(z_t)
    # E[v^2] = alpha^2 E[eps^2] + sigma^2 E[z^2] = 1 for unit-variance z and eps
    assert sa.diffusion_loss(zero, z, context, mask, g).item() == pytest.approx(1, abs=0.05)


def test_conditioning_dropout_swaps_in_the_null_context_at_the_given_rate():
    seen = []

    class Spy(OracleUNet):
        def forward(self, z_t, t, context, mask, length=None):
            seen.append((context == self.null_context).all(-1).all(-1))
            return torch.zeros_like(z_t)
    z = torch.zeros(4000, 1, 1)
    spy = Spy(z, (3, 2))
    with torch.no_grad():
        spy.null_context.fill_(7.0)
    sa.diffusion_loss(spy, z, torch.zeros(4000, 3, 2), torch.ones(4000, 3, dtype=torch.bool),
                      torch.Generator().manual_seed(0))
    assert seen[0].float().mean().item() == pytest.approx(0.1, abs=0.015)


def test_dropped_samples_attend_the_whole_null_context_and_kept_ones_keep_their_mask():
    # The text's padding mask belongs to the text: the null context that replaces it is
    # attended in full (as generate's unconditional branch is).
    seen = {}

    class Spy(OracleUNet):
        def forward(self, z_t, t, context, mask, length=None):
            seen.update(dropped=(context == self.null_context).all(-1).all(-1), mask=mask)
            return torch.zeros_like(z_t)
    B = 400
    z = torch.zeros(B, 1, 1)
    spy = Spy(z, (4, 2))
    with torch.no_grad():
        spy.null_context.fill_(7.0)
    text_mask = torch.tensor([True, True, False, False]).expand(B, 4)
    sa.diffusion_loss(spy, z, torch.zeros(B, 4, 2), text_mask, torch.Generator().manual_seed(0),
                      cond_dropout=0.5)
    dropped = seen["dropped"]
    assert 0 < dropped.sum() < B
    assert seen["mask"][dropped].all()
    assert torch.equal(seen["mask"][~dropped], text_mask[~dropped])


# ---------------------------------------------------------------------------------- sampling
MU, S_DATA = 0.3, 0.1                    # Gaussian data x0 ~ N(MU, S_DATA^2)


def gaussian_denoiser(x, sigma):
    """E[x0 | x0 + sigma eps = x] for Gaussian data: the exact denoiser."""
    return MU + S_DATA ** 2 / (S_DATA ** 2 + sigma ** 2) * (x - MU)


def exact_flow(x, sigma_from, sigma_to):
    """The probability-flow ODE dx/dsigma = (x - D) / sigma solved exactly for Gaussian data."""
    scale = math.sqrt((S_DATA ** 2 + sigma_to ** 2) / (S_DATA ** 2 + sigma_from ** 2))
    return MU + (x - MU) * scale


def sampler_errors(sampler, steps_list, sigma_max=10.0, sigma_min=0.1):
    x = MU + torch.randn(500, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64) * math.hypot(S_DATA, sigma_max)
    target = exact_flow(x, sigma_max, sigma_min)
    errors = []
    for n in steps_list:
        sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n + 1))
        errors.append((sampler(gaussian_denoiser, x, sigmas.double()) - target).abs().max().item())
    return errors


def measured_order(errors, steps_list):
    """Least-squares slope of -log(error) against log(steps)."""
    xs, ys = torch.tensor(steps_list).double().log(), -torch.tensor(errors).log()
    return (((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()).item()


STEPS = [20, 40, 80, 160]


def test_euler_is_first_order():
    order = measured_order(sampler_errors(sa.sample_euler, STEPS), STEPS)
    assert order == pytest.approx(1, abs=0.2)


def test_dpmpp_2m_is_second_order():
    order = measured_order(sampler_errors(sa.sample_dpmpp_2m, STEPS), STEPS)
    assert order == pytest.approx(2, abs=0.2)


def test_dpmpp_3m_is_third_order_and_beats_2m_at_20_steps():
    # The 1 / (1 + h) taper is an O(h^4) change, still visible at 20 steps (h = 0.23): the
    # order is measured where h is small.
    steps = [40, 80, 160, 320]
    errors = sampler_errors(sa.sample_dpmpp_3m, steps)
    assert measured_order(errors, steps) == pytest.approx(3, abs=0.3)
    assert sampler_errors(sa.sample_dpmpp_3m, [20])[0] < sampler_errors(sa.sample_dpmpp_2m,
                                                                        [20])[0] / 3


def test_dpmpp_2m_is_algorithm_2_of_lu_et_al_on_a_hand_computed_example():
    # D(x, sigma) = x / (1 + sigma^2) (data N(0, 1)); sigmas 4, 2, 1/2, 0, starting from x = 1.
    # step 1, h = log 2, no D_{i-1}: x1 = x / 2 + (1 - 1/2) D(1, 4) = 1/2 + 1/34 = 9/17
    # step 2, h = log 4, r = log 2 / log 4 = 1/2, so the bracket is 2 D(x1, 2) - D(1, 4)
    #         = 18/85 - 5/85 = 13/85, and x2 = x1 / 4 + (3/4)(13/85) = 45/340 + 39/340 = 21/85
    # step 3, to sigma 0: the clean estimate D(x2, 1/2) = (21/85) / (5/4) = 84/425
    seen = []

    def denoiser(x, sigma):
        seen.append(x.item())
        return x / (1 + sigma ** 2)
    out = sa.sample_dpmpp_2m(denoiser, torch.ones(1, dtype=torch.float64),
                             torch.tensor([4, 2, 0.5, 0], dtype=torch.float64))
    assert seen == pytest.approx([1, 9 / 17, 21 / 85], rel=1e-12)
    assert out.item() == pytest.approx(84 / 425, rel=1e-12)


def test_dpmpp_3m_integrates_a_quadratic_denoiser_exactly_but_for_the_taper():
    # D = q(lam) alone, q quadratic in lam = -log sigma: the quadratic through three values is q
    # itself, so a full-history step misses the exact integral only by the taper's share of the
    # curvature term, I2 (1 / (1 + h) - 1) q'' with q'' = 2 a.
    a, b, c = 0.7, -0.4, 0.2
    q = lambda lam: a * lam ** 2 + b * lam + c
    lams = [0.0, 0.5, 1.2, 1.9]                              # uneven steps
    sigmas = torch.tensor([math.exp(-lam) for lam in lams], dtype=torch.float64)
    states = []

    def denoiser(x, sigma):
        states.append(x)
        return torch.full_like(x, q(-math.log(sigma)))
    x_last = sa.sample_dpmpp_3m(denoiser, torch.tensor([0.3], dtype=torch.float64), sigmas)
    lam, h = lams[2], lams[3] - lams[2]                      # the third step, full history
    tau = torch.linspace(0, h, 20001, dtype=torch.float64)   # the integral by quadrature
    exact = math.exp(-h) * states[2] + torch.trapezoid(torch.exp(-(h - tau)) * q(lam + tau), tau)
    I2 = h * h / 2 - h + 1 - math.exp(-h)
    assert (x_last - exact).item() == pytest.approx(I2 * (1 / (1 + h) - 1) * 2 * a, rel=1e-6)


@pytest.mark.parametrize("name", sa.SAMPLERS)
def test_sampler_ending_at_sigma_zero_returns_the_denoised_estimate(name):
    x = torch.randn(10, dtype=torch.float64)
    sigmas = sa.get_sigmas(5, 0.5, 10.0)
    assert sigmas[-1] == 0 and len(sigmas) == 6
    seen = []

    def denoiser(x, sigma):
        seen.append(x.clone())
        return gaussian_denoiser(x, sigma)
    out = sa.SAMPLERS[name](denoiser, x, sigmas)
    torch.testing.assert_close(out, gaussian_denoiser(seen[-1], 0.5))
    assert len(seen) == 5                                    # one model call per step


def test_schedule_is_log_linear_between_sigma_max_and_sigma_min():
    sigmas = sa.get_sigmas(10, 0.03, 80.0)[:-1]
    assert sigmas[0].item() == pytest.approx(80) and sigmas[-1].item() == pytest.approx(0.03)
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.03 / 80) ** (1 / 9)))


def test_v_denoiser_recovers_x0_from_the_true_v():
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    for sigma in (0.05, 1.0, 30.0):
        x = x0 + sigma * eps                                   # VE form
        t = 2 / math.pi * math.atan(sigma)
        alpha, sig = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)

        def true_v(z, t_in):
            assert torch.allclose(t_in, torch.full_like(t_in, t))
            return alpha * eps - sig * x0                      # v at z = alpha x0 + sigma eps
        torch.testing.assert_close(sa.v_to_denoiser(true_v)(x, sigma), x0, rtol=1e-4, atol=1e-4)


def test_the_denoiser_asks_the_unet_at_the_noise_level_training_used():
    # diffusion_loss noises z0 at t with alpha_sigma(t); the sampler's denoiser at the matching
    # VE level sigma / alpha must call the U-Net with that t and that z_t, and get z0 back from
    # the v the loss trains towards.
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    for t in (0.1, 0.3, 0.8):
        alpha, sigma = sa.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        z_t, seen = alpha * x0 + sigma * eps, {}

        def v_fn(z, t_in):
            seen.update(z=z, t=t_in)
            return alpha * eps - sigma * x0
        out = sa.v_to_denoiser(v_fn)(z_t / alpha, (sigma / alpha).item())
        torch.testing.assert_close(seen["t"], torch.full((2,), t), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen["z"].double(), z_t.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.double(), x0.double(), rtol=1e-5, atol=1e-5)


def test_cfg_with_scale_one_equals_the_conditional_prediction(model):
    context, mask = model.condition(["rain"], [0], [10])
    null = model.unet.null_context[None]
    z, t = torch.randn(1, 64, 16), torch.tensor([0.4])
    with torch.no_grad():
        guided = sa.guided_v(model.unet, context, mask, null, torch.ones(1, 130, dtype=bool), 1.0)
        torch.testing.assert_close(guided(z, t), model.unet(z, t, context, mask))


def test_cfg_is_one_batched_forward_and_follows_the_guidance_formula(model):
    context, mask = model.condition(["rain"], [0], [10])
    null, null_mask = model.unet.null_context[None], torch.ones(1, 130, dtype=torch.bool)
    z, t, calls = torch.randn(1, 64, 16), torch.tensor([0.4]), []
    unet = lambda *args: calls.append(args[0].shape[0]) or model.unet(*args)
    with torch.no_grad():
        guided = sa.guided_v(unet, context, mask, null, null_mask, 6.0, rescale=0.0)(z, t)
        v_c, v_u = model.unet(z, t, context, mask), model.unet(z, t, null, null_mask)
    assert calls == [2]
    torch.testing.assert_close(guided, v_u + 6.0 * (v_c - v_u), rtol=1e-4, atol=1e-4)


def test_full_cfg_rescale_gives_each_frame_the_conditional_spread():
    # phi = 1: the guided v keeps its direction but takes v_c's std over channels, frame by frame.
    # A stand-in U-Net whose v is the noisy latent plus the context's first token.
    unet = lambda z, t, context, mask, length=None: z + context[:, 0, :, None]
    context, uncond = torch.randn(2, 1, 1, 64).unbind()
    mask = torch.ones(1, 1, dtype=torch.bool)
    z, t = torch.randn(1, 64, 16), torch.tensor([0.4])
    guided = sa.guided_v(unet, context, mask, uncond, mask, 6.0, rescale=1.0)(z, t)
    plain = sa.guided_v(unet, context, mask, uncond, mask, 6.0, rescale=0.0)(z, t)
    v_c, v_u = unet(z, t, context, mask), unet(z, t, uncond, mask)
    torch.testing.assert_close(plain, v_u + 6.0 * (v_c - v_u))
    torch.testing.assert_close(guided.std(1), v_c.std(1))
    torch.testing.assert_close(guided / guided.norm(dim=1, keepdim=True),
                               plain / plain.norm(dim=1, keepdim=True))
    assert (plain.std(1) > 2 * v_c.std(1)).all()                 # so the rescale did something


def test_generate_passes_cfg_rescale_to_guidance(model):
    run = lambda **kw: sa.generate(model, ["rain"], seconds_total=1, steps=3, trim=False, **kw)
    assert not torch.allclose(run(cfg_rescale=0.0), run())                  # 0.4 by default
    torch.testing.assert_close(run(cfg_scale=1.0, cfg_rescale=0.0), run(cfg_scale=1.0))


def test_cfg_past_the_requested_end_is_the_conditional_prediction(model):
    context, mask = model.condition(["rain"], [0], [10])
    null, null_mask = model.unet.null_context[None], torch.ones(1, 130, dtype=torch.bool)
    z, t, n = torch.randn(1, 64, 16), torch.tensor([0.4]), torch.tensor([6])
    with torch.no_grad():
        guided = sa.guided_v(model.unet, context, mask, null, null_mask, 6.0, rescale=0.0,
                             content_frames=n)(z, t)
        v_c, v_u = model.unet(z, t, context, mask, n), model.unet(z, t, null, null_mask, n)
    torch.testing.assert_close(guided[..., :6], (v_u + 6.0 * (v_c - v_u))[..., :6],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided[..., 6:], v_c[..., 6:])
    assert not torch.allclose(v_c[..., 6:], v_u[..., 6:])       # so the choice is visible


# ---------------------------------------------------------------------------------- generate
def test_generate_gives_the_requested_length_in_stereo(model):
    audio = sa.generate(model, ["rain", "bells"], seconds_total=1.5, steps=3)
    assert audio.shape == (2, 2, round(1.5 * 44100))
    window = sa.generate(model, ["rain"], seconds_total=1.5, steps=3, trim=False)
    assert window.shape == (1, 2, SHORT.window)
    assert audio.abs().max() <= 1                          # the decoder ends in tanh


def test_same_seed_same_audio_and_sample_i_is_seed_plus_i(model):
    a = sa.generate(model, ["rain", "piano"], seconds_total=1, steps=3, seed=5)
    b = sa.generate(model, ["rain", "piano"], seconds_total=1, steps=3, seed=5)
    alone = sa.generate(model, ["piano"], seconds_total=1, steps=3, seed=6)
    other = sa.generate(model, ["rain"], seconds_total=1, steps=3, seed=6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[1], alone[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a[0], other[0], atol=1e-3)


WINDOW_S = 2 ** 17 / 44100                                 # SHORT's window: 2.97 s


@pytest.mark.parametrize("start, total, seconds", [
    (0, 1.5, 1.5),                                         # seconds_total alone: that long
    (10, 11.5, 1.5),                                       # §3.2: total - start, < the window
    (0, 100, WINDOW_S),                                    # longer than the window: all of it
    (14, 180, WINDOW_S),                                   # the paper's example: a full window
    (0, 512, WINDOW_S)])                                   # the timing table's last second
def test_generate_gives_total_minus_start_up_to_the_window(model, start, total, seconds):
    audio = sa.generate(model, ["rain"], seconds_total=total, seconds_start=start, steps=2)
    assert audio.shape == (1, 2, round(seconds * 44100))


def test_generate_conditions_on_whole_seconds_and_trims_to_the_exact_request(model, monkeypatch):
    seen, condition = [], model.condition
    monkeypatch.setattr(model, "condition",
                        lambda p, s, T: seen.append((s, T)) or condition(p, s, T))
    audio = sa.generate(model, ["rain"], seconds_total=12.2, seconds_start=10.7, steps=2)
    assert seen == [([10], [13])]                          # start floored, total ceiled
    assert audio.shape[-1] == round(1.5 * 44100)           # 12.2 - 10.7 s


def test_generate_without_trim_gives_the_whole_window_for_any_start(model):
    audio = sa.generate(model, ["rain"], seconds_total=11.5, seconds_start=10, steps=2, trim=False)
    assert audio.shape == (1, 2, SHORT.window)


@pytest.mark.parametrize("start, total, message", [
    (0, 0, r"seconds_total must be in \(0, 512\]"),
    (0, -1, r"seconds_total must be in \(0, 512\]"),
    (0, 513, r"seconds_total must be in \(0, 512\].*whole piece's length"),
    (-1, 5, r"seconds_start must be in \[0, seconds_total = 5\)"),
    (5, 5, r"seconds_start must be in \[0, seconds_total = 5\).*where the clip begins"),
    (6, 5, r"seconds_start must be in \[0, seconds_total = 5\)")])
def test_generate_refuses_timing_outside_the_piece_or_the_table(model, start, total, message):
    with pytest.raises(ValueError, match=message):
        sa.generate(model, ["rain"], seconds_total=total, seconds_start=start, steps=2)


def test_generate_stops_on_non_finite_latents(model):
    broken = sa.build_model(SHORT).eval()
    with torch.no_grad():
        broken.unet.to_out.block2[1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="float32"):
        sa.generate(broken, ["rain"], seconds_total=1, steps=2)


def test_trimmed_output_equals_the_start_of_the_whole_window(model):
    # Trimming decodes only the kept frames plus a margin; the receptive field makes it exact.
    kept = sa.generate(model, ["rain"], seconds_total=1, steps=3, seed=2)
    whole = sa.generate(model, ["rain"], seconds_total=1, steps=3, seed=2, trim=False)
    torch.testing.assert_close(kept, whole[..., :kept.shape[-1]], rtol=0, atol=1e-5)


def test_generate_decodes_in_short_chunks_what_it_decodes_in_one_go(model):
    # 40-frame chunks of the 160 frames decoded (the window and its margin) against one chunk.
    run = lambda chunk: sa.generate(model, ["rain"], seconds_total=2, steps=2, seed=1,
                                    trim=False, decode_chunk=chunk)
    torch.testing.assert_close(run(40), run(10_000), rtol=0, atol=1e-5)


def test_a_negative_prompt_equal_to_the_prompt_leaves_guidance_nothing_to_do(model):
    # v_u = v_c: v_u + scale (v_c - v_u) = v_c, and the rescale then divides v_c's spread by
    # itself, so the result is the unguided run's. It holds only if the negative branch gets
    # the same timing as the prompt's; tiny's two timing tables start equal, which would hide a
    # swap of start and total, so the total table is redrawn.
    apart = copy.deepcopy(model)
    with torch.no_grad():
        apart.timing.total.weight.normal_(generator=torch.Generator().manual_seed(0))
    run = lambda **kw: sa.generate(apart, ["rain"], seconds_total=2, seconds_start=1,
                                   steps=3, seed=4, **kw)
    torch.testing.assert_close(run(negative_prompt="rain"), run(cfg_scale=1.0),
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(run(negative_prompt="wind"), run(cfg_scale=1.0), atol=1e-3)


# --- audio-to-audio --------------------------------------------------------------------------------
def final_latent(model, monkeypatch, **kwargs):
    """Run generate(trim=False) and return the latent it hands to the VAE decoder."""
    seen, decode = [], model.vae.decode
    monkeypatch.setattr(model.vae, "decode", lambda z, **kw: seen.append(z) or decode(z, **kw))
    sa.generate(model, ["rain"], seconds_total=2, steps=4, seed=3, trim=False, **kwargs)
    return seen[0][..., :model.latent_frames]        # generate repeats the last frame past the end


def encoded(model, audio):
    return model.vae.encode(F.pad(audio, (0, SHORT.window - audio.shape[-1]))[None])[0][0]


CLIP = 0.3 * torch.sin(torch.linspace(0, 2000, 88200)).expand(2, -1)   # 2 s of a 318 Hz tone


def test_the_latent_scale_is_applied_for_the_unet_and_undone_for_the_decoder(model, monkeypatch):
    z0, s = encoded(model, CLIP), 3.7
    scaled = sa.build_model(replace(model.config, latent_scale=s)).eval()
    scaled.load_state_dict(model.state_dict())
    # Nothing left to sample: the decoder gets the encoded latent back, unscaled.
    none_left = final_latent(scaled, monkeypatch, init_audio=CLIP, init_strength=1e-3)[0]
    torch.testing.assert_close(none_left, z0, rtol=1e-6, atol=1e-6)
    # One step from sigma: the U-Net sees alpha (s z0 + sigma eps), with the same eps for both.
    first = []                                  # the U-Net's first input, for each model
    for m in (model, scaled):
        unet, seen = m.unet.forward, []
        monkeypatch.setattr(m.unet, "forward", lambda x, *a, f=unet, seen=seen:
                            seen.append(x) or f(x, *a))
        final_latent(m, monkeypatch, init_audio=CLIP, init_strength=0.25)
        first.append(seen[0][0])
    sigma = sa.init_sigmas(4, 0.25)[0].item()
    torch.testing.assert_close(first[1] - first[0], (s - 1) * z0 / math.sqrt(1 + sigma ** 2),
                               rtol=1e-4, atol=1e-6)


def test_init_sigmas_start_where_the_strength_points_on_the_schedule():
    full = sa.get_sigmas(100)
    assert torch.equal(sa.init_sigmas(100, 1.0), full)
    assert torch.equal(sa.init_sigmas(100, 0.3), full[70:])    # 30 of the 100 steps are run
    assert torch.equal(sa.init_sigmas(100, 1e-6), full[100:])  # nothing left: sigma 0


def test_init_strength_one_is_exactly_text_to_audio(model):
    plain = sa.generate(model, ["rain"], seconds_total=2, steps=4, seed=3)
    init = sa.generate(model, ["rain"], seconds_total=2, steps=4, seed=3, init_audio=CLIP,
                       init_strength=1.0)
    torch.testing.assert_close(init, plain, rtol=0, atol=0)


def test_init_strength_near_zero_returns_the_input_latent(model, monkeypatch):
    z0 = encoded(model, CLIP)
    none_left = final_latent(model, monkeypatch, init_audio=CLIP, init_strength=1e-3)[0]
    torch.testing.assert_close(none_left, z0, rtol=0, atol=0)
    one_step = final_latent(model, monkeypatch, init_audio=CLIP, init_strength=0.25)[0]
    far = final_latent(model, monkeypatch, init_audio=CLIP, init_strength=1.0)[0]
    # One step from sigma_min = 0.03 moves the latent by ~0.03; from pure noise it lands far off.
    assert (one_step - z0).abs().mean() < 0.05 < (far - z0).abs().mean()


def test_inpainting_keeps_the_latent_outside_the_gap_and_changes_it_inside(model, monkeypatch):
    z0 = encoded(model, CLIP)
    z = final_latent(model, monkeypatch, init_audio=CLIP, inpaint=(0.5, 1.5))[0]
    keep = sa.inpaint_mask(z0.shape[-1], (0.5, 1.5), 44100 / 1024)
    torch.testing.assert_close(z[:, keep == 1], z0[:, keep == 1], rtol=0, atol=1e-6)
    assert (z[:, keep == 0] - z0[:, keep == 0]).abs().mean() > 0.1


def test_inpaint_mask_is_one_outside_the_gap_zero_inside_and_ramps_at_the_seams():
    keep = sa.inpaint_mask(100, (1.0, 2.0), frame_rate=20, ramp=4)   # gap: frames 20..39
    assert (keep[:20] == 1).all() and (keep[40:] == 1).all()
    assert (keep[24:36] == 0).all()
    assert (keep[20:25].diff() < 0).all() and (keep[35:40].diff() > 0).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"init_audio": CLIP, "init_strength": 0}, "init_strength"),
    ({"init_audio": CLIP, "init_strength": 1.5}, "init_strength"),
    ({"inpaint": (0.5, 1.0)}, "need init_audio"),
    ({"init_audio": torch.zeros(2, SHORT.window + 1)}, "longer than the model's window"),
    ({"cfg_rescale": -0.1}, "cfg_rescale")])
def test_generate_refuses_bad_init_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sa.generate(model, ["rain"], seconds_total=1, steps=2, **kwargs)


# ---------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_loads_with_weights_only(model, tmp_path):
    path = tmp_path / "m.pt"
    sa.save_checkpoint(path, model, step=7)
    raw = torch.load(path, weights_only=True)                   # plain tensors and values only
    assert raw["step"] == 7 and raw["size"] == "tiny"
    loaded, ckpt = sa.load_checkpoint(path)
    assert loaded.config == model.config and not (tmp_path / "m.pt.tmp").exists()
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_checkpoint_prefers_ema_weights(model, tmp_path):
    ema = {k: v + 1 for k, v in model.state_dict().items() if k.startswith("timing.")}
    sa.save_checkpoint(tmp_path / "m.pt", model, ema=ema)      # an EMA of one part only
    with_ema, _ = sa.load_checkpoint(tmp_path / "m.pt")
    without, _ = sa.load_checkpoint(tmp_path / "m.pt", ema=False)
    torch.testing.assert_close(with_ema.timing.start.weight, model.timing.start.weight + 1)
    torch.testing.assert_close(with_ema.unet.null_context, model.unet.null_context)
    torch.testing.assert_close(without.timing.start.weight, model.timing.start.weight)


def test_loading_a_wrong_size_damaged_or_missing_checkpoint_says_which(model, tmp_path):
    sa.save_checkpoint(tmp_path / "m.pt", model)
    with pytest.raises(ValueError, match="size 'tiny', not 'small'"):
        sa.load_checkpoint(tmp_path / "m.pt", size="small")
    (tmp_path / "bad.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="damaged"):
        sa.load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        sa.load_checkpoint(tmp_path / "none.pt")
    torch.save({"format": sa.CHECKPOINT_FORMAT, "size": "tiny",
                "config": sa.asdict(model.config), "model": {}}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="missing"):
        sa.load_checkpoint(tmp_path / "empty.pt")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"format": sa.CHECKPOINT_FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="damaged or not a checkpoint"):
        sa.load_checkpoint(tmp_path / "evil.pt")


# --- the released code (stable-audio-tools) ----------------------------------------------------
# fixtures/sat_reference.pt was written by fixtures/make_sat_fixture.py with stable-audio-tools at a
# reduced size that keeps every block type: released-style weights, inputs and the released
# modules' outputs. Equality target: max |difference| <= 1e-4 of the largest reference value.
SAT_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                           "sat_reference.pt")


@pytest.fixture(scope="module")
def sat():
    return torch.load(SAT_FIXTURE, weights_only=True)


def floats(state_dict):
    return {k: v.float() for k, v in state_dict.items()}


def released_model(sat, mutate=None):
    """The fixture's diffusion model through from_sat, optionally with one weight changed."""
    weights = floats(sat["diffusion"]["state_dict"])
    if mutate is not None:
        noise = torch.randn(weights[mutate].shape, generator=torch.Generator().manual_seed(0))
        weights[mutate] = weights[mutate] + 0.5 * noise
    with pytest.warns(UserWarning, match="LAION CLAP"):
        return released.from_sat(sat["diffusion"]["config"], weights)


def relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def released_unet_errors(model, u):
    """(v, guided v) against the released outputs, all-true masks, guidance 6 with rescale 0.4."""
    with torch.no_grad():
        v = model.unet(u["x"], u["t"], u["context"], u["mask"])
        null = model.unet.null_context.expand_as(u["context"])
        guided = sa.guided_v(model.unet, u["context"], u["mask"], null, u["mask"],
                             u["cfg_scale"], u["scale_phi"])(u["x"], u["t"])
    return relative_error(v, u["v"]), relative_error(guided, u["v_cfg"])


def test_released_unet_gives_the_released_v_and_guided_v(sat):
    errors = released_unet_errors(released_model(sat), sat["diffusion"]["unet"])
    assert max(errors) <= 1e-4, errors


def test_released_timing_tokens_are_the_released_ones_clamped_to_0_512(sat):
    model, t = released_model(sat), sat["diffusion"]["timing"]
    tokens = model.timing(torch.tensor(t["seconds_start"]), torch.tensor(t["seconds_total"]))
    assert relative_error(tokens[:, 0], t["seconds_start_embeds"][:, 0]) <= 1e-4
    assert relative_error(tokens[:, 1], t["seconds_total_embeds"][:, 0]) <= 1e-4


@pytest.mark.parametrize("part", ["diffusion", "dac_vae", "oobleck"])
def test_released_autoencoders_encode_and_decode_the_same(sat, part):
    if part == "diffusion":          # Stable Audio 1.0's VAE inside the diffusion checkpoint
        vae, ref = released_model(sat).vae, sat["diffusion"]["vae"]
    else:                            # standalone autoencoder configs, keys without a prefix
        vae, ref = released.from_sat(sat[part]["config"], floats(sat[part]["state_dict"])), sat[part]
    with torch.no_grad():
        mean, std = vae.encode(ref["audio"])
        audio = vae.decode(ref["z"])
    for ours, theirs in ((mean, ref["mean"]), (std, ref["std"]), (audio, ref["decoded"])):
        assert relative_error(ours, theirs) <= 1e-4
    assert (part == "oobleck") == any(isinstance(m, sa.SnakeBeta) for m in vae.modules())


def test_a_released_oobleck_decoder_takes_its_width_from_its_own_config(sat):
    # The fixture's encoder and decoder are both 4 wide, which would hide one read for the
    # other. stable-audio-tools' OobleckEncoder starts with a conv to `channels`, its decoder
    # with a conv to channels x c_mults[-1], each from its own config.
    config = json.loads(json.dumps(sat["oobleck"]["config"]["model"]))
    config["decoder"]["config"]["channels"] = 6
    vae = sa.VAE(released.sat_vae_config(config))
    assert vae.encoder[0].out_channels == 4
    assert vae.decoder[0].out_channels == 6 * 8


@pytest.mark.parametrize("key", [
    "model.model.downsamples.3.downsample.weight",                     # the factor-4 level
    "model.model.downsamples.0.transformer.blocks.0.attention.norm_context.weight",
    "model.model.bottleneck.transformer.blocks.0.cross_attention.to_kv.weight",
    "model.model.upsamples.1.blocks.2.to_out.weight",                  # a resnet's 1x1 skip
    "model.model.to_time.0.0.weights",
    "model.model.fixed_embedding.embedding.weight",                     # guidance's null context
])
def test_changing_one_released_unet_weight_breaks_the_equality(sat, key):
    assert max(released_unet_errors(released_model(sat, mutate=key), sat["diffusion"]["unet"])) > 1e-4


def test_the_symmetric_padding_of_format_1_differs_from_the_released_unet(sat):
    model = released_model(sat)
    for level in model.unet.down:
        level.pad = (level.downsample.stride[0],) * 2
    assert released_unet_errors(model, sat["diffusion"]["unet"])[0] > 1e-4


def test_a_released_pretransform_scale_divides_the_latent_the_unet_sees(sat, monkeypatch):
    # stable-audio-tools' AutoencoderPretransform returns encode(audio) / scale and decodes
    # decode(z * scale); the fixture's scale is 1, so a config with scale 4 tells the directions
    # apart. The diffusion latent of the released encoder's mean is mean / 4, and a diffusion
    # latent w must reach the decoder as 4 w.
    config = json.loads(json.dumps(sat["diffusion"]["config"]))
    config["model"]["pretransform"]["scale"] = 4.0
    with pytest.warns(UserWarning, match="LAION CLAP"):
        model = released.from_sat(config, floats(sat["diffusion"]["state_dict"]))
    ref = sat["diffusion"]["vae"]
    with torch.no_grad():
        mean = model.vae.encode(ref["audio"])[0]
    assert relative_error(mean * model.config.latent_scale, ref["mean"] / 4) <= 1e-4
    seen, decode = [], model.vae.decode
    monkeypatch.setattr(model.vae, "decode", lambda z, **kw: seen.append(z) or decode(z, **kw))
    sa.decode_content(model, ref["z"] / 4, ref["audio"].shape[-1], None)
    torch.testing.assert_close(seen[0][..., :ref["z"].shape[-1]], ref["z"])


def test_padded_context_tokens_are_excluded_where_the_released_code_zeroes_them(sat):
    """A documented difference: both agree with an all-true mask (tested above); with padding,
    ours equals the released output on the context with the padded tokens removed."""
    model, u = released_model(sat), sat["diffusion"]["unet"]
    keep = u["partial_mask"][1]
    with torch.no_grad():
        ours = model.unet(u["x"], u["t"], u["context"], u["partial_mask"])
        short = model.unet(u["x"][1:], u["t"][1:], u["context"][1:, keep], None)
    torch.testing.assert_close(ours[1:], short, rtol=1e-5, atol=1e-5)
    assert relative_error(ours, u["v_partial_mask"]) > 1e-4      # the released code differs


def test_a_partial_released_state_dict_names_what_is_missing_and_left_over(sat):
    weights = floats(sat["diffusion"]["state_dict"])
    weights.pop("model.model.to_mapping.0.weight")
    weights["model.model.surplus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing \['to_mapping.0.weight'\], "
                                         r"1 unexpected \['surplus.weight'\]"):
        released.from_sat(sat["diffusion"]["config"], weights)


def test_a_released_oobleck_config_takes_stable_audio_tools_defaults(sat):
    # stable-audio-tools' OobleckDecoder defaults final_tanh to True, which this port does not
    # implement: a config that leaves it out is refused, not read as the Stable Audio Open one.
    config = json.loads(json.dumps(sat["oobleck"]["config"]["model"]))
    del config["decoder"]["config"]["final_tanh"]
    with pytest.raises(ValueError, match="final_tanh"):
        released.sat_vae_config(config)
    # Its OobleckEncoder defaults in_channels to 2: a config that leaves it out is stereo.
    config["decoder"]["config"]["final_tanh"] = False
    del config["encoder"]["config"]["in_channels"]
    assert released.sat_vae_config(config).channels == 2


def test_released_weights_load_from_a_plain_state_dict_ckpt(sat, tmp_path):
    path = tmp_path / "plain.ckpt"                  # the weights themselves, not under state_dict
    torch.save(floats(sat["oobleck"]["state_dict"]), path)
    weights = released.read_sat_weights(str(path))
    assert weights.keys() == sat["oobleck"]["state_dict"].keys()


def test_a_released_ckpt_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"state_dict": {"w": torch.zeros(2), "x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        released.read_sat_weights(str(tmp_path / "evil.ckpt"))
    assert "pwned" not in capsys.readouterr().out


def test_released_weights_load_from_a_lightning_ckpt_and_refuse_a_dit(sat, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": floats(sat["oobleck"]["state_dict"])}, path)
    config = tmp_path / "model_config.json"
    config.write_text(json.dumps(sat["oobleck"]["config"]))
    vae = released.from_sat(str(config), str(path))
    with torch.no_grad():
        assert relative_error(vae.decode(sat["oobleck"]["z"]), sat["oobleck"]["decoded"]) <= 1e-4
    dit = dict(sat["diffusion"]["config"], model={**sat["diffusion"]["config"]["model"],
                                                  "diffusion": {"type": "dit", "config": {}}})
    with pytest.raises(ValueError, match="vae_only=True"):
        released.from_sat(dit, floats(sat["diffusion"]["state_dict"]))
    assert isinstance(released.from_sat(dit, floats(sat["diffusion"]["state_dict"]), vae_only=True),
                      sa.VAE)


SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}


def write_safetensors(path, tensors, metadata=None):
    """The published .safetensors layout, written by hand: u64 little-endian header size, JSON
    header {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_files_read_back_exactly_without_any_other_package(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b.half": torch.randn(5).half(),
               "c": torch.arange(6).reshape(2, 3), "empty": torch.zeros(0, 2)}
    write_safetensors(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    read = released.read_sat_weights(str(tmp_path / "m.safetensors"))
    assert set(read) == set(tensors)
    for name, t in tensors.items():
        assert read[name].dtype == t.dtype and torch.equal(read[name], t), name


def test_a_truncated_or_garbled_safetensors_file_is_one_line_naming_it(sat, tmp_path, capsys):
    write_safetensors(tmp_path / "m.safetensors", floats(sat["diffusion"]["state_dict"]))
    whole = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "header.safetensors").write_bytes(whole[:100])
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "short.safetensors").write_bytes(whole[:-1])     # the last tensor a byte short
    for name, message in (("cut", "damaged or truncated"), ("header", "not a complete"),
                          ("noise", "not a complete"), ("short", "damaged or truncated")):
        with pytest.raises(ValueError, match=message) as error:
            released.read_sat_weights(str(tmp_path / f"{name}.safetensors"))
        assert f"{name}.safetensors" in str(error.value)
    config, _ = released_files(sat, tmp_path)
    assert run_train("export", "--from-sat", config, tmp_path / "cut.safetensors", "--to",
                     tmp_path / "x.pt") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "truncated" in err
    assert not (tmp_path / "x.pt").exists()


def peak_memory_gib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


@pytest.mark.parametrize("change, message", [
    (lambda c: c["model"]["pretransform"]["config"]["encoder"]["config"].update(strides="abc"),
     "strides"),
    (lambda c: c["model"]["diffusion"]["config"].update(channels="wide"), "not a config"),
    (lambda c: c["model"]["diffusion"]["config"].update(channels=10 ** 7), "does not match"),
    (lambda c: c["model"]["pretransform"]["config"]["decoder"]["config"].update(
        channels=10 ** 7), "does not match"),
    (lambda c: c["model"].update(pretransform=[]), "not a config"),
    (lambda c: c.update(sample_size=-4), "window"),
])
def test_a_strangers_released_config_is_one_line_before_anything_large_is_allocated(
        sat, change, message):
    """10^7 channels would need petabytes: the model is first built on the meta device."""
    config = json.loads(json.dumps(sat["diffusion"]["config"]))
    change(config)
    before = peak_memory_gib()
    with pytest.raises(ValueError, match=message) as error:
        released.from_sat(config, floats(sat["diffusion"]["state_dict"]))
    assert "\n" not in str(error.value) and peak_memory_gib() - before < 1


@pytest.mark.parametrize("change, message", [
    (lambda c: c["unet"].update(widths=[10 ** 6] * 5), "does not match"),
    (lambda c: c["vae"].update(strides="abc"), "vae.strides"),
    (lambda c: c["clap"].update(text_layers=2.5), "clap.text_layers"),
    (lambda c: c["clap"].update(n_fft=2 ** 25), "GiB of fixed tables"),
    (lambda c: c.update(unet="wide"), "cannot build"),
    (lambda c: c["timing"].update(enabled="yes"), "timing.enabled"),
    (lambda c: c.update(window=2 ** 40), "window"),
])
def test_a_strangers_checkpoint_config_is_one_line_before_anything_large_is_allocated(
        model, tmp_path, change, message):
    sa.save_checkpoint(tmp_path / "m.pt", model)
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    change(ckpt["config"])
    torch.save(ckpt, tmp_path / "m.pt")
    before = peak_memory_gib()
    with pytest.raises(ValueError, match=message) as error:
        sa.load_checkpoint(tmp_path / "m.pt")
    assert "m.pt" in str(error.value) and "\n" not in str(error.value)
    assert peak_memory_gib() - before < 1


def test_weights_that_are_not_tensors_are_refused_in_one_line(model, tmp_path):
    sa.save_checkpoint(tmp_path / "m.pt", model)
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["model"]["unet.null_context"] = "text"
    torch.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="named tensors"):
        sa.load_checkpoint(tmp_path / "m.pt")
    torch.save([1, 2], tmp_path / "w.ckpt")
    with pytest.raises(ValueError, match="no dictionary of named tensors"):
        released.read_sat_weights(str(tmp_path / "w.ckpt"))


def test_full_size_parameter_counts_equal_the_released_networks():
    """Counted by stable-audio-tools from the released JSON configs."""
    with torch.device("meta"):
        full, oobleck = sa.build_model("full"), sa.VAE(sa.OOBLECK)
    assert sa.count(full.unet) == 906_679_744 and full.unet.null_context.shape == (79, 768)
    assert sa.count(full.vae) == 133_431_300
    assert sa.count(oobleck) == 156_112_514 and oobleck.hop == 2048


def test_format_1_checkpoints_compute_what_they_computed(tmp_path):
    """Format 1 had one LayerNorm for both streams of self-attention and padded the downsampling
    f on both sides; loading one must give the same function."""
    torch.manual_seed(0)
    model = sa.build_model(replace(SHORT, unet=replace(SHORT.unet, symmetric_downsample=True)))
    for m in model.modules():
        if isinstance(m, sa.Attention) and m.norm.weight.shape == m.norm_context.weight.shape:
            with torch.no_grad():             # scramble, so that a wrong copy would show
                m.norm.weight.normal_(), m.norm.bias.normal_()
    state = {k: v for k, v in model.state_dict().items()
             if not (".norm_context." in k and ("self_attn" in k or ".attn." in k))}
    config = dataclasses.asdict(model.config)
    del config["unet"]["symmetric_downsample"]
    torch.save({"format": "stable-audio-reference/1", "size": "tiny", "config": config,
                "model": state}, tmp_path / "old.pt")
    loaded, ckpt = sa.load_checkpoint(tmp_path / "old.pt")
    assert ckpt["upgraded_from"] == "stable-audio-reference/1"
    assert loaded.config.unet.symmetric_downsample
    x, t = torch.randn(1, 64, 32), torch.tensor([0.4])
    S = model.config.context_len
    context, mask = torch.randn(1, S, 64), torch.ones(1, S, dtype=torch.bool)

    def shared_norm(self, x, context=None, mask=None):   # format 1's self-attention, by hand
        h = self.norm(x)
        q, (k, v) = self.to_q(h), self.to_kv(h if context is None else
                                             self.norm_context(context)).chunk(2, -1)
        q, k, v = (a.reshape(1, a.shape[1], self.heads, -1).transpose(1, 2) for a in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else
                                             mask[:, None, None, :])
        return self.to_out(out.transpose(1, 2).reshape(x.shape))
    with torch.no_grad():
        ours = loaded.unet(x, t, context, mask)
        original = sa.Attention.forward
        try:
            sa.Attention.forward = shared_norm
            before = model.unet(x, t, context, mask)
        finally:
            sa.Attention.forward = original
    torch.testing.assert_close(ours, before)


# ============================================================================ sound_world.py
SR = 44100


def sine(freq, sr, n, phase=0.3):
    return torch.sin(2 * math.pi * freq * torch.arange(n, dtype=torch.float64) / sr + phase)


def interior(x):
    return x[..., len(x[0]) // 10: -len(x[0]) // 10]


def rms(x):
    return float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64)))))


# --- resampling, channels, reading ----------------------------------------------------------------
@pytest.mark.parametrize("sr_in, sr_out, freq", [(48000, SR, 1000), (48000, SR, 15000),
                                                 (96000, SR, 5000), (22050, SR, 3000),
                                                 (SR, 48000, 10000)])
def test_resample_keeps_a_sine_below_the_new_nyquist(sr_in, sr_out, freq):
    x = sine(freq, sr_in, 2 * sr_in).float().repeat(2, 1)
    y = sound_world.resample(x, sr_in, sr_out)
    expected = sine(freq, sr_out, y.shape[-1]).float().repeat(2, 1)
    assert rms(interior(y - expected)) < 1e-3 * rms(interior(expected))


def test_resample_removes_a_tone_above_the_new_nyquist():
    x = sine(30000, 96000, 2 * 96000).float()[None]
    y = sound_world.resample(x, 96000, SR)
    assert 20 * math.log10(rms(interior(y)) / rms(x)) < -40


@pytest.mark.parametrize("n", [1, 999, 48000, 123457])
@pytest.mark.parametrize("sr_in, sr_out", [(48000, SR), (96000, SR), (8000, SR), (SR, 48000)])
def test_resample_output_length_is_n_times_the_rate_ratio(n, sr_in, sr_out):
    y = sound_world.resample(torch.randn(2, n), sr_in, sr_out)
    assert y.shape == (2, round(n * sr_out / sr_in))


def test_resample_at_equal_rates_is_the_identity():
    x = torch.randn(2, 1000)
    assert torch.equal(sound_world.resample(x, SR, SR), x)


def test_to_stereo_duplicates_mono_keeps_stereo_and_averages_more_channels():
    mono, stereo, six = torch.randn(1, 50), torch.randn(2, 50), torch.randn(6, 50)
    assert torch.equal(sound_world.to_stereo(mono), mono.repeat(2, 1))
    assert torch.equal(sound_world.to_stereo(stereo), stereo)
    out = sound_world.to_stereo(six)
    assert out.shape == (2, 50)
    torch.testing.assert_close(out[0], six.mean(0))
    torch.testing.assert_close(out[1], six.mean(0))


def test_read_audio_raises_value_error_for_unreadable_and_empty_files(tmp_path):
    broken, empty = tmp_path / "broken.wav", tmp_path / "empty.wav"
    broken.write_bytes(os.urandom(3000))
    sf.write(str(empty), np.zeros((0, 2), dtype=np.float32), SR)
    for path in (broken, empty):
        with pytest.raises(ValueError, match=path.name):
            sound_world.read_audio(path, SR)


# --- notes or noise ------------------------------------------------------------------------------
def test_tonality_is_near_1_for_a_sine_and_near_0_for_noise():
    noise = np.random.default_rng(0).standard_normal((2, 2 * SR))
    sine = np.sin(2 * np.pi * 1000 * np.arange(2 * SR) / SR)
    assert sound_world.tonality(sine) > 0.95
    assert sound_world.tonality(noise) < 0.05


# --- the sound world ------------------------------------------------------------------------------
def test_sound_world_is_deterministic_by_seed():
    a, meta_a = sound_world.make_clip(7, SR, 3.0)
    b, meta_b = sound_world.make_clip(7, SR, 3.0)
    c, meta_c = sound_world.make_clip(8, SR, 3.0)
    assert torch.equal(a, b) and meta_a == meta_b
    assert a.shape != c.shape or not torch.equal(a, c)


def test_clip_is_stereo_float32_never_clips_and_lasts_its_seconds():
    for seed in range(12):
        audio, meta = sound_world.make_clip(seed, SR, 3.0)
        assert audio.dtype == torch.float32 and audio.shape == (2, round(meta["seconds"] * SR))
        assert torch.isfinite(audio).all() and audio.abs().max() <= 1.0
        assert audio.abs().max() > 0.1                      # never silent
        assert all(isinstance(v, (str, int, float)) for v in meta.values())


def test_clip_durations_vary_from_1_s_to_max_seconds():
    seconds = [sound_world.make_clip(seed, 8000, 20.0)[1]["seconds"] for seed in range(30)]
    assert min(seconds) >= 1.0 and max(seconds) <= 20.0
    assert np.std(seconds) > 3.0


def test_every_sound_and_a_mixture_can_be_made_and_is_named_in_the_metadata():
    for sound in [*sound_world.SOUNDS, "rain and piano"]:
        audio, meta = sound_world.make_clip(0, SR, 2.0, sound=sound)
        assert meta["sound"] == sound and rms(audio) > 0.01
    with pytest.raises(ValueError, match="unknown sound"):
        sound_world.make_clip(0, SR, 2.0, sound="kazoo")


def test_music_has_tempo_and_key_and_nature_has_neither():
    _, piano = sound_world.make_clip(1, SR, 2.0, sound="piano")
    _, drums = sound_world.make_clip(1, SR, 2.0, sound="drums")
    _, rain = sound_world.make_clip(1, SR, 2.0, sound="rain")
    assert {"bpm", "key", "genre", "mood", "instruments"} <= set(piano)
    assert "bpm" in drums and "key" not in drums
    assert "bpm" not in rain and "key" not in rain


def test_louder_intensity_means_a_higher_peak():
    peaks = {}
    for seed in range(40):
        audio, meta = sound_world.make_clip(seed, 8000, 1.5, sound="rain")
        peaks.setdefault(meta["intensity"], []).append(float(audio.abs().max()))
    assert max(peaks["soft"]) < min(peaks["medium"]) and max(peaks["medium"]) < min(peaks["loud"])


def test_position_and_width_are_heard_in_the_channels():
    for seed in range(30):
        audio, meta = sound_world.make_clip(seed, 16000, 2.0, sound="rain")
        left, right = rms(audio[0]), rms(audio[1])
        corr = float(np.corrcoef(audio[0].numpy(), audio[1].numpy())[0, 1])
        assert {"left": left > 2 * right, "right": right > 2 * left,
                "center": abs(left / right - 1) < 0.1}[meta["position"]]
        assert (corr > 0.99) if meta["width"] == "narrow" else (corr < 0.8)


def power_spectrum(audio, n_fft=4096):
    """Welch average power spectrum of the mid channel."""
    x = audio.numpy().mean(0).astype(np.float64)
    frames = sliding_window_view(x, n_fft)[:: n_fft // 2] * np.hanning(n_fft)
    return (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(0), np.fft.rfftfreq(n_fft, 1 / SR)


def local_flatness(audio, block=16):
    """Spectral flatness within 16-bin bands, weighted by band power: ~1 for noise, ~0 for tones.
    (Flatness over the whole band would call brown noise tonal: its tilt spans 60 dB.)"""
    power = power_spectrum(audio)[0][1:2049].reshape(-1, block) + 1e-30
    flatness = np.exp(np.log(power).mean(1)) / power.mean(1)
    return float((flatness * power.sum(1)).sum() / power.sum())


def centroid(audio):
    power, freqs = power_spectrum(audio)
    return float((freqs * power).sum() / power.sum())


def onset_strength(audio):
    """Largest rise in frame log-energy between 23 ms frames, skipping the clip's fade-in."""
    frames = sliding_window_view(audio.numpy().mean(0), 1024)[::512]
    log_energy = np.log(np.square(frames).mean(1) + 1e-10)
    return float(np.diff(log_energy)[2:].max())


def clips(sound, seeds=range(4)):
    return [sound_world.make_clip(seed, SR, 4.0, sound=sound)[0] for seed in seeds]


def test_rain_wind_and_waves_are_noise_and_piano_bells_bass_pad_are_tones():
    noisy = [local_flatness(a) for s in ("rain", "wind", "ocean waves") for a in clips(s)]
    tonal = [local_flatness(a) for s in ("piano", "bells", "bass", "synth pad") for a in clips(s)]
    assert min(noisy) > 0.6 and max(tonal) < 0.35


def test_rain_is_brighter_than_waves_which_are_brighter_than_wind():
    rain, waves, wind = (np.array([centroid(a) for a in clips(s)])
                         for s in ("rain", "ocean waves", "wind"))
    assert rain.min() > 2 * waves.max() and waves.min() > 1.5 * wind.max()


def test_birdsong_is_higher_pitched_than_bass_and_thunder():
    birds = min(centroid(a) for a in clips("birdsong"))
    assert birds > 5 * max(centroid(a) for s in ("bass", "thunder") for a in clips(s))


def test_drums_have_sharper_onsets_than_a_synth_pad():
    drums = min(onset_strength(a) for a in clips("drums"))
    assert drums > 3 * max(onset_strength(a) for a in clips("synth pad"))


def test_piano_plays_in_its_key():
    for seed in range(4):
        audio, meta = sound_world.make_clip(seed, SR, 4.0, sound="piano")
        power, freqs = power_spectrum(audio, 16384)
        midi = 69 + 12 * math.log2(freqs[power.argmax()] / 440)     # the strongest partial
        tonic, mode = meta["key"].split()
        scale = (0, 2, 4, 5, 7, 9, 11) if mode == "major" else (0, 2, 3, 5, 7, 8, 10)
        degree = (round(midi) - sound_world.NOTE_NAMES.index(tonic)) % 12
        assert degree in scale and abs(midi - round(midi)) < 0.4


META = {"sound": "rain and piano", "seconds": 12.5, "bpm": 96, "key": "C minor", "mood": "calm",
        "genre": "ambient", "intensity": "soft", "position": "left", "width": "wide"}


def test_build_prompt_makes_both_forms_and_always_names_the_sound():
    rng = np.random.default_rng(0)
    prompts = [sound_world.build_prompt(META, rng) for _ in range(200)]
    structured = [p for p in prompts if ": " in p]
    free = [p for p in prompts if ": " not in p]
    assert 60 < len(structured) < 140
    assert all("rain and piano" in p for p in prompts)
    assert all(set(p.split(" | ")) <= {f"{k.capitalize()}: {v}" for k, v in META.items()}
               | {"BPM: 96"} for p in structured)
    assert any("96 bpm" in p for p in free) and not any("12.5" in p for p in prompts)
    assert len({p.count(",") for p in free}) > 3          # subsets of varying size
    assert len(set(prompts)) > 100                         # and shuffled order


def test_build_prompt_keeps_the_description_when_there_is_no_sound_field():
    meta = {"description": "lush strings", "genre": "film", "instruments": ["violin", "cello"]}
    rng = np.random.default_rng(1)
    prompts = [sound_world.build_prompt(meta, rng) for _ in range(50)]
    assert all("lush strings" in p for p in prompts)
    assert any("Instruments: violin, cello" in p for p in prompts)


# --- crops and timing (§3.3) ----------------------------------------------------------------------
def test_long_clip_is_cropped_at_a_random_offset_with_the_papers_seconds():
    sr, window, n = 100, 250, 1234
    audio = torch.arange(n, dtype=torch.float32).repeat(2, 1)   # each sample holds its index
    offsets = []
    for seed in range(200):
        x, start, total = sound_world.crop_or_pad(audio, window, np.random.default_rng(seed), sr)
        offset = int(x[0, 0])
        assert torch.equal(x, audio[:, offset:offset + window])
        assert start == offset // sr and total == 13          # ceil(1234 / 100)
        offsets.append(offset)
    assert min(offsets) < 20 and max(offsets) > n - window - 20


def test_short_clip_is_padded_with_silence_and_starts_at_zero():
    audio = torch.randn(2, 150)
    x, start, total = sound_world.crop_or_pad(audio, 400, np.random.default_rng(0), 100)
    assert torch.equal(x[:, :150], audio) and not x[:, 150:].any()
    assert (start, total) == (0, 2)


def test_cropping_latents_gives_the_seconds_of_the_matching_audio_crop():
    hop = 1024
    latents = torch.arange(4000, dtype=torch.float32).repeat(64, 1)     # (64, L) frame indices
    for seed in range(50):
        rng = np.random.default_rng(seed)
        z, start, total = sound_world.crop_or_pad(latents, 128, rng, SR / hop)
        offset_samples = int(z[0, 0]) * hop
        assert start == offset_samples // SR and total == math.ceil(4000 * hop / SR)


# --- datasets -------------------------------------------------------------------------------------
def test_toy_batches_have_the_trainers_shapes_and_timing():
    data = sound_world.ToyData(window=3 * SR, sample_rate=SR, seed=0)
    batch = data.batch(4, step=0)
    assert batch["audio"].shape == (4, 2, 3 * SR) and batch["audio"].dtype == torch.float32
    assert len(batch["prompts"]) == 4 and all(batch["prompts"])
    for key in ("seconds_start", "seconds_total"):
        assert batch[key].shape == (4,) and batch[key].dtype == torch.long
    assert (batch["seconds_total"] >= 1).all() and (batch["seconds_start"] >= 0).all()
    assert (batch["seconds_start"] < batch["seconds_total"]).all()
    short = data.batch(4, step=0, window=65536)
    assert short["audio"].shape == (4, 2, 65536) and (short["seconds_total"] <= 3).all()


def test_batches_depend_only_on_seed_and_step_so_resuming_repeats_them():
    first = sound_world.ToyData(SR, SR, seed=3).batch(4, step=1)      # items 4..7
    again = sound_world.ToyData(SR, SR, seed=3).batch(2, step=3)      # items 6..7, a fresh object
    assert torch.equal(first["audio"][2:], again["audio"])
    item = sound_world.ToyData(SR, SR, seed=3).item(4, SR)            # step 1's first, alone
    assert torch.equal(first["audio"][0], item[0]) and first["prompts"][0] == item[1]
    assert first["prompts"][2:] == again["prompts"]
    other = sound_world.ToyData(SR, SR, seed=4).batch(4, step=1)
    assert not torch.equal(first["audio"], other["audio"])


def write_folder(root):
    """A folder with good files in odd formats and bad ones; returns the names that should load."""
    def tone(sr, freq=440.0):
        return 0.5 * np.sin(2 * np.pi * freq * np.arange(sr) / sr)    # one second

    sf.write(str(root / "stereo.wav"), np.stack([tone(SR), -tone(SR)], 1), SR)
    sf.write(str(root / "mono.flac"), tone(SR), SR)
    sf.write(str(root / "u8.wav"), tone(22050), 22050, subtype="PCM_U8")
    sf.write(str(root / "hi.wav"), tone(96000, 1000.0), 96000)
    six = np.stack([tone(48000) * (c + 1) / 6 for c in range(6)], 1)     # mean: 0.58 · tone
    sf.write(str(root / "six.wav"), six, 48000)
    (root / "sub").mkdir()
    sf.write(str(root / "sub" / "nested.ogg"), np.stack([tone(SR), tone(SR)], 1), SR)
    (root / "broken.wav").write_bytes(os.urandom(4000))
    sf.write(str(root / "empty.wav"), np.zeros((0, 2), dtype=np.float32), SR)
    sf.write(str(root / "nocaption.wav"), tone(SR), SR)
    sf.write(str(root / "blank.wav"), tone(SR), SR)
    for name in ("stereo", "mono", "hi", "six", "sub/nested", "broken", "empty"):
        (root / f"{name}.txt").write_text(f"a tone called {name}\n")
    (root / "blank.txt").write_text("  \n")
    (root / "u8.json").write_text(json.dumps({"description": "a buzzy tone", "bpm": 120}))
    (root / "notes.md").write_text("not audio")
    return {"stereo.wav", "mono.flac", "u8.wav", "hi.wav", "six.wav", "nested.ogg"}


def test_scan_folder_keeps_readable_captioned_audio_and_reports_the_rest(tmp_path, capsys):
    usable = write_folder(tmp_path)
    items, skipped = sound_world.scan_folder(tmp_path)
    assert {os.path.basename(item["path"]) for item in items} == usable
    reasons = {os.path.basename(path): reason for path, reason in skipped}
    assert set(reasons) == {"broken.wav", "empty.wav", "nocaption.wav", "blank.wav"}
    assert "not readable" in reasons["broken.wav"] and "no audio frames" in reasons["empty.wav"]
    assert "no caption" in reasons["nocaption.wav"] and "empty" in reasons["blank.wav"]
    err = capsys.readouterr().err
    assert err.count("warning: skipping") == 4 and "skipped 4 of 10 files" in err


def test_folder_files_load_as_stereo_at_the_model_rate(tmp_path):
    write_folder(tmp_path)
    items, _ = sound_world.scan_folder(tmp_path)
    for item in items:
        audio = sound_world.read_audio(item["path"], SR)
        n = round(item["seconds"] * item["sample_rate"])
        assert audio.dtype == torch.float32
        assert audio.shape == (2, round(n * SR / item["sample_rate"]))
    hi = sound_world.read_audio(tmp_path / "hi.wav", SR)            # 96 kHz, 1 kHz sine
    expected = 0.5 * sine(1000, SR, hi.shape[-1], phase=0.0).float()
    assert rms(interior(hi - expected)) < 1e-3
    u8 = sound_world.read_audio(tmp_path / "u8.wav", SR)            # 8-bit, 22.05 kHz
    expected = 0.5 * sine(440, SR, u8.shape[-1], phase=0.0).float()
    assert rms(interior(u8 - expected)) < 0.02                # 8-bit quantisation noise
    six = sound_world.read_audio(tmp_path / "six.wav", SR)           # 6 channels, 48 kHz
    expected = 0.5 * 3.5 / 6 * sine(440, SR, six.shape[-1], phase=0.0).float()
    assert torch.equal(six[0], six[1]) and rms(interior(six - expected)) < 1e-3


def test_folder_batches_use_the_captions_and_json_metadata(tmp_path):
    write_folder(tmp_path)
    data = sound_world.FolderData(tmp_path, window=SR // 2, sample_rate=SR, seed=0)
    batch = data.batch(16, step=0)
    assert batch["audio"].shape == (16, 2, SR // 2)
    for prompt in batch["prompts"]:
        assert prompt.startswith("a tone called") or "a buzzy tone" in prompt
    assert (batch["seconds_total"] == 1).all() and (batch["seconds_start"] == 0).all()


def test_folder_with_nothing_usable_raises_value_error_saying_what_is_needed(tmp_path):
    (tmp_path / "broken.wav").write_bytes(os.urandom(4000))
    sf.write(str(tmp_path / "nocaption.wav"), np.zeros(100), SR)
    with pytest.raises(ValueError, match=r"found 2 audio files.*\.txt.*\.json"):
        sound_world.scan_folder(tmp_path)


def test_missing_folder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sound_world.scan_folder(tmp_path / "nowhere")


def test_make_toy_folder_writes_a_dataset_that_scans_cleanly(tmp_path):
    folder = sound_world.make_toy_folder(tmp_path / "toy", SR, n=3, max_seconds=2.0)
    items, skipped = sound_world.scan_folder(folder)
    assert len(items) == 3 and not skipped
    for item in items:
        assert item["channels"] == 2 and item["sample_rate"] == SR and item["caption"]
        assert 1.0 <= item["seconds"] <= 2.0


# ================================================================================== train.py
# --- the three stages (§4.2-§4.4) -----------------------------------------------------------------
def run_train(*argv):
    return train.main([*map(str, argv)])


@pytest.mark.parametrize("stage", ["vae", "clap"])
def test_a_stages_first_logged_loss_is_the_papers_loss_on_its_first_batch(stage, tmp_path):
    """The loop in train.py computes §4.2's and §4.3's losses, nothing else: step 1's logged
    figures equal the losses computed here from the model's own functions, on a model built from
    the same seed and the data's first batch with noise stream 0 (the one-process run's)."""
    flags = ["--size", "tiny", "--data", "toy", "--batch-size", 2, "--crop", 8192,
             "--window-seconds", 1.5, "--seed", 3, "--disc-start", 5][:None if stage == "vae"
                                                                        else -2]
    assert run_train(stage, "--steps", 1, "--out", tmp_path, "--eval-every", 0, *flags) == 0
    with open(tmp_path / f"{stage}.csv", newline="") as f:
        logged = next(csv.DictReader(f))
    args = train.parse_args([stage, *map(str, flags)])
    torch.manual_seed(3)
    model = sa.build_model(train.model_config(args))
    data, _, _ = sound_world.split_data("toy", None, model.config.window,
                                        model.config.sample_rate, 3)
    batch = data.batch(2, 0, 8192)
    with torch.no_grad():
        if stage == "vae":
            x = batch["audio"]
            mean, std = model.vae.encode(x)
            z = mean + std * sa.randn(mean.shape, torch.Generator().manual_seed(3), mean)
            x_hat = model.vae.decode(z)[..., :x.shape[-1]]
            want = {"spectral": sa.stereo_loss(x_hat, x, model.config.sample_rate),
                    "kl": sa.kl_divergence(mean, std)}
        else:
            text = model.clap.embed_text(*model.clap.tokenize(batch["prompts"]))
            want = {"loss": model.clap.loss(text, model.clap.embed_audio(batch["audio"]))}
    for name, value in want.items():
        assert float(logged[name]) == pytest.approx(value.item(), rel=1e-5), name


def test_the_vae_losses_are_weighted_as_section_4_2_says():
    """§4.2: 1 for the spectral losses, 0.1 adversarial, 5.0 feature matching, 1e-4 for the KL
    (the released config's KL weight, 1e-6, is not the paper's)."""
    assert train.LOSS_WEIGHTS == {"spectral": 1.0, "adversarial": 0.1, "feature": 5.0, "kl": 1e-4}


def test_ema_moves_toward_the_weights_by_one_minus_its_decay():
    """shadow <- decay shadow + (1 - decay) w, decay = min(beta, 1 - (1 + k)^-3/4) at step k; a
    part the stage does not train keeps no shadow."""
    model = nn.Module()
    model.unet, model.vae = nn.Linear(3, 2), nn.Linear(2, 2)
    ema = training.EMA(model, ("unet.",), beta=0.99)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.5)
    for step in (0, 10, 10_000):
        decay = min(0.99, 1 - (1 + step) ** -0.75)
        ema.update(model, step)
        for k, v in model.state_dict().items():
            if k.startswith("unet."):
                before[k] = decay * before[k] + (1 - decay) * v
                torch.testing.assert_close(ema.shadow[k], before[k])
    assert set(ema.shadow) == {"unet.weight", "unet.bias"}


def log_losses(path, key):
    """The per-step values of one loss from a stage's log file."""
    values = []
    for line in open(path):
        words = line.split()
        values.append(float(words[words.index(key) + 1]))
    return values


def test_a_weighting_is_0_db_at_1_khz_and_follows_the_standard_table():
    gain_db = lambda f: 20 * math.log10(sa.a_weighting(torch.tensor(float(f))).item())
    # IEC 61672 A-weighting: 0 dB at 1 kHz, -19.1 dB at 100 Hz, +1.2 dB at 2.5 kHz, -2.5 at 10 kHz
    for f, db in [(1000, 0.0), (100, -19.1), (2500, 1.3), (10000, -2.5), (50, -30.2)]:
        assert gain_db(f) == pytest.approx(db, abs=0.15)


def test_stft_loss_is_zero_for_a_perfect_reconstruction_and_grows_with_error():
    x = torch.randn(2, 8192)
    assert sa.stft_loss(x, x, SR).item() == pytest.approx(0, abs=1e-6)
    small = sa.stft_loss(x + 0.01 * torch.randn_like(x), x, SR)
    large = sa.stft_loss(x + 0.3 * torch.randn_like(x), x, SR)
    assert 0 < small < large


def test_spectral_convergence_is_normalised_by_the_target():
    # ||Y - X|| / ||X|| with X the target: for x_hat = 2x that is 1, for x_hat = x / 2 it is 1/2,
    # and the log-magnitude term is log 2 both ways, so the two losses differ by exactly 1/2.
    x = torch.randn(2, 8192, generator=torch.Generator().manual_seed(2))
    gap = sa.stft_loss(2 * x, x, SR) - sa.stft_loss(x, 2 * x, SR)
    assert gap.item() == pytest.approx(0.5, abs=1e-3)


def test_stereo_loss_sees_a_left_right_swap_that_mid_and_side_alone_miss():
    x = torch.randn(1, 2, 8192)
    swapped = x.flip(1)                 # same mid, side of opposite sign: same magnitudes
    side = lambda a: a[:, 0] - a[:, 1]
    assert sa.stft_loss(side(swapped), side(x), SR).item() == pytest.approx(0, abs=1e-6)
    assert sa.stereo_loss(x, x, SR).item() == pytest.approx(0, abs=1e-6)
    assert sa.stereo_loss(swapped, x, SR) > 0.1


def test_stereo_loss_stays_finite_for_a_mono_clip():
    x = torch.randn(1, 1, 8192).repeat(1, 2, 1)          # side = 0 exactly
    x_hat = x + 0.01 * torch.randn_like(x)
    assert sa.stereo_loss(x_hat, x, SR) < 5


def test_discriminator_hinge_loss_is_two_for_a_discriminator_that_outputs_zero():
    disc = train.Discriminator()
    with torch.no_grad():
        for scale in disc.scales:
            scale.post.parametrizations.weight.original0.zero_()
            scale.post.bias.zero_()
    x = torch.randn(2, 2, 8192)
    assert train.discriminator_loss(disc, x, x).item() == pytest.approx(2.0)
    with torch.no_grad():                 # every logit 3: real ones past the margin, fake ones not
        for scale in disc.scales:
            scale.post.bias.fill_(3.0)
    assert train.discriminator_loss(disc, x, x).item() == pytest.approx(0.0 + 4.0)
    logits, features = disc.scales[0](x)
    assert len(disc.scales) == 5 and len(features) == 5 and logits.dim() == 4


def test_vae_stage_overfits_one_batch(tmp_path):
    assert run_train("vae", "--steps", 40, "--out", tmp_path, "--crop", 4096, "--batch-size", 2,
                     "--overfit", "--lr", 1e-3) == 0
    spectral = log_losses(tmp_path / "vae.log", "spectral")
    assert len(spectral) == 40 and sum(spectral[-3:]) < 0.6 * sum(spectral[:3])


def test_discriminator_joins_at_disc_start_and_not_before(tmp_path):
    assert run_train("vae", "--steps", 3, "--out", tmp_path, "--crop", 4096, "--batch-size", 1,
                     "--disc-start", 2) == 0
    lines = (tmp_path / "vae.log").read_text().splitlines()
    assert ["disc" in line.split() for line in lines] == [False, False, True]
    assert ["adversarial" in line.split() for line in lines] == [False, False, True]


def test_clap_stage_overfits_one_batch(tmp_path):
    assert run_train("clap", "--steps", 25, "--out", tmp_path, "--crop", 16384,
                     "--batch-size", 4, "--overfit") == 0
    loss = log_losses(tmp_path / "clap.log", "loss")
    assert loss[-1] < 0.1 * loss[0]


@pytest.fixture
def parts(tmp_path):
    """Untrained VAE and CLAP checkpoints of a short-window tiny model, as stages would write."""
    torch.manual_seed(0)                 # the same weights in every run (torch's own seed varies)
    model = sa.build_model(sa.SIZES["tiny"])
    with torch.no_grad():          # a near-deterministic posterior, as a trained VAE has
        model.vae.encoder[-1].bias[64:] = -10
    sa.save_checkpoint(tmp_path / "vae.pt", model, stage="vae", step=0)
    sa.save_checkpoint(tmp_path / "clap.pt", model, stage="clap", step=0)
    return tmp_path


DIFFUSION = ["--window-seconds", 0.5, "--batch-size", 2]


def test_auto_latent_scale_counts_the_posterior_noise_of_z():
    """z = mean + std eps: 1 / its std, measured here over many draws of eps, is the scale."""
    g = torch.Generator().manual_seed(0)
    cache = object.__new__(training.LatentCache)            # a cache of two clips' posteriors
    cache.cached = {"mean": 0.3 * torch.randn(2, 8, 50, generator=g) + 0.2,
                    "std": 0.2 + 0.4 * torch.rand(2, 8, 50, generator=g)}
    z = cache.cached["mean"] + cache.cached["std"] * torch.randn(500, 2, 8, 50, generator=g)
    scale = training.latent_scale(cache, None, "cpu", None)
    assert scale == pytest.approx(1 / z.std().item(), rel=0.01)


def test_latent_scale_scales_the_training_latents_and_auto_gives_them_unit_variance(parts, capsys):
    args = ["--steps", 1, "--out", parts, *DIFFUSION, "--latent-cache", 3, "--force"]
    stds = {}
    for scale in ("1", "3"):                 # the same seed draws the same batch and noise
        assert run_train("diffusion", *args, "--latent-scale", scale) == 0
        assert sa.load_checkpoint(parts / "diffusion.pt")[0].config.latent_scale == float(scale)
        stds[scale] = log_losses(parts / "diffusion.log", "latent_std")[-1]   # appended
    assert stds["3"] == pytest.approx(3 * stds["1"], abs=2e-4)   # the log keeps 4 decimals
    assert run_train("diffusion", *args, "--latent-scale", "auto") == 0
    scale = sa.load_checkpoint(parts / "diffusion.pt")[0].config.latent_scale
    cache = torch.load(parts / "latents.pt", weights_only=True)
    z = cache["mean"] + cache["std"] * torch.randn(cache["mean"].shape,
                                                   generator=torch.Generator().manual_seed(0))
    assert scale > 1 and (z * scale).std().item() == pytest.approx(1, rel=0.02)
    assert run_train("diffusion", *args[:1], 2, *args[2:-1], "--resume") == 0
    assert sa.load_checkpoint(parts / "diffusion.pt")[0].config.latent_scale == scale   # kept
    for bad in ("0", "-1", "nan", "big"):
        capsys.readouterr()
        assert run_train("diffusion", *args, "--latent-scale", bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --latent-scale must be") and err.count("\n") == 1, err


def fixed_loss(model, batch):
    """The diffusion loss on one batch averaged over 8 fixed draws of (t, eps)."""
    with torch.no_grad():
        mean, _ = model.vae.encode(batch["audio"])
        context, mask = model.condition(batch["prompts"], batch["seconds_start"],
                                        batch["seconds_total"])
        return sum(sa.diffusion_loss(model.unet, mean, context, mask,
                                     torch.Generator().manual_seed(k), cond_dropout=0).item()
                   for k in range(8)) / 8


def test_diffusion_stage_gives_the_loss_each_clips_content_frames(parts, monkeypatch):
    seen, frames, loss = [], sa.StableAudio.content_frames, sa.diffusion_loss
    monkeypatch.setattr(sa.StableAudio, "content_frames", lambda self, s, T: seen.append(
        (torch.as_tensor(s).clone(), torch.as_tensor(T).clone())) or frames(self, s, T))
    monkeypatch.setattr(sa, "diffusion_loss", lambda *a, content_frames=None, **k: seen.append(
        content_frames) or loss(*a, content_frames=content_frames, **k))
    assert run_train("diffusion", "--steps", 2, "--out", parts, *DIFFUSION, "--eval-every", 0) == 0
    assert len(seen) == 4                                        # (seconds, length) per step
    for (start, total), length in zip(seen[::2], seen[1::2]):
        want = [math.ceil((T - s) * 44100 / 1024) for s, T in zip(start.tolist(), total.tolist())]
        assert length.tolist() == want


def test_diffusion_stage_overfits_one_batch(parts):
    assert run_train("diffusion", "--steps", 40, "--out", parts, *DIFFUSION, "--overfit",
                     "--lr", 2e-3) == 0
    trained, ckpt = sa.load_checkpoint(parts / "diffusion.pt", ema=False)
    torch.manual_seed(0)                                     # train.py's initialisation
    fresh = sa.build_model(trained.config)
    fresh.load_state_dict({k: v for k, v in trained.state_dict().items()
                           if k.startswith(("vae.", "clap."))}, strict=False)
    batch = sound_world.ToyData(trained.config.window, SR, seed=0).batch(2, 0)
    assert ckpt["step"] == 40
    before, after = fixed_loss(fresh.eval(), batch), fixed_loss(trained.eval(), batch)
    assert after < 0.85 * before, (before, after)     # same (t, eps) draws for both


def test_the_diffusion_stage_trains_the_unet_and_the_timing_tables_and_freezes_the_rest(parts):
    """§4.4: the U-Net and the timing embeddings learn; the VAE and CLAP stay as trained."""
    assert run_train("diffusion", "--steps", 1, "--out", parts, *DIFFUSION,
                     "--eval-every", 0) == 0
    trained, _ = sa.load_checkpoint(parts / "diffusion.pt", ema=False)
    torch.manual_seed(0)                                     # train.py's initialisation
    fresh = sa.build_model(trained.config).state_dict()
    frozen, _ = sa.load_checkpoint(parts / "vae.pt", ema=False)
    for part, learns in (("unet.", True), ("timing.", True), ("vae.", False), ("clap.", False)):
        before = fresh if learns else frozen.state_dict()
        moved = any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items()
                    if k.startswith(part))
        assert moved == learns, part


def test_resume_and_workers_give_the_same_weights_as_an_uninterrupted_run(parts, tmp_path):
    """A run stopped and resumed, and a run whose batches come from --workers processes, both
    end with the weights of one uninterrupted run in one process."""
    for stage, extra in [("vae", ["--crop", 4096, "--batch-size", 1]), ("diffusion", DIFFUSION)]:
        straight, split = tmp_path / f"straight_{stage}", tmp_path / f"split_{stage}"
        workers = tmp_path / f"workers_{stage}"
        for out in (straight, split, workers):
            out.mkdir()
            for part in ("vae", "clap"):
                (out / f"{part}.pt").write_bytes((parts / f"{part}.pt").read_bytes())
        force = ["--force"] if stage == "vae" else []
        assert run_train(stage, "--steps", 4, "--out", straight, *extra, *force) == 0
        assert run_train(stage, "--steps", 2, "--out", split, *extra, *force) == 0
        assert run_train(stage, "--steps", 4, "--out", split, *extra, "--resume") == 0
        assert run_train(stage, "--steps", 4, "--out", workers, *extra, *force,
                         "--workers", 2) == 0
        a = torch.load(straight / f"{stage}.pt", weights_only=True)
        for other in (split, workers):
            b = torch.load(other / f"{stage}.pt", weights_only=True)
            assert a["step"] == b["step"] == 4
            for key in ("model", "ema"):
                for name, tensor in a[key].items():
                    assert torch.equal(tensor, b[key][name]), (stage, other, key, name)


def test_freeze_encoder_keeps_the_latents_the_diffusion_stage_saw(tmp_path):
    """Phase 2 (--freeze-encoder) starts from the EMA encoder and keeps it: the encoder a
    diffusion stage loads (the EMA) is bit-identical before and after, the decoder changes."""
    vae = ["--crop", 4096, "--batch-size", 1, "--out", tmp_path]
    assert run_train("vae", "--steps", 3, *vae) == 0
    before, _ = sa.load_checkpoint(tmp_path / "vae.pt", ema=True)
    assert run_train("vae", "--steps", 5, *vae, "--resume", "--freeze-encoder") == 0
    after, ckpt = sa.load_checkpoint(tmp_path / "vae.pt", ema=True)
    raw, _ = sa.load_checkpoint(tmp_path / "vae.pt", ema=False)
    for model in (after, raw):
        for (name, a), b in zip(before.vae.encoder.state_dict().items(),
                                model.vae.encoder.state_dict().values()):
            assert torch.equal(a, b), name
    changed = [not torch.equal(a, b) for a, b in zip(before.vae.decoder.state_dict().values(),
                                                     after.vae.decoder.state_dict().values())]
    assert ckpt["step"] == 5 and any(changed)


def assert_same_weights(a, b, what=""):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), (what, name)


def test_init_starts_a_diffusion_run_from_another_checkpoints_unet_at_its_scale(parts, tmp_path,
                                                                                capsys):
    """diffusion --init copies the U-Net and timing embeddings (EMA) of a checkpoint and keeps
    its latent scale unless --latent-scale is given: a fine-tune, not a fresh model."""
    parts_flags = ["--vae", parts / "vae.pt", "--clap", parts / "clap.pt", *DIFFUSION]
    source_run = tmp_path / "source"
    # Another seed: a fresh run (seed 0) would start from other random weights.
    assert run_train("diffusion", "--steps", 2, "--out", source_run, *parts_flags,
                     "--latent-scale", 2, "--seed", 1) == 0
    source, _ = sa.load_checkpoint(source_run / "diffusion.pt", ema=True)
    for extra, scale in (([], 2.0), (["--latent-scale", 3], 3.0)):
        out = tmp_path / f"init{scale:g}"
        assert run_train("diffusion", "--steps", 1, "--out", out, *parts_flags,
                         "--init", source_run / "diffusion.pt", *extra) == 0
        tuned, ckpt = sa.load_checkpoint(out / "diffusion.pt", ema=False)
        assert ckpt["config"]["latent_scale"] == scale
        for part in ("unet", "timing"):
            moved = [(a - b).abs().max().item() for a, b in zip(
                getattr(source, part).state_dict().values(),
                getattr(tuned, part).state_dict().values())]
            assert 0 < max(moved) < 0.01, part      # one step from the source, not from random
    assert run_train("diffusion", "--steps", 1, "--out", tmp_path / "x", *parts_flags,
                     "--init", tmp_path / "missing.pt") == 2
    assert "--init" in capsys.readouterr().err.splitlines()[-1]


def test_init_starts_phase_two_from_another_checkpoints_vae(parts, tmp_path, capsys):
    """--init copies a trained model's VAE (here an export, as checkpoints/demo.pt is); with
    --freeze-encoder its encoder, and so its latents, stay bit-identical."""
    assert run_train("diffusion", "--steps", 1, "--out", parts, *DIFFUSION) == 0
    demo = tmp_path / "demo.pt"
    assert run_train("export", "--out", parts, "--to", demo) == 0
    source, _ = sa.load_checkpoint(demo)
    out = tmp_path / "phase2"
    vae = ["--crop", 4096, "--batch-size", 1, "--out", out]
    assert run_train("vae", "--steps", 2, *vae, "--init", demo, "--freeze-encoder") == 0
    after, ckpt = sa.load_checkpoint(out / "vae.pt", ema=True)
    assert_same_weights(source.vae.encoder, after.vae.encoder)
    decoder = [(a - b).abs().max().item() for a, b in zip(
        source.vae.decoder.state_dict().values(), after.vae.decoder.state_dict().values())]
    assert 0 < max(decoder) < 0.1       # moved by two steps from the source, not from random
    assert run_train("vae", "--steps", 3, *vae, "--init", demo, "--resume") == 2
    assert "--init starts a fresh vae" in capsys.readouterr().err
    assert run_train("vae", "--steps", 3, *vae, "--init", tmp_path / "missing.pt", "--force") == 2
    err = capsys.readouterr().err
    assert "missing.pt not found" in err
    # export --vae puts the phase-2 decoder beside the source's U-Net, in place with --force.
    assert run_train("export", "--from", demo, "--vae", out / "vae.pt", "--to", demo,
                     "--force") == 0
    swapped, _ = sa.load_checkpoint(demo)
    for part, want in (("unet", source), ("vae", after), ("clap", source)):
        assert_same_weights(getattr(want, part), getattr(swapped, part), part)
    # A VAE with another encoder would decode latents the U-Net never learned: refused.
    torch.manual_seed(1)
    sa.save_checkpoint(tmp_path / "fresh.pt", sa.build_model(sa.SIZES["tiny"]), stage="vae", step=0)
    assert run_train("export", "--from", demo, "--vae", tmp_path / "fresh.pt", "--to",
                     tmp_path / "other.pt") == 2
    assert "another encoder" in capsys.readouterr().err and not (tmp_path / "other.pt").exists()


BUNDLED_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints",
                            "demo.pt")


def test_the_bundled_demo_is_current_and_computes_what_it_was_published_computing():
    """checkpoints/demo.pt was re-saved in the current format; fixtures/demo_outputs.pt holds what
    the file as first published (format 1) computed on fixed inputs (fixtures/make_demo_fixture.py
    says how it was made)."""
    import importlib.util
    raw = torch.load(BUNDLED_DEMO, weights_only=True)
    assert raw["format"] == sa.CHECKPOINT_FORMAT and "upgraded_from" not in raw
    spec = importlib.util.spec_from_file_location(
        "make_demo_fixture", os.path.join(os.path.dirname(BUNDLED_DEMO), "..", "fixtures",
                                          "make_demo_fixture.py"))
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    demo, _ = sa.load_checkpoint(BUNDLED_DEMO)
    published = torch.load(fixture.OUT_PATH, weights_only=True)["outputs"]
    now = fixture.outputs(demo, fixture.inputs(demo))
    assert set(now) == set(published)
    for name, value in published.items():
        assert relative_error(now[name], value) <= 1e-5, name


def test_the_bundled_demo_fine_tunes_in_each_stage_and_the_result_samples(tmp_path, capsys):
    """What the README promises: phase 2 of the VAE, the CLAP and a diffusion fine-tune start
    from checkpoints/demo.pt itself, and the exported result samples."""
    demo, _ = sa.load_checkpoint(BUNDLED_DEMO)
    out = tmp_path / "run"
    assert run_train("vae", "--init", BUNDLED_DEMO, "--freeze-encoder", "--steps", 1, "--crop",
                     4096, "--batch-size", 1, "--out", out) == 0
    assert run_train("clap", "--init", BUNDLED_DEMO, "--steps", 1, "--crop", 8192,
                     "--batch-size", 2, "--out", out) == 0
    clap, _ = sa.load_checkpoint(out / "clap.pt", ema=False)
    moved = [(a - b).abs().max().item() for a, b in zip(demo.clap.state_dict().values(),
                                                       clap.clap.state_dict().values())]
    assert 0 < max(moved) < 0.01              # one step from the demo's CLAP, not from random
    assert run_train("diffusion", "--init", BUNDLED_DEMO, "--vae", BUNDLED_DEMO, "--clap",
                     BUNDLED_DEMO, "--steps", 1, "--batch-size", 1, "--latent-cache", 1,
                     "--eval-every", 0, "--out", out) == 0
    tuned, ckpt = sa.load_checkpoint(out / "diffusion.pt", ema=False)
    assert ckpt["config"]["latent_scale"] == demo.config.latent_scale          # the demo's, 4.5
    assert tuned.config.unet == demo.config.unet and tuned.config.timing.max_seconds == 512
    assert_same_weights(demo.vae, tuned.vae, "vae")
    assert_same_weights(demo.clap, tuned.clap, "clap")
    moved = [(a - b).abs().max().item() for a, b in zip(demo.unet.state_dict().values(),
                                                       tuned.unet.state_dict().values())]
    assert 0 < max(moved) < 0.01              # one step from the demo's U-Net, not from random
    phase2, _ = sa.load_checkpoint(out / "vae.pt")
    assert_same_weights(demo.vae.encoder, phase2.vae.encoder, "encoder")
    assert run_train("export", "--from", out / "diffusion.pt", "--vae", out / "vae.pt", "--to",
                     tmp_path / "tuned.pt") == 0
    assert run_sample(tmp_path / "tuned.pt", tmp_path / "a.wav") == 0
    audio, sr = sf.read(tmp_path / "a.wav")
    assert sr == demo.config.sample_rate and audio.shape == (int(1.5 * sr), 2)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


def test_latent_cache_holds_the_vae_posterior_of_the_datas_own_items(parts, capsys):
    args = ["--steps", 2, "--out", parts, *DIFFUSION, "--latent-cache", 3]
    assert run_train("diffusion", *args, "--workers", 2) == 0      # windows made in 2 processes
    cache = torch.load(parts / "latents.pt", weights_only=True)
    model, _ = sa.load_checkpoint(parts / "diffusion.pt")
    data = sound_world.ToyData(model.config.window, SR, seed=0)
    for j in range(3):
        audio, prompt, start, total = data.item(j, model.config.window)
        mean, std = model.vae.encode(audio[None])
        torch.testing.assert_close(cache["mean"][j], mean[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache["std"][j], std[0], rtol=1e-4, atol=1e-5)
        assert (cache["prompts"][j], cache["seconds_start"][j], cache["seconds_total"][j]) == (
            prompt, start, total)
    capsys.readouterr()
    assert run_train("diffusion", *args[:1], 4, *args[2:], "--resume") == 0
    assert "using 3 cached latents" in capsys.readouterr().out       # reused, not re-encoded
    assert run_train("diffusion", *args, "--latent-cache", 2, "--force") == 0
    assert len(torch.load(parts / "latents.pt", weights_only=True)["prompts"]) == 2   # rebuilt


def test_the_latent_cache_is_made_anew_for_another_seed(tmp_path):
    torch.manual_seed(0)
    model = sa.build_model(replace(sa.SIZES["tiny"], window=32768)).eval()
    for seed in (0, 1):                                  # the same folder, VAE, window and n
        args = types.SimpleNamespace(seed=seed, ranks=training.Ranks(), out=str(tmp_path),
                                     data="toy", overfit=False, workers=0)
        data = sound_world.ToyData(model.config.window, SR, seed=seed)
        cache = training.LatentCache(model, data, 2, "cpu", args)
        assert cache.cached["prompts"] == [data.item(j, model.config.window)[1] for j in range(2)]


def test_export_writes_the_ema_weights_alone_and_sample_py_loads_them(parts, tmp_path, capsys):
    assert run_train("diffusion", "--steps", 2, "--out", parts, *DIFFUSION) == 0
    demo = tmp_path / "ckpts" / "demo.pt"
    assert run_train("export", "--out", parts, "--to", demo) == 0
    source = torch.load(parts / "diffusion.pt", weights_only=True)
    exported = torch.load(demo, weights_only=True)
    assert set(exported) >= {"config", "model"} and "optimizers" not in exported
    for name, tensor in exported["model"].items():
        expected = source["ema"].get(name, source["model"][name])
        assert torch.equal(tensor, expected), name
    assert demo.stat().st_size < 0.6 * (parts / "diffusion.pt").stat().st_size
    assert run_train("export", "--out", parts, "--to", demo) == 2     # no overwrite
    assert "--force" in capsys.readouterr().err
    assert sample.main(["rain", "--ckpt", str(demo), "--steps", "2", "--seconds", "0.3",
                        "--out", str(tmp_path / "a.wav")]) == 0
    assert "EMA weights of" in capsys.readouterr().out


def released_files(sat, tmp_path, part="diffusion"):
    """The fixture's model as a user would have it: a config JSON and a Lightning .ckpt."""
    config, weights = tmp_path / f"{part}.json", tmp_path / f"{part}.ckpt"
    config.write_text(json.dumps(sat[part]["config"]))
    torch.save({"state_dict": floats(sat[part]["state_dict"])}, weights)
    return str(config), str(weights)


def test_export_from_sat_writes_a_checkpoint_sample_py_loads(sat, tmp_path, capsys):
    config, weights = released_files(sat, tmp_path)
    out = tmp_path / "released.pt"
    assert run_train("export", "--from-sat", config, weights, "--to", out) == 0
    assert "LAION CLAP" in capsys.readouterr().out
    model, ckpt = sa.load_checkpoint(out)
    assert ckpt["format"] == sa.CHECKPOINT_FORMAT
    assert released_unet_errors(model, sat["diffusion"]["unet"])[0] <= 1e-4
    assert sample.main(["rain", "--ckpt", str(out), "--steps", "2",
                        "--out", str(tmp_path / "a.wav")]) == 0
    assert sf.info(str(tmp_path / "a.wav")).frames == model.config.window     # the whole window
    assert sample.main(["rain", "--from-sat", config, weights, "--steps", "2",     # directly
                        "--out", str(tmp_path / "b.wav")]) == 0
    assert sf.info(str(tmp_path / "b.wav")).frames == model.config.window
    vae_config, vae_weights = released_files(sat, tmp_path, "oobleck")
    assert run_train("export", "--from-sat", vae_config, vae_weights, "--to",
                     tmp_path / "vae.pt") == 2
    assert "--reconstruct" in capsys.readouterr().err


def test_reconstruct_round_trips_a_file_through_a_released_autoencoder(sat, tmp_path, capsys):
    config, weights = released_files(sat, tmp_path, "oobleck")
    audio = 0.05 * np.sin(2 * np.pi * 440 * np.arange(3000) / 44100)
    sf.write(tmp_path / "in.wav", np.stack([audio, -audio], 1), 44100, subtype="FLOAT")
    args = ["--reconstruct", str(tmp_path / "in.wav"), "--from-sat", config, weights,
            "--out", str(tmp_path / "out.wav")]
    assert sample.main(args) == 0
    written, sr = sf.read(tmp_path / "out.wav", dtype="float64")
    vae = released.from_sat(config, weights)
    with torch.no_grad():
        x = torch.tensor(np.stack([audio, -audio]), dtype=torch.float32)[None]
        expected = vae.decode(vae.encode(x)[0])[0, :, :3000].double().numpy()
    expected = expected - expected.mean(-1, keepdims=True)          # sample.py removes DC
    assert sr == 44100 and written.shape == (3000, 2)
    assert np.abs(written.T - expected).max() < 1e-4 + 1e-3 * np.abs(expected).max()
    assert (tmp_path / "out.png").exists()
    assert sample.main(args) == 2 and "--force" in capsys.readouterr().err


def test_clap_layer_flag_conditions_on_the_chosen_layer(parts):
    assert run_train("diffusion", "--steps", 1, "--out", parts, *DIFFUSION,
                     "--clap-layer", -1) == 0
    model, _ = sa.load_checkpoint(parts / "diffusion.pt")
    tokens, mask = model.clap.tokenize(["bells"])
    last = model.clap.text_hidden(tokens, mask, len(model.clap.text_layers))
    torch.testing.assert_close(model.clap.text_features(tokens, mask), last)
    assert run_train("diffusion", "--steps", 1, "--out", parts, "--clap-layer", 0) == 2


def test_diffusion_refuses_a_vae_of_another_size(parts, capsys):
    other = replace(sa.SIZES["tiny"], size="other", vae=sa.VAEConfig(encoder_width=8))
    sa.save_checkpoint(parts / "vae.pt", sa.build_model(other), stage="vae", step=0)
    assert run_train("diffusion", "--steps", 1, "--out", parts, *DIFFUSION) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "size 'other'" in err and "Traceback" not in err


def test_diffusion_refuses_to_start_without_a_trained_vae(tmp_path, capsys):
    assert run_train("diffusion", "--steps", 1, "--out", tmp_path, *DIFFUSION) == 2
    assert "needs a trained vae" in capsys.readouterr().err


def test_lr_on_resume_replaces_the_checkpoints_rate_and_is_kept_after(tmp_path):
    args = ["clap", "--out", tmp_path, "--crop", 8192, "--batch-size", 2]
    rate = lambda: torch.load(tmp_path / "clap.pt", weights_only=True)["optimizers"][0][
        "param_groups"][0]["lr"]
    assert run_train(*args, "--steps", 1, "--lr", 3e-4) == 0 and rate() == 3e-4
    assert run_train(*args, "--steps", 2, "--resume") == 0 and rate() == 3e-4   # not the default
    assert run_train(*args, "--steps", 3, "--resume", "--lr", 2e-5) == 0 and rate() == 2e-5


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    args = ["clap", "--out", tmp_path, "--crop", 8192, "--batch-size", 2, "--save-every", 1]
    assert run_train(*args, "--steps", 2) == 0
    before = (tmp_path / "clap.pt").read_bytes()
    monkeypatch.setattr(sa.CLAP, "loss", lambda self, t, a: (t.sum() + a.sum()) * float("nan"))
    assert run_train(*args, "--steps", 4, "--resume") == 2
    assert "not finite" in capsys.readouterr().err
    assert (tmp_path / "clap.pt").read_bytes() == before


def test_the_last_step_is_saved_whatever_save_every(tmp_path):
    assert run_train("clap", "--steps", 3, "--save-every", 2, "--out", tmp_path, "--crop", 4096,
                     "--batch-size", 2, "--eval-every", 0) == 0
    assert torch.load(tmp_path / "clap.pt", weights_only=True)["step"] == 3


def test_ctrl_c_saves_and_exits_and_resume_continues(tmp_path, monkeypatch, capsys):
    calls = []
    real_loss = sa.CLAP.loss

    def interrupt_at_third_step(self, t, a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(self, t, a)
    monkeypatch.setattr(sa.CLAP, "loss", interrupt_at_third_step)
    args = ["clap", "--out", tmp_path, "--crop", 8192, "--batch-size", 2, "--steps", 5]
    assert run_train(*args) == 2
    assert "interrupted after step 2" in capsys.readouterr().err
    assert torch.load(tmp_path / "clap.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(sa.CLAP, "loss", real_loss)
    assert run_train(*args, "--resume") == 0
    assert torch.load(tmp_path / "clap.pt", weights_only=True)["step"] == 5


def test_an_existing_checkpoint_is_not_overwritten_without_force(tmp_path, capsys):
    args = ["clap", "--out", tmp_path, "--crop", 8192, "--batch-size", 2, "--steps", 1]
    assert run_train(*args) == 0
    assert run_train(*args) == 2
    assert "--resume" in capsys.readouterr().err and run_train(*args, "--force") == 0


def test_training_on_a_messy_folder_skips_what_it_cannot_use(tmp_path, capsys):
    folder = tmp_path / "data"
    sound_world.make_toy_folder(folder, SR, n=3, max_seconds=2, seed=1)
    (folder / "broken.wav").write_bytes(os.urandom(300))
    (folder / "broken.txt").write_text("noise")
    sf.write(folder / "empty.wav", np.zeros((0, 2)), SR)
    (folder / "empty.txt").write_text("nothing")
    for name, channels, rate, subtype in [("mono", 1, SR, "PCM_16"), ("u8", 2, 22050, "PCM_U8"),
                                          ("hi", 2, 96000, "PCM_24"), ("six", 6, 48000, "FLOAT")]:
        sf.write(folder / f"{name}.wav", 0.1 * np.random.randn(rate, channels), rate,
                 subtype=subtype)
        (folder / f"{name}.txt").write_text(f"{name} noise")
    sf.write(folder / "uncaptioned.wav", np.zeros((SR, 2)), SR)
    assert run_train("clap", "--data", folder, "--out", tmp_path / "run", "--crop", 8192,
                     "--batch-size", 4, "--steps", 3) == 0
    err = capsys.readouterr().err
    for bad in ("broken.wav", "empty.wav", "uncaptioned.wav"):
        assert f"skipping {folder / bad}" in err
    assert "skipped 3 of 10 files" in err


def test_prompts_are_limited_in_utf8_bytes_not_characters():
    # 40 characters of three bytes each: short in characters, long in the bytes the tokenizer reads.
    meta = {"sound": "雨", "genre": "音" * 40, "mood": "静" * 40}
    rng = np.random.default_rng(0)
    for _ in range(50):
        prompt = sound_world.build_prompt(meta, rng)
        assert len(prompt.encode()) <= sound_world.MAX_PROMPT_BYTES and "雨" in prompt


def test_long_prompts_are_shortened_by_dropping_fields_never_the_sound():
    meta = {"sound": "rain", "description": "x" * 60, "genre": "y" * 40, "mood": "z" * 40}
    rng = np.random.default_rng(0)
    for _ in range(100):
        prompt = sound_world.build_prompt(meta, rng)
        assert len(prompt.encode()) <= 126 and "rain" in prompt


# --- watching a run: held-out set, evaluation, demos, metrics -------------------------------------
import csv  # noqa: E402 (this section's own)


def metrics_rows(out, stage):
    with open(out / f"{stage}.csv", newline="") as f:
        return list(csv.DictReader(f))


def captioned_files(folder, names):
    """Short silent files with a caption each, as a user's folder would hold."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        sf.write(folder / f"{name}.wav", np.zeros((100, 2)), SR)
        (folder / f"{name}.txt").write_text(f"{name} sound")
    return folder


def held_names(held):
    return {os.path.basename(item["path"]) for item in held.items}


def test_held_out_files_are_a_stable_share_by_path_and_a_small_folder_says_it_trains_on_them(
        tmp_path):
    first = [f"a{i:03d}" for i in range(100)]
    folder = captioned_files(tmp_path / "data", first)
    train_data, held, note = sound_world.split_data(folder, None, SR, SR)
    before = held_names(held)
    assert 1 <= len(before) <= 15 and note.startswith(f"{len(before)} of 100 files")
    assert before.isdisjoint(held_names(train_data)) and not held.trained_on
    assert len(held_names(train_data)) + len(before) == 100
    captioned_files(folder, [f"b{i:03d}" for i in range(100)])      # more files arrive
    _, held, note = sound_world.split_data(folder, None, SR, SR)
    assert {name for name in held_names(held) if name.startswith("a")} == before
    moved = folder.rename(tmp_path / "elsewhere")                   # the same files, moved
    assert held_names(sound_world.split_data(moved, None, SR, SR)[1]) == held_names(held)
    small = captioned_files(tmp_path / "small", ["x", "y"])
    train_data, held, note = sound_world.split_data(small, None, SR, SR)
    assert held.trained_on and held_names(held) == held_names(train_data) == {"x.wav", "y.wav"}
    assert "TRAINING" in note
    _, held, note = sound_world.split_data(small, moved, SR, SR)     # --val DIR: its files
    assert len(held.items) == 200 and not held.trained_on and str(moved) in note


def test_held_out_sound_world_items_are_the_same_whatever_the_runs_seed():
    window = SR // 4
    runs = [sound_world.split_data("toy", None, window, SR, seed) for seed in (0, 1)]
    (train_0, held_0, _), (train_1, held_1, _) = runs
    a, b = held_0.batch(2, 0), held_1.batch(2, 0)
    assert torch.equal(a["audio"], b["audio"]) and a["prompts"] == b["prompts"]
    for train_data in (train_0, train_1):
        assert not torch.equal(train_data.batch(2, 0)["audio"], a["audio"])


WATCHED = ["--init", BUNDLED_DEMO, "--vae", BUNDLED_DEMO, "--clap", BUNDLED_DEMO,
           "--window-seconds", 0.75, "--batch-size", 1, "--latent-cache", 1, "--demo-steps", 2,
           "--demo-seconds", 0.5]
TIMES = ("step_seconds", "eval_seconds")


def test_a_watched_run_writes_held_out_figures_and_demos_and_resumes_to_the_same_rows(tmp_path):
    """The bundled demo fine-tuned for 4 steps, evaluated and sampled every 2: the metrics file
    and demos; a run stopped at step 2 (after logging a row past its checkpoint, and half of
    another) and resumed writes the same rows, times aside; one not watched, the same weights."""
    watch = ["--eval-every", 2, "--demo-every", 2, "--keep-best"]
    straight, split, unwatched = tmp_path / "straight", tmp_path / "split", tmp_path / "plain"
    assert run_train("diffusion", *WATCHED, *watch, "--steps", 4, "--out", straight) == 0
    assert run_train("diffusion", *WATCHED, *watch, "--steps", 2, "--out", split) == 0
    last = (split / "diffusion.csv").read_text().splitlines()[-1]
    with open(split / "diffusion.csv", "a") as f:
        f.write("3" + last[1:] + "\n4,0.1")
    assert run_train("diffusion", "--resume", "--batch-size", 1, "--steps", 4, "--out", split) == 0
    rows = metrics_rows(straight, "diffusion")
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"]
    assert [bool(row["val_loss"]) for row in rows] == [False, True, False, True]
    strip = lambda row: {k: v for k, v in row.items() if k not in TIMES}
    assert [strip(row) for row in metrics_rows(split, "diffusion")] == list(map(strip, rows))
    evaluated = [row for row in rows if row["val_loss"]]
    best = min(evaluated, key=lambda row: float(row["val_loss"]))
    assert torch.load(straight / "diffusion_best.pt", weights_only=True)["step"] == int(
        best["step"])
    demos = sorted(os.listdir(straight / "demos"))
    assert {name.split("_")[1] for name in demos} == {"000002", "000004"} and len(demos) == 8
    for name in demos:
        if name.endswith(".wav"):
            audio, sr = sf.read(straight / "demos" / name)
            assert sr == SR and audio.shape == (SR // 2, 2) and np.isfinite(audio).all()
            width, height, _, raw = read_png(straight / "demos" / name.replace(".wav", ".png"))
            assert len(raw) == height * (1 + 3 * width)
    assert run_train("diffusion", *WATCHED, "--eval-every", 0, "--demo-every", 0, "--steps", 4,
                     "--out", unwatched) == 0
    assert not (unwatched / "demos").exists()
    a = torch.load(straight / "diffusion.pt", weights_only=True)
    b = torch.load(unwatched / "diffusion.pt", weights_only=True)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def test_a_vae_run_on_a_messy_folder_never_trains_on_its_held_out_share(tmp_path, monkeypatch,
                                                                          capsys):
    folder = tmp_path / "data"
    sound_world.make_toy_folder(folder, SR, n=3, max_seconds=2, seed=1)
    (folder / "broken.wav").write_bytes(os.urandom(300))
    (folder / "broken.txt").write_text("noise")
    for name, channels, rate, subtype in [("mono", 1, 22050, "PCM_U8"), ("six", 6, 48000, "FLOAT")]:
        sf.write(folder / f"{name}.wav", 0.1 * np.random.randn(rate, channels), rate,
                 subtype=subtype)
        (folder / f"{name}.txt").write_text(f"{name} noise")
    _, held, _ = sound_world.split_data(folder, None, SR, SR)
    read, read_audio = [], sound_world.read_audio
    monkeypatch.setattr(sound_world, "read_audio", lambda path, sr: read.append(
        os.path.basename(path)) or read_audio(path, sr))
    vae = ["vae", "--data", folder, "--crop", 4096, "--batch-size", 2, "--steps", 2]
    assert run_train(*vae, "--eval-every", 0, "--demo-every", 0, "--out", tmp_path / "a") == 0
    assert read and not held_names(held) & set(read)                     # training alone
    assert run_train(*vae, "--eval-every", 1, "--demo-every", 2, "--demo-seconds", 0.25,
                     "--out", tmp_path / "b") == 0
    assert held_names(held) <= set(read)                                 # evaluation
    out, err = capsys.readouterr()
    assert f"held out: {len(held.items)} of 5 files" in out and "Traceback" not in err
    rows = metrics_rows(tmp_path / "b", "vae")
    assert all(float(row["val_spectral"]) > 0 and float(row["val_kl"]) >= 0 for row in rows)
    demos = sorted(os.listdir(tmp_path / "b" / "demos"))
    assert [name for name in demos if name.endswith(".wav")] == [
        "vae_000002_0_decoded.wav", "vae_000002_0_heldout.wav", "vae_000002_1_decoded.wav",
        "vae_000002_1_heldout.wav"]
    for a, b in zip(*(sa.load_checkpoint(tmp_path / run / "vae.pt")[0].parameters()
                      for run in ("a", "b"))):
        assert torch.equal(a, b)


def test_the_demo_clap_picks_held_out_clips_by_their_captions_well_above_chance(tmp_path,
                                                                                 capsys):
    assert run_train("clap", "--init", BUNDLED_DEMO, "--lr", 1e-9, "--steps", 1, "--crop",
                     2 * SR, "--batch-size", 2, "--demo-every", 1, "--out", tmp_path) == 0
    row = metrics_rows(tmp_path, "clap")[0]
    assert float(row["val_top1"]) >= 0.5 and float(row["val_loss"]) < math.log(16) / 2
    table = capsys.readouterr().out.split("held-out captions against clips")[1].splitlines()
    assert len(table) >= 6 and all(line.count("[") == 1 for line in table[2:6])


def test_bad_watching_flags_are_one_error_line_and_lose_nothing_in_out(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["clap", "--out", out, "--crop", 4096, "--batch-size", 2, "--eval-every", 0]
    assert run_train(*args, "--steps", 1) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    empty = tmp_path / "val"
    empty.mkdir()
    (empty / "notes.txt").write_text("no audio here")
    for bad in (["--demo-prompt", ""], ["--demo-prompt", "rain", "--demo-prompt", "  "],
                ["--eval-every", -1], ["--demo-every", -2], ["--val", empty],
                ["--eval-every", "often"]):                   # argparse's own error: one line
        capsys.readouterr()
        assert run_train(*args, "--steps", 2, "--resume", *bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, (bad, err)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


# --- before training on your own audio: train.py check --------------------------------------------
# Folders made to fail one way each. Their findings come from the files alone, so those tests stub
# out the autoencoder and the trial run (check_model_parts); one clean folder runs the whole check.
import contextlib  # noqa: E402 (this section's own)
import io          # noqa: E402

CHECK = ["--window-seconds", 0.5, "--batch-size", 2, "--crop", 16384]


def check_folder(root, files, rate=SR, caption="{}, a sound of its own"):
    """Write {name: audio (N, C)} into `root`, each captioned caption.format(name)."""
    root.mkdir()
    for name, audio in files.items():
        sf.write(root / f"{name}.wav", audio, rate)
        (root / f"{name}.txt").write_text(caption.format(name), encoding="utf-8")
    return root


def tone_noise(seconds, rate=SR, channels=2, seed=0):
    """A 330 Hz tone in a little noise, at -12 dBFS: nothing wrong with it."""
    n = int(seconds * rate)
    x = np.sin(2 * np.pi * 330 * np.arange(n) / rate)[:, None].repeat(channels, 1)
    return 0.25 * x + 0.01 * np.random.default_rng(seed).standard_normal((n, channels))


def run_check(capsys, *argv):
    """train.py check's exit status and its problem and fix lines, in pairs."""
    capsys.readouterr()
    code = run_train("check", *argv)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    problems = [(a, b) for a, b in zip(lines, lines[1:]) if a.startswith("problem:")]
    assert all(b.startswith("  fix: ") for _, b in problems), out
    return code, problems, out, err


@pytest.fixture
def check_model_parts(monkeypatch):
    """The check without its autoencoder and trial run: the folder's own findings alone."""
    monkeypatch.setattr(training, "check_vae", lambda *a: None)
    monkeypatch.setattr(training, "check_trial", lambda *a: None)


@pytest.mark.parametrize("case, problem, fix", [
    ("silent", "files read are silent", "remove them, or export them again"),
    ("clipped", "files read are clipped", "export them again at a lower gain"),
    ("dc", "files read have a DC offset", "high-pass filter"),
    ("short", "of a typical window is padding", "--window-seconds 1 "),
    ("one caption", "files share one caption", "give each file a caption"),
    ("long caption", "longer than the 126 bytes", "shorten them"),
    ("mono 16 kHz", "lower rate than the model's 44100 Hz (down to 16000 Hz)", "train on 44100 Hz"),
    ("mono 16 kHz", "files are mono", "train on stereo sources"),
    ("unreadable", "2 of 5 audio files are not readable audio", "convert them to wav or flac"),
])
def test_check_names_each_problem_of_a_folder_and_its_fix(case, problem, fix, tmp_path, capsys,
                                                            check_model_parts):
    rng = np.random.default_rng(1)
    good = {f"tone{i}": tone_noise(2, seed=i) for i in range(3)}
    folders = {
        "silent": lambda: {f"quiet{i}": np.zeros((2 * SR, 2)) for i in range(3)},
        "clipped": lambda: {f"loud{i}": np.clip(4 * rng.standard_normal((2 * SR, 2)), -1, 1)
                            for i in range(3)},
        "dc": lambda: {f"offset{i}": tone_noise(2, seed=i) + 0.2 for i in range(3)},
        "short": lambda: {f"blip{i}": tone_noise(1, seed=i) for i in range(3)},
        "one caption": lambda: good, "long caption": lambda: good,
        "mono 16 kHz": lambda: {f"phone{i}": tone_noise(2, 16000, 1, i) for i in range(3)},
        "unreadable": lambda: good}
    captions = {"one caption": "music", "long caption": "{} " + "é" * 64}     # 2 bytes each
    folder = check_folder(tmp_path / "data", folders[case](), 16000 if "16" in case else SR,
                          *[captions[case]] if case in captions else [])
    if case == "unreadable":
        for name in ("broken", "garbage"):
            (folder / f"{name}.wav").write_bytes(os.urandom(500))
            (folder / f"{name}.txt").write_text("lost")
    window = [] if case == "short" else CHECK
    code, problems, out, err = run_check(capsys, "--data", folder, *window)
    assert code == 1 and len(problems) == (2 if case == "mono 16 kHz" else 1), out
    (what, how), = [(a, b) for a, b in problems if problem in a]
    assert fix in how, how


def test_check_of_a_folder_with_nothing_usable_is_one_error_line_naming_the_fix(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        sf.write(folder / f"take{i}.wav", tone_noise(1, seed=i), SR)    # no captions at all
    code, _, out, err = run_check(capsys, "--data", folder)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "3 of 3 audio files have no caption" in err and "song.txt" in err
    for bad in (["--data", tmp_path / "nowhere"], []):
        code, _, out, err = run_check(capsys, *bad)
        assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]       # wrote nothing


@pytest.fixture(scope="module")
def clean_check(tmp_path_factory):
    """The whole check (the bundled demo's VAE and CLAP, a 20-step trial) on sound-world clips,
    on one torch thread: its exit status and what it printed. --latent-scale auto, as the check
    advises for the demo's VAE at scale 1 (it was trained at 4.5: its latents are small)."""
    root = tmp_path_factory.mktemp("check")
    sound_world.make_toy_folder(root / "data", SR, n=6, max_seconds=2, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = run_train("check", "--data", root / "data", *CHECK, "--latent-scale", "auto",
                             "--steps", 20, "--lr", 2e-3)
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), sorted(p.name for p in root.rglob("*"))


def test_check_of_clean_sound_world_clips_raises_no_alarm_and_writes_nothing(clean_check):
    code, out, files = clean_check
    assert code == 0 and "verdict: no problem found" in out and "problem:" not in out, out
    for section in ("folder", "autoencoder", "latents of 2 windows", "trial: 20 steps"):
        assert f"\n{section}" in out
    assert len(files) == 13                              # the folder: 6 clips, 6 captions


def test_the_check_finds_an_untrained_autoencoder(tmp_path, capsys, monkeypatch):
    """A VAE fresh from its initialisation reconstructs nothing: train it first."""
    torch.manual_seed(0)
    sa.save_checkpoint(tmp_path / "vae.pt", sa.build_model(sa.SIZES["tiny"]), stage="vae", step=0)
    monkeypatch.setattr(training, "check_trial", lambda *a: None)
    folder = sound_world.make_toy_folder(tmp_path / "data", SR, n=3, max_seconds=2, seed=0)
    code, problems, out, _ = run_check(capsys, "--data", folder, *CHECK, "--vae",
                                       tmp_path / "vae.pt")
    (what, fix), = problems
    assert code == 1 and "it is untrained" in what and f"train.py vae --data {folder}" in fix


def test_the_check_finds_latents_far_from_unit_variance_and_gives_the_scale():
    """z = mean + std * eps with mean ~ N(0, 0.2^2), std 0.1: its std is sqrt(0.05)."""
    g = torch.Generator().manual_seed(0)
    cached = {"mean": 0.2 * torch.randn(3, 64, 50, generator=g),
              "std": torch.full((3, 64, 50), 0.1)}
    found = training.Findings()
    with contextlib.redirect_stdout(io.StringIO()):
        training.check_latents(cached, 1.0, found)
    (what, fix), = found.problems
    want = 1 / math.sqrt(0.2 ** 2 + 0.1 ** 2)
    scale = float(fix.split("here ")[1].rstrip(")"))
    assert "std is 0.22" in what and "--latent-scale auto" in fix
    assert scale == pytest.approx(want, rel=0.02)
    found = training.Findings()
    with contextlib.redirect_stdout(io.StringIO()):
        training.check_latents(cached, scale, found)     # at that scale: nothing to fix
    assert found.problems == []


def test_the_checks_trial_run_finds_a_pipeline_that_does_not_learn(clean_check, tmp_path,
                                                                   capsys, monkeypatch):
    """The clean trial's loss fell (no alarm above); at a learning rate of 0 it cannot."""
    monkeypatch.setattr(training, "check_vae", lambda *a: None)
    folder = sound_world.make_toy_folder(tmp_path / "data", SR, n=3, max_seconds=2, seed=0)
    code, problems, out, _ = run_check(capsys, "--data", folder, *CHECK, "--steps", 2,
                                       "--lr", 1e-30, "--latent-scale", "auto")
    (what, fix), = problems
    assert code == 1 and "did not learn one batch in 2 steps" in what and "1.00x" in what
    assert "--overfit" in fix


# ================================================================================== sample.py
# A 4-second window keeps generation fast; 32 kHz shows the rate comes from the checkpoint.
CFG = dataclasses.replace(sa.SIZES["tiny"], window=2 ** 17, sample_rate=32000)


def silence_decoder(model):
    """Zero the VAE's last conv, so the tanh output (and every sample) is exactly 0."""
    conv = model.vae.decoder[-2]
    with torch.no_grad():
        conv.parametrizations.weight.original0.zero_()
        conv.bias.zero_()
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    sa.save_checkpoint(path, sa.build_model(CFG))
    return path


def run_sample(ckpt, out, *args, prompt="ambient rain"):
    return sample.main([prompt, "--ckpt", str(ckpt), "--steps", "2", "--seconds", "1.5",
                        "--out", str(out), *args])


def read_png(path):
    """Check the signature and every chunk's CRC -> (width, height, colour type, raw IDAT)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = {}, 8
    while i < len(data):
        (length,), tag = struct.unpack(">I", data[i:i + 4]), data[i + 4:i + 8]
        body = data[i + 8:i + 8 + length]
        (crc,) = struct.unpack(">I", data[i + 8 + length:i + 12 + length])
        assert zlib.crc32(tag + body) == crc, tag
        chunks[tag] = chunks.get(tag, b"") + body
        i += 12 + length
    assert list(chunks)[0] == b"IHDR" and list(chunks)[-1] == b"IEND"
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8
    return width, height, colour, zlib.decompress(chunks[b"IDAT"])


# ---------------------------------------------------------------------------------- end to end
def test_writes_stereo_file_of_the_requested_seconds_at_the_checkpoint_rate(ckpt, tmp_path,
                                                                             capsys):
    assert run_sample(ckpt, tmp_path, "--seed", "7") == 0
    path = tmp_path / "ambient-rain_7.wav"
    audio, sr = sf.read(path)
    assert sr == CFG.sample_rate
    assert audio.shape == (round(1.5 * sr), 2)
    assert np.abs(audio).max() <= 10 ** (-1 / 20) + 1e-4       # peak-limited, not clipped
    out = capsys.readouterr().out
    assert "seed 7" in out and str(path) in out and "real-time factor" in out


def test_default_out_is_out_slug_seed_wav(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sample.main(["Rain!", "--ckpt", str(ckpt), "--steps", "2", "--seconds", "1",
                        "--seed", "3"]) == 0
    assert (tmp_path / "out" / "rain_3.wav").is_file()
    assert (tmp_path / "out" / "rain_3.png").is_file()


@pytest.mark.parametrize("ext", ["flac", "ogg"])
def test_format_follows_the_extension(ckpt, tmp_path, ext):
    assert run_sample(ckpt, tmp_path / f"a.{ext}", "--seed", "1") == 0
    assert sf.info(tmp_path / f"a.{ext}").format == ext.upper()


def test_no_trim_keeps_the_whole_window(ckpt, tmp_path):
    assert run_sample(ckpt, tmp_path / "a.wav", "--no-trim") == 0
    assert sf.info(tmp_path / "a.wav").frames == CFG.window


def test_batch_files_carry_seed_plus_i_and_each_regenerates_alone(ckpt, tmp_path):
    assert run_sample(ckpt, tmp_path / "b.wav", "--n", "2", "--seed", "11") == 0
    first, second = sf.read(tmp_path / "b_11.wav")[0], sf.read(tmp_path / "b_12.wav")[0]
    assert np.abs(first - second).max() > 1e-3                 # different seeds, different audio
    assert run_sample(ckpt, tmp_path / "c.wav", "--seed", "12") == 0
    np.testing.assert_allclose(sf.read(tmp_path / "c.wav")[0], second, atol=1e-4)


def test_never_overwrites_without_force(ckpt, tmp_path, capsys):
    path = tmp_path / "a.wav"
    assert run_sample(ckpt, path, "--seed", "1") == 0
    before = path.read_bytes()
    capsys.readouterr()
    assert run_sample(ckpt, path, "--seed", "2") != 0
    out, err = capsys.readouterr()
    assert err.startswith("error:") and "--force" in err and "loaded" not in out  # no work done
    assert path.read_bytes() == before
    assert run_sample(ckpt, path, "--seed", "2", "--force") == 0
    assert path.read_bytes() != before


def test_an_existing_spectrogram_alone_is_not_overwritten_without_force(tmp_path):
    (tmp_path / "a.png").write_bytes(b"mine")                 # a.wav itself does not exist
    with pytest.raises(sample.CLIError, match="a.png exists"):
        sample.prepare_outputs([tmp_path / "a.wav"], force=False)
    sample.prepare_outputs([tmp_path / "a.wav"], force=True)
    assert (tmp_path / "a.png").read_bytes() == b"mine"       # checked, not yet written


def test_the_negative_prompt_reaches_generate(ckpt, tmp_path, monkeypatch):
    seen = []

    def generate(model, prompts, **kwargs):
        seen.append(kwargs["negative_prompt"])
        return torch.zeros(len(prompts), 2, 100)
    monkeypatch.setattr(sa, "generate", generate)
    assert run_sample(ckpt, tmp_path / "a.wav", "--negative", "thunder") == 0
    assert run_sample(ckpt, tmp_path / "b.wav") == 0
    assert seen == ["thunder", None]


def test_uses_ema_weights_when_saved_and_warns_on_silence(tmp_path, capsys):
    torch.manual_seed(0)
    model = sa.build_model(CFG)
    silent = silence_decoder(sa.build_model(CFG)).state_dict()
    sa.save_checkpoint(tmp_path / "m.pt", model, ema=silent)
    assert run_sample(tmp_path / "m.pt", tmp_path / "ema.wav") == 0
    out, err = capsys.readouterr()
    assert "EMA weights" in out and "warning:" in err and "silence" in err
    assert np.abs(sf.read(tmp_path / "ema.wav")[0]).max() == 0
    assert run_sample(tmp_path / "m.pt", tmp_path / "raw.wav", "--no-ema") == 0
    out, err = capsys.readouterr()
    assert "raw weights" in out and "warning:" not in err
    assert np.abs(sf.read(tmp_path / "raw.wav")[0]).max() > 1e-3


def test_a_constant_offset_is_removed_before_writing(tmp_path, capsys):
    model = silence_decoder(sa.build_model(CFG))
    with torch.no_grad():
        model.vae.decoder[-2].bias.fill_(0.2)               # every sample tanh(0.2): pure DC
    sa.save_checkpoint(tmp_path / "dc.pt", model)
    assert run_sample(tmp_path / "dc.pt", tmp_path / "dc.wav") == 0
    assert np.abs(sf.read(tmp_path / "dc.wav")[0]).max() == 0
    assert "near-silent" in capsys.readouterr().err


def test_each_channels_own_offset_is_removed_before_writing(tmp_path):
    t = np.arange(8000) / 8000                          # whole cycles: each sine's mean is 0
    audio = np.stack([0.3 * np.sin(2 * np.pi * 50 * t) + 0.2,
                      0.3 * np.sin(2 * np.pi * 70 * t) - 0.1])
    sound_world.write_clip(tmp_path / "a.wav", audio, 8000)
    written = sf.read(tmp_path / "a.wav")[0]            # (N, 2)
    assert np.abs(written.mean(0)).max() < 1e-3
    assert np.abs(written - (audio - audio.mean(1, keepdims=True)).T).max() < 1e-3


@pytest.mark.parametrize("units", [False, True])
def test_bfloat16_on_a_cpu_runs_only_with_bf16_units(units, ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: units)
    assert run_sample(ckpt, tmp_path / "a.wav", "--device", "cpu", "--dtype", "bfloat16") == 0
    out = capsys.readouterr().out
    assert out.count("on cpu in bfloat16") == units and out.count("running in float32") != units
    assert sf.read(tmp_path / "a.wav")[0].any()


def test_init_audio_sets_the_length_and_inpainting_runs(ckpt, tmp_path, capsys):
    clip = tmp_path / "clip.wav"
    sf.write(clip, 0.3 * np.sin(np.arange(2 * 48000) / 20)[:, None], 48000)   # 2 s mono 48 kHz
    assert sample.main(["x", "--ckpt", str(ckpt), "--steps", "4", "--out", str(tmp_path / "v.wav"),
                        "--init-audio", str(clip), "--init-strength", "0.5"]) == 0
    audio, rate = sf.read(tmp_path / "v.wav")
    assert audio.shape == (2 * 32000, 2) and rate == 32000      # the clip's length, model's rate
    out = capsys.readouterr().out
    assert "a variation, strength 0.5" in out
    assert sample.main(["x", "--ckpt", str(ckpt), "--steps", "4", "--out", str(tmp_path / "i.wav"),
                        "--init-audio", str(clip), "--inpaint", "0.5", "1.0"]) == 0
    assert "inpainting 0.5-1 s, strength 1" in capsys.readouterr().out
    assert sf.read(tmp_path / "i.wav")[0].shape == (2 * 32000, 2)


@pytest.mark.parametrize("timing, seconds", [
    (["--start", "10", "--seconds", "12"], 2),             # §3.2: total - start, < the window
    (["--start", "10", "--seconds", "30"], 2 ** 17 / 32000)])   # start + window < total
def test_start_and_seconds_write_total_minus_start_up_to_the_window(ckpt, tmp_path, timing,
                                                                    seconds):
    assert run_sample(ckpt, tmp_path / "a.wav", *timing) == 0
    assert sf.info(tmp_path / "a.wav").frames == round(seconds * 32000)


def test_init_audio_is_cut_to_the_content_after_start(tmp_path):
    # --start 1 --seconds 2.5 asks for 1.5 s of content: a 2 s clip keeps its first 1.5 s.
    clip = tmp_path / "clip.wav"
    sf.write(clip, 0.3 * np.sin(np.arange(2 * SR) / 20)[:, None].repeat(2, 1), SR)
    args = argparse.Namespace(init_audio=str(clip), start=1.0, seconds=2.5, inpaint=None,
                              init_strength=None)
    config = types.SimpleNamespace(sample_rate=SR, window=4 * SR)
    assert sample.read_init_audio(args, config).shape == (2, round(1.5 * SR))


def test_start_without_seconds_takes_the_init_audios_length_after_it(ckpt, tmp_path, capsys):
    clip = tmp_path / "clip.wav"
    sf.write(clip, 0.3 * np.sin(np.arange(32000) / 20)[:, None], 32000)      # 1 s
    assert sample.main(["x", "--ckpt", str(ckpt), "--steps", "2", "--out", str(tmp_path / "v.wav"),
                        "--init-audio", str(clip), "--start", "7"]) == 0
    assert sf.info(tmp_path / "v.wav").frames == 32000                       # the clip's 1 s
    assert "into a 8 s piece" in capsys.readouterr().out                     # 7 + 1


# ---------------------------------------------------------------------------------- bad input
def assert_one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for word in words:
        assert word in lines[0]


BAD = {
    "zero seconds": (["x", "--seconds", "0"], "--seconds"),
    "negative seconds": (["x", "--seconds", "-2"], "--seconds"),
    "seconds not a number": (["x", "--seconds", "abc"], "--seconds"),
    "seconds past the timing table": (["x", "--seconds", "513"], "range of 512 s"),
    "negative start": (["x", "--start", "-1"], "--start"),
    "start at the total": (["x", "--start", "1"], "--start 1 must be less than --seconds 1"),
    "start past the total": (["x", "--start", "3", "--seconds", "2"], "pass --seconds 5"),
    "zero steps": (["x", "--steps", "0"], "--steps"),
    "cfg rescale above one": (["x", "--cfg-rescale", "1.5"], "--cfg-rescale"),
    "zero samples": (["x", "--n", "0"], "--n"),
    "negative seed": (["x", "--seed", "-1"], "--seed"),
    "empty prompt": ([""], "--unconditional"),
    "blank prompt": (["  "], "--unconditional"),
    "prompt and --unconditional": (["x", "--unconditional"], "--unconditional"),
    "mp3": (["x", "--out", "OUT/a.mp3"], ".mp3"),
    "decode chunk below the overlap": (["x", "--decode-chunk", "16"], "--decode-chunk"),
    "unwritable folder": (["x", "--out", "OUT/file/a.wav"], "cannot write"),
    "missing checkpoint": (["x", "--ckpt", "OUT/none.pt"], "not found"),
    "damaged checkpoint": (["x", "--ckpt", "OUT/file"], "damaged"),
    "missing init audio": (["x", "--init-audio", "OUT/none.wav"], "no such file"),
    "unreadable init audio": (["x", "--init-audio", "OUT/file"], "cannot read"),
    "init audio past the window": (["x", "--init-audio", "OUT/long.wav"], "window of 4.1 s"),
    "init strength zero": (["x", "--init-audio", "OUT/clip.wav", "--init-strength", "0"],
                           "--init-strength"),
    "init strength above one": (["x", "--init-audio", "OUT/clip.wav", "--init-strength", "1.5"],
                                "--init-strength"),
    "strength without init audio": (["x", "--init-strength", "0.5"], "--init-audio"),
    "inpaint without init audio": (["x", "--inpaint", "0", "1"], "--init-audio"),
    "inpaint gap reversed": (["x", "--init-audio", "OUT/clip.wav", "--inpaint", "1", "0.5"],
                             "START < END"),
    "inpaint gap past the clip": (["x", "--init-audio", "OUT/clip.wav", "--inpaint", "1", "3"],
                                  "past the end"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_exit_2(ckpt, tmp_path, capsys, case):
    (tmp_path / "file").write_bytes(b"not a checkpoint")
    sf.write(tmp_path / "clip.wav", np.zeros((2 * 48000, 1)), 48000)      # 2 s, mono, 48 kHz
    sf.write(tmp_path / "long.wav", np.zeros((5 * 32000, 2)), 32000)      # 5 s > the window
    args, word = BAD[case]
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    assert sample.main(["--ckpt", str(ckpt), "--steps", "2", "--seconds", "1",
                        "--out", str(tmp_path / "o.wav"), *args]) == 2
    assert_one_error_line(capsys, word)
    assert not (tmp_path / "o.wav").exists()


def test_checkpoint_that_does_not_match_its_config_is_one_error_line(ckpt, tmp_path, capsys):
    state = torch.load(ckpt, weights_only=True)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, tmp_path / "bad.pt")
    assert run_sample(tmp_path / "bad.pt", tmp_path / "a.wav") == 2
    assert_one_error_line(capsys, "does not match")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_error_line(ckpt, tmp_path, capsys):
    assert run_sample(ckpt, tmp_path / "a.wav", "--device", "cuda") == 2
    assert_one_error_line(capsys, "no CUDA GPU", "--device cpu")


def test_non_finite_output_is_one_error_line(tmp_path, capsys):
    model = sa.build_model(CFG)
    with torch.no_grad():
        model.unet.to_out.block2[-1].bias.fill_(float("nan"))
    sa.save_checkpoint(tmp_path / "nan.pt", model)
    assert run_sample(tmp_path / "nan.pt", tmp_path / "a.wav") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and "float32" in errors[0]
    assert not (tmp_path / "a.wav").exists()


# ---------------------------------------------------------------------------------- helpers
def test_spectrogram_png_is_valid_with_frequency_up(tmp_path):
    sr = 32000
    t = np.arange(sr) / sr
    tone = np.sin(2 * np.pi * 4000 * t)                      # a quarter of the way to Nyquist
    sound_world.write_spectrogram_png(tmp_path / "s.png", np.stack([tone, tone]))
    width, height, colour, raw = read_png(tmp_path / "s.png")
    assert colour == 2 and 500 <= width <= 2000 and 150 <= height <= 600
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()                           # filter type byte of every row
    brightness = rows[:, 1:].reshape(height, width, 3).astype(int).sum((1, 2))
    assert abs(brightness.argmax() - 0.75 * (height - 1)) <= 2


def test_command_writes_a_valid_png_beside_the_audio(ckpt, tmp_path):
    assert run_sample(ckpt, tmp_path / "a.flac") == 0
    width, height, colour, raw = read_png(tmp_path / "a.png")
    assert len(raw) == height * (1 + 3 * width)


def test_peak_limiter_scales_loud_clips_to_minus_1_dbfs_and_leaves_quiet_ones():
    loud = np.array([[0.5, -2.0, 1.0], [0.1, 0.2, 0.3]])
    out, scaled = sound_world.limit_peak(loud)
    assert scaled and np.abs(out).max() == 10 ** (-1 / 20)
    np.testing.assert_allclose(out / loud, 10 ** (-1 / 20) / 2)     # one gain: shape unchanged
    quiet = np.array([[0.5, -0.3], [0.1, 0.0]])
    out, scaled = sound_world.limit_peak(quiet)
    assert not scaled and np.array_equal(out, quiet)


@pytest.mark.parametrize("prompt", ["Ambient rain!!", "", "../../etc/passwd", "Café ночь 🌧",
                                    "ночь", "x" * 200, "  --  "])
def test_slug_is_a_safe_nonempty_file_name(prompt):
    name = sound_world.slug(prompt)
    assert name and len(name) <= 40 and "/" not in name and ".." not in name
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert not name.startswith("-")


def test_slug_keeps_the_words():
    assert sound_world.slug("Ambient rain!!") == "ambient-rain"
    assert sound_world.slug("Café") == "cafe"
    assert sound_world.slug("") == "untitled"


def test_output_paths_file_directory_and_batch(tmp_path):
    assert sample.output_paths(None, "Rain", 5, 1) == [sample.Path("out/rain_5.wav")]
    assert sample.output_paths(str(tmp_path), "Rain", 5, 1) == [tmp_path / "rain_5.wav"]
    assert sample.output_paths("d/x.flac", "Rain", 5, 2) == [sample.Path("d/x_5.flac"),
                                                             sample.Path("d/x_6.flac")]
    assert sample.output_paths("d/x.wav", "Rain", 5, 1) == [sample.Path("d/x.wav")]


# ================================================================================== bench.py
BENCH_SR = 16000
FRAME = bench.FRAME_SECONDS


# ---------------------------------------------------------------------------------- timing
def test_audible_end_finds_where_noise_stops_to_within_a_frame():
    noise = 0.3 * np.random.default_rng(0).standard_normal((2, round(1.234 * BENCH_SR)))
    audio = np.concatenate([noise, np.zeros((2, BENCH_SR))], axis=1)
    assert 1.234 <= bench.audible_end(audio, BENCH_SR) <= 1.234 + FRAME


def test_audible_end_of_a_decaying_tone_is_where_it_falls_40_db_under_its_peak():
    t = np.arange(3 * BENCH_SR) / BENCH_SR
    audio = 0.5 * np.exp(-np.clip(t - 1, 0, None) / 0.2) * np.sin(2 * np.pi * 440 * t)
    expected = 1 + 0.2 * math.log(10 ** (40 / 20))          # amplitude 40 dB down: 1.92 s
    assert bench.audible_end(audio, BENCH_SR, threshold_db=-40) == pytest.approx(expected, abs=FRAME)


@pytest.mark.parametrize("extra", [0, 123])        # 123: the last frame is a partial one
def test_audible_end_ignores_a_constant_offset(extra):
    noise = 0.3 * np.random.default_rng(0).standard_normal((2, BENCH_SR))
    audio = np.concatenate([noise, np.zeros((2, 2 * BENCH_SR + extra))], axis=1) - 0.05   # DC
    assert bench.audible_end(audio, BENCH_SR) == pytest.approx(1.0, abs=FRAME)


def test_level_drop_is_the_db_ratio_of_the_rms_after_and_before_the_end():
    t = np.arange(3 * BENCH_SR) / BENCH_SR
    tone = np.sin(2 * np.pi * 440 * t)
    audio = np.where(t < 1, 0.5, 0.05) * tone             # 20 dB quieter after 1 s
    assert bench.level_drop_db(audio, BENCH_SR, 1.0) == pytest.approx(-20, abs=0.01)
    assert bench.level_drop_db(0.5 * tone, BENCH_SR, 1.0) == pytest.approx(0, abs=0.01)


def test_timing_summary_pools_clips_into_means_and_the_share_within_a_second():
    clips = [{"seconds": 10, "error": e, "drop": d, "inside": -30.0, "loudest after": a}
             for e, d, a in ((0.5, -60.0, -50.0), (-3.0, -20.0, -10.0), (1.0, -40.0, -30.0))]
    row = bench.timing_summary("rain", clips)
    assert row["requested s"] == "rain" and row["detector on a real clip: error s"] is None
    assert row["within 1 s"] == pytest.approx(2 / 3)         # |1.0| counts, as in the table
    assert row["error s (mean)"] == pytest.approx(-0.5)
    assert row["abs error s (mean)"] == pytest.approx(1.5)
    assert row["detected s (mean)"] == pytest.approx(9.5)
    assert row["after the end, dB"] == pytest.approx(-40)
    assert row["loudest frame after the end, dB"] == pytest.approx(-30)


def test_audible_end_ignores_hiss_under_the_absolute_floor():
    tone = 10 ** (-45 / 20) * math.sqrt(2) * np.sin(2 * np.pi * 440 * np.arange(BENCH_SR) / BENCH_SR)
    hiss = 10 ** (-80 / 20) * np.random.default_rng(0).standard_normal(2 * BENCH_SR)
    audio = np.concatenate([tone, hiss])                    # -45 dBFS for 1 s, then -80 dBFS
    assert bench.audible_end(audio, BENCH_SR, floor_dbfs=-70) == pytest.approx(1.0, abs=FRAME)
    # Without the floor the hiss is within 40 dB of the tone and counts as audible.
    assert bench.audible_end(audio, BENCH_SR, floor_dbfs=-200) == pytest.approx(3.0, abs=FRAME)


# ---------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("sampler, order", [(sa.sample_euler, 1), (sa.sample_dpmpp_2m, 2),
                                            (sa.sample_dpmpp_3m, 3)])
def test_measured_sampler_order_matches_theory_on_the_exact_gaussian_problem(sampler, order):
    steps = [50, 100]
    errors = [e for e, _ in sound_world.gaussian_sampler_errors(sampler, steps)]
    assert sound_world.measured_orders(errors, steps)[0] == pytest.approx(order, abs=0.15 * order)


def test_error_at_sigma_zero_is_the_final_denoising_steps_closed_form_bias():
    s = sound_world.DATA_STD
    (_, at_zero), = sound_world.gaussian_sampler_errors(sa.sample_dpmpp_3m, [100], s=s)
    assert at_zero == pytest.approx(1 - s / math.hypot(s, sound_world.SIGMA_MIN), rel=0.01)


# ---------------------------------------------------------------------------------- descriptors
def test_spectral_flatness_is_near_1_for_white_noise_and_near_0_for_a_sine():
    noise = np.random.default_rng(0).standard_normal((2, 2 * BENCH_SR))
    sine = np.sin(2 * np.pi * 1000 * np.arange(2 * BENCH_SR) / BENCH_SR)
    assert bench.spectral_flatness(noise) > 0.95
    assert bench.spectral_flatness(sine) < 0.05


def test_clicks_are_more_percussive_than_steady_noise():
    clicks = np.zeros((2, 2 * BENCH_SR))
    clicks[:, ::BENCH_SR // 4] = 1.0                               # 4 clicks a second
    noise = np.random.default_rng(0).standard_normal((2, 2 * BENCH_SR))
    assert bench.percussiveness(clicks, BENCH_SR) > bench.percussiveness(noise, BENCH_SR) + 10


def test_descriptors_hear_rain_as_noise_piano_as_tonal_and_drums_as_percussive():
    rain, piano, drums = (bench.real_clip(s, 0, BENCH_SR, 3.0).numpy()
                          for s in ("rain", "piano", "drums"))
    assert bench.spectral_flatness(rain) > 0.9 > 0.3 > bench.spectral_flatness(piano)
    assert sound_world.tonality(piano) > 0.9 > 0.1 > sound_world.tonality(rain)
    assert bench.percussiveness(drums, BENCH_SR) > bench.percussiveness(rain, BENCH_SR) + 5


def test_log_spectral_distance_ignores_loudness_and_separates_noise_from_a_tone():
    rng = np.random.default_rng(0)
    noise_a, noise_b = rng.standard_normal((2, 2, 2 * BENCH_SR))
    sine = np.sin(2 * np.pi * 1000 * np.arange(2 * BENCH_SR) / BENCH_SR)
    assert bench.log_spectral_distance(noise_a, 0.1 * noise_a) == pytest.approx(0, abs=1e-9)
    assert bench.log_spectral_distance(noise_a, noise_b) < 1
    assert bench.log_spectral_distance(noise_a, sine) > 20


def test_real_clip_is_the_start_of_the_first_sound_world_clip_that_is_long_enough():
    n = round(2.5 * BENCH_SR)
    long, _ = sound_world.make_clip(0, BENCH_SR, 5.0, sound="piano")
    short, _ = sound_world.make_clip(3, BENCH_SR, 5.0, sound="piano")
    assert long.shape[-1] >= n > short.shape[-1]
    assert torch.equal(bench.real_clip("piano", 0, BENCH_SR, 2.5), long[:, :n])
    assert bench.real_clip("piano", 3, BENCH_SR, 2.5).shape == (2, n)      # another seed is tried


# ---------------------------------------------------------------------------------- Fréchet
def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((50, 8))
    assert bench.frechet_distance(x, x) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    assert bench.frechet_gaussians(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)) == \
        pytest.approx(expected)
    # A rotation of both leaves the distance alone; the covariances are then not diagonal.
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
    rotated = bench.frechet_gaussians(q @ mu1, q @ np.diag(s1 ** 2) @ q.T,
                                      q @ mu2, q @ np.diag(s2 ** 2) @ q.T)
    assert rotated == pytest.approx(expected)
    # From samples, the fitted Gaussians give the same distance.
    rng = np.random.default_rng(1)
    a, b = mu1 + s1 * rng.standard_normal((20000, 3)), mu2 + s2 * rng.standard_normal((20000, 3))
    assert bench.frechet_distance(a, b) == pytest.approx(expected, rel=0.05)


# ---------------------------------------------------------------------------------- command


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bench") / "m.pt"
    sa.save_checkpoint(path, sa.build_model(SHORT))
    return path


def test_speed_wall_time_covers_text_sampling_and_decoding(short_ckpt):
    model, _ = sa.load_checkpoint(short_ckpt)
    (row,) = bench.speed_rows(model, steps=2, dtype=torch.float32, repeats=1)
    window = SHORT.window / SHORT.sample_rate
    assert row["audio s"] == round(window, 1)               # 10 s and 30 s do not fit in 3 s
    parts = row["text s"] + row["sampling s"] + row["decoding s"]
    assert 0 < parts <= row["total s"]
    assert row["audio s per s"] == pytest.approx(window / row["total s"])


def test_timing_and_adherence_run_on_a_checkpoint_and_name_the_machine(short_ckpt, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--only", "timing,adherence", "--ckpt", str(short_ckpt),
                       "--eval-steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    timing = report["sections"]["timing"][0]["rows"]
    # Whole seconds under 3 s, then one row per sound drawn (--quick: one seed per duration).
    assert [r["requested s"] for r in timing] == [1, 2, *bench.TIMING_SOUNDS[:2], "all"]
    assert all(abs(r["detector on a real clip: error s"]) <= FRAME for r in timing[:2])
    assert all(np.isfinite(r["after the end, dB"]) for r in timing)
    tables = [t for section in report["sections"].values() for t in section]
    assert len(tables) == 5 and all(t["rows"] for t in tables)
    assert all(t["machine"]["torch"] == torch.__version__ and t["machine"]["dtype"]
               and t["machine"]["threads"] == torch.get_num_threads() for t in tables)


def test_sections_that_need_a_checkpoint_are_skipped_without_one(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DEMO_CKPT", tmp_path / "demo.pt")
    out = tmp_path / "bench.json"
    assert bench.main(["--only", "timing,adherence", "--out", str(out)]) == 0
    tables = [t for s in json.loads(out.read_text())["sections"].values() for t in s]
    assert tables and all(t["notes"] == [f"skipped: no checkpoint at {tmp_path / 'demo.pt'}"]
                          for t in tables)


@pytest.mark.parametrize("argv", [["--only", "nonsense"], ["--only", "samplers,speeed"],
                                  ["--only", "timing", "--ckpt", "missing.pt"],
                                  ["--repeats", "0"], ["--size", "huge"]])
def test_bench_bad_input_is_one_error_line_and_exit_2(argv, tmp_path, capsys):
    assert bench.main([*argv, "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_bench_cuda_without_a_gpu_is_one_error_line(tmp_path, capsys):
    assert bench.main(["--device", "cuda", "--only", "samplers",
                       "--out", str(tmp_path / "b.json")]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda but no CUDA GPU")


# ------------------------------------------------------------------- bench.py --gpu-check
# The GPU self-test's checks run here on the CPU with tiny sizes: the same code, so it cannot rot.
GPU_PLAN = bench.GPUPlan(reduced=SHORT, frames=32, full=SHORT, steps=2,
                         batch={"vae": 1, "clap": 2, "diffusion": 1}, vae_crop=8192,
                         clap_seconds=1, train_steps=1, ddp_steps=1,
                         ddp_flags=("--window-seconds", "1", "--batch-size", "1", "--crop", "8192"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_gpu_check_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys):
    assert bench.main(["--gpu-check", "--out", str(tmp_path / "g.json")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --gpu-check needs a CUDA GPU")
    assert len(captured.err.strip().splitlines()) == 1 and not captured.out
    assert not (tmp_path / "g.json").exists()


def test_gpu_check_runs_every_check_on_the_cpu():
    rows = bench.run_checks(torch.device("cpu"), GPU_PLAN)
    assert [r["result"] for r in rows] == ["pass"] * len(rows), rows
    names = " | ".join(r["check"] for r in rows)
    for part in ("U-Net", "VAE", "CLAP"):
        assert f"{part} float32" in names and f"{part} bfloat16 autocast" in names
    for stage in ("vae", "clap", "diffusion", "diffusion --grad-checkpointing"):
        assert f"train {stage} (" in names
    assert "self-attention kernel" in names and "cross-attention kernel" in names
    assert "generate 3.0 s, 2 steps, CFG 6" in names and "torchrun: 1 rank (gloo)" in names
    # The same weights on the same device agree exactly; bf16 carries its 8-bit mantissa's error.
    errors = {r["check"].split(" on ")[0]: float(r["figure"]) for r in rows
              if "float32 on" in r["check"] or "autocast" in r["check"]}
    assert all(errors[f"{part} float32"] == 0 for part in ("U-Net", "VAE", "CLAP"))
    assert all(1e-4 < errors[f"{part} bfloat16 autocast"] < bench.BF16_TOLERANCE
               for part in ("U-Net", "VAE", "CLAP"))
    assert rows[-1]["figure"].endswith("checkpoint at step 2")   # 1 step, then 1 resumed


def test_a_failing_check_is_one_row_and_the_rest_still_run():
    def check_broken(device, plan):
        yield bench.check_row("first part", True, "1", "-")
        raise RuntimeError("CUDA error: an illegal memory access\nmore lines")
    rows = bench.run_checks(torch.device("cpu"), GPU_PLAN,
                            [check_broken, bench.check_attention_kernels])
    assert [r["result"] for r in rows] == ["pass", "FAIL", "pass", "pass"]
    assert rows[1]["check"] == "broken" and rows[1]["figure"] == "RuntimeError"
    assert rows[1]["criterion"] == "CUDA error: an illegal memory access"


def test_a_part_failing_on_the_device_is_a_row_and_the_next_part_runs(monkeypatch):
    real = bench.part_outputs

    def part_outputs(model, inputs, part):
        if part == "VAE" and "VAE" in calls:           # the reference ran: now on the device
            raise RuntimeError("CUDA error: no kernel image is available")
        calls.append(part)
        return real(model, inputs, part)
    calls = []
    monkeypatch.setattr(bench, "part_outputs", part_outputs)
    rows = list(bench.check_correctness(torch.device("cpu"), GPU_PLAN))
    assert [(r["check"].split()[0], r["result"]) for r in rows] == [
        ("U-Net", "pass"), ("U-Net", "pass"), ("VAE", "FAIL"), ("CLAP", "pass"), ("CLAP", "pass")]
    assert rows[2]["criterion"] == "CUDA error: no kernel image is available"


def test_a_failing_training_stage_is_a_row_and_the_next_stage_runs(monkeypatch):
    real = bench.median_seconds
    calls = []

    def median_seconds(fn, device, repeats):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if len(calls) == 3:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\nmore")
        return real(fn, device, repeats)
    monkeypatch.setattr(bench, "median_seconds", median_seconds)
    rows = list(bench.check_training(torch.device("cpu"), GPU_PLAN))
    assert [r["result"] for r in rows] == ["FAIL", "pass", "FAIL", "pass"]
    assert rows[0]["figure"] == "out of memory" and "--grad-checkpointing" in rows[0]["criterion"]
    assert rows[2]["figure"] == "RuntimeError"
    assert rows[2]["criterion"] == "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"
    assert rows[3]["check"].startswith("train diffusion --grad-checkpointing")


def test_the_attention_kernel_is_read_from_what_ran():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    attn = sa.Attention(32, 4).eval()
    x = torch.randn(1, 16, 32)
    with torch.inference_mode():
        assert bench.sdpa_kernel_used(attn, (x,), torch.device("cpu"), torch.float32) == \
            "flash (CPU)"
        with sdpa_kernel(SDPBackend.MATH):
            assert bench.sdpa_kernel_used(attn, (x,), torch.device("cpu"), torch.float32) == "math"


def test_relative_error_and_tf32_flags():
    b = torch.randn(1000)
    assert bench.relative_error(b * 1.01, b) == pytest.approx(0.01, rel=1e-5)
    off = 0.5 * b.norm() * F.normalize(torch.ones(1000), dim=0)     # a vector of norm ||b|| / 2
    assert bench.relative_error(b + off, b) == pytest.approx(0.5, rel=1e-6)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with bench.no_tf32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_gpu_check_trains_at_train_pys_default_batches():
    assert bench.TRAIN_BATCH == {stage: train.DEFAULTS[stage]["full"][0]
                                 for stage in ("vae", "clap", "diffusion")}


# ------------------------------------------------------------------- bf16 on CPUs that have it
@pytest.mark.parametrize("flags, expected", [("fpu sse avx2 avx512f amx_bf16 amx_tile", True),
                                              ("fpu avx512f avx512_bf16", True),
                                              ("fp asimd bf16 i8mm", True),
                                              ("fpu sse avx2 avx512f avx512bw", False)])
def test_cpu_bf16_units_are_read_from_the_cpu_flags(flags, expected, tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text(f"processor : 0\nflags : {flags}\n")
    real_open, real_isfile = open, os.path.isfile
    redirect = lambda path: str(fake) if path == "/proc/cpuinfo" else path
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(redirect(path), *a, **k))
    monkeypatch.setattr(os.path, "isfile", lambda path: real_isfile(redirect(path)))
    assert training.cpu_has_bf16() is expected


@pytest.mark.parametrize("units", [True, False])
def test_bfloat16_on_a_cpu_only_where_it_has_bf16_units(units, monkeypatch, capsys):
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: units)
    cpu = torch.device("cpu")
    assert training.pick_dtype("bfloat16", cpu) == (torch.bfloat16 if units else torch.float32)
    assert ("AMX" in capsys.readouterr().out) is not units
    assert training.pick_dtype("auto", cpu) == torch.float32            # the default stays float32
    assert training.pick_dtype("float16", cpu) == torch.float32
    assert training.pick_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_bench_cpu_bf16_reports_both_precisions(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--only", "cpu-bf16", "--out", str(out)]) == 0
    (t,) = json.loads(out.read_text())["sections"]["cpu-bf16"]
    (row,) = t["rows"]
    assert row["size"] == "tiny" and row["float32 s"] > 0 and row["bf16 autocast s"] > 0
    assert row["bf16 weights s"] > 0
    assert 1e-4 < row["relative difference"] < bench.BF16_TOLERANCE
    assert bench.cpu_model() in t["notes"][0]


# ------------------------------------------------------------------- data-parallel training
# train.py under torchrun: R ranks x K micro-batches (--grad-accum) of B clips per optimizer step
# train like one process at batch R·K·B. Two ranks on gloo, the tiny model, a half-second window,
# a few steps; every launch has a timeout, so a hang fails its test instead of blocking.
import signal       # noqa: E402 (this section's own)
import subprocess   # noqa: E402
import sys          # noqa: E402
import time         # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RANK_SCRIPT = ("import sys\nimport test_stable_audio\n"
               "sys.exit(test_stable_audio.rank_main(sys.argv[1:]))\n")
CLIPS = ["--window-seconds", 0.5, "--device", "cpu"]


def test_a_steps_micro_batches_are_its_own_consecutive_batches():
    """R ranks x K micro-batches: step k's are batches k·R·K … (k + 1)·R·K - 1, each once."""
    for world, accum in ((1, 1), (2, 1), (1, 3), (2, 3), (4, 2)):
        for step in (0, 5):
            got = sorted(training.micro_index(step, m, rank, world, accum)
                         for rank in range(world) for m in range(accum))
            assert got == list(range(step * world * accum, (step + 1) * world * accum))


def test_a_steps_logged_losses_are_the_means_over_its_micro_batches():
    run = types.SimpleNamespace(losses={}, args=types.SimpleNamespace(grad_accum=2))
    for loss in (1.0, 4.0):
        training.Run.record(run, {"loss": torch.tensor(loss)})
    assert run.losses == {"loss": 2.5}
DIFFUSION_LOSS = sa.diffusion_loss


def launch(script, *argv):
    """Two ranks of `script` under torchrun, in a process group of their own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.Popen([*TORCHRUN, str(script), *map(str, argv)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def finish(proc, timeout=150):
    """(exit status, stdout, stderr); a launch still running after `timeout` s fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"two ranks still running after {timeout} s: a hang")
    return proc.returncode, out, err


def torchrun(*argv, script=os.path.join(REPO, "train.py")):
    return finish(launch(script, *argv))


def no_noise(shape, generator, like):
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def per_clip_loss(unet, z, context, mask, generator, content_frames=None, **kwargs):
    """The v-objective at one fixed draw of (t, eps, dropout) for every clip, clip by clip: the
    loss of a batch is then the mean of its clips' losses, however the batch is split. (The real
    draws come from one generator per micro-batch, so they depend on the split.)"""
    return torch.stack([DIFFUSION_LOSS(unet, z[i:i + 1], context[i:i + 1], mask[i:i + 1],
                                       torch.Generator().manual_seed(0),
                                       content_frames=content_frames[i:i + 1])
                        for i in range(len(z))]).mean()


FIXED_NOISE = {"randn": no_noise, "diffusion_loss": per_clip_loss}


def rank_main(argv):
    """One rank of a test launch: MODE then train.py's arguments. fixed-noise: per_clip_loss;
    rank-1-fails: rank 1 cannot read its second batch."""
    mode, argv = argv[0], argv[1:]
    if mode == "fixed-noise":
        for name, fn in FIXED_NOISE.items():
            setattr(sa, name, fn)
    if mode == "rank-1-fails" and os.environ["RANK"] == "1":
        batch = sound_world.AudioData.batch

        def failing(self, batch_size, index, window=None):
            if index >= 2:
                raise ValueError(f"cannot read audio file clip_{index:03d}.wav: test")
            return batch(self, batch_size, index, window)
        sound_world.AudioData.batch = failing
    return train.main(argv)


def error_lines(stderr):
    """Lines that start with "error:", also after rank 0's progress bar (which ends in \\r)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("error:")]


def fresh_out(root, name):
    """A new output folder holding the untrained VAE and CLAP of `root`."""
    out = root / name
    out.mkdir()
    for part in ("vae", "clap"):
        (out / f"{part}.pt").write_bytes((root / f"{part}.pt").read_bytes())
    return out


def assert_same_checkpoints(path_a, path_b, exact=False):
    """Same step, gradients (Adam's moments) and weights: bit for bit, or to float32 rounding.
    A weight may move by up to 1e-4 more: Adam divides by sqrt(v) + 1e-8, which magnifies the
    rounding of a gradient that cancels to ~1e-8 (averaging over ranks adds in another order)."""
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    assert a["step"] == b["step"]
    weights = [(f"{key} {name}", x, b[key][name]) for key in ("model", "ema")
               for name, x in a[key].items()]
    moments = [(f"optimizer {i} {key}", x[key], y[key])
               for opt_a, opt_b in zip(a["optimizers"], b["optimizers"])
               for i, (x, y) in enumerate(zip(opt_a["state"].values(), opt_b["state"].values()))
               for key in ("exp_avg", "exp_avg_sq")]
    for what, x, y in weights + moments:
        if exact:
            assert torch.equal(x, y), what
        else:
            scale = 1.0 if what.startswith(("model", "ema")) else x.abs().max().item()
            assert (x - y).abs().max().item() <= 1e-4 * scale, what


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Untrained parts as `parts` writes them, and a 4-step diffusion run on 2 ranks x batch 1,
    evaluated and sampled every 2 steps."""
    root = tmp_path_factory.mktemp("ranks")
    torch.manual_seed(0)
    model = sa.build_model(sa.SIZES["tiny"])
    with torch.no_grad():
        model.vae.encoder[-1].bias[64:] = -10
    for part in ("vae", "clap"):
        sa.save_checkpoint(root / f"{part}.pt", model, stage=part, step=0)
    (root / "rank.py").write_text(RANK_SCRIPT)
    out = fresh_out(root, "straight")
    status, stdout, stderr = torchrun("diffusion", "--steps", 4, "--out", out, *CLIPS,
                                      "--batch-size", 1, "--eval-every", 2, "--demo-every", 2,
                                      "--demo-steps", 2, "--demo-seconds", 0.5)
    assert status == 0, stderr[-3000:]
    return root, out, stdout


@pytest.fixture(scope="module")
def batch_of_two(two_ranks):
    """One process at batch 2, each clip's loss at one fixed noise draw (per_clip_loss)."""
    out = fresh_out(two_ranks[0], "batch_of_two")
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, fn in FIXED_NOISE.items():
            monkeypatch.setattr(sa, name, fn)
        assert run_train("diffusion", "--steps", 2, "--out", out, *CLIPS, "--batch-size", 2) == 0
    return out / "diffusion.pt"


def test_two_ranks_at_batch_b_reach_the_weights_of_one_process_at_batch_2b(two_ranks,
                                                                           batch_of_two):
    """Rank r's micro-batch holds items r·B … r·B + B - 1 of the one-process batch, and DDP
    averages the gradients: the same clips, the same update."""
    root = two_ranks[0]
    out = fresh_out(root, "fixed_noise_ranks")
    status, _, stderr = torchrun("fixed-noise", "diffusion", "--steps", 2, "--out", out, *CLIPS,
                                 "--batch-size", 1, script=root / "rank.py")
    assert status == 0, stderr[-3000:]
    assert_same_checkpoints(batch_of_two, out / "diffusion.pt")


def test_grad_accum_2_at_batch_b_reaches_the_weights_of_batch_2b(two_ranks, batch_of_two,
                                                                 monkeypatch):
    out = fresh_out(two_ranks[0], "fixed_noise_accum")
    for name, fn in FIXED_NOISE.items():
        monkeypatch.setattr(sa, name, fn)
    assert run_train("diffusion", "--steps", 2, "--out", out, *CLIPS, "--batch-size", 1,
                     "--grad-accum", 2) == 0
    assert_same_checkpoints(batch_of_two, out / "diffusion.pt")


def test_ranks_and_grad_accum_are_interchangeable_with_the_real_noise(two_ranks):
    """Micro-batch j = rank·K + m takes the same clips and noise stream whether j counts ranks
    or accumulation steps: 2 ranks x 1 = 1 process x --grad-accum 2."""
    root, straight, _ = two_ranks
    out = fresh_out(root, "accum")
    assert run_train("diffusion", "--steps", 4, "--out", out, *CLIPS, "--batch-size", 1,
                     "--grad-accum", 2) == 0
    assert_same_checkpoints(straight / "diffusion.pt", out / "diffusion.pt")


def test_clap_on_two_ranks_contrasts_every_caption_with_every_clip_of_the_step(two_ranks):
    """The contrastive loss on 2 ranks x 2 pairs sees all 4 pairs, as one process at batch 4."""
    root = two_ranks[0]
    flags = ["--steps", 2, "--crop", 16384, "--save-every", 2, "--device", "cpu"]
    ranks, one = fresh_out(root, "clap_ranks"), fresh_out(root, "clap_one")
    status, _, stderr = torchrun("clap", "--out", ranks, *flags, "--batch-size", 2, "--force")
    assert status == 0, stderr[-3000:]
    assert run_train("clap", "--out", one, *flags, "--batch-size", 4, "--force") == 0
    assert_same_checkpoints(one / "clap.pt", ranks / "clap.pt")


def test_resuming_a_two_rank_run_gives_the_weights_of_the_uninterrupted_run(two_ranks):
    root, straight, _ = two_ranks
    split = fresh_out(root, "split")
    for steps, resume in ((2, []), (4, ["--resume"])):
        status, _, stderr = torchrun("diffusion", "--steps", steps, "--out", split, *CLIPS,
                                     "--batch-size", 1, *resume)
        assert status == 0, stderr[-3000:]
    assert_same_checkpoints(straight / "diffusion.pt", split / "diffusion.pt", exact=True)


def test_resuming_on_another_number_of_ranks_says_what_changes(two_ranks, capsys):
    root, straight, _ = two_ranks
    out = fresh_out(root, "one_rank")
    (out / "diffusion.pt").write_bytes((straight / "diffusion.pt").read_bytes())
    assert run_train("diffusion", "--steps", 5, "--out", out, *CLIPS, "--batch-size", 1,
                     "--resume") == 0
    assert ("trained on 2 micro-batches of 1 per step (ranks x --grad-accum), this run takes 1 "
            "of 1: the effective batch goes from 2 to 1" in capsys.readouterr().out)


def test_rank_0_alone_writes_the_log_the_checkpoint_and_the_output(two_ranks):
    """One log line per step, one checkpoint of plain weight names (what sample.py loads), and
    one copy of what the run prints."""
    _, out, stdout = two_ranks
    assert sorted(p.name for p in out.iterdir()) == ["clap.pt", "demos", "diffusion.csv",
                                                     "diffusion.log", "diffusion.pt", "vae.pt"]
    assert [line.split()[1] for line in (out / "diffusion.log").read_text().splitlines()] == [
        "1", "2", "3", "4"]
    rows = metrics_rows(out, "diffusion")
    assert [(row["step"], bool(row["val_loss"])) for row in rows] == [
        ("1", False), ("2", True), ("3", False), ("4", True)]
    assert len(os.listdir(out / "demos")) == 8 and stdout.count("wrote 2 demos") == 2
    assert stdout.count("diffusion: done") == 1
    assert "effective batch 2 = batch 1 x 2 ranks x --grad-accum 1" in stdout
    _, ckpt = sa.load_checkpoint(out / "diffusion.pt")       # strict: no "module." prefixes
    assert ckpt["args"]["ranks"] == 2 and len(ckpt["rng"]) == 2   # one noise stream per rank


def test_a_rank_that_raises_stops_every_rank_with_one_line(two_ranks):
    root = two_ranks[0]
    out = fresh_out(root, "failing")
    status, _, stderr = torchrun("rank-1-fails", "diffusion", "--steps", 4, "--out", out, *CLIPS,
                                 "--batch-size", 1, "--save-every", 1, script=root / "rank.py")
    errors = error_lines(stderr)
    assert status != 0 and errors == ["error: rank 1: cannot read audio file clip_003.wav: test"]
    assert torch.load(out / "diffusion.pt", weights_only=True)["step"] == 1   # the last good one


def test_ctrl_c_on_two_ranks_finishes_the_step_saves_once_and_stops_both(two_ranks):
    """Ctrl-C in a terminal reaches torchrun and both ranks: they stop together after a step."""
    root = two_ranks[0]
    out = fresh_out(root, "ctrl_c")
    proc = launch(os.path.join(REPO, "train.py"), "diffusion", "--steps", 1000, "--out", out,
                  *CLIPS[:2], "--save-every", 1000, "--device", "cpu", "--batch-size", 1)
    log, waited = out / "diffusion.log", 0.0
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and waited < 120:
        time.sleep(0.2)
        waited += 0.2
    os.killpg(proc.pid, signal.SIGINT)
    status, _, stderr = finish(proc)
    step = torch.load(out / "diffusion.pt", weights_only=True)["step"]
    errors = error_lines(stderr)
    assert status != 0 and errors == [f"error: interrupted after step {step}; saved "
                                      f"{out / 'diffusion.pt'}; continue with --resume"]
    assert len(log.read_text().splitlines()) == step >= 2


# ---------------------------------------------------------------------------------- exercises
import exercises

# Figures where each exercise's effect is plainly there, and the same with it gone: what
# --check reads, in the form the exercise returns them.
EXERCISE_PASS = {
    1: {"ending error, with the tokens": 0.02, "ending error, tokens zeroed": 0.25},
    2: {"scale 1: CLAP own prompt": 0.19, "scale 6: CLAP own prompt": 0.34,
        "scale 12: latent RMS": 5.07, "scale 12, no rescale: latent RMS": 6.16},
    3: {"euler: Gaussian order": 0.99, "dpmpp-2m: Gaussian order": 1.80,
        "dpmpp-3m: Gaussian order": 3.13, "euler: model, 20 steps": 0.2,
        "dpmpp-3m: model, 20 steps": 0.07},
    4: {"snake: fit error": 0.1, "relu: fit error": 0.93, "elu: fit error": 0.85},
    5: {"512x: energy lost": 0.27, "1024x: energy lost": 0.36, "2048x: energy lost": 0.47,
        "512x: U-Net GFLOPs per second": 54, "1024x: U-Net GFLOPs per second": 24,
        "2048x: U-Net GFLOPs per second": 11},
    6: {"v: ending error, 10 steps": 0.01, "eps: ending error, 10 steps": 0.36},
}
EXERCISE_FAIL = {  # one change each: the effect gone
    1: {"ending error, with the tokens": 0.24, "ending error, tokens zeroed": 0.25},
    2: {"scale 1: CLAP own prompt": 0.19, "scale 6: CLAP own prompt": 0.2,
        "scale 12: latent RMS": 5.07, "scale 12, no rescale: latent RMS": 6.16},
    3: {"euler: Gaussian order": 0.99, "dpmpp-2m: Gaussian order": 1.80,
        "dpmpp-3m: Gaussian order": 2.0, "euler: model, 20 steps": 0.2,
        "dpmpp-3m: model, 20 steps": 0.07},
    4: {"snake: fit error": 0.9, "relu: fit error": 0.93, "elu: fit error": 0.85},
    5: {"512x: energy lost": 0.3, "1024x: energy lost": 0.3, "2048x: energy lost": 0.3,
        "512x: U-Net GFLOPs per second": 54, "1024x: U-Net GFLOPs per second": 24,
        "2048x: U-Net GFLOPs per second": 11},
    6: {"v: ending error, 10 steps": 0.3, "eps: ending error, 10 steps": 0.36},
}


@pytest.fixture
def short_demo(tmp_path, monkeypatch):
    """An untrained model with a 3 s window in place of the bundled demo: the guidance and
    sampler exercises run their code paths in seconds (their figures mean nothing)."""
    path = tmp_path / "demo.pt"
    torch.manual_seed(0)
    sa.save_checkpoint(path, sa.build_model(SHORT), stage="export", step=0)
    monkeypatch.setattr(exercises, "DEMO", str(path))
    monkeypatch.setattr(exercises, "SECONDS", 2)


def smoke(number):
    """Exercise `number` at smoke scale, checking that its figures are the check's and finite."""
    figures = exercises.EXERCISES[number][1](0, scale=0.01)
    assert all(math.isfinite(v) for v in figures.values())
    assert set(EXERCISE_PASS[number]) <= set(figures)
    return figures


def test_exercise_1_timing_world_runs_and_ends_windows_where_the_sound_stops():
    figures = smoke(1)
    assert all(0 <= v <= 1 for v in figures.values())
    # The detector finds the end of the world's own windows exactly.
    z, seconds_total = exercises.latent_world(64, torch.Generator().manual_seed(0))
    assert torch.equal(exercises.detected_end(exercises.sound_level(z)), seconds_total)


def test_exercise_2_guidance_runs_with_and_without_the_rescale(short_demo):
    figures = smoke(2)
    assert len(figures) == 4 * (2 * len(exercises.GUIDANCE_SCALES) - 1)


def test_exercise_3_samplers_run_on_gaussian_data_and_a_model(short_demo):
    figures = smoke(3)
    assert 0.8 < figures["euler: Gaussian order"] < 1.2        # exact data: scale-independent


def test_exercise_4_snake_mlp_runs():
    smoke(4)


def test_exercise_5_linear_code_and_unet_cost_run():
    figures = smoke(5)
    # Halving the latent rate at least halves the U-Net's work per second of audio.
    assert figures["512x: U-Net GFLOPs per second"] > 2 * figures["1024x: U-Net GFLOPs per second"]


def test_exercise_6_v_and_eps_objectives_run():
    smoke(6)


@pytest.mark.parametrize("number", sorted(EXERCISE_PASS))
def test_exercise_check_passes_with_the_effect_and_fails_without(number):
    check = exercises.EXERCISES[number][2]
    assert check(EXERCISE_PASS[number]) is None
    failure = check(EXERCISE_FAIL[number])
    assert isinstance(failure, str) and "\n" not in failure


@pytest.mark.parametrize("number, change, names, figure", [
    (3, {"dpmpp-3m: model, 20 steps": 0.19}, "DPM-Solver++(3M) is no closer than Euler", "0.95"),
    (4, {"snake: fit error": 0.35, "elu: fit error": 0.6}, "Snake has no effect", "more than half"),
    (5, {"2048x: U-Net GFLOPs per second": 24}, "compression saves no compute", "x2.25")])
def test_a_failed_check_names_the_part_that_failed_with_its_figure(number, change, names, figure):
    # One part broken, the others as with the effect: the line is that part's, not the first's.
    failure = exercises.EXERCISES[number][2]({**EXERCISE_PASS[number], **change})
    assert failure.startswith(names) and figure in failure, failure


def test_with_the_rescale_off_the_guidance_check_names_the_rescale_and_not_adherence():
    # Adherence gains +0.15 from scale 1 to 6; the latent RMS at scale 12 is the same with and
    # without the rescale, as when the rescale is disabled.
    failure = exercises.check_2({**EXERCISE_PASS[2], "scale 12, no rescale: latent RMS": 5.07})
    assert "rescale" in failure.split(":")[0] and "guidance has no effect" not in failure


def test_zeroed_timing_tokens_fail_the_timing_check(monkeypatch):
    """Break §3.2's mechanism (the timing tokens carry nothing) and exercise 1's check fails:
    its two models are then one model, whose error cannot be half of its own, and which ends its
    windows no better than a guess (about a quarter of the window away) at any training length,
    here a twentieth of the exercise's."""
    zeros = lambda self, start, total: torch.zeros(len(total), 2, self.total.embedding_dim)
    monkeypatch.setattr(sa.TimingEmbedding, "forward", zeros)
    broken = exercises.exercise_1(0, scale=0.05)                  # 40 training steps, not 800
    assert exercises.check_1(broken) is not None
    # The model "with the tokens" is now the one without them, and ends no better than a guess.
    assert broken["ending error, with the tokens"] == broken["ending error, tokens zeroed"] > 0.2


def test_exercises_cli_reports_bad_arguments_in_one_line_and_fails_the_check(capsys):
    for argv in (["7"], ["1", "--seeds", "0"], ["1", "--scale", "2"], []):
        assert exercises.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert exercises.main(["4", "--scale", "0.01", "--check"]) == 1   # 20 steps: no fit yet
    out, err = capsys.readouterr()
    assert "snake: fit error" in out and err.count("\n") == 1     # progress bars end in \r
    assert err.rsplit("\r", 1)[-1].startswith("check failed: Snake has no effect")


# ============================================================================== assignments.py
import csv             # noqa: E402 (this section's own)
import inspect         # noqa: E402
import io              # noqa: E402
import assignments     # noqa: E402

# Typical mistakes, one per line: (assignment, the key's text, the mistake's text, words its
# failure message must contain). Each is the key with one change.
BUGS = [
    ("A1", "(beta + 1e-9).reciprocal() * torch", "torch", "the 1/alpha is missing"),
    ("A1", "(beta + 1e-9).reciprocal()", "beta.reciprocal()", "divide by alpha + 1e-9"),
    ("A1", "std.pow(2) - 2 * torch.log(std)", "std - torch.log(std)", "used as the variance"),
    ("A1", "return 0.5 * (mean", "return (mean", "the 1/2 is missing"),
    ("A2", "(F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2",
     "F.cross_entropy(logits, labels)", "caption -> clip only"),
    ("A2", ".clamp(max=100)", "", "clamped at 100"),
    ("A3", "self.start(index(seconds_start)), self.total(index(seconds_total))",
     "self.start(index(seconds_total)), self.total(index(seconds_start))",
     "start and total swapped"),
    ("A3", "s.long().clamp(0, self.max_seconds)", "s.long()", "clamp seconds"),
    ("A3", "torch.cat([text, timing.to(text.dtype)], 1)",
     "torch.cat([timing.to(text.dtype), text], 1)", "after the text features"),
    ("A3", "torch.cat([mask, ones], 1)", "torch.cat([mask, ~ones], 1)", "hides the timing tokens"),
    ("A4", "else mask[:, None, None, :]", "else ~mask[:, None, None, :]", "wrong way round"),
    ("A4", "attn_mask=mask)", "attn_mask=None)", "the mask is ignored"),
    ("A4", "context = self.norm_context(x if context is None else context)",
     "context = self.norm(x) if context is None else self.norm_context(context)",
     "norm_context(x)"),
    ("A4", "self.heads, -1", "1, -1", "one head"),
    ("A5", "torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)",
     "torch.sin(t * math.pi / 2), torch.cos(t * math.pi / 2)", "alpha and sigma swapped"),
    ("A5", ".float(), v.float())", ".float(), eps.float())", "the target is eps"),
    ("A5", "< cond_dropout)", "> cond_dropout)", "the wrong way round"),
    ("A5", "t = torch.rand(B, generator=generator)", "t = torch.rand(B)", "generator passed in"),
    ("A5", "mask = mask | drop[:, None]", "mask = mask", "null context has no padding"),
    ("A6", "v_c.std(dim=1, keepdim=True) / v.std(dim=1, keepdim=True)",
     "v_c.std(dim=2, keepdim=True) / v.std(dim=2, keepdim=True)", "over frames (dim 2)"),
    ("A6", "v = v_u + scale * (v_c - v_u)", "v = v_c + scale * (v_u - v_c)",
     "guidance runs the wrong way"),
    ("A6", "v = rescale * v_rescaled + (1 - rescale) * v",
     "v = (1 - rescale) * v_rescaled + rescale * v", "phi weights the wrong term"),
    ("A7", "z = alpha_t * x ", "z = x ", "the v-model was given x"),
    ("A7", "torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps))",
     "torch.linspace(sigma_max, sigma_min, steps)", "evenly spaced in sigma"),
    ("A7", "2 / math.pi * math.atan(sigma)", "math.atan(sigma)", "scale it by 2 / pi"),
    ("A8", "I2 / (1 + h) * d2", "I2 / 2 * d2", "as k-diffusion does"),
    ("A8", "d1_0 = (denoised - D_1) / h_1", "d1_0 = (D_1 - denoised) / h_1", "sign is flipped"),
    ("A8", "return ddim_step(x, (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * D_1, h)",
     "return ddim_step(x, denoised, h)", "a first-order (DDIM/Euler) update"),
    # Mistakes a class made that the grader once passed, or failed without naming.
    ("A2", "return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2",
     "return -(logits.softmax(1).log().diagonal().mean()\n"
     "                 + logits.softmax(0).log().diagonal().mean()) / 2", "underflows"),
    ("A2", "(F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2",
     "(F.cross_entropy(logits, labels, reduction='sum')\n"
     "                + F.cross_entropy(logits.T, labels, reduction='sum')) / 2",
     "summed over the batch"),
    ("A5", "context = torch.where(drop[:, None, None], unet.null_context.to(context.dtype), "
     "context)\n    mask = mask | drop[:, None]",
     "context[drop] = unet.null_context.to(context.dtype)\n    mask[drop] = True", "in place"),
    ("A5", "drop = (torch.rand(B, generator=generator)", "drop = (torch.rand(B)",
     "generator passed in"),
    ("A4", "attn_mask=mask)", "attn_mask=mask, scale=1 / q.shape[-1])", "divided by d"),
    ("A4", "out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)",
     "logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])\n"
     "        if mask is not None:\n"
     "            logits = logits.masked_fill(~mask, -math.inf)\n"
     "        out = logits.softmax(-2) @ v", "over the queries"),
    ("A4", "t.reshape(B, t.shape[1], self.heads, -1).transpose(1, 2)",
     "t.reshape(B, self.heads, t.shape[1], -1)", "without the transpose"),
    ("A4", "self.to_kv(context).chunk(2, dim=-1)", "self.to_kv(context).chunk(2, dim=-1)[::-1]",
     "k and v swapped"),
    ("A7", "torch.linspace(math.log(sigma_max), math.log(sigma_min), steps)",
     "torch.linspace(math.log(sigma_min), math.log(sigma_max), steps)", "ascends"),
    ("A7", "torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps))",
     "torch.logspace(math.log(sigma_max), math.log(sigma_min), steps)", "base-10"),
    ("A1", ".sum(1).mean()", ".sum((1, 2)).mean()", "summed over frames as well"),
    ("A6", "v_c.std(dim=1, keepdim=True) / v.std(dim=1, keepdim=True)",
     "v.std(dim=1, keepdim=True) / v_c.std(dim=1, keepdim=True)", "ratio is inverted"),
    ("A3", "s.long().clamp(0, self.max_seconds)", "s.long().clamp(0, self.max_seconds - 1)",
     "clamped one short"),
    ("A3", "text = self.clap.text_features(tokens, mask)",
     "text = self.clap.text_hidden(tokens, mask, len(self.clap.text_layers))", "last layer"),
    ("A8", "lam_1, D_1 = history[-1]\n        r =", "lam_1, D_1 = history[0]\n        r =",
     "oldest history entry"),
    ("A8", "I0 = -math.expm1(-h)", "I0 = math.expm1(-h)", "I0's sign is flipped"),
    ("A8", "return d1_0 + h_1 * f, 2 * f", "return 2 * f, d1_0 + h_1 * f", "swapped"),
    ("A3", "lambda s: s.long()", "lambda s: s.round().long()", "seconds are rounded"),
    ("A5", "< cond_dropout).to(z.device)", "< 2 * cond_dropout).to(z.device)",
     "of contexts at cond_dropout 0.25"),
]


@pytest.fixture(scope="module")
def key_text():
    return assignments.student_file(False, "key.py")


def student(tmp_path, text, name="student.py"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return assignments.load_student(path)


def test_the_starter_keeps_each_pieces_signature_and_docstring_and_grades_not_done(tmp_path,
                                                                                   capsys):
    # Made from stable_audio.py each time, it cannot drift from it: checked piece by piece.
    assert assignments.main(["starter", "--out", str(tmp_path / "student.py")]) == 0
    module = assignments.load_student(tmp_path / "student.py")
    assert len(assignments.ASSIGNMENTS) >= 8
    for piece in assignments.PIECES:
        theirs, ours = assignments.their_function(module, piece), assignments.reference(piece)
        assert inspect.signature(theirs) == inspect.signature(ours), piece
        assert theirs.__doc__ == ours.__doc__, piece
        with pytest.raises(NotImplementedError, match=piece.replace(".", r"\.")):
            theirs(*[None] * len(inspect.signature(ours).parameters))
    capsys.readouterr()
    assert assignments.main(["grade", str(tmp_path / "student.py")]) == 1
    rows = capsys.readouterr().out.splitlines()[2:-1]
    assert len(rows) == len(assignments.ASSIGNMENTS)
    assert all("not done" in row and "0.0/" in row for row in rows), rows


# Correct answers a careful student may write other than the key: each must pass at every seed.
# Other correct answers a careful student writes: (assignment, the key's text, theirs).
CAREFUL = [
    ("A1", "a larger epsilon", "(beta + 1e-9).reciprocal()", "(beta + 1e-6).reciprocal()"),
    ("A1", "snake in float32",
     "return x + (beta + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)",
     "y = x.float()\n    return (y + torch.sin(alpha.float() * y).pow(2) / (beta.float() + 1e-9))"
     ".to(x.dtype)"),
    ("A4", "attention written out",
     "out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)",
     "logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])\n"
     "        if mask is not None:\n"
     "            logits = logits.masked_fill(~mask, -math.inf)\n"
     "        out = logits.softmax(-1) @ v"),
    ("A1", "the KL through log std^2", "- 2 * torch.log(std)", "- torch.log(std.pow(2))"),
]


def test_the_key_passes_every_assignment_at_every_seed(key_text, tmp_path):
    """The grader's tolerances come from float32 round-off, not from one seed: the key passes
    every assignment at hundreds of seeds, and a careful student's other correct answers pass the
    assignment they answer (the others grade the reference's pieces) at 25 more each."""
    every = list(assignments.ASSIGNMENTS.values())
    variants = [("the key", key_text, every, range(300))]
    for key, what, old, new in CAREFUL:
        a = assignments.ASSIGNMENTS[key]
        assert any(old in inspect.getsource(assignments.ORIGINALS[p]) for p in a.pieces), what
        variants.append((what, key_text.replace(old, new), [a], range(300, 325)))
    for n, (what, text, graded, seeds) in enumerate(variants):
        assert text != key_text or what == "the key", what
        module = student(tmp_path, text, f"careful_{n}.py")
        for seed in seeds:
            for a in graded:
                result = assignments.grade_one(module, a, seed)
                assert result.status == "passed", f"{what}, seed {seed}: {result.message}"


@pytest.mark.parametrize("key, old, new, words", BUGS, ids=[f"{b[0]}-{b[3]}" for b in BUGS])
def test_each_typical_mistake_fails_its_assignment_with_a_message_naming_it(key_text, tmp_path,
                                                                            key, old, new, words):
    assert key_text.count(old) == 1, "the reference changed: update this mistake"
    module = student(tmp_path, key_text.replace(old, new))
    result = assignments.grade_one(module, assignments.ASSIGNMENTS[key], 0)
    assert result.status == "failed" and words in result.message, result.message
    # The other assignments are graded on the reference's pieces, so the mistake stays in its own.
    other = next(a for k, a in assignments.ASSIGNMENTS.items() if k != key)
    assert assignments.grade_one(module, other, 0).status == "passed"


def test_a_piece_earns_the_share_of_the_points_of_the_checks_it_passes(key_text, tmp_path):
    a3 = assignments.ASSIGNMENTS["A3"]          # 10 points over 4 checks: 2.5 points a check
    module = student(tmp_path, key_text.replace("lambda s: s.long()", "lambda s: s.round().long()"))
    result = assignments.grade_one(module, a3, 0)     # rounding fails timing_rows alone
    assert (result.status, result.passed, result.points) == ("failed", 3, 7.5)


def test_a_check_the_piece_crashes_in_is_failed_and_says_why(key_text, tmp_path):
    start = key_text.index("def snake(")
    body = key_text.index('"""', key_text.index('"""', start) + 3) + 3
    module = student(tmp_path, key_text[:body] + "\n    raise RuntimeError('boom')"
                     + key_text[body:])
    result = assignments.grade_one(module, assignments.ASSIGNMENTS["A1"], 0)
    assert (result.status, result.passed) == ("failed", 2)      # the KL's two checks alone
    assert result.message == "snake_formula: RuntimeError: boom"


def test_k_diffusions_3m_weight_fails_both_the_steps_and_the_order_check(key_text, tmp_path):
    module = student(tmp_path, key_text.replace("I2 / (1 + h) * d2", "I2 / 2 * d2"))
    result = assignments.grade_one(module, assignments.ASSIGNMENTS["A8"], 0)
    assert result.passed == 3 and "k-diffusion" in result.message    # of 5: both checks fail


def test_an_answer_hard_coded_for_one_seed_fails_at_another(key_text, tmp_path):
    # Record what get_sigmas is asked at seed 0 and answer that whatever the arguments.
    asked = []
    a7 = assignments.ASSIGNMENTS["A7"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sa, "get_sigmas", lambda *args: asked.append(args) or
                  assignments.ORIGINALS["get_sigmas"](*args))
        a7.checks[0](torch.Generator().manual_seed(0))
    answer = assignments.ORIGINALS["get_sigmas"](*asked[0]).tolist()
    start = key_text.index("def get_sigmas(")
    end = key_text.index("\n\n\n", start)
    module = student(tmp_path, key_text[:start] + "def get_sigmas(steps, sigma_min=0.03, "
                     f"sigma_max=80.0):\n    return torch.tensor({answer}).double()"
                     + key_text[end:])
    assert assignments.grade_one(module, a7, 0).passed == 2
    assert assignments.grade_one(module, a7, 1).status == "failed"


def replace_function(text, name, new):
    """`text` with the top-level function `name` replaced by `new`."""
    start = text.index(f"def {name}(")
    return text[:start] + new + text[text.index("\n\n\n", start):]


def test_a_piece_that_calls_the_reference_is_refused_in_its_own_row(key_text, tmp_path):
    kept = "import stable_audio\nfrom stable_audio import guided_v as theirs\n" + key_text
    a6, a8 = assignments.ASSIGNMENTS["A6"], assignments.ASSIGNMENTS["A8"]
    for call, words in (("theirs", "guided_v calls stable_audio's own guided_v"),   # kept aside
                        ("stable_audio.guided_v", "guided_v calls itself")):    # or the module
        body = f"def guided_v(*args, **kwargs):\n    return {call}(*args, **kwargs)"
        module = student(tmp_path, replace_function(kept, "guided_v", body))
        rows = {a.key: assignments.grade_one(module, a, 0) for a in (a6, a8)}
        assert rows["A6"].status == "refused" and words in rows["A6"].message, rows["A6"].message
        assert rows["A8"].status == "passed"                # the file's other rows are graded
    # A piece that calls the reference in one case only is refused, with none of its points.
    sometimes = kept.replace("    if scale == 1:\n", "    if content_frames is not None:\n        return "
                             "theirs(unet, context, mask, uncond, uncond_mask, scale, rescale, "
                             "content_frames)\n    if scale == 1:\n", 1)
    result = assignments.grade_one(student(tmp_path, sometimes), a6, 0)
    assert (result.status, result.passed, result.points) == ("refused", 0, 0)
    # The refusal names the piece that calls the reference, not another piece of its assignment.
    module = student(tmp_path, "from stable_audio import dpm_derivatives as theirs\n"
                     + replace_function(key_text, "sample_dpmpp_2m",
                                        "def sample_dpmpp_2m(denoiser, x, sigmas, callback=None):"
                                        "\n    theirs([], 0.0, x)\n    return x"))
    message = assignments.grade_one(module, a8, 0).message
    assert message.startswith("sample_dpmpp_2m calls stable_audio's own dpm_derivatives"), message


def test_a_missing_function_is_not_done_and_a_tensor_zero_is_zero(key_text, tmp_path):
    module = student(tmp_path, replace_function(key_text, "kl_divergence", ""))
    result = assignments.grade_one(module, assignments.ASSIGNMENTS["A1"], 0)
    assert result.message == "not done: kl_divergence is missing from student.py"
    assert result.passed == 3                               # snake's three checks still count
    module = student(tmp_path, key_text.replace(
        "        return 0, 0\n", "        return torch.zeros_like(denoised), 0 * denoised\n"))
    assert assignments.grade_one(module, assignments.ASSIGNMENTS["A8"], 0).status == "passed"


def test_a_piece_that_returns_zeros_or_its_input_earns_nothing_from_properties(key_text, tmp_path):
    # Appending masked keys changes nothing, and a function that returns x changes nothing too.
    a4 = assignments.ASSIGNMENTS["A4"]
    for body in ("return x", "return torch.zeros_like(x)"):
        module = student(tmp_path, key_text.replace(
            "        B, S, C = x.shape                                            # (B, S, C)",
            f"        {body}"))
        assert assignments.grade_one(module, a4, 0).passed == 0, body


def test_an_unnamed_wrong_answer_says_what_its_numbers_show():
    want = torch.arange(1.0, 25.0, dtype=torch.float64).reshape(2, 3, 4) - 7.5
    row = want.clone()
    row[1] += torch.linspace(0.5, 2.0, 12, dtype=torch.float64).reshape(3, 4)
    for got, words in ((-want, "with the wrong sign"), (want * 0.75, "is 0.75 times"),
                       (want + 0.5, "plus 0.5 everywhere"),
                       (row, "right at indices [0] of axis 0 (of 2) and wrong at [1]"),
                       (want + torch.linspace(0, 1, 24, dtype=torch.float64).reshape(2, 3, 4),
                        "is off by up to 1")):
        with pytest.raises(assignments.Wrong, match=re.escape(words)):
            assignments.compare(got, want, "x")
    assignments.compare(want * (1 + 1e-7), want, "x")        # float32 round-off passes


def test_every_catalogued_mistake_fails_its_assignment(key_text, tmp_path):
    """Plausible mistakes written without reading the checks (fixtures/grader_mistakes.py): every
    one fails its assignment; of those the grader was tuned on, at least two thirds are named
    (their message is a hint, not "off by up to" or a bare exception)."""
    sys.path.insert(0, os.path.join(REPO, "fixtures"))
    try:
        import grader_mistakes
    finally:
        sys.path.remove(os.path.join(REPO, "fixtures"))
    generic = re.compile(r"is off by up to|holds nan or inf|^\w+: \w+(Error|Exception)\b")
    for catalogue in (grader_mistakes.MISTAKES, getattr(grader_mistakes, "HELD_OUT", [])):
        named = 0
        for n, (key, old, new, what) in enumerate(catalogue):
            assert key_text.count(old) == 1, f"the reference changed: update {what!r}"
            module = student(tmp_path, key_text.replace(old, new), f"mistake_{n}.py")
            result = assignments.grade_one(module, assignments.ASSIGNMENTS[key], 0)
            assert result.status != "passed", f"{key}: {what} passed"
            named += not generic.search(result.message)
        assert catalogue is not grader_mistakes.MISTAKES or 3 * named >= 2 * len(catalogue)


def test_a_class_is_graded_whatever_one_submission_does(key_text, tmp_path, capsys):
    """Each file is graded in processes of its own, each assignment under --timeout: a hang, an
    exit, a crash, an import-time patch and printing touch only that file's rows, each said in one
    line; what the code prints stays out of the CSV and goes to --log."""
    folder = tmp_path / "submissions"
    folder.mkdir()
    clap = "        logits = self.logit_scale.exp()"
    files = {"hangs": key_text.replace("    return 0.5 * (mean", "    while True:\n        pass\n"
                                       "    return 0.5 * (mean"),
             "exits": key_text.replace(clap, "        import os; os._exit(5)\n" + clap),
             "raises_exit": key_text.replace(clap, "        raise SystemExit(3)\n" + clap),
             "patches": key_text + "\nimport stable_audio\nstable_audio.ddim_step = "
                                   "lambda x, denoised, h: x\n",
             "prints": key_text.replace("    beta = alpha if beta is None else beta\n",
                                        "    print('shape', x.shape)\n"
                                        "    beta = alpha if beta is None else beta\n"),
             "forks": key_text + "\nimport os, time\nif os.fork() == 0:\n    time.sleep(600)\n",
             "stalls_on_import": "while True:\n    pass\n", "key": key_text}
    for name, text in files.items():
        assert text != key_text or name == "key", name
        (folder / f"{name}.py").write_text(text)
    book, log = tmp_path / "gradebook.csv", tmp_path / "printed.log"
    assert assignments.main(["grade", str(folder), "--timeout", "4", "--jobs", "2", "--csv",
                             "--gradebook", str(book), "--log", str(log), "--seed", "7"]) == 1
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == len(files) * len(assignments.ASSIGNMENTS)       # nothing printed got in
    grades = {(r["student"], r["assignment"]): (r["status"], r["message"]) for r in rows}
    assert {r["seed"] for r in rows} == {"7"}
    unusual = {k: v for k, v in grades.items() if v != ("passed", "")}
    assert unusual.pop(("hangs", "A1")) == ("timed out", "A1 timed out after 4 s")
    assert unusual.pop(("exits", "A2")) == ("crashed", "A2 ended the grading process "
                                                       "(exit code 5)")
    status, message = unusual.pop(("raises_exit", "A2"))
    assert status == "failed" and "calls exit(3)" in message
    for key in assignments.ASSIGNMENTS:
        status, message = unusual.pop(("stalls_on_import", key))
        assert status == "import error" and message.endswith("importing it timed out after 4 s")
    assert unusual == {}            # the patch, the prints, the fork and the rest: full marks
    book_rows = {r["student"]: r for r in csv.DictReader(io.StringIO(book.read_text()))}
    assert book_rows["key"]["total"] == book_rows["patches"]["total"] == "85.0"
    assert book_rows["hangs"]["A1"] == "0.0" and book_rows["hangs"]["total"] == "75.0"
    assert "shape torch.Size" in log.read_text() and "==== " in log.read_text()
    assert assignments.main(["grade", str(folder / "key.py"), "--log", str(log)]) == 2  # kept
    assert "pass --force" in capsys.readouterr().err


def test_what_a_files_import_does_to_the_model_is_undone_and_said(key_text, tmp_path, capsys):
    reference = sa.ddim_step
    (tmp_path / "patches.py").write_text(key_text + "\nimport stable_audio\nstable_audio.ddim_step"
                                         " = lambda x, denoised, h: x\nstable_audio.SAMPLERS.clear()\n")
    module = assignments.load_student(tmp_path / "patches.py")
    assert module.__undone__ == ["SAMPLERS", "ddim_step"]
    assert sa.ddim_step is reference and set(sa.SAMPLERS) == {"dpmpp-2m", "dpmpp-3m", "euler"}
    assert assignments.main(["grade", str(tmp_path / "patches.py"), "--only", "A8"]) == 0
    assert "changed stable_audio's SAMPLERS, ddim_step when imported; undone" in \
        capsys.readouterr().out


def test_grades_go_out_as_gradescope_results(key_text, tmp_path):
    results = tmp_path / "results.json"
    (tmp_path / "student.py").write_text(key_text.replace("return 0.5 * (mean", "return (mean"))
    assert assignments.main(["grade", str(tmp_path / "student.py"), "--gradescope",
                             str(results), "--only", "A1,A7"]) == 1
    graded = json.loads(results.read_text())
    assert [(t["name"][:2], t["max_score"]) for t in graded["tests"]] == [("A1", 10), ("A7", 10)]
    a1, a7 = graded["tests"]
    assert a7["score"] == 10 and 0 < a1["score"] < 10 and "the 1/2 is missing" in a1["output"]
    assert graded["score"] == a1["score"] + a7["score"]
    assert assignments.main(["grade", str(tmp_path), str(tmp_path), "--gradescope",
                             str(tmp_path / "other.json")]) == 2        # one submission only


def test_grading_swaps_pieces_in_and_puts_the_reference_back(key_text, tmp_path):
    module = student(tmp_path, key_text.replace("I2 / (1 + h) * d2", "I2 / 2 * d2"))
    before = dict(vars(sa)), dict(vars(sa.Attention)), dict(sa.SAMPLERS)
    with assignments.swapped_in(module, ["sample_dpmpp_3m", "Attention.forward"]):
        assert sa.SAMPLERS["dpmpp-3m"] is sa.sample_dpmpp_3m is not before[2]["dpmpp-3m"]
        assert sa.Attention.forward is not before[1]["forward"]
    assert (dict(vars(sa)), dict(vars(sa.Attention)), dict(sa.SAMPLERS)) == before


def test_grade_reports_bad_files_in_one_line_and_a_class_as_csv(key_text, tmp_path, capsys):
    (tmp_path / "broken.py").write_text("def snake(:\n")
    (tmp_path / "key.py").write_text(key_text)
    assert assignments.main(["grade", str(tmp_path / "broken.py")]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "does not import: SyntaxError" in out
    for argv in (["grade", str(tmp_path / "missing.py")], ["grade", "x.py", "--only", "A9"],
                 ["starter", "--out", str(tmp_path / "key.py")]):
        assert assignments.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert (tmp_path / "key.py").read_text() == key_text            # not overwritten
    files = [str(tmp_path / n) for n in ("key.py", "broken.py")]
    assert assignments.main(["grade", *files, "--only", "a1,A7", "--csv"]) == 1
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(os.path.basename(r["file"]), r["assignment"], r["status"]) for r in rows] == [
        ("key.py", "A1", "passed"), ("key.py", "A7", "passed"),
        ("broken.py", "A1", "import error"), ("broken.py", "A7", "import error")]


def test_the_assignments_guide_points_at_the_lines_that_open_what_it_names():
    text = open(os.path.join(REPO, "docs", "assignments.md"), encoding="utf-8").read()
    lines, nodes = assignments.definitions()
    found = re.findall(r"`([\w.]+)`\s+\(stable_audio\.py:(\d+)\)", text)
    assert {name for name, _ in found} >= set(assignments.PIECES)
    for name, line in found:
        assert nodes[name].lineno == int(line), f"{name} opens at line {nodes[name].lineno}"


def test_an_exercise_runs_on_the_students_pieces(key_text, tmp_path, capsys):
    # Exercise 4 on the key computes what it computes on the reference; on a Snake that is the
    # identity it fits no better than a linear network.
    figures = {}
    for name, text in (("reference", None), ("key", key_text),
                       ("identity", key_text.replace(
                           "return x + (beta + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)",
                           "return x"))):
        argv = ["4", "--scale", "0.02"]
        if text:
            (tmp_path / f"{name}.py").write_text(text)
            argv += ["--student", str(tmp_path / f"{name}.py")]
        assert exercises.main(argv) == 0
        out = capsys.readouterr().out
        figures[name] = re.search(r"snake: fit error +(\S+)", out)[1]
    assert "with your snake" in out and sa.snake is assignments.ORIGINALS["snake"]
    assert figures["key"] == figures["reference"] != figures["identity"]


# ---------------------------------------------------------------------------- resuming, export
def test_resume_without_the_run_flags_continues_on_the_cached_latents(parts, tmp_path, capsys):
    """--resume alone takes --latent-cache, --latent-scale and the window back from the
    checkpoint: the cached windows are reused, and the weights are those of an uninterrupted
    run, bit for bit."""
    run = [*DIFFUSION, "--latent-cache", 3, "--latent-scale", 2.0]
    straight, split = fresh_out(parts, "straight"), fresh_out(parts, "split")
    assert run_train("diffusion", "--steps", 4, "--out", straight, *run) == 0
    assert run_train("diffusion", "--steps", 2, "--out", split, *run) == 0
    capsys.readouterr()
    assert run_train("diffusion", "--steps", 4, "--out", split, "--resume",
                     "--batch-size", 2, "--save-every", 1) == 0
    out = capsys.readouterr().out
    assert "using 3 cached latents" in out and "encoding" not in out
    assert "with its --window-seconds 0.5 --latent-cache 3 --latent-scale 2.0" in out
    a = torch.load(straight / "diffusion.pt", weights_only=True)
    b = torch.load(split / "diffusion.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and b["args"]["latent_cache"] == 3
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def test_resume_says_which_flag_changes_and_refuses_one_the_model_is_built_with(tmp_path,
                                                                                capsys):
    args = ["clap", "--out", tmp_path, "--batch-size", 2]
    assert run_train(*args, "--steps", 1, "--crop", 8192) == 0
    capsys.readouterr()
    assert run_train(*args, "--steps", 2, "--resume", "--crop", 4096) == 0       # honoured
    assert "note: " + str(tmp_path / "clap.pt") + " was trained with --crop 8192; this run " \
        "continues it with --crop 4096" in capsys.readouterr().out
    assert torch.load(tmp_path / "clap.pt", weights_only=True)["args"]["crop"] == 4096
    assert run_train(*args, "--steps", 3, "--resume", "--window-seconds", 2) == 2
    assert_one_error_line(capsys, "no --window-seconds", "cannot take --window-seconds 2.0")
    assert torch.load(tmp_path / "clap.pt", weights_only=True)["step"] == 2      # untouched


def test_export_names_its_own_flags_when_a_checkpoint_is_missing(tmp_path, capsys):
    assert run_train("export", "--from", tmp_path / "gone.pt", "--to", tmp_path / "a.pt") == 2
    assert_one_error_line(capsys, f"--from {tmp_path / 'gone.pt'} not found")
    source = tmp_path / "source.pt"
    sa.save_checkpoint(source, sa.build_model(SHORT), stage="export", step=0)
    assert run_train("export", "--from", source, "--vae", tmp_path / "gone.pt",
                     "--to", tmp_path / "a.pt") == 2
    assert_one_error_line(capsys, f"--vae {tmp_path / 'gone.pt'} not found", "phase-2")
    assert not (tmp_path / "a.pt").exists()


# ---------------------------------------------------------------------------- documented commands
# Every command in README.md and docs/*.md runs, so that the documents cannot drift from the code:
# in document order (a recipe builds on its earlier commands), in a copy of the repository with
# stand-ins for the reader's files, each in a short form (below) and in one process beside the
# suite's (the copy's own modules, as `python SCRIPT` would import them). DOC_SKIPPED is what a
# 2-core CPU machine cannot run; everything else must exit with 0.
import runpy                 # noqa: E402 (this section's own)
import shlex                 # noqa: E402
import shutil                # noqa: E402
import traceback             # noqa: E402
from pathlib import Path     # noqa: E402

DOCS = ["README.md", *(f"docs/{name}" for name in sorted(os.listdir(os.path.join(REPO, "docs")))
                       if name.endswith(".md"))]
STEP_FLAGS = ("--steps", "--disc-start", "--save-every")
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
COMMAND = re.compile(r"(\w+=\S* )*(python|torchrun|bash|pip) ")
DOC_SKIPPED = {"pip install": "the CI's own setup, from the network",
               "bash .ci/run": "this suite in a fresh environment",
               "python -m pytest": "this suite",
               "torchrun --nproc_per_node 8": "8 GPUs",
               "torchrun --nnodes 2": "two machines with 8 GPUs each",
               "--device cuda": "a GPU"}
# The short forms (short_form, short_python, documented_repo):
# every train.py --steps, --disc-start, --save-every: its rank among the document's values of
#     those flags (1, 2, ...), so that a resumed run still goes on past its first part
# train.py vae, clap, diffusion: --batch-size 2; without --resume, --window-seconds 1.5 and
#     (vae, clap) --crop 4096
# --latent-cache N: 2 windows
# sample.py and bench.py: --steps 2; bench.py: --eval-steps 2 --seeds 1 --repeats 1, and each
#     section once per run of the suite for the same flags, as far as it reads them
#     (bench_sections_left)
# --seconds, --start, --inpaint, and a Python block's seconds_total: a tenth; its steps: 2
# bench.py: --quick, its own short form (the check at the size's window and 50 trial steps takes
#     minutes, and the class it grades waits a minute for its hanging file)
# exercises.py: --scale 0.01 and --seeds 1, without --check (its ranges hold at scale 1 only)
# docs/mutants.py: --list, which checks that every mutant applies (running them takes hours)
# assignments.py grade: exit 1 is a grade too (a starter fails every assignment), not a failure
# checkpoints/demo.pt: the bundled weights at a 3 s window (the U-Net always runs the window)
# The stand-ins for the reader's files (documented_repo):
# my_clip.wav (2 s of rain), drums.wav (1.2 s of drums), song.wav (1 s of piano): sound world
# model_config.json, model.ckpt, model.safetensors: fixtures/sat_reference.pt's diffusion model


def documented_commands(text):
    """A markdown text's commands in order: each line of a ```bash block (a line ending in `\\`
    goes on), each ```python block whole, each inline `python ...` (or torchrun, bash, pip)
    outside the blocks. -> [("bash" | "python", text)]"""
    found, prose = [], text
    for m in FENCE.finditer(text):
        indent, lang, body = m.groups()
        body = "\n".join(line[len(indent):] for line in body.splitlines())
        if lang == "bash":
            found += [(m.start(), "bash", line) for line in body.replace("\\\n", " ").splitlines()
                      if line.strip()]
        elif lang == "python":
            found.append((m.start(), "python", body))
        else:                          # a diagram or a program's output: no command in it
            assert not any(COMMAND.match(line) for line in body.splitlines()), body
        prose = prose[:m.start()] + " " * (m.end() - m.start()) + prose[m.end():]
    for m in re.finditer(r"`([^`]+)`", prose):
        command = " ".join(m.group(1).split())
        if COMMAND.match(command):
            found.append((m.start(), "bash", command))
    return [(kind, command) for _, kind, command in sorted(found, key=lambda f: f[0])]


def set_flag(argv, flag, *values):
    """argv with `flag`'s values replaced, or the flag added."""
    if flag in argv:
        i = argv.index(flag)
        return [*argv[:i + 1], *values, *argv[i + 1 + len(values):]]
    return [*argv, flag, *values]


def tenth(argv, flag, n=1):
    if flag not in argv:
        return argv
    i = argv.index(flag)
    return set_flag(argv, flag, *(f"{float(v) / 10:g}" for v in argv[i + 1:i + 1 + n]))


def short_form(argv, ranks):
    """The short form of `python SCRIPT ARGS`, as argv (SCRIPT first)."""
    script = argv[0]
    if script == "train.py":
        for flag in STEP_FLAGS:
            if flag in argv:
                argv = set_flag(argv, flag, str(ranks[argv[argv.index(flag) + 1]]))
        if argv[1] in train.STAGES:
            argv = set_flag(argv, "--batch-size", "2")
        if argv[1] in train.STAGES and "--resume" not in argv:
            argv = set_flag(argv, "--window-seconds", "1.5")
            if argv[1] in ("vae", "clap"):
                argv = set_flag(argv, "--crop", "4096")
    if "--latent-cache" in argv:
        argv = set_flag(argv, "--latent-cache", "2")
    if script in ("sample.py", "bench.py"):
        argv = set_flag(argv, "--steps", "2")
    if script == "bench.py":
        for flag, value in (("--eval-steps", "2"), ("--seeds", "1"), ("--repeats", "1")):
            argv = set_flag(argv, flag, value)
        if "--quick" not in argv:
            argv = [*argv, "--quick"]
    for flag, n in (("--seconds", 1), ("--start", 1), ("--inpaint", 2)):
        argv = tenth(argv, flag, n)
    if script == "docs/mutants.py":
        argv = set_flag(argv, "--list")
    if script == "exercises.py":
        argv = [a for a in set_flag(argv, "--seeds", "1") if a != "--check"] + ["--scale", "0.01"]
    return argv


def short_python(code):
    """A Python block's short form: its steps=N become 2, its seconds_total a tenth."""
    code = re.sub(r"\bsteps=\d+", "steps=2", code)
    return re.sub(r"\bseconds_total=(\d+)", lambda m: f"seconds_total={int(m[1]) / 10:g}", code)


def documented_repo(root, sat):
    """A copy of the repository's code, checkpoints and fixtures, with the stand-ins beside."""
    (root / "docs").mkdir()
    for folder in (".", "docs"):
        for name in os.listdir(os.path.join(REPO, folder)):
            if name.endswith(".py"):
                shutil.copy(os.path.join(REPO, folder, name), root / folder)
    for folder in ("checkpoints", "fixtures"):
        shutil.copytree(os.path.join(REPO, folder), root / folder)
    demo = torch.load(root / "checkpoints" / "demo.pt", weights_only=True)
    demo["config"]["window"] = 2 ** 17
    torch.save(demo, root / "checkpoints" / "demo.pt")
    for name, sound, seconds in (("my_clip", "rain", 2), ("drums", "drums", 1.2),
                                 ("song", "piano", 1)):
        audio = sound_world.make_clip(0, SR, 1, sound)[0].numpy()      # 1 s, repeated
        audio = np.tile(audio, math.ceil(seconds))[:, :round(seconds * SR)]
        sf.write(root / f"{name}.wav", audio.T, SR)
    (root / "model_config.json").write_text(json.dumps(sat["diffusion"]["config"]))
    weights = floats(sat["diffusion"]["state_dict"])
    torch.save({"state_dict": weights}, root / "model.ckpt")
    write_safetensors(root / "model.safetensors", weights)


BENCHED = set()      # (section, other flags) run so far, in any document
# sample.py, exercises.py and stable_audio.py read only the stand-ins, the checkpoints and files
# every document makes alike (key.py), and no later command reads what they write: a command one
# document ran runs once, as bench.py's sections do. train.py and assignments.py build on their
# document's earlier commands (--resume, a starter graded), so they run in every document.
STATELESS, RAN = ("sample.py", "exercises.py", "stable_audio.py"), []


def bench_sections_left(argv, done=BENCHED):
    """A bench.py command's sections that have not run yet, in any document, with the same flags
    as far as the section reads them: its flags are checked by bench.py's own parser, and each
    section runs once (this check asks whether a command runs, not what it measures; bench.py
    reads only the checkpoint its flags name, so the documents' copies of the repository run it
    alike)."""
    args = bench.parse_args(argv[1:])
    keys = [section_key(s, args) for s in bench.check_args(args)]
    left = [key for key in keys if key not in done]
    done.update(left)
    return [section for section, _ in left]


# The entries of bench.py's setup that are one flag's value as given; the others (device, size,
# the models) follow from several flags.
PLAIN_FLAGS = ("quick", "steps", "eval_steps", "repeats", "seeds", "cfg_scale")


def section_key(section, args):
    """(section, the flags that decide its run): those it reads, where it reads only setup
    entries that are one flag each and hands setup to nothing else; else all but --only, --out."""
    source = inspect.getsource(bench.BENCHES[section]).split("\n", 1)[1]      # past its def
    read = set(re.findall(r'setup\["(\w+)"\]', source))
    whole = re.search(r"\bsetup\b(?!\[)", source)                  # setup passed on whole
    names = read if read <= set(PLAIN_FLAGS) and not whole else set(vars(args)) - {"only", "out"}
    return section, tuple(sorted((k, str(getattr(args, k))) for k in names))


def run_documented(argv, root, monkeypatch):
    """`python SCRIPT ARGS` as the shell would run it in `root` -> its exit code."""
    monkeypatch.setattr(sys, "argv", argv)
    try:
        runpy.run_path(str(root / argv[0]), run_name="__main__")
    except SystemExit as e:
        return e.code or 0
    return 0


def written_files(argv):
    """The files a command names with --out or --to (a folder or a batch's stem aside)."""
    return [argv[argv.index(flag) + 1] for flag in ("--out", "--to") if flag in argv
            and Path(argv[argv.index(flag) + 1]).suffix and "--n" not in argv]


def run_commands(doc, commands, root, monkeypatch):
    """Run a document's commands in order in `root` -> [(command, why it was skipped)]."""
    argvs = [shlex.split(c, comments=True) for kind, c in commands if kind == "bash"]
    counts = sorted({int(a[i + 1]) for a in argvs if a[:2] == ["python", "train.py"]
                     for i, flag in enumerate(a[:-1]) if flag in STEP_FLAGS})
    ranks = {str(n): i + 1 for i, n in enumerate(counts)}
    ran, skipped = [], []
    for kind, command in commands:
        if kind == "python":
            exec(compile(short_python(command), doc, "exec"), {})
            continue
        reason = next((why for key, why in DOC_SKIPPED.items() if key in command), None)
        if reason is not None:
            skipped.append((command, reason))
            continue
        words = shlex.split(command, comments=True)
        while "=" in words[0]:                      # VARIABLE=value python ...
            monkeypatch.setenv(*words.pop(0).split("=", 1))
        assert words[0] == "python", f"{doc}: cannot run {command!r}"
        argv = short_form(words[1:], ranks)
        if argv in ran or argv[0] in STATELESS and argv in RAN:   # a repeat: it ran once
            continue
        if "--gpu-check" in argv:                   # without a GPU: one line and exit 2
            code = run_documented(argv, root, monkeypatch)
            expected = {0, 1} if torch.cuda.is_available() else {2}    # 1: a check failed
            assert code in expected, f"{doc}: {command!r} exited with {code}"
            ran.append(argv)
            continue
        if argv[0] == "bench.py":
            left = bench_sections_left(argv)
            if not left:
                ran.append(argv)
                continue
            argv = set_flag(argv, "--only", ",".join(left))
        code = run_documented(argv, root, monkeypatch)
        graded = argv[:2] == ["assignments.py", "grade"]        # 1: a student's file fails
        assert code == 0 or graded and code == 1, \
            f"{doc}: {command!r}, run as {argv}, exited with {code}"
        for path in written_files(argv):
            assert (root / path).exists(), f"{doc}: {command!r} did not write {path}"
        ran.append(argv)
        RAN.append(argv)
    return skipped


def run_document(doc, root, sat, monkeypatch):
    """Run a document's commands in a copy of the repository at `root` -> [(command, why it was
    skipped)]."""
    commands = documented_commands(open(os.path.join(REPO, doc), encoding="utf-8").read())
    root.mkdir(parents=True)
    documented_repo(root, sat)
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    for name in ("stable_audio", "released", "sound_world", "training", "train", "sample",
                 "bench", "exercises", "assignments"):
        monkeypatch.delitem(sys.modules, name, raising=False)     # the copy's, when imported
    return run_commands(doc, commands, root, monkeypatch)


def run_documents(out, docs):
    """`python test_stable_audio.py --documents OUT DOC...`: each document's commands in order,
    in one process; OUT/results.json maps each document to None (every command ran) or the
    failure's traceback, written after each document."""
    torch.set_num_threads(1)
    sat, results = torch.load(SAT_FIXTURE, weights_only=True), {}
    for n, doc in enumerate(docs):
        with pytest.MonkeyPatch.context() as monkeypatch:
            try:
                skipped = run_document(doc, Path(out) / f"doc_{n}", sat, monkeypatch)
                assert all(why for _, why in skipped), skipped
                results[doc] = None
            except BaseException:
                results[doc] = traceback.format_exc()
        Path(out, "results.json").write_text(json.dumps(results))
    return 0


@pytest.fixture(scope="session", autouse=True)
def documents(request, tmp_path_factory):
    """The documents' commands take minutes on one core, and most other tests leave the second
    core idle: a session that collects their test starts them at once, in a process of their own
    with one torch thread (beside other processes on 2 cores, two threads slowed training steps
    several times over; docs/exercises.md says so too), and each document's test waits for its
    result. -> (the process, its folder), or None."""
    docs = [item.callspec.params["doc"] for item in request.session.items
            if getattr(item, "originalname", "") == DOCUMENTS_TEST]
    if not docs:
        yield None
        return
    out = tmp_path_factory.mktemp("documents")
    with open(out / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--documents",
                                    str(out), *docs], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   start_new_session=True)
    try:
        yield process, out
    finally:
        if process.poll() is None:                          # the session was stopped early
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


DOCUMENTS_TEST = "test_every_documented_command_runs_in_its_short_form"
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def one_thread_beside_the_documents(documents):
    """While the documents' process runs, each test here uses one torch thread as well: with
    three threads on 2 cores, a thread of a two-thread team waits, spinning, for one that is not
    running, and a training step took thirty times as long."""
    torch.set_num_threads(1 if documents and documents[0].poll() is None else THREADS)
    yield


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_runs_in_its_short_form(doc, documents):
    process, out = documents
    process.wait()
    results = json.loads((out / "results.json").read_text()) \
        if (out / "results.json").exists() else {}
    log = (out / "log.txt").read_text(errors="replace")[-3000:]
    assert doc in results, f"the documents' process ended (exit {process.returncode}) before " \
        f"{doc}:\n{log}"
    assert results[doc] is None, results[doc]


def test_the_skipped_documented_commands_are_the_ones_no_cpu_machine_can_run():
    """Each rule of DOC_SKIPPED matches a documented command, and what it skips needs a GPU,
    another machine or the network (or is this suite): no rule hides a command that could run."""
    used = {key for doc in DOCS
            for kind, command in documented_commands(open(os.path.join(REPO, doc)).read())
            for key in DOC_SKIPPED if kind == "bash" and key in command}
    assert used == set(DOC_SKIPPED)


# ------------------------------------------------------------------------------- the house's shape
import ast  # noqa: E402 (this section's own)

TAG = re.compile(r"(?:Not the paper's|Released, not the paper) \(([^)]+)\)")


def test_every_difference_the_readme_lists_is_tagged_at_its_code():
    """The README's differences table and the tags in the code name the same rows: its grep
    finds each row at least once, and no tag names a row the table lacks."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    table = readme.split("## Where this differs")[1].split("\n\n")[1].splitlines()[2:]
    rows = {line.split("|")[1].strip() for line in table}
    assert len(rows) >= 12 and 'grep -nE "Not the paper\'s \\(|Released, not the paper \\(" *.py' \
        in readme
    tags = {}
    for name in sorted(os.listdir(REPO)):
        if name.endswith(".py") and not name.startswith("test_"):
            for m in TAG.finditer(open(os.path.join(REPO, name), encoding="utf-8").read()):
                tags.setdefault(m.group(1), []).append(name)
    assert rows - set(tags) == set(), "rows without a tag in the code"
    assert set(tags) - rows == set(), "tags that name no row of the README's table"


def our_imports(name):
    """The project's own modules that a file imports, anywhere in it."""
    ours = {n[:-3] for n in os.listdir(REPO) if n.endswith(".py") and n != name}
    tree = ast.parse(open(os.path.join(REPO, name), encoding="utf-8").read())
    found = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for a in node.names}
    found |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module}
    return found & ours


def test_each_file_imports_only_the_rooms_below_it():
    """The model file imports none of ours; the two rooms beside it import the model alone, and
    the training machinery the model and the data; the tools import the model and the rooms,
    never each other, but for one edge: exercises.py --student runs on a student's pieces, put
    in place by assignments.py (the README's file map)."""
    rooms = {"stable_audio": set(), "released": {"stable_audio"}, "sound_world": {"stable_audio"},
             "training": {"stable_audio", "sound_world"}}
    tools = {"sample": set(), "train": set(), "bench": set(), "assignments": set(),
             "exercises": {"assignments"}}
    for name, allowed in rooms.items():
        assert our_imports(f"{name}.py") <= allowed, name
    for tool, also in tools.items():
        assert our_imports(f"{tool}.py") <= set(rooms) | also, tool


if __name__ == "__main__" and sys.argv[1:2] == ["--documents"]:
    sys.exit(run_documents(sys.argv[2], sys.argv[3:]))
