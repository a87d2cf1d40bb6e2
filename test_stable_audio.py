"""Tests for stable_audio.py, in the module's order. Each compares with something independent:
a closed form, an exact solution, or a property that must hold."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import stable_audio as sa

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


def test_build_model_rejects_window_not_divisible_by_vae_and_unet_strides():
    with pytest.raises(ValueError, match="multiple of 16384"):
        sa.build_model(replace(sa.SIZES["tiny"], window=2 ** 17 + 1024))
    with pytest.raises(ValueError, match="unknown size"):
        sa.build_model("huge")


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


# ---------------------------------------------------------------------------------- CLAP
def test_tokenizer_round_trip_and_truncation():
    prompts = ["ambient rain", "Café, 120 BPM | Mood: 😊", ""]
    tokens, mask = sa.tokenize(prompts, 64)
    assert sa.detokenize(tokens) == prompts
    assert mask.sum(1).tolist() == [len(p.encode()) + 2 for p in prompts]   # + BOS, EOS
    long = "x" * 500
    tokens, mask = sa.tokenize([long], 128)
    assert tokens.shape == (1, 128) and bool(mask.all())
    assert sa.detokenize(tokens) == ["x" * 126] and tokens[0, -1] == sa.EOS


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


def test_log_mel_of_a_sine_peaks_in_the_band_holding_its_frequency(model):
    cfg, sr = model.clap.cfg, 44100
    n = torch.arange(sr) / sr
    for f in (300.0, 2000.0, 9000.0):
        mel = model.clap.log_mel(torch.sin(2 * math.pi * f * n).repeat(1, 2, 1))
        band = mel[0, :, 10:-10].mean(1).argmax().item()
        centres = 700 * (10 ** (torch.linspace(0, 2595 * math.log10(1 + sr / 2 / 700),
                                               cfg.n_mels + 2) / 2595) - 1)[1:-1]
        assert abs(band - (centres - f).abs().argmin().item()) <= 1


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


def test_context_is_text_plus_two_timing_tokens_and_the_mask_hides_padding(model):
    context, mask = model.condition(["rain"], [0], [30])
    S = model.cfg.clap.text_len
    assert context.shape == (1, S + 2, model.cfg.clap.text_width)
    assert mask[0].tolist() == [True] * 6 + [False] * (S - 6) + [True, True]  # BOS rain EOS
    z, t = torch.randn(1, 64, 32), torch.tensor([0.3])
    noisy = context.clone()
    noisy[~mask] = 100 * torch.randn(int((~mask).sum()), context.shape[-1])
    with torch.no_grad():
        torch.testing.assert_close(model.unet(z, t, noisy, mask), model.unet(z, t, context, mask))


# ---------------------------------------------------------------------------------- U-Net
@pytest.mark.parametrize("L", [16, 48, 128])
def test_unet_output_shape_equals_input_shape(model, L):
    context, mask = model.condition(["wind", "fire"], [0, 3], [10, 20])
    x = torch.randn(2, 64, L)
    with torch.no_grad():
        assert model.unet(x, torch.rand(2), context, mask).shape == x.shape


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


# ---------------------------------------------------------------------------------- diffusion
class OracleUNet(torch.nn.Module):
    """Knows the clean latent, so it can return the exact v = (alpha z_t - z) / sigma."""
    def __init__(self, z, context_shape):
        super().__init__()
        self.z, self.null_context = z, torch.nn.Parameter(torch.zeros(context_shape))

    def forward(self, z_t, t, context, mask):
        alpha, sigma = (a[:, None, None] for a in sa.alpha_sigma(t))
        return (alpha * z_t - self.z) / sigma


def test_diffusion_loss_is_zero_for_the_true_v_and_one_for_zero_output():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 8, 32, generator=g)
    context, mask = torch.zeros(64, 5, 4), torch.ones(64, 5, dtype=torch.bool)
    oracle = OracleUNet(z, (5, 4))
    assert sa.diffusion_loss(oracle, z, context, mask, g).item() < 1e-8
    zero = OracleUNet(z, (5, 4))
    zero.forward = lambda z_t, t, c, m: torch.zeros_like(z_t)
    # E[v^2] = alpha^2 E[eps^2] + sigma^2 E[z^2] = 1 for unit-variance z and eps
    assert sa.diffusion_loss(zero, z, context, mask, g).item() == pytest.approx(1, abs=0.05)


def test_conditioning_dropout_swaps_in_the_null_context_at_the_given_rate():
    seen = []

    class Spy(OracleUNet):
        def forward(self, z_t, t, context, mask):
            seen.append((context == self.null_context).all(-1).all(-1))
            return torch.zeros_like(z_t)
    z = torch.zeros(4000, 1, 1)
    spy = Spy(z, (3, 2))
    with torch.no_grad():
        spy.null_context.fill_(7.0)
    sa.diffusion_loss(spy, z, torch.zeros(4000, 3, 2), torch.ones(4000, 3, dtype=torch.bool),
                      torch.Generator().manual_seed(0))
    assert seen[0].float().mean().item() == pytest.approx(0.1, abs=0.015)


# ---------------------------------------------------------------------------------- sampling
MU, S_DATA = 0.3, 0.1                    # Gaussian data x0 ~ N(MU, S_DATA^2)


def gaussian_denoiser(x, sigma):
    """E[x0 | x0 + sigma eps = x] for Gaussian data: the exact denoiser."""
    return MU + S_DATA ** 2 / (S_DATA ** 2 + sigma ** 2) * (x - MU)


def exact_flow(x, sigma_from, sigma_to):
    """The probability-flow ODE dx/dsigma = (x - D) / sigma solved exactly for Gaussian data."""
    return MU + (x - MU) * math.sqrt((S_DATA ** 2 + sigma_to ** 2) / (S_DATA ** 2 + sigma_from ** 2))


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
    assert measured_order(sampler_errors(sa.sample_euler, STEPS), STEPS) == pytest.approx(1, abs=0.2)


def test_dpmpp_2m_is_second_order():
    order = measured_order(sampler_errors(sa.sample_dpmpp_2m, STEPS), STEPS)
    assert order == pytest.approx(2, abs=0.2)


def test_dpmpp_3m_is_third_order_and_beats_2m_at_20_steps():
    errors = sampler_errors(sa.sample_dpmpp_3m, STEPS)
    assert measured_order(errors, STEPS) == pytest.approx(3, abs=0.3)
    assert errors[0] < sampler_errors(sa.sample_dpmpp_2m, [20])[0] / 3


def test_sampler_ending_at_sigma_zero_returns_the_denoised_estimate():
    x = torch.randn(10, dtype=torch.float64)
    sigmas = sa.get_sigmas(5, 0.5, 10.0)
    assert sigmas[-1] == 0 and len(sigmas) == 6
    seen = []

    def denoiser(x, sigma):
        seen.append(x.clone())
        return gaussian_denoiser(x, sigma)
    out = sa.sample_dpmpp_3m(denoiser, x, sigmas)
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


def test_generate_refuses_seconds_outside_the_window(model):
    for bad in (0, -1, SHORT.window / 44100 + 1):
        with pytest.raises(ValueError, match="window"):
            sa.generate(model, ["rain"], seconds_total=bad, steps=2)


def test_generate_stops_on_non_finite_latents(model):
    broken = sa.build_model(SHORT).eval()
    with torch.no_grad():
        broken.unet.to_out.block2[1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="float32"):
        sa.generate(broken, ["rain"], seconds_total=1, steps=2)


# ---------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_loads_with_weights_only(model, tmp_path):
    path = tmp_path / "m.pt"
    sa.save_checkpoint(path, model, step=7)
    raw = torch.load(path, weights_only=True)                   # plain tensors and values only
    assert raw["step"] == 7 and raw["size"] == "tiny"
    loaded, ckpt = sa.load_checkpoint(path)
    assert loaded.cfg == model.cfg and not (tmp_path / "m.pt.tmp").exists()
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_checkpoint_prefers_ema_weights(model, tmp_path):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sa.save_checkpoint(tmp_path / "m.pt", model, ema=ema)
    with_ema, _ = sa.load_checkpoint(tmp_path / "m.pt")
    without, _ = sa.load_checkpoint(tmp_path / "m.pt", ema=False)
    torch.testing.assert_close(with_ema.timing.start.weight, model.timing.start.weight + 1)
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
                "config": sa.asdict(model.cfg), "model": {}}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="missing"):
        sa.load_checkpoint(tmp_path / "empty.pt")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"format": sa.CHECKPOINT_FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="damaged or not a checkpoint"):
        sa.load_checkpoint(tmp_path / "evil.pt")
