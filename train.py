"""Train Stable Audio's three stages (paper §4): the VAE, the CLAP text/audio encoders, and the
latent diffusion U-Net, on a folder of audio with captions or on the built-in procedural sound
world (both from sound_world.py).

    python train.py vae --size tiny --data toy --steps 2000
    python train.py clap --size tiny --data toy --steps 2000
    python train.py diffusion --size tiny --data toy --steps 4000
    torchrun --nproc_per_node 8 train.py diffusion --size full --data DIR --grad-accum 4

The file reads as §4: the defaults, then each stage as a plain loop (batch, the paper's losses
with their weights, backward, step, EMA), then the discriminator, export and the command line.
The machinery the loops stand on (ranks, noise streams, checkpoints and --resume, Ctrl-C,
held-out figures and demos, the latent cache) is in training.py. Each stage writes OUT/STAGE.pt
(resumable with --resume), OUT/STAGE.log and OUT/STAGE.csv (one row per step, with held-out
figures every --eval-every steps), and demos under OUT/demos/. Under torchrun each rank trains
on its own share of every batch (DistributedDataParallel); rank 0 alone writes.
Shape alphabet: B batch, C channels, L latent frames, N samples.
"""
import argparse
import functools
import math
import os
import sys
import warnings
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import stable_audio as sa
import released
import training
from training import Stop, TrainingError, autocast, clip_and_step

# -------------------------------------------------------------------------------------------------
# §4 defaults. Per stage and size: (batch size per micro-batch, learning rate). Full size: the
# VAE's 1e-4 (AdamW, betas 0.8, 0.99) and the U-Net's 4e-5 (Adam) are the released configs'; the
# paper gives neither. CLAP's 1e-4 is ours: the paper trains its CLAP (batch 6,144), no rate
# given. The VAE's loss weights are the paper's §4.2 (the released config weights the KL 1e-6).
# -------------------------------------------------------------------------------------------------
DEFAULTS = {
    "vae": {"full": (8, 1e-4), "small": (8, 1e-4), "tiny": (4, 5e-4)},
    "clap": {"full": (64, 1e-4), "small": (64, 1e-4), "tiny": (16, 1e-3)},
    "diffusion": {"full": (8, 4e-5), "small": (8, 1e-4), "tiny": (4, 5e-4)},
}
LOSS_WEIGHTS = {"spectral": 1.0, "adversarial": 0.1, "feature": 5.0, "kl": 1e-4}
VAE_CROP = 65536                        # samples of a VAE training clip, 1.5 s, as released


# -------------------------------------------------------------------------------------------------
# §4.2 The VAE, on short crops: reconstruction (stable_audio.stereo_loss, a multi-resolution STFT
# loss on the channels' sum and difference) and the KL term from the start; from --disc-start
# on (0 as released) also an adversarial loss and feature matching against a discriminator that
# learns beside it. Phase 2 (--freeze-encoder) trains the decoder alone.
# -------------------------------------------------------------------------------------------------
def train_vae(args):
    model, state = training.prepare(args, "vae", model_config)
    device, config = training.pick_device(args.device), model.config
    if args.init and not state:    # e.g. phase 2 on the demo's VAE: --init checkpoints/demo.pt
        training.load_part(model, "vae", args.init, "--init")
    model.to(device).train()
    vae = model.vae
    disc = Discriminator(config.vae.channels, DISC_FILTERS.get(config.size, 32)).to(device)
    if state:
        disc.load_state_dict(state["discriminator"])
    freeze_encoder(vae, args, state)
    # Released config: AdamW, betas (0.8, 0.99), for both. AdamW skips parameters without
    # gradients, so a phase-1 checkpoint's optimizer state resumes into phase 2.
    opt_g = torch.optim.AdamW(vae.parameters(), args.lr, betas=(0.8, 0.99))
    opt_d = torch.optim.AdamW(disc.parameters(), args.lr, betas=(0.8, 0.99))
    crop = args.crop or VAE_CROP
    net = args.ranks.wrap(training.Forward(vae, functools.partial(reconstruct, device=device,
                                                                   dtype=args.dtype)))
    critic = args.ranks.wrap(training.Forward(disc, discriminator_loss))
    with training.Run(args, model, [opt_g, opt_d], state,
                      extra=lambda: {"discriminator": disc.state_dict()}) as run:
        data, held = training.make_data(args, config)
        data = training.prefetch(data, args, run.first_step, window=crop)
        for step, micro in run.steps(lambda index: data.batch(args.batch_size, index, crop),
                                     training.HeldOutVAE(args, held, crop, device)):
            audio = [batch["audio"].to(device) for batch, _ in micro]         # (B, 2, N) each
            adversarial = step >= args.disc_start
            graphs = (train_discriminator(run, net, critic, opt_d, audio, micro) if adversarial
                      else [None] * len(micro))
            opt_g.zero_grad(set_to_none=True)
            for m, (x, (_, generator)) in enumerate(zip(audio, micro)):
                with run.sync(net, m):
                    x_hat, mean, std = graphs[m] or net(x, generator)
                    losses = {"spectral": sa.stereo_loss(x_hat, x, config.sample_rate),
                              "kl": sa.kl_divergence(mean, std)}
                    if adversarial:
                        losses["adversarial"], losses["feature"] = generator_losses(disc, x, x_hat)
                    loss = sum(LOSS_WEIGHTS[k] * v for k, v in losses.items())   # §4.2's sum
                    (loss / len(micro)).backward()
                run.record(losses)
            clip_and_step(opt_g, vae.parameters(), args.clip)
            run.ema.update(model, step)
    return run.averaged


def reconstruct(vae, x, generator, device, dtype):
    """Audio (B, 2, N) -> x_hat (B, 2, N) decoded from z ~ q(z | x), and the posterior's mean and
    std (B, 64, L)."""
    with autocast(device, dtype):
        mean, std = vae.encode(x)
        z = mean + std * sa.randn(mean.shape, generator, mean)
        return vae.decode(z)[..., :x.shape[-1]].float(), mean.float(), std.float()


def freeze_encoder(vae, args, state):
    """Phase 2 (§4.2): the encoder frozen, the decoder trained. The diffusion stage encodes with
    the EMA weights; phase 2 freezes exactly those, so the latents a U-Net learned on stay the
    same while the decoder improves."""
    vae.encoder.requires_grad_(not args.freeze_encoder)
    if args.freeze_encoder and state:
        vae.encoder.load_state_dict({k[len("vae.encoder."):]: v for k, v in state["ema"].items()
                                     if k.startswith("vae.encoder.")})


def train_discriminator(run, net, critic, opt_d, audio, micro):
    """One step of the discriminator's hinge loss, before the generator's (which then meets the
    updated discriminator). -> the generator's graphs to reuse: with one micro-batch its
    reconstruction is kept for the generator's step; with several, each is reconstructed here
    without a graph (from a copy of its noise) and again there, so one graph at a time is alive."""
    K, graphs = len(micro), [None] * len(micro)
    opt_d.zero_grad(set_to_none=True)
    for m, (x, (_, generator)) in enumerate(zip(audio, micro)):
        if K == 1:
            graphs[m] = net(x, generator)
            x_hat = graphs[m][0]
        else:
            with torch.no_grad():
                x_hat = net(x, training.copy_of(generator))[0]
        with run.sync(critic, m):
            d_loss = critic(x, x_hat)
            (d_loss / K).backward()
        run.record({"disc": d_loss})
    clip_and_step(opt_d, critic.parameters(), run.args.clip)
    return graphs


# -------------------------------------------------------------------------------------------------
# §4.3 CLAP: the text and audio towers learn one space from (caption, clip) pairs, by the
# symmetric contrastive loss (stable_audio.CLAP.loss); on R ranks every caption meets every clip
# of the R micro-batches, as in one process at R times the batch (LAION-CLAP gathers the same way).
# -------------------------------------------------------------------------------------------------
def train_clap(args):
    model, state = training.prepare(args, "clap", model_config)
    device, config = training.pick_device(args.device), model.config
    if args.init and not state:    # e.g. the demo's CLAP, further on your own captions
        training.load_part(model, "clap", args.init, "--init")
    model.to(device).train()
    clap = model.clap
    opt = torch.optim.AdamW(clap.parameters(), args.lr)         # ours: the paper names none
    crop = min(args.crop or 10 * config.sample_rate, config.window)
    net = args.ranks.wrap(training.Forward(clap, functools.partial(
        contrastive_loss, ranks=args.ranks, device=device, dtype=args.dtype)))
    with training.Run(args, model, [opt], state) as run:
        data, held = training.make_data(args, config)
        data = training.prefetch(data, args, run.first_step, window=crop)
        for step, micro in run.steps(lambda index: data.batch(args.batch_size, index, crop),
                                     training.HeldOutCLAP(args, held, crop, device)):
            opt.zero_grad(set_to_none=True)
            for m, (batch, _) in enumerate(micro):
                tokens, mask = clap.tokenize(batch["prompts"])
                with run.sync(net, m):
                    loss = net(tokens, mask, batch["audio"].to(device))
                    (loss / len(micro)).backward()
                run.record({"loss": loss})
            clip_and_step(opt, clap.parameters(), args.clip)
            run.ema.update(model, step)
    return run.averaged


def contrastive_loss(clap, tokens, mask, audio, ranks, device, dtype):
    """§4.3's loss over the captions and clips of every rank's micro-batch."""
    with autocast(device, dtype):
        return clap.loss(ranks.concat(clap.embed_text(tokens, mask)),
                         ranks.concat(clap.embed_audio(audio))).float()


# -------------------------------------------------------------------------------------------------
# §4.4 The U-Net: the v-objective (stable_audio.diffusion_loss) on latents of the frozen VAE,
# conditioned on the frozen CLAP's text features and the timing embeddings, which train with it;
# 10 % of the samples see the null context, for classifier-free guidance.
# -------------------------------------------------------------------------------------------------
def train_diffusion(args):
    model, state = training.prepare(args, "diffusion", model_config)
    if state is None:
        load_parts(model, args)
    device, config = training.pick_device(args.device), model.config
    model.to(device).train()
    for frozen in (model.vae, model.clap):
        frozen.requires_grad_(False).eval()
    model.timing.requires_grad_(config.timing.enabled)      # --no-timing leaves the tables unused
    model.unet.set_checkpointing(args.grad_checkpointing)
    params = [*model.unet.parameters(), *model.timing.parameters()]
    opt = torch.optim.Adam(params, args.lr)     # released config: Adam, no weight decay
    net = args.ranks.wrap(training.Forward(model, functools.partial(v_loss, device=device,
                                                                     dtype=args.dtype)))
    with training.Run(args, model, [opt], state) as run:
        data, held = latent_data(args, model, state, device, run.first_step)
        for step, micro in run.steps(lambda index: data.batch(args.batch_size, index),
                                     training.HeldOutDiffusion(args, held, device)):
            opt.zero_grad(set_to_none=True)
            for m, (batch, generator) in enumerate(micro):
                z = latents(model, batch, generator, device, args.dtype)      # (B, 64, L)
                with run.sync(net, m):
                    loss = net(z, batch["prompts"], batch["seconds_start"],
                               batch["seconds_total"], generator)
                    (loss / len(micro)).backward()
                run.record({"loss": loss, "latent_std": z.float().std()})
            clip_and_step(opt, params, args.clip)
            run.ema.update(model, step)
    return run.averaged


def v_loss(model, z, prompts, seconds_start, seconds_total, generator, device, dtype):
    """§4.4's loss for latents z (B, 64, L) and their captions and timing: the forward pass that
    DistributedDataParallel syncs (the U-Net and timing train; the rest is frozen)."""
    with autocast(device, dtype):
        context, mask = model.condition(prompts, seconds_start, seconds_total)
        content_frames = model.content_frames(seconds_start, seconds_total)
        return sa.diffusion_loss(model.unet, z, context, mask, generator,
                                 content_frames=content_frames.to(device))


@torch.no_grad()
def latents(model, batch, generator, device, dtype):
    """A batch's latents z ~ q(z | x) (B, 64, L), times the latent scale: from the latent cache's
    posteriors, or the frozen VAE encoding the batch's audio."""
    with autocast(device, dtype):
        if "mean" in batch:
            mean, std = batch["mean"].to(device), batch["std"].to(device)
        else:
            mean, std = training.encode_clips(model.vae, batch["audio"], device)
        z = mean + std * sa.randn(mean.shape, generator, mean)
        return z * model.config.latent_scale


def load_parts(model, args):
    """A fresh diffusion run's trained parts: the VAE and CLAP (--vae, --clap, or this run's
    OUT), and with --init another run's U-Net and timing embeddings, to fine-tune."""
    training.load_part(model, "vae", args.vae or os.path.join(args.out, "vae.pt"), "--vae",
                       "the diffusion stage")
    training.load_part(model, "clap", args.clap or os.path.join(args.out, "clap.pt"), "--clap",
                       "the diffusion stage")
    if args.init and args.stage == "diffusion":
        source = training.load_part(model, ("unet", "timing"), args.init, "--init")
        if args.latent_scale is None:                 # it keeps the scale it learned at
            model.config.latent_scale = source.config.latent_scale


def latent_data(args, model, state, device, first_step):
    """(the data the U-Net trains on, held-out data): the latent cache (--latent-cache N) or
    batches of audio; a fresh run with --latent-scale auto measures its scale here."""
    data, held = training.make_data(args, model.config)
    if args.latent_cache:
        data = training.LatentCache(model, data, args.latent_cache, device, args)
    if state is None and args.latent_scale == "auto":
        model.config.latent_scale = training.latent_scale(data, model, device, args)
    print(f"diffusion: latent scale {model.config.latent_scale:g}")
    return data if args.latent_cache else training.prefetch(data, args, first_step), held


STAGES = {"vae": train_vae, "clap": train_clap, "diffusion": train_diffusion}


# -------------------------------------------------------------------------------------------------
# §4.2 The discriminator: multi-scale STFT discriminators with a hinge loss, plus feature matching
# (weights 0.1 adversarial, 5.0 feature matching in LOSS_WEIGHTS).
# -------------------------------------------------------------------------------------------------
DISC_SIZES = (2048, 1024, 512, 256, 128)
# Discriminator width per model size: the released 32 filters cost ~36 GMAC per second of stereo
# per pass, most of a tiny VAE step on a CPU; 8 filters cost 1/16 of that.
DISC_FILTERS = {"full": 32, "small": 32, "tiny": 8}


def WNConv2d(*args, **kwargs):
    return weight_norm(nn.Conv2d(*args, **kwargs))


class STFTDiscriminator(nn.Module):
    """One scale: 2-D convolutions over the complex spectrogram (real and imaginary parts of
    both channels as 4 input planes), strided along frequency, dilated along time."""
    def __init__(self, n_fft, channels=2, filters=32):
        super().__init__()
        self.n_fft = n_fft
        self.convs = nn.ModuleList([
            nn.Conv2d(2 * channels, filters, (3, 9), padding=(1, 4)),
            *[WNConv2d(filters, filters, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4))
              for d in (1, 2, 4)],
            WNConv2d(filters, filters, (3, 3), padding=(1, 1))])
        self.post = WNConv2d(filters, 1, (3, 3), padding=(1, 1))

    def forward(self, x):
        """Audio (B, 2, N) -> patch logits and the feature map of every layer."""
        B, C, N = x.shape
        spec = torch.stft(x.float().reshape(B * C, N), self.n_fft, self.n_fft // 4,
                          window=torch.hann_window(self.n_fft, device=x.device),
                          normalized=True, center=False, return_complex=True)   # (B C, F, T)
        h = torch.view_as_real(spec).reshape(B, C, *spec.shape[1:], 2)          # (B, C, F, T, 2)
        h = h.permute(0, 1, 4, 3, 2).reshape(B, 2 * C, spec.shape[2], spec.shape[1])  # (B, 4, T, F)
        features = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            features.append(h)
        return self.post(h), features


class Discriminator(nn.Module):
    def __init__(self, channels=2, filters=32):
        super().__init__()
        self.scales = nn.ModuleList(STFTDiscriminator(n, channels, filters) for n in DISC_SIZES)

    def forward(self, x):
        return [scale(x) for scale in self.scales]


def discriminator_loss(disc, x, x_hat):
    """Hinge loss: real patches pushed above +1, reconstructed ones below -1."""
    real, fake = disc(x), disc(x_hat.detach())
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean()
               for (r, _), (f, _) in zip(real, fake)) / len(real)


def generator_losses(disc, x, x_hat):
    """Adversarial loss (-D(x_hat)) and feature matching (L1 between the layers' features)."""
    with torch.no_grad():                         # the real features are targets only
        real = disc(x)
    fake = disc(x_hat)
    adversarial = sum(-f.mean() for f, _ in fake) / len(fake)
    feature = sum(sum((a.detach() - b).abs().mean() for a, b in zip(fr, ff)) / len(fr)
                  for (_, fr), (_, ff) in zip(real, fake)) / len(real)
    return adversarial, feature


# -------------------------------------------------------------------------------------------------
# The model a fresh run builds: the size's config with the command line's changes.
# -------------------------------------------------------------------------------------------------
def model_config(args):
    """The size's config with the command line's changes (each flag defaults to the size's own)."""
    config = sa.SIZES[args.size]
    config = replace(config, vae=replace(config.vae, activation=args.activation,
                                         strides=tuple(args.vae_strides or config.vae.strides)),
                     clap=replace(config.clap, feature_layer=args.clap_layer),
                     timing=replace(config.timing, enabled=not args.no_timing),
                     unet=replace(config.unet, padding_mask=config.unet.padding_mask
                                  and not (args.paper_timing or args.no_timing)))
    if isinstance(getattr(args, "latent_scale", None), float):
        config = replace(config, latent_scale=args.latent_scale)
    if not -config.clap.text_layers <= args.clap_layer <= -1:
        raise ValueError(f"--clap-layer must be from -{config.clap.text_layers} (the first layer) "
                         f"to -1 (the last), got {args.clap_layer}")
    if args.window_seconds:
        stride = math.prod(config.vae.strides) * math.prod(config.unet.factors)
        window = math.ceil(args.window_seconds * config.sample_rate / stride) * stride
        config = replace(config, window=window)
    return config


# -------------------------------------------------------------------------------------------------
# Export: a trained run's EMA weights and config alone, what sample.py loads (about a third of the
# checkpoint), or a stable-audio-tools model under our names, the same way.
# -------------------------------------------------------------------------------------------------
def export(args):
    """OUT/diffusion.pt (or --from) -> --to: the EMA weights and config alone, what sample.py
    needs (no optimizer state, no raw weights; about a third of the size). --vae swaps in a
    decoder trained further by phase 2, whose encoder must be the one the U-Net learned on."""
    source = args.source or os.path.join(args.out, "diffusion.pt")
    if args.to is None:
        raise TrainingError("export needs --to PATH, e.g. --to checkpoints/demo.pt")
    if os.path.exists(args.to) and not args.force:
        raise TrainingError(f"{args.to} exists; pass --force to overwrite it")
    if args.from_sat:
        return export_released(args)
    # Said here in export's own flags: the loader's message names sample.py's --ckpt.
    if not os.path.isfile(source):
        raise TrainingError(f"--from {source} not found; pass a checkpoint train.py wrote"
                            if args.source else f"{source} not found; train the diffusion stage "
                            f"into --out {args.out} first, or pass --from CKPT")
    if args.vae and not os.path.isfile(args.vae):
        raise TrainingError(f"--vae {args.vae} not found; pass the vae.pt of a phase-2 run "
                            f"(train.py vae --init {source} --freeze-encoder)")
    model, ckpt = sa.load_checkpoint(source, ema=True)
    if ckpt.get("stage") not in ("diffusion", "export"):
        raise TrainingError(f"{source} is a {ckpt.get('stage')} checkpoint; export takes the "
                            f"diffusion stage's, which holds all three parts")
    weights = ckpt.get("weights", f"EMA weights of {source} at step {ckpt['step']}")
    if args.vae:
        encoder = {k: v.clone() for k, v in model.vae.encoder.state_dict().items()}
        training.load_part(model, "vae", args.vae, "--vae")
        if any(not torch.equal(v, encoder[k]) for k, v in model.vae.encoder.state_dict().items()):
            raise TrainingError(f"{args.vae} has another encoder than {source}: the U-Net was "
                                f"trained on that encoder's latents. Train the decoder alone "
                                f"(train.py vae --init {source} --freeze-encoder)")
        weights += f"; VAE: EMA weights of {args.vae}"
    os.makedirs(os.path.dirname(os.path.abspath(args.to)), exist_ok=True)
    sa.save_checkpoint(args.to, model, stage="export", step=ckpt["step"], weights=weights)
    print(f"export: wrote {args.to} ({os.path.getsize(args.to) / 2 ** 20:.1f} MiB) from {source}")


def export_released(args):
    """--from-sat CONFIG WEIGHTS: a stable-audio-tools model (Stable Audio 1.0's U-Net, VAE and
    timing tables under our names) -> a checkpoint sample.py loads."""
    config, weights = args.from_sat
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = released.from_sat(config, weights)
    if not isinstance(model, sa.StableAudio):
        raise TrainingError(f"{config} describes an autoencoder, not a diffusion model; "
                            f"sample.py --reconstruct FILE --from-sat reads it directly")
    for w in caught:
        print(f"note: {w.message}")
    os.makedirs(os.path.dirname(os.path.abspath(args.to)), exist_ok=True)
    sa.save_checkpoint(args.to, model, stage="export", step=0,
                       weights=f"released weights {weights} (config {config})")
    print(f"export: wrote {args.to} ({os.path.getsize(args.to) / 2 ** 20:.1f} MiB) from {weights}")


# -------------------------------------------------------------------------------------------------
# Command line: the flags, each defaulting to the paper's choice, and main, which runs the stages in
# order; a run that fails says why in one `error:` line and exits with status 2.
# -------------------------------------------------------------------------------------------------
def parse_args(argv):
    p = training.Parser(description="Train Stable Audio's three stages (paper §4).")
    p.add_argument("stage", choices=[*STAGES, "all", "export", "check"], help="what to train; "
                   "`all` runs the three in order (vae, clap, diffusion), each for --steps; "
                   "`export` writes OUT/diffusion.pt's EMA weights alone to --to; `check` looks "
                   "at --data before training: files, captions, lengths, the --vae on them, the "
                   "latents and a trial run (exit status 1 if something needs fixing)")
    p.add_argument("--size", default="tiny", choices=sa.SIZES, help="model size (default tiny)")
    p.add_argument("--data", default=None, help="`toy` for the built-in sound world, or a "
                   "folder of audio files with same-name .txt captions or .json metadata")
    p.add_argument("--steps", type=int, default=None, help="train until this step (default "
                   f"1000; check: the trial run's, default {training.CHECK_STEPS})")
    p.add_argument("--out", default=None, help="output folder (default runs/SIZE)")
    p.add_argument("--to", default=None, help="export: the checkpoint to write, e.g. "
                   "checkpoints/demo.pt")
    p.add_argument("--from", dest="source", default=None, metavar="CKPT", help="export: the "
                   "diffusion or exported checkpoint to read (default OUT/diffusion.pt)")
    p.add_argument("--from-sat", nargs=2, default=None, metavar=("CONFIG", "WEIGHTS"),
                   help="export: a stable-audio-tools model instead, its config JSON and its "
                   ".ckpt or .safetensors weights (the text encoder stays untrained)")
    p.add_argument("--resume", action="store_true", help="continue OUT/STAGE.pt from its step "
                   "with the flags it was trained with (--data, --seed, --crop, --latent-cache, "
                   "...) unless given; a flag given anew is used, with a note")
    p.add_argument("--force", action="store_true", help="start over even if OUT/STAGE.pt exists")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per micro-batch on each rank (default per stage and size; tiny: vae 4, "
                   "clap 16, diffusion 4)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per "
                   "optimizer step: the effective batch is --batch-size x ranks x K (default 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default per stage and "
                   "size; full size: vae 1e-4 and diffusion 4e-5 as released, clap 1e-4; with "
                   "--resume: the checkpoint's rate unless given)")
    p.add_argument("--crop", type=int, default=None, help="samples per training clip for vae "
                   "(default 65536, 1.5 s) and clap (default 10 s); diffusion uses the window")
    p.add_argument("--window-seconds", type=float, default=None, help="override the size's "
                   "window (rounded up to a multiple of 16384 samples)")
    p.add_argument("--freeze-encoder", action="store_true", default=None,
                   help="vae phase 2 (§4.2): train the decoder only, e.g. with --resume")
    p.add_argument("--init", default=None, metavar="CKPT", help="vae: start from the (EMA) VAE "
                   "of CKPT instead of random weights, e.g. checkpoints/demo.pt with "
                   "--freeze-encoder to train the demo's decoder further; diffusion: from its "
                   "(EMA) U-Net and timing embeddings, e.g. to fine-tune the demo at another "
                   "--latent-scale; clap: from its CLAP (a fresh run only)")
    p.add_argument("--disc-start", type=int, default=None, help="vae: train the discriminator "
                   "and use its losses from this step on (default 0, as released); before it, "
                   "reconstruction + KL only, much faster on a CPU")
    p.add_argument("--activation", default=None, choices=sa.ACTIVATIONS, help="vae: the "
                   "VAE's activation (default snake, §3.1; elu for the comparison exercise)")
    p.add_argument("--vae-strides", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   metavar="S,S,S,S", help="vae: encoder strides, whose product is the "
                   "compression in time (default 4,4,8,8 = 1024x; e.g. 2,4,8,8 = 512x)")
    p.add_argument("--clap-layer", type=int, default=None, help="diffusion: the CLAP text layer "
                   "that conditions the U-Net (default -2, the next-to-last, §3.2; -1 the last)")
    p.add_argument("--no-timing", action="store_true", default=None, help="diffusion: drop "
                   "the two timing tokens from the context, and tiny's padding mask (an "
                   "ablation; the paper conditions on the tokens)")
    p.add_argument("--latent-scale", default=None, metavar="X|auto", help="diffusion: train on "
                   "the VAE's latents times X (default 1, as released, or with --init that "
                   "checkpoint's); auto: 1 / their std, measured on the latent cache or the "
                   "first batch")
    p.add_argument("--paper-timing", action="store_true", default=None, help="diffusion: the "
                   "paper's U-Net, timing through the cross-attention tokens alone (tiny adds "
                   "the padding mask)")
    p.add_argument("--vae", default=None, help="diffusion: VAE checkpoint (default OUT/vae.pt); "
                   "export: a phase-2 VAE (same encoder) whose decoder replaces the source's")
    p.add_argument("--clap", default=None, help="diffusion: CLAP checkpoint (default OUT/clap.pt)")
    p.add_argument("--latent-cache", type=int, default=None, metavar="N", help="diffusion: encode "
                   "the first N windows once and train on them (default 0: encode every batch "
                   "afresh); much faster on a CPU")
    p.add_argument("--workers", type=int, default=0, help="processes that make batches ahead "
                   "of training (default 0: in this process); a GPU needs several to be kept busy")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="diffusion: recompute activations in the backward pass to save memory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (default bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (default 1)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--overfit", action="store_true", default=None, help="train on the first "
                   "batch only, a sanity check: the loss should fall far below its starting value")
    p.add_argument("--seed", type=int, default=None, help="seed for data order and noise "
                   "(default 0)")
    p.add_argument("--val", default=None, metavar="DIR", help="held-out audio to evaluate on, a "
                   "folder like --data's (default: a share of --data's files picked by a hash of "
                   "each path, at least one; for --data toy, sound-world items no run trains on)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N", help="every N steps and "
                   "at the last, held-out figures of the EMA weights with fixed noise, printed and "
                   f"put in OUT/STAGE.csv (default {training.EVAL_EVERY}; 0: never)")
    p.add_argument("--demo-every", type=int, default=None, metavar="N", help="every N steps, "
                   "demos from the EMA weights: diffusion writes fixed-seed samples, vae held-out "
                   "clips and their reconstructions (audio and spectrogram PNG, in OUT/demos/); "
                   f"clap prints a retrieval table (default {training.DEMO_EVERY}; 0: never)")
    p.add_argument("--demo-prompt", action="append", default=None, metavar="TEXT",
                   help="diffusion: a demo prompt; repeat the flag for more (default: the first "
                   f"{training.DEMO_PROMPTS} held-out captions)")
    p.add_argument("--demo-seconds", type=float, default=None, help="diffusion: seconds of each "
                   "demo sample; vae: of each demo clip (default 10)")
    p.add_argument("--demo-steps", type=int, default=None, help="diffusion: sampler steps of a "
                   "demo (default 20)")
    p.add_argument("--keep-best", action="store_true", default=None, help="keep the checkpoint "
                   "of the best held-out figure so far too, as OUT/STAGE_best.pt")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="default: cuda, then mps, then cpu")
    args = p.parse_args(argv)
    args.given = {name for name in training.RUN_FLAGS if getattr(args, name) is not None}
    for name, (default, _) in training.RUN_FLAGS.items():
        if name not in args.given:
            setattr(args, name, default)
    if args.workers < 0:
        p.error("--workers must be 0 or more")
    if args.latent_scale not in (None, "auto"):
        try:
            args.latent_scale = float(args.latent_scale)
        except ValueError:
            p.error(f"--latent-scale must be a number or auto, got {args.latent_scale!r}")
        if not (math.isfinite(args.latent_scale) and args.latent_scale > 0):
            p.error(f"--latent-scale must be positive, got {args.latent_scale}")
    if args.init and (args.stage == "export" or args.resume):
        p.error("--init starts a fresh vae or diffusion run (or a clap one); it cannot go with "
                "export or --resume")
    if args.steps is None:
        args.steps = training.CHECK_STEPS if args.stage == "check" else 1000
    if args.stage == "check" and args.data in (None, "toy"):
        p.error("check needs --data DIR, the folder of audio to look at")
    for name in ("steps", "save_every", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    check_watching(args)
    args.out = args.out or os.path.join("runs", args.size)
    if args.dtype is None:
        args.dtype = "bfloat16" if training.pick_device(args.device).type == "cuda" else "float32"
    return args


def check_watching(args):
    """The flags of evaluation and demos, each wrong one a TrainingError: one `error:` line."""
    for name in ("eval_every", "demo_every"):
        if getattr(args, name) < 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be 0 (never) or more, got "
                                f"{getattr(args, name)}")
    if any(not prompt.strip() for prompt in args.demo_prompt or []):
        raise TrainingError("--demo-prompt is empty; give the text of a demo, e.g. "
                            "--demo-prompt 'steady rain, rain', or leave the flag out for "
                            "held-out captions")
    if not 0 < args.demo_seconds <= sa.TimingConfig.max_seconds:
        raise TrainingError(f"--demo-seconds must be in (0, {sa.TimingConfig.max_seconds}], got "
                            f"{args.demo_seconds:g}")
    if args.demo_steps < 1:
        raise TrainingError(f"--demo-steps must be at least 1, got {args.demo_steps}")


def run_stage(args, stage):
    batch, lr = DEFAULTS[stage][args.size]
    stage_args = replace_args(args, stage=stage, batch_size=args.batch_size or batch,
                              lr=args.lr or lr, lr_from_checkpoint=args.lr is None)
    B, R, K = stage_args.batch_size, args.ranks.world, args.grad_accum
    if R * K > 1:
        print(f"{stage}: effective batch {B * R * K} = batch {B} x {R} ranks x --grad-accum {K}")
    losses = STAGES[stage](stage_args)
    print(f"{stage}: done, step {stage_args.steps}, "
          + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
          + f"; wrote {os.path.join(args.out, stage + '.pt')}")
    return losses


def replace_args(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def main(argv=None):
    ranks = training.Ranks()
    try:
        args = parse_args(argv)
        if args.stage == "export":
            export(args)
            return 0
        if args.stage == "check":                   # before training on a folder: training.py
            batch, lr = DEFAULTS["diffusion"][args.size]
            return training.check(replace_args(args, batch_size=args.batch_size or batch,
                                               lr=args.lr or lr, crop=args.crop or VAE_CROP),
                                  model_config, train_diffusion)
        args.ranks = ranks = training.Ranks.start(args.device)   # under torchrun: its group
        for stage in ([*STAGES] if args.stage == "all" else [args.stage]):
            run_stage(args, stage)
    except Stop as e:
        if ranks.main and str(e):
            print(f"error: {e}", file=sys.stderr)
        ranks.close()
        return 2
    except torch.OutOfMemoryError:
        ranks.error("out of GPU memory; lower --batch-size (a larger --grad-accum keeps the "
                    "effective batch), add --grad-checkpointing (diffusion) or pick a smaller "
                    "--size; the last checkpoint is untouched")
        return 2
    except (TrainingError, ValueError, FileNotFoundError, OSError) as e:
        ranks.error(e)
        return 2
    except dist.DistError as e:        # a rank that failed has said why; its loss reached us here
        if ranks.main:
            ranks.error(f"lost contact with another rank ({str(e).splitlines()[0][:200]})")
        return 2
    ranks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
