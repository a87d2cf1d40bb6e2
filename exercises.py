"""Six exercises on the ideas of Stable Audio (Evans et al., "Fast Timing-Conditioned Latent Audio
Diffusion", ICML 2024). Each isolates one idea in a small world built so that its effect is large
and shows within minutes on a laptop CPU, using this project's own modules.

    python exercises.py 1                    # timing conditioning (§3.2)
    python exercises.py 3 --seeds 3 --check  # three seeds; exit 1 if the effect is absent
    python exercises.py 4 --student student.py --check   # on your own pieces (assignments.py)

Each exercise prints its figures per seed and their mean, then the range measured over three
seeds on two 2-core CPUs (docs/exercises.md). --check exits with 1 and one line when the effect is
missing: break the idea (zero the timing tokens, swap Snake for ReLU, ...) and the check fails.
Each check tests several parts of its effect; the line names the first part that failed, with its
figure.
Shape alphabet: B batch, C channels, L latent frames, N samples, S tokens.
"""
import argparse
import contextlib
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import assignments
import sound_world
import stable_audio as sa
import training

DEMO = "checkpoints/demo.pt"


def seeded(seed, build):
    """build() with torch's global RNG at `seed` (module initialisation takes no generator),
    leaving the caller's RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def first_failure(parts):
    """A check's verdict from its parts, (passed, line) pairs in order: None when every part
    passed, else the line of the first that failed, which names that part and its figure."""
    return next((line for passed, line in parts if not passed), None)


def halving_failure(effect, error, other, at_most):
    """The exercises' test of an idea, as a check's failure line or None. Its error, a
    (name, value) pair, must be small (at most `at_most`) and at most half of `other`, the
    (name, value) without the idea."""
    (name, value), (other_name, other_value) = error, other
    return first_failure([
        (value <= at_most, f"{effect}: {name} {value:.3f}, expected at most {at_most} "
                           f"({other_name} {other_value:.3f})"),
        (value <= 0.5 * other_value, f"{effect}: {name} {value:.3f} is more than half of "
                                     f"{other_name} {other_value:.3f}")])


def steps_at(steps, scale, least=1):
    """A step count scaled for a quicker run (tests use scale < 1)."""
    return max(least, round(steps * scale))


# -------------------------------------------------------------------------------------------------
# A latent world for exercises 1 and 6: windows of L = 32 latent frames of 64 channels, made
# directly rather than by a VAE. A piece seconds_total "seconds" long (a second is one frame
# here) is a fixed sound latent at a random gain, then a fixed silence latent to the end of the
# window: the one thing to learn is where the sound stops. The U-Net is the project's, small,
# with no padding mask: it can learn the end from the timing tokens alone, as in the paper.
# -------------------------------------------------------------------------------------------------
WINDOW = 32                       # latent frames
SHORTEST, LONGEST = 4, 28         # seconds_total, drawn uniformly, inclusive
WIDTH = 32                        # the timing tokens' width
SOUND = torch.randn(64, generator=torch.Generator().manual_seed(1))
SILENCE = torch.randn(64, generator=torch.Generator().manual_seed(2))
WORLD_UNET = sa.UNetConfig(widths=(32, 32, 32, 64, 64), attentions=(0, 1, 1, 1, 1), heads=4,
                           mapping_features=64, time_frequencies=16)   # padding_mask=False
WORLD_BATCH, WORLD_LR, WORLD_STEPS = 16, 2e-3, 800
SAMPLE_STEPS = 20                 # DPM-Solver++(3M) steps for the world's windows


def latent_world(B, generator):
    """B windows of the world -> z (B, 64, L), seconds_total (B,)."""
    seconds_total = torch.randint(SHORTEST, LONGEST + 1, (B,), generator=generator)
    gain = 0.5 + torch.rand(B, 1, 1, generator=generator)
    inside = (torch.arange(WINDOW) < seconds_total[:, None])[:, None]    # (B, 1, L)
    return SILENCE[:, None] + inside * gain * SOUND[:, None], seconds_total


def sound_level(z):
    """How much of the sound each frame holds: (z - silence) . sound / |sound|^2. (B, L)"""
    return torch.einsum("bcl,c->bl", z - SILENCE[:, None], SOUND) / SOUND.pow(2).sum()


def detected_end(level):
    """The frame T that best splits a window into a steady sound (before T) and silence, by
    least squares: T maximises S_T^2 / T, with S_T the sum of the first T levels. (B,)"""
    S = torch.cat([level.new_zeros(len(level), 1), level.cumsum(1)], 1).clamp(min=0)  # (B, L + 1)
    return (S.pow(2) / torch.arange(WINDOW + 1).clamp(min=1)).argmax(1)


def ending_error(z, seconds_total):
    """Mean |detected end - requested end|, as a fraction of the window."""
    return ((detected_end(sound_level(z)) - seconds_total).abs().float().mean() / WINDOW).item()


def eps_loss(unet, z, context, mask, generator):
    """The ε-objective (Ho et al. 2020) on the same cosine schedule: predict the noise."""
    t = torch.rand(len(z), generator=generator)
    eps = torch.randn(z.shape, generator=generator)
    alpha, sigma = (a[:, None, None] for a in sa.alpha_sigma(t))
    return F.mse_loss(unet(alpha * z + sigma * eps, t, context, mask), eps)


class WorldModel(nn.Module):
    """The timing tokens of §3.2 and a small U-Net predicting v (§4.4) or, in exercise 6, ε."""
    def __init__(self, objective="v"):
        super().__init__()
        self.objective = objective
        self.timing = sa.TimingEmbedding(sa.TimingConfig(max_seconds=WINDOW), WIDTH)
        self.unet = sa.UNet(WORLD_UNET, 64, WIDTH, context_len=2)

    def context(self, seconds_total, tokens=True):
        """Two timing tokens (seconds_start = 0, seconds_total), or zeros instead. (B, 2, C)"""
        context = self.timing(torch.zeros_like(seconds_total), seconds_total)
        return context if tokens else torch.zeros_like(context)

    def loss(self, z, context, mask, generator):
        if self.objective == "v":
            return sa.diffusion_loss(self.unet, z, context, mask, generator, cond_dropout=0.0)
        return eps_loss(self.unet, z, context, mask, generator)

    def v(self, z, t, context, mask):
        """v for the samplers; an ε-model gives v = (ε - sigma z) / alpha."""
        out = self.unet(z, t, context, mask)
        if self.objective == "v":
            return out
        alpha, sigma = (a[:, None, None] for a in sa.alpha_sigma(t))
        return (out - sigma * z) / alpha


def train_world(seed, steps, tokens=True, objective="v", desc="training"):
    """A WorldModel trained on fresh windows of the world, batch 16, Adam."""
    model = seeded(seed, lambda: WorldModel(objective))
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=WORLD_LR)
    for _ in tqdm(range(steps), desc=desc, leave=False):
        z, seconds_total = latent_world(WORLD_BATCH, generator)
        context = model.context(seconds_total, tokens)
        loss = model.loss(z, context, torch.ones(context.shape[:2], dtype=torch.bool), generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def sample_world(model, seconds_total, seed, tokens=True, steps=SAMPLE_STEPS):
    """Windows for the requested seconds_total (B,) by DPM-Solver++(3M). (B, 64, L)"""
    context = model.context(seconds_total, tokens)
    mask = torch.ones(context.shape[:2], dtype=torch.bool)
    sigmas = sa.get_sigmas(steps)
    x = sigmas[0].item() * torch.randn(len(seconds_total), 64, WINDOW,
                                       generator=torch.Generator().manual_seed(seed))
    denoiser = sa.v_to_denoiser(lambda z, t: model.v(z, t, context, mask))
    return sa.SAMPLERS["dpmpp-3m"](denoiser, x, sigmas)


def requests(scale):
    """Every seconds_total of the world, twice (once at smoke scale). (B,)"""
    return torch.arange(SHORTEST, LONGEST + 1).repeat(1 if scale < 1 else 2)


# -------------------------------------------------------------------------------------------------
# Exercise 1. Timing conditioning (§3.2): the two timing tokens, read by cross-attention, tell
# the U-Net where the content ends.
# -------------------------------------------------------------------------------------------------
def exercise_1(seed, scale=1.0):
    """Does a U-Net end its output where the seconds_total token says, from cross-attention alone?

    Two U-Nets train on the same windows, one reading the timing tokens and one reading zeros in
    their place; each then makes windows for every seconds_total from 4 to 28 frames. The error
    is |detected end - requested end| as a fraction of the 32-frame window. Without the tokens a
    model can only guess an end the way the data end: about a quarter of the window away."""
    wanted = requests(scale)
    figures = {}
    for tokens, name in ((True, "with the tokens"), (False, "tokens zeroed")):
        model = train_world(seed, steps_at(WORLD_STEPS, scale), tokens,
                            desc=f"seed {seed}, {name}")
        figures[f"ending error, {name}"] = ending_error(sample_world(model, wanted, seed, tokens),
                                                        wanted)
    return figures


def check_1(r):
    """The tokens must place the end: a small error, at most half of the error without them."""
    return halving_failure("timing conditioning has no effect",
                           ("ending error with the tokens", r["ending error, with the tokens"]),
                           ("with them zeroed", r["ending error, tokens zeroed"]), 0.1)


# -------------------------------------------------------------------------------------------------
# Exercise 2. Classifier-free guidance (§3.4, §4.4) on the bundled demo model, no training:
# v = v_null + scale (v_prompt - v_null), then the CFG rescale (phi = 0.4) of Lin et al.
# -------------------------------------------------------------------------------------------------
GUIDANCE_SCALES = (1, 3, 6, 9, 12)
SOUNDS = ("rain", "piano", "drums")
SECONDS, STEPS = 5, 10            # short clips, few DPM-Solver++(3M) steps: minutes, not hours


def exercise_2(seed, scale=1.0):
    """What does the guidance scale buy, and what does it cost?

    The demo model makes two 5 s clips for each of three prompts at guidance scales 1 to 12,
    with and without the CFG rescale. Its own CLAP scores each clip against its prompt (cosine
    similarity; top-1: the own prompt scores highest of the three); the seed distance is the
    CLAP distance (1 - cosine) between a prompt's two clips; the latent's RMS inside the
    request shows the over-saturation that the rescale holds back."""
    model, _ = sa.load_checkpoint(DEMO)
    prompts = [sound_world.adherence_prompt(s) for s in SOUNDS for _ in range(2)]
    labels = torch.arange(len(SOUNDS)).repeat_interleave(2)
    with torch.inference_mode():
        text = model.clap.embed_text(*model.clap.tokenize(
            [sound_world.adherence_prompt(s) for s in SOUNDS]))               # (3, D)
    runs = [(1, sa.CFG_RESCALE)] + [(s, r) for s in GUIDANCE_SCALES[1:]
                                    for r in (sa.CFG_RESCALE, 0.0)]
    inside = int(model.content_frames(0, SECONDS))        # the latent frames of the request
    figures = {}
    for cfg_scale, rescale in tqdm(runs, desc=f"seed {seed}, guidance", leave=False):
        z = sa.generate(model, prompts, SECONDS, steps=steps_at(STEPS, scale, 2),
                        cfg_scale=cfg_scale, cfg_rescale=rescale, seed=seed * len(prompts),
                        latents=True)                                       # (B, 64, L)
        with torch.inference_mode():
            audio = sa.decode_content(model, z, SECONDS * model.config.sample_rate, None)
            emb = model.clap.embed_audio(audio)                                 # (B, D)
        scores = emb @ text.T                                                   # (B, 3)
        pairs = emb.view(len(SOUNDS), 2, -1)                                    # two per prompt
        name = f"scale {cfg_scale:g}" + (", no rescale" if rescale == 0 else "")
        figures[f"{name}: CLAP own prompt"] = scores[torch.arange(len(labels)), labels].mean()
        figures[f"{name}: top-1"] = (scores.argmax(1) == labels).float().mean()
        figures[f"{name}: seed distance"] = 1 - (pairs[:, 0] * pairs[:, 1]).sum(1).mean()
        figures[f"{name}: latent RMS"] = z[..., :inside].pow(2).mean().sqrt()
    return {k: float(v) for k, v in figures.items()}


def check_2(r):
    """Guidance must raise adherence, and scale 12 without the rescale must inflate the latent."""
    gain = r["scale 6: CLAP own prompt"] - r["scale 1: CLAP own prompt"]
    inflation = r["scale 12, no rescale: latent RMS"] / r["scale 12: latent RMS"]
    return first_failure([
        (gain >= 0.05, f"guidance has no effect on adherence: CLAP own prompt {gain:+.3f} from "
                       f"scale 1 to 6, expected at least +0.05"),
        (inflation >= 1.1, f"the CFG rescale has no effect: latent RMS at scale 12 "
                           f"x{inflation:.2f} without the rescale, expected at least x1.1 "
                           f"(guidance's adherence passed: {gain:+.3f} from scale 1 to 6)")])


# -------------------------------------------------------------------------------------------------
# Exercise 3. Samplers (§3.4): Euler against DPM-Solver++ 2M and 3M, first on Gaussian data,
# where the probability-flow ODE has an exact solution, then on the demo model.
# -------------------------------------------------------------------------------------------------
SAMPLER_NAMES = sound_world.SAMPLERS_BY_ORDER       # orders 1, 2, 3
GAUSS_STEPS = (10, 20, 50, 100)
MODEL_STEPS, REFERENCE_STEPS = (5, 10, 20), 50


def exercise_3(seed, scale=1.0):
    """How fast does each sampler's error fall with the number of steps?

    On Gaussian data the exact answer is known (sound_world.gaussian_sampler_errors): the error
    at 20 and 100 steps and the measured order p (error ~ steps^-p, between 50 and 100 steps; the
    same for every seed). On the demo model, as generate runs it (guidance scale 6, a 5 s request):
    the relative RMS difference of the latent from a 50-step 3M run from the same noise, at 5,
    10 and 20 steps; seed k uses prompt k of rain, piano, drums."""
    figures = {}
    for name in SAMPLER_NAMES:
        errors = [e for e, _ in sound_world.gaussian_sampler_errors(sa.SAMPLERS[name], GAUSS_STEPS)]
        figures[f"{name}: Gaussian error, 20 steps"] = errors[1]
        figures[f"{name}: Gaussian error, 100 steps"] = errors[3]
        orders = sound_world.measured_orders(errors[2:], GAUSS_STEPS[2:])
        figures[f"{name}: Gaussian order"] = orders[0]
    model, _ = sa.load_checkpoint(DEMO)
    prompt = [sound_world.adherence_prompt(SOUNDS[seed % len(SOUNDS)])]
    run = lambda sampler, steps: sa.generate(model, prompt, SECONDS, seed=seed, sampler=sampler,
                                             steps=steps_at(steps, scale, 2), latents=True)
    reference = run("dpmpp-3m", REFERENCE_STEPS)
    jobs = [(n, name) for n in MODEL_STEPS for name in SAMPLER_NAMES]
    for n, name in tqdm(jobs, desc=f"seed {seed}, samplers on the model", leave=False):
        figures[f"{name}: model, {n} steps"] = ((run(name, n) - reference).norm()
                                                / reference.norm()).item()
    return figures


def check_3(r):
    """Orders 1, 2, 3 on the exact problem, and 3M closer than Euler on the model at 20 steps."""
    euler, second, third = (r[f"{name}: Gaussian order"] for name in SAMPLER_NAMES)
    ratio = r["dpmpp-3m: model, 20 steps"] / r["euler: model, 20 steps"]
    return first_failure([
        (0.8 < euler < 1.2, f"Euler is not of order 1: measured {euler:.2f} on Gaussian data, "
                            f"expected 0.8 to 1.2"),
        (second > 1.7, f"DPM-Solver++(2M) is not of order 2: measured {second:.2f} on Gaussian "
                       f"data, expected more than 1.7"),
        (third > 2.6, f"DPM-Solver++(3M) is not of order 3: measured {third:.2f} on Gaussian "
                      f"data, expected more than 2.6"),
        (ratio <= 0.7, f"DPM-Solver++(3M) is no closer than Euler on the model: 3M / Euler at "
                       f"20 steps {ratio:.2f}, expected at most 0.7")])


# -------------------------------------------------------------------------------------------------
# Exercise 4. Snake (§3.1): x + sin^2(alpha x) / alpha against ReLU and ELU (EnCodec's), in the
# smallest network where it can matter, a two-layer MLP fitting a periodic waveform.
# -------------------------------------------------------------------------------------------------
PERIODS, POINTS_PER_PERIOD = 8, 256      # fit 8 periods, then try the next 4
HARMONICS = (1.0, 0.5)                   # a tone: the fundamental and its octave
MLP_WIDTH, MLP_STEPS, MLP_LR = 64, 2000, 1e-3
ACTIVATIONS = {"snake": sa.Snake, "relu": lambda channels: nn.ReLU(),
               "elu": sa.ACTIVATIONS["elu"]}


def waveform(cycles):
    """The tone at times given in periods, from the sound world's wavetable oscillator. (N,)"""
    return torch.from_numpy(sound_world.oscillator(cycles.double().numpy(), HARMONICS)).float()


def mlp(act):
    """Two hidden layers of 1x1 convolutions: an MLP on each time point, in Snake's (B, C, N)."""
    return nn.Sequential(nn.Conv1d(1, MLP_WIDTH, 1), act(MLP_WIDTH),
                         nn.Conv1d(MLP_WIDTH, MLP_WIDTH, 1), act(MLP_WIDTH),
                         nn.Conv1d(MLP_WIDTH, 1, 1))


def exercise_4(seed, scale=1.0):
    """Which activation lets a small network model an oscillation?

    The same MLP (64 wide, two hidden layers, same initial weights) learns 8 periods of a tone
    with Snake, ReLU and ELU, full batch, Adam, 2,000 steps; the input is the time in radians.
    Errors are relative RMS (1 = no better than silence): on the 8 periods it saw (fit) and on
    the 4 that follow (continuation)."""
    seen = torch.arange(PERIODS * POINTS_PER_PERIOD) / POINTS_PER_PERIOD       # (N,) periods
    after = PERIODS + torch.arange(4 * POINTS_PER_PERIOD) / POINTS_PER_PERIOD
    radians = lambda cycles: (2 * math.pi * cycles)[None, None]                # (1, 1, N)
    figures = {}
    for name, act in ACTIVATIONS.items():
        net = seeded(seed, lambda: mlp(act))
        steps = steps_at(MLP_STEPS, scale)
        opt = torch.optim.Adam(net.parameters(), lr=MLP_LR)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)   # settles the last steps
        target = waveform(seen)
        for _ in tqdm(range(steps), desc=f"seed {seed}, {name}", leave=False):
            loss = (net(radians(seen))[0, 0] - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
        with torch.no_grad():
            for part, cycles in (("fit", seen), ("continuation", after)):
                y = waveform(cycles)
                figures[f"{name}: {part} error"] = ((net(radians(cycles))[0, 0] - y).norm()
                                                    / y.norm()).item()
    return figures


def check_4(r):
    """Snake must fit the tone, and at least twice as well as the better of ReLU and ELU."""
    return halving_failure("Snake has no effect", ("fit error", r["snake: fit error"]),
                           ("the best of ReLU and ELU", min(r["relu: fit error"],
                                                            r["elu: fit error"])), 0.4)


# -------------------------------------------------------------------------------------------------
# Exercise 5. The latent's compression (§3.1): 64 latent channels per 512, 1024 or 2048 samples
# of stereo (VAEConfig.strides), against what the U-Net pays per second of audio.
# -------------------------------------------------------------------------------------------------
STRIDES = ((2, 4, 8, 8), (4, 4, 8, 8), (2, 4, 4, 8, 8))   # 512x; 1024x (the paper); 2048x
CODE_CLIPS, HELD_OUT, CLIP_SECONDS = 128, 16, 4.0


def frames(clips, hop):
    """Stereo clips cut into frames of `hop` samples, both channels side by side. (frames, 2 hop)"""
    return torch.cat([a[:, :a.shape[1] // hop * hop].reshape(2, -1, hop).transpose(0, 1)
                      .reshape(-1, 2 * hop) for a in clips]).double()


def linear_code_loss(train_clips, test_clips, hop, channels=64):
    """The share of a held-out clip's energy lost by the best linear code of `channels` numbers
    per frame, averaged over the clips: its projection onto the top principal components of the
    training frames (PCA: the best linear encoder and decoder for non-overlapping frames)."""
    basis = torch.linalg.svd(frames(train_clips, hop), full_matrices=False)[2][:channels].T
    # basis: (2 hop, channels), the principal directions of the training frames
    lost = [(Y - Y @ basis @ basis.T).pow(2).sum() / Y.pow(2).sum()
            for Y in (frames([a], hop) for a in test_clips)]
    return torch.stack(lost).mean().item()


def unet_gflops_per_second(hop):
    """One pass of the full-size U-Net over the paper's 95 s window at this hop, counted (not
    timed) on PyTorch's meta device, per second of audio."""
    config = sa.SIZES["full"]
    L = config.window // hop
    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet = sa.UNet(config.unet, config.vae.latent_dim, config.clap.text_width,
                       config.context_len)
        unet(torch.zeros(1, config.vae.latent_dim, L), torch.zeros(1),
             torch.zeros(1, config.context_len, config.clap.text_width),
             torch.ones(1, config.context_len, dtype=torch.bool))
    return counter.get_total_flops() / 1e9 / (config.window / config.sample_rate)


def exercise_5(seed, scale=1.0):
    """What does each doubling of the latent's compression lose, and what does it save?

    Reconstruction: the best linear code of 64 numbers per hop (the VAE's 64 channels per
    latent frame) is fitted to 128 sound-world clips and tested on 16 others; the figure is the
    share of their energy it loses (0 is perfect). A trained VAE does better than a linear code,
    but not by changing what 64 numbers per hop can hold. Cost: GFLOPs of one full-size U-Net
    pass per second of audio, over the paper's 95 s window."""
    sr = sa.SIZES["full"].sample_rate
    n = steps_at(CODE_CLIPS, scale, 4)
    clips = [sound_world.make_clip(seed * 10_000 + i, sr, CLIP_SECONDS)[0]
             for i in tqdm(range(n + HELD_OUT), desc=f"seed {seed}, clips", leave=False)]
    clips = [a / a.pow(2).mean().sqrt() for a in clips]     # soft and loud clips count alike
    figures = {}
    for strides in tqdm(STRIDES, desc=f"seed {seed}, compressions", leave=False):
        hop = math.prod(strides)
        figures[f"{hop}x: energy lost"] = linear_code_loss(clips[:n], clips[n:], hop)
        figures[f"{hop}x: U-Net GFLOPs per second"] = unet_gflops_per_second(hop)
    return figures


def check_5(r):
    """A longer hop must lose more (1.4 times as much at 2048x as at 512x), and cost less."""
    lost = [r[f"{hop}x: energy lost"] for hop in (512, 1024, 2048)]
    cost = [r[f"{hop}x: U-Net GFLOPs per second"] for hop in (512, 1024, 2048)]
    return first_failure([
        (lost[0] < lost[1], f"compression shows no trade-off: energy lost {lost[1]:.3f} at "
                            f"1024x, expected more than the {lost[0]:.3f} at 512x"),
        (lost[1] < lost[2], f"compression shows no trade-off: energy lost {lost[2]:.3f} at "
                            f"2048x, expected more than the {lost[1]:.3f} at 1024x"),
        (lost[2] >= 1.4 * lost[0], f"compression shows no trade-off: energy lost at 2048x "
                                   f"x{lost[2] / lost[0]:.2f} that at 512x, expected at least "
                                   f"x1.4"),
        (cost[0] >= 3 * cost[2], f"compression saves no compute: U-Net cost at 512x "
                                 f"x{cost[0] / cost[2]:.2f} that at 2048x, expected at least x3")])


# -------------------------------------------------------------------------------------------------
# Exercise 6. The v-objective (§4.4) against ε-prediction, in exercise 1's world.
# -------------------------------------------------------------------------------------------------
OBJECTIVE_STEPS = (10, 50)               # sampler steps: few, and many


def exercise_6(seed, scale=1.0):
    """Why predict v rather than the noise ε?

    Two U-Nets with the timing tokens train on exercise 1's world, one on the v-objective
    (sa.diffusion_loss), one on ε. Both sample from sigma = 80 (generate's schedule), where
    a denoiser built on ε multiplies the network's error by sigma / alpha and one built on v
    does not. Figures: the ending error as in exercise 1, and the RMS of the generated latents
    over that of the world's (1 is right) at 10 and 50 sampler steps."""
    wanted = requests(scale)
    world_rms = latent_world(256, torch.Generator().manual_seed(0))[0].pow(2).mean().sqrt()
    figures = {}
    for objective in ("v", "eps"):
        model = train_world(seed, steps_at(WORLD_STEPS, scale), objective=objective,
                            desc=f"seed {seed}, {objective}-objective")
        for steps in OBJECTIVE_STEPS:
            z = sample_world(model, wanted, seed, steps=steps_at(steps, scale, 2))
            figures[f"{objective}: ending error, {steps} steps"] = ending_error(z, wanted)
            figures[f"{objective}: RMS / world's, {steps} steps"] = (z.pow(2).mean().sqrt()
                                                                     / world_rms).item()
    return figures


def check_6(r):
    """The v-model must end on time at few steps, with at most half the ε-model's error."""
    return halving_failure("the v-objective shows no advantage",
                           ("ending error at 10 steps with v", r["v: ending error, 10 steps"]),
                           ("with ε", r["eps: ending error, 10 steps"]), 0.1)


# -------------------------------------------------------------------------------------------------
# The command line.
# -------------------------------------------------------------------------------------------------
EXERCISES = {  # number: (title, function, check)
    1: ("timing conditioning (§3.2)", exercise_1, check_1),
    2: ("classifier-free guidance (§3.4)", exercise_2, check_2),
    3: ("samplers (§3.4)", exercise_3, check_3),
    4: ("Snake (§3.1)", exercise_4, check_4),
    5: ("the latent's compression (§3.1)", exercise_5, check_5),
    6: ("the v-objective (§4.4)", exercise_6, check_6),
}
EXPECTED = {  # seeds 0, 1, 2 on two 2-core machines, 2026-12-02 (docs/exercises.md): an Intel Xeon
    # on one torch thread and an AMD EPYC on two; the ranges cover both, the times are per seed
    1: "ending error 0.013-0.031 of the window with the tokens, 0.23-0.27 with them zeroed; "
       "2-6 min a seed",
    2: "CLAP own prompt 0.19-0.25 at scale 1, 0.34-0.40 at 6, 0.37-0.38 at 12; latent RMS "
       "2.4-2.7 at 1, at 12 5.0-5.2 with the rescale and 6.0-6.4 without; 90-100 s a seed",
    3: "Gaussian orders 0.99, 1.80, 3.13; on the model at 20 steps Euler 0.09-0.27, 2M "
       "0.013-0.15, 3M 0.009-0.13 (3M / Euler 0.10-0.49); 25-35 s a seed",
    4: "fit error Snake 0.09-0.25, ReLU 0.94-0.96, ELU 0.89-0.90; continuation Snake 0.76-0.94, "
       "ReLU 1.03-1.09, ELU 1.10-1.16; 16-40 s a seed",
    5: "energy lost 0.21-0.30 at 512x, 0.31-0.40 at 1024x, 0.43-0.50 at 2048x; U-Net 53.9, "
       "24.1, 11.3 GFLOPs per second of audio; 55-75 s a seed",
    6: "ending error 0.013-0.031 with v, 0.29-0.36 with ε at 10 and 50 steps; RMS over the "
       "world's 1.10-1.16 with v, 46 with ε; 2-5 min a seed",
}


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def scale_factor(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def parse_args(argv):
    p = training.Parser(description="Six exercises on Stable Audio's ideas, each a few minutes on "
                              "a laptop CPU: " + "; ".join(f"{n} {t}" for n, (t, _, _) in
                                                         EXERCISES.items()) + ".")
    p.add_argument("exercise", type=int, choices=sorted(EXERCISES),
                   help="which exercise to run, 1 to 6")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="run it for seeds 0 .. K-1 and report each and the mean (default 1)")
    p.add_argument("--check", action="store_true",
                   help="exit with 1 and one line if the mean figures miss the expected effect")
    p.add_argument("--student", default=None, metavar="FILE",
                   help="run on your own pieces: every function of an assignments.py starter "
                        "that you have written replaces the reference's for the run")
    p.add_argument("--scale", type=scale_factor, default=1.0,
                   help="shrink training and sampling, for a smoke test; the expected ranges and "
                        "--check hold at 1 (the default) only")
    return p.parse_args(argv)


def mean_figures(per_seed):
    """The mean of each figure over seeds."""
    return {k: sum(r[k] for r in per_seed) / len(per_seed) for k in per_seed[0]}


def print_figures(per_seed):
    """One row per figure: each seed, then the mean."""
    names = [f"seed {i}" for i in range(len(per_seed))] + (["mean"] if len(per_seed) > 1 else [])
    means = mean_figures(per_seed)
    width = max(len(k) for k in means)
    print(f"{'':{width}}  " + "  ".join(f"{n:>8}" for n in names))
    for k in means:
        values = [r[k] for r in per_seed] + ([means[k]] if len(per_seed) > 1 else [])
        print(f"{k:{width}}  " + "  ".join(f"{v:8.3g}" for v in values))


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        title, exercise, check = EXERCISES[args.exercise]
        print(f"Exercise {args.exercise}: {title}. {exercise.__doc__.splitlines()[0]}")
        start, pieces = time.perf_counter(), []
        student = args.student and assignments.load_student(args.student)
        if student:
            pieces = assignments.written_pieces(student)
            if not pieces:
                raise training.UsageError(f"{args.student} has no piece written yet; fill in the "
                                    f"functions of `python assignments.py starter`")
            print(f"with your {', '.join(pieces)}; the rest is stable_audio's")
        with assignments.swapped_in(student, pieces) if student else contextlib.nullcontext():
            per_seed = [exercise(seed, args.scale) for seed in range(args.seeds)]
    except (FileNotFoundError, ValueError, assignments.NotImportable) as e:  # UsageError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_figures(per_seed)
    print(f"time: {time.perf_counter() - start:.0f} s for {args.seeds} seed(s), "
          f"{torch.get_num_threads()} torch threads")
    print(f"expected: {EXPECTED[args.exercise]}" if args.scale == 1 else
          f"--scale {args.scale:g}: a smoke run; the expected ranges hold at scale 1 only")
    if args.check:
        failure = check(mean_figures(per_seed))
        if failure is not None:
            print(f"check failed: {failure}", file=sys.stderr)
            return 1
        print("check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
