"""Train Stable Audio's three stages (paper §4): the VAE, the CLAP text/audio encoders, and the
latent diffusion U-Net, on a folder of audio with captions or on the built-in procedural sound
world (both from sound_world.py).

    python train.py vae --size tiny --data toy --steps 2000
    python train.py clap --size tiny --data toy --steps 2000
    python train.py diffusion --size tiny --data toy --steps 4000
    torchrun --nproc_per_node 8 train.py diffusion --size full --data DIR --grad-accum 4

Each stage writes OUT/STAGE.pt (resumable with --resume), OUT/STAGE.log and OUT/STAGE.csv (one row
per step, with held-out figures every --eval-every steps), and demos under OUT/demos/. Under
torchrun each rank trains on its own share of every batch (DistributedDataParallel); rank 0 alone
writes.
Shape alphabet: B batch, C channels, L latent frames, N samples.
"""
import argparse
import csv
import functools
import hashlib
import math
import os
import shlex
import signal
import sys
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import fields, replace
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.parametrizations import weight_norm
from tqdm import tqdm

import stable_audio as sa
import released
import sound_world

# -------------------------------------------------------------------------------------------------
# §4.2 VAE losses. Reconstruction: stable_audio.stereo_loss, a multi-resolution STFT loss on the
# sum and the difference of the channels. Adversarial: a multi-scale STFT discriminator with
# hinge loss, plus feature matching. Weights 1.0 spectral, 0.1 adversarial, 5.0 feature matching,
# 1e-4 KL (the paper; the released config uses 1e-6).
# -------------------------------------------------------------------------------------------------
DISC_SIZES = (2048, 1024, 512, 256, 128)
# Discriminator width per model size: the released 32 filters cost ~36 GMAC per second of stereo
# per pass, most of a tiny VAE step on a CPU; 8 filters cost 1/16 of that.
DISC_FILTERS = {"full": 32, "small": 32, "tiny": 8}
LOSS_WEIGHTS = {"spectral": 1.0, "adversarial": 0.1, "feature": 5.0, "kl": 1e-4}


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
# Training machinery shared by the three stages: device choice, EMA, checkpoints that can be
# resumed exactly, a NaN guard and Ctrl-C handling. Data parallelism: under torchrun, R ranks each
# take K micro-batches (--grad-accum) of B clips per optimizer step, an effective batch of B·R·K
# (the paper: 256 on 64 A100s for the U-Net); DistributedDataParallel averages the gradients.
# -------------------------------------------------------------------------------------------------
DEFAULTS = {  # stage: {size: (batch size, learning rate)}; full-size rates are the paper's
    "vae": {"full": (8, 1e-4), "small": (8, 1e-4), "tiny": (4, 5e-4)},
    "clap": {"full": (64, 1e-4), "small": (64, 1e-4), "tiny": (16, 1e-3)},
    "diffusion": {"full": (8, 4e-5), "small": (8, 1e-4), "tiny": (4, 5e-4)},
}


class TrainingError(Exception):
    """A problem the user can fix; printed as one line."""


class Stop(TrainingError):
    """A stop every rank reaches at the same step (Ctrl-C, a non-finite loss, a rank whose data
    failed): rank 0 alone says why, if anyone has not already."""


# Longer than rank 0 takes to write a full-size checkpoint (15.5 GB) while the others wait; a rank
# stuck for this long stops the run instead of holding every GPU.
DIST_TIMEOUT = timedelta(minutes=10)


def micro_index(step, m, rank, world, accum):
    """The data's batch index for micro-batch m of `step` on `rank`. A step's R·K micro-batches
    are consecutive batches of B: together the items one process draws in one batch of R·K·B."""
    return (step * world + rank) * accum + m


def stream_seed(seed, j):
    """Seed of the noise stream of micro-batch j = rank·K + m; stream 0 is the one-process run's."""
    return seed if j == 0 else int(np.random.SeedSequence([seed, j]).generate_state(1)[0])


class Ranks:
    """This process's place among the ranks torchrun started (rank 0 of 1 without torchrun): the
    process group, DistributedDataParallel, and the few values the ranks agree on each step."""

    def __init__(self, rank=0, world=1, local_rank=0, device=None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.on, self.device = device is not None, device       # device: where collectives run
        self.main = rank == 0

    @classmethod
    def start(cls, device_name):
        """Join torchrun's process group (NCCL on CUDA, gloo on a CPU), or none without torchrun."""
        if "RANK" not in os.environ:
            return cls()
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        device = sa.pick_device(device_name)
        if device.type == "mps":
            raise ValueError("torchrun with --device mps: there is no process group for MPS; "
                             "use cuda or cpu")
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"local rank {local_rank} but {torch.cuda.device_count()} GPUs "
                                 f"visible; give torchrun --nproc_per_node at most that")
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
        if rank != 0:
            sys.stdout = open(os.devnull, "w")      # rank 0 alone reports; errors use stderr
        return cls(rank, world, local_rank, device)

    def error(self, text):
        """One line on stderr; under torchrun on a line of its own (rank 0's progress bar leaves
        its line open) and naming the rank, since the others may not share the problem."""
        print(f"\nerror: rank {self.rank}: {text}" if self.on else f"error: {text}",
              file=sys.stderr)

    def barrier(self):
        if self.on:
            dist.barrier()

    def close(self):
        """Leave together: torchrun ends every rank as soon as one exits with an error, and rank 0
        may still be saying why the run stopped."""
        if self.on:
            dist.barrier()
            dist.destroy_process_group()
            if not self.main:
                sys.stdout.close()
                sys.stdout = sys.__stdout__

    def index(self, step, m, accum):
        return micro_index(step, m, self.rank, self.world, accum)

    def wrap(self, module):
        """DistributedDataParallel around what a stage trains, so that the backward pass averages
        its gradients over the ranks (the frozen parts inside it have none to average)."""
        if not self.on:
            return module
        return DistributedDataParallel(module, device_ids=(
            [self.local_rank] if self.device.type == "cuda" else None))

    def sync(self, net, last):
        """Average the gradients on a step's last micro-batch only; the others accumulate."""
        return net.no_sync() if self.on and not last else nullcontext()

    def mean(self, values):
        """{name: float} averaged over the ranks."""
        if not self.on:
            return values
        total = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return dict(zip(values, (total / self.world).tolist()))

    def any(self, *flags):
        """Whether each flag is set on any rank."""
        if not self.on:
            return flags
        flags = torch.tensor(flags, dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return tuple(bool(f) for f in flags.tolist())

    def collect(self, obj):
        """[rank 0's obj, rank 1's obj, …] on every rank."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def concat(self, x):
        """(B, D) on each rank -> (R·B, D) in rank order, gradients flowing back to this rank's."""
        return ConcatRanks.apply(x, self.rank, self.world) if self.on else x


class ConcatRanks(torch.autograd.Function):
    """All-gather whose backward keeps this rank's rows, times R: every rank computes the same loss
    from the gathered rows, so the gradient summed over the ranks is R times this rank's own."""
    @staticmethod
    def forward(ctx, x, rank, world):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(rank * len(x), (rank + 1) * len(x))
        ctx.world = world
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rows] * ctx.world, None, None


class Forward(nn.Module):
    """`fn(module, *inputs)` as a forward pass. DistributedDataParallel syncs the gradients of what
    its forward computes, and the stages' losses call methods (encode, embed_text), not forward."""
    def __init__(self, module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *inputs):
        return self.fn(self.module, *inputs)


def accumulate(totals, values, K):
    """totals += values / K: a step's losses are the means over its K micro-batches."""
    for k, v in values.items():
        totals[k] = totals.get(k, 0.0) + v.item() / K
    return totals


STAGE_PARTS = {"vae": ("vae.",), "clap": ("clap.",), "diffusion": ("unet.", "timing.")}


class EMA:
    """Exponential moving average of the weights a stage trains: decay min(beta, 1 - (1 + k)^-3/4)
    at step k, so a short run still averages (ema-pytorch's warm-up, as in the released code)."""
    def __init__(self, model, parts, beta=0.9999, state=None):
        self.beta, self.parts = beta, parts
        weights = model.state_dict()
        self.shadow = ({k: v.to(weights[k].device) for k, v in state.items()} if state else
                       {k: v.detach().clone() for k, v in weights.items() if k.startswith(parts)})

    @torch.no_grad()
    def update(self, model, step):
        decay = min(self.beta, 1 - (1 + step) ** -0.75)
        for k, v in model.state_dict().items():
            if not k.startswith(self.parts):
                continue
            if v.is_floating_point():
                self.shadow[k].lerp_(v, 1 - decay)
            else:
                self.shadow[k].copy_(v)

    @contextmanager
    def weights(self, model):
        """`model` in eval mode with the averaged weights in place of the trained ones, which come
        back bit for bit after (kept on the CPU meanwhile: a GPU may have no room for a copy)."""
        state, modes = model.state_dict(), [(m, m.training) for m in model.modules()]
        trained = {k: state[k].to("cpu", copy=True) for k in self.shadow}
        with torch.no_grad():
            for k, v in self.shadow.items():
                state[k].copy_(v)
        model.eval()
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in trained.items():
                    state[k].copy_(v)
            for m, mode in modes:
                m.training = mode


def plain(value):
    """A value a checkpoint can hold and torch.load(weights_only=True) can read back."""
    return isinstance(value, (str, int, float, bool)) or value is None


class Trainer:
    """One stage's loop: batches by step, optimizer steps, EMA, logging, checkpoints. A step is
    --grad-accum micro-batches on each rank; rank 0 alone logs and saves."""
    def __init__(self, args, model, optimizers, ckpt_path, resume_state, extra=dict):
        self.args, self.model, self.optimizers, self.path = args, model, optimizers, ckpt_path
        self.ranks, self.interrupted = args.ranks, False
        self.extra = extra                       # more state to save, e.g. the discriminator
        self.ema = EMA(model, STAGE_PARTS[args.stage],
                       state=resume_state.get("ema") if resume_state else None)
        # One noise stream per micro-batch of a step, so that how the R·K micro-batches are spread
        # over ranks and --grad-accum does not change the run.
        K = args.grad_accum
        self.streams = range(self.ranks.rank * K, (self.ranks.rank + 1) * K)
        self.generators = [torch.Generator().manual_seed(stream_seed(args.seed, j))
                           for j in self.streams]
        self.step = 0
        if resume_state:
            self.step = resume_state["step"]
            rng = resume_state["rng"]
            states = rng if isinstance(rng, list) else [rng]     # one stream before --grad-accum
            for j, generator in zip(self.streams, self.generators):
                if j < len(states):
                    generator.set_state(states[j])
            for opt, state in zip(optimizers, resume_state["optimizers"]):
                opt.load_state_dict(state)                   # restores the old rate too
                for group in opt.param_groups:
                    group["lr"] = group["lr"] if args.lr_from_checkpoint else args.lr
            self.note_new_split(resume_state.get("args", {}))
        self.first_step = self.step
        self.best = resume_state.get("best", math.inf) if resume_state else math.inf
        self.log = (open(os.path.join(args.out, f"{args.stage}.log"), "a", buffering=1)
                    if self.ranks.main else None)

    def note_new_split(self, old):
        """--resume with other ranks × --grad-accum or --batch-size works, but is another run."""
        if "batch_size" not in old:
            return
        before = (old.get("ranks", 1) * old.get("grad_accum", 1), old["batch_size"])
        now = (self.ranks.world * self.args.grad_accum, self.args.batch_size)
        if before != now:
            print(f"note: {self.path} was trained on {before[0]} micro-batches of {before[1]} per "
                  f"step (ranks x --grad-accum), this run takes {now[0]} of {now[1]}: the "
                  f"effective batch goes from {math.prod(before)} to {math.prod(now)} and the "
                  f"data order and noise change; keep both numbers to continue it exactly")

    def save(self, path=None):
        """The whole state at this step into `path` (default OUT/STAGE.pt), on every rank."""
        path = path or self.path
        states = [s for rank in self.ranks.collect([g.get_state() for g in self.generators])
                  for s in rank]
        if self.ranks.main:
            try:
                self._save(path, states)
            except (OSError, RuntimeError) as e:
                raise TrainingError(f"could not write {path} ({str(e).splitlines()[0]}); "
                                    f"is the disk full? The previous checkpoint is untouched"
                                    ) from None
        self.ranks.barrier()           # `all`: the next stage reads this checkpoint on every rank

    def _save(self, path, rng):
        sa.save_checkpoint(path, self.model, stage=self.args.stage, step=self.step,
                           ema=self.ema.shadow, rng=rng, best=self.best,
                           optimizers=[opt.state_dict() for opt in self.optimizers],
                           **self.extra(),
                           args={**{k: v for k, v in vars(self.args).items()
                                    if plain(v) or isinstance(v, list) and all(map(plain, v))},
                                 "ranks": self.ranks.world})

    def on_ctrl_c(self, signum, frame):
        self.interrupted = True

    def fetch(self, batch_fn):
        """This rank's micro-batches of the step, [(batch, noise generator), …]. Under torchrun
        the ranks first agree that each has its data and that nobody pressed Ctrl-C."""
        K, micro = self.args.grad_accum, None
        try:
            micro = [(batch_fn(self.ranks.index(self.step, m, K)), generator)
                     for m, generator in enumerate(self.generators)]
        except Exception as e:
            if not self.ranks.on:
                raise
            if isinstance(e, (TrainingError, ValueError, OSError)):    # a bad file, say
                self.ranks.error(e)
            else:
                traceback.print_exc()
        failed, interrupted = self.ranks.any(micro is None, self.interrupted)
        if failed:
            raise Stop("")                       # the rank that failed has said why
        if interrupted:
            raise KeyboardInterrupt
        return micro

    def run(self, step_fn, batch_fn, held, evaluate, demo):
        """Call step_fn(step, micro-batches) -> {name: loss} until --steps, saving every
        --save-every steps; batch_fn(index) -> the data's batch `index` (see micro_index). Every
        --eval-every steps and at the last, evaluate(model) -> {name: held-out figure}; every
        --demo-every steps, demo(model, step) -> what it did, in words; both see the EMA weights,
        on rank 0, and read the held-out data `held`."""
        args, ranks = self.args, self.ranks
        bar = tqdm(total=args.steps, initial=self.step, desc=args.stage, dynamic_ncols=True,
                   disable=not ranks.main)
        start, losses = time.time(), {}
        self.held_note = " on TRAINING data" if held.trained_on else ""
        metrics = (Metrics(os.path.join(args.out, f"{args.stage}.csv"), args.stage, self.step)
                   if ranks.main else None)
        # Under torchrun Ctrl-C reaches every rank (and torchrun passes it on): each finishes its
        # step and they stop together; torchrun kills them after --shutdown_timeout (30 s).
        ctrl_c = signal.signal(signal.SIGINT, self.on_ctrl_c) if ranks.on else None
        try:
            while self.step < args.steps:
                began = time.time()
                losses = ranks.mean(step_fn(self.step, self.fetch(batch_fn)))
                if not all(math.isfinite(v) for v in losses.values()):
                    raise Stop(
                        f"{args.stage}: loss is not finite at step {self.step} ({losses}); the "
                        f"last good checkpoint {self.path} is untouched; lower --lr or use "
                        f"--dtype float32")
                self.ema.update(self.model, self.step)
                self.step += 1
                seconds = time.time() - began
                text = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
                bar.set_postfix_str(text)
                bar.update()
                per_step = (time.time() - start) / (self.step - self.first_step)
                if self.log:
                    self.log.write(f"step {self.step} {text} {per_step:.3f} s/step\n")
                figures, eval_seconds = {}, None
                if args.eval_every and (self.step % args.eval_every == 0
                                        or self.step == args.steps):
                    figures, eval_seconds = self.evaluate(evaluate)
                if metrics:
                    metrics.write({"step": self.step, **losses, **figures,
                                   "lr": self.optimizers[0].param_groups[0]["lr"],
                                   "step_seconds": seconds, "eval_seconds": eval_seconds})
                if self.step % args.save_every == 0 or self.step == args.steps:
                    self.save()
                if args.demo_every and self.step % args.demo_every == 0:
                    self.demo(demo)
        except KeyboardInterrupt:
            self.save()
            raise Stop(f"interrupted after step {self.step}; saved {self.path}; "
                       f"continue with --resume") from None
        finally:
            if ctrl_c is not None:
                signal.signal(signal.SIGINT, ctrl_c)
            bar.close()
            if self.log:
                self.log.close()
            if metrics:
                metrics.close()
        return losses

    def evaluate(self, evaluate):
        """The held-out figures of the EMA weights, on every rank -> (figures, seconds taken).
        With --keep-best, a better main figure than any before saves OUT/STAGE_best.pt."""
        began, figures = time.time(), {}
        if self.ranks.main:
            with self.ema.weights(self.model), torch.no_grad():
                figures = evaluate(self.model)
        figures = self.ranks.collect(figures)[0]          # rank 0's, for --keep-best's save
        seconds = time.time() - began
        main = figures[VAL_FIGURES[self.args.stage][0]]
        kept = ""
        if self.args.keep_best and main < self.best:
            self.best, best = main, self.path.removesuffix(".pt") + "_best.pt"
            self.save(best)
            kept = f"; best so far, saved {best}"
        tqdm.write(f"{self.args.stage} step {self.step}: held-out{self.held_note} "
                   + ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in figures.items())
                   + f" ({seconds:.1f} s{kept})")
        return figures, seconds

    def demo(self, demo):
        """Rank 0 makes the stage's demos from the EMA weights and says what they are and how
        long they took; the others wait."""
        if self.ranks.main:
            began = time.time()
            with self.ema.weights(self.model), torch.no_grad():
                head, *rest = demo(self.model, self.step).split("\n")
            tqdm.write("\n".join([f"{self.args.stage} step {self.step}: {head} "
                                  f"({time.time() - began:.1f} s)", *rest]))
        self.ranks.barrier()


# -------------------------------------------------------------------------------------------------
# Watching a run, to know when to stop it: every --eval-every steps (and at the last) figures on
# held-out data (sound_world.split_data) from the EMA weights with fixed noise, so that two
# evaluations of the same weights agree and runs compare; every --demo-every steps something to
# hear under OUT/demos/ (or, for clap, read); one row per step in OUT/STAGE.csv. None of it draws
# from the training's noise streams, so a run trains the same with it or without.
# -------------------------------------------------------------------------------------------------
EVAL_EVERY, DEMO_EVERY = 100, 500
EVAL_ITEMS = {"vae": 8, "clap": 16, "diffusion": 4}     # held-out windows an evaluation reads
# diffusion: the v-loss at 8 noise levels, the midpoints of [0, 1] in t: the mean of the loss
# over t ~ U[0, 1], as training draws it, by the midpoint rule.
EVAL_T = [(k + 0.5) / 8 for k in range(8)]
DEMO_PROMPTS, DEMO_CLIPS, TABLE_ROWS = 2, 2, 4   # held-out captions, vae clips, clap table rows

# Columns of OUT/STAGE.csv beside step, lr and seconds: the training losses, then the held-out
# figures, the first of which --keep-best follows. A cell without a value stays empty.
LOSSES = {"vae": ("spectral", "kl", "adversarial", "feature", "disc"), "clap": ("loss",),
          "diffusion": ("loss", "latent_std")}
VAL_FIGURES = {"vae": ("val_spectral", "val_kl"), "clap": ("val_loss", "val_top1"),
               "diffusion": ("val_loss",)}


class Metrics:
    """OUT/STAGE.csv, one row per step: the training losses, the held-out figures where the step
    was evaluated, the learning rate, and the seconds the step's training and evaluation took. A
    resumed run first drops the rows past its checkpoint, which the stopped run wrote after its
    last save, so that no step is missing or there twice. Written from the first row on."""
    def __init__(self, path, stage, step):
        self.path, self.step, self.file = path, step, None
        self.columns = ["step", *LOSSES[stage], *VAL_FIGURES[stage], "lr", "step_seconds",
                        "eval_seconds"]

    def start(self):
        """The rows up to the run's first step (none for a fresh run) rewritten, atomically."""
        rows, last = [], 0
        if self.step and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    step = row.get("step") or ""
                    whole = None not in row and None not in row.values()   # not cut short
                    if whole and step.isdigit() and last < int(step) <= self.step:
                        rows.append(row)
                        last = int(step)
        with open(f"{self.path}.tmp", "w", newline="") as f:
            old = csv.DictWriter(f, self.columns, extrasaction="ignore", lineterminator="\n")
            old.writeheader()
            old.writerows(rows)
        os.replace(f"{self.path}.tmp", self.path)
        self.file = open(self.path, "a", newline="", buffering=1)
        self.writer = csv.DictWriter(self.file, self.columns, lineterminator="\n")

    def write(self, values):
        if self.file is None:
            self.start()
        self.writer.writerow({k: "" if v is None else f"{v:.6g}" if isinstance(v, float) else v
                              for k, v in values.items()})

    def close(self):
        if self.file:
            self.file.close()


def v_loss_at(unet, z, t, eps, context, mask, content_frames):
    """§4.4's v-objective at the noise levels t (B,) with the noise eps given: what
    sa.diffusion_loss computes, always conditioned, at the t and eps it draws itself."""
    alpha, sigma = (a[:, None, None] for a in sa.alpha_sigma(t))
    v = alpha * eps - sigma * z
    return F.mse_loss(unet(alpha * z + sigma * eps, t, context, mask, content_frames), v).item()


def write_demos(args, step, clips, names, sample_rate):
    """(B, 2, N) audio -> OUT/demos/STAGE_STEP_NAME.wav, each with its spectrogram PNG -> what
    was written, in words."""
    folder = os.path.join(args.out, "demos")
    os.makedirs(folder, exist_ok=True)
    for clip, name in zip(clips.float().cpu().numpy(), names):
        path = os.path.join(folder, f"{args.stage}_{step:06d}_{name}.wav")
        try:
            sound_world.write_clip(path, clip, sample_rate)
        except (OSError, RuntimeError) as e:
            raise TrainingError(f"could not write {path} ({str(e).splitlines()[0]})") from None
    return f"wrote {len(names)} demos (+ .png) to {folder}"


def retrieval_table(similarity, prompts):
    """clap's demo: held-out captions (rows) against their own clips (columns), the best marked,
    as lines of text."""
    n = len(prompts)
    lines = ["held-out captions against clips, cosine similarity, [best]",
             " " * 42 + "".join(f"{f'clip {j + 1}':>9}" for j in range(n))]
    for i, prompt in enumerate(prompts):
        best = int(similarity[i].argmax())
        cells = [f"[{s:.2f}]" if j == best else f"{s:.2f} "
                 for j, s in enumerate(similarity[i].tolist())]
        lines.append(f"{i + 1:>2} {prompt[:38]:<39}" + "".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def autocast(device, dtype):
    """bf16/fp16 autocast on CUDA (the paper trains with AMP); plain float32 elsewhere."""
    return torch.autocast(device.type, getattr(torch, dtype), enabled=dtype != "float32")


# -------------------------------------------------------------------------------------------------
# The three stages. Each writes OUT/{stage}.pt (the whole model's config and weights, plus EMA,
# optimizer, step and RNG state) and OUT/{stage}.log.
# -------------------------------------------------------------------------------------------------
def model_config(args):
    """The size's config with the command line's changes (all default to the paper's choices)."""
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


# The flags that shape a run's data, model and what it reports, their defaults, and the stages
# they shape. With --resume they come back from the checkpoint unless given, so that it continues
# the same run.
EVERY_STAGE = ("vae", "clap", "diffusion")
RUN_FLAGS = {"data": ("toy", EVERY_STAGE), "seed": (0, EVERY_STAGE),
             "overfit": (False, EVERY_STAGE), "window_seconds": (None, EVERY_STAGE),
             "crop": (None, ("vae", "clap")),
             "disc_start": (0, ("vae",)), "freeze_encoder": (False, ("vae",)),
             "activation": ("snake", ("vae", "diffusion")),
             "vae_strides": (None, ("vae", "diffusion")),
             "latent_cache": (0, ("diffusion",)), "latent_scale": (None, ("diffusion",)),
             "clap_layer": (-2, ("diffusion",)), "no_timing": (False, ("diffusion",)),
             "paper_timing": (False, ("diffusion",)),
             "val": (None, EVERY_STAGE), "eval_every": (EVAL_EVERY, EVERY_STAGE),
             "demo_every": (DEMO_EVERY, EVERY_STAGE), "keep_best": (False, EVERY_STAGE),
             "demo_prompt": (None, ("diffusion",)), "demo_seconds": (10.0, ("vae", "diffusion")),
             "demo_steps": (20, ("diffusion",))}
# Of those, the ones the checkpoint's model was built with: a resumed run cannot change them.
MODEL_FLAGS = {"window_seconds", "activation", "vae_strides", "latent_scale", "clap_layer",
               "no_timing", "paper_timing"}


def as_flag(name, value):
    """A flag and its value as typed, e.g. "--latent-cache 256", "--overfit", "no --overfit"."""
    flag = "--" + name.replace("_", "-")
    if value is None or isinstance(value, bool):
        return flag if value else f"no {flag}"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):   # a repeated flag
        return " ".join(f"{flag} {shlex.quote(v)}" for v in value)
    return f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"


def resume_flags(args, stage, old, path):
    """--resume: the run's flags come back from the checkpoint's `old` args unless given; one
    given with another value is honoured with a note, or refused if the model is built with it.
    -> the flags that came back with other than their defaults, as text."""
    kept = []
    for name, (default, stages) in RUN_FLAGS.items():
        if stage not in stages or name not in old:     # not saved by an earlier version
            continue
        before, now = old[name], getattr(args, name)
        if name not in args.given:
            setattr(args, name, before)
            kept += [as_flag(name, before)] if before != default else []
        elif now != before and name in MODEL_FLAGS:
            other = (f", or fine-tune it at another scale: --init {path} --latent-scale X"
                     if name == "latent_scale" else "")
            raise TrainingError(f"{path} holds a model built with {as_flag(name, before)}, "
                                f"so --resume cannot take {as_flag(name, now)}; drop the flag "
                                f"to continue the run{other}")
        elif now != before and args.ranks.main:
            print(f"note: {path} was trained with {as_flag(name, before)}; this run "
                  f"continues it with {as_flag(name, now)}")
    return kept


def prepare(args, stage):
    """The model to train and its checkpoint path: fresh, or restored for --resume."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{stage}.pt")
    if args.resume and (os.path.exists(path) or args.stage != "all"):
        model, state = sa.load_checkpoint(path, size=args.size, ema=False)
        if state.get("stage") != stage:
            raise TrainingError(f"{path} is a {state.get('stage')} checkpoint, not {stage}")
        if state.get("upgraded_from") and stage != "vae":
            raise TrainingError(f"{path} was written by an earlier version whose attention had "
                                f"one norm fewer, so its optimizer state cannot be resumed; "
                                f"start a new run from its weights with --init {path}")
        kept = resume_flags(args, stage, state.get("args", {}), path)
        print(f"{stage}: resuming {path} at step {state['step']}"
              + (f" with its {' '.join(kept)}" if kept else ""))
        return model, path, state
    if os.path.exists(path) and not args.force:
        raise TrainingError(f"{path} exists; pass --resume to continue it or --force to start over")
    metrics = os.path.join(args.out, f"{stage}.csv")
    if os.path.exists(metrics) and not args.force:
        raise TrainingError(f"{metrics} holds the metrics of an earlier run that left no "
                            f"checkpoint; pass --force to start over")
    torch.manual_seed(args.seed)               # parameter initialisation draws from torch's RNG
    return sa.build_model(model_config(args)), path, None


class Overfit:
    """Every step sees the first batch: a sanity check that the loss can fall toward zero."""
    def __init__(self, data):
        self.data = data

    def batch(self, batch_size, step, window=None):
        return self.data.batch(batch_size, 0, window)


def make_data(args, config):
    """(data to train on, held-out data for evaluation and demos), saying what is held out."""
    data, held, note = sound_world.split_data(args.data, args.val, config.window,
                                              config.sample_rate, args.seed)
    print(f"held out: {note}")
    return Overfit(data) if args.overfit else data, held


class Batches(torch.utils.data.Dataset):
    """The k-th micro-batch this rank trains on from step `first`: data.batch(B, index, window),
    index from micro_index. In one process without --grad-accum, batch k is first + k."""
    def __init__(self, data, args, first, window):
        self.data, self.batch_size, self.first, self.window = data, args.batch_size, first, window
        self.rank, self.world, self.accum = args.ranks.rank, args.ranks.world, args.grad_accum
        self.n = (args.steps - first) * args.grad_accum

    def __len__(self):
        return self.n

    def index(self, k):
        step, m = divmod(k, self.accum)
        return micro_index(self.first + step, m, self.rank, self.world, self.accum)

    def __getitem__(self, k):
        return self.data.batch(self.batch_size, self.index(k), self.window)


def ignore_ctrl_c(worker_id):
    """Data workers leave Ctrl-C to the trainer, which may need one more batch before stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Prefetch:
    """--workers N: N processes make the coming batches while the model trains (torch's
    DataLoader). The sound world is synthesised on the CPU, which a GPU would otherwise wait for;
    batches stay the same as in one process, since batch k depends only on (seed, k)."""
    def __init__(self, data, args, first, window=None):
        self.order = Batches(data, args, first, window)
        self.batches = iter(torch.utils.data.DataLoader(
            self.order, batch_size=None, num_workers=args.workers, prefetch_factor=4,
            worker_init_fn=ignore_ctrl_c))
        self.next = 0

    def batch(self, batch_size, index, window=None):
        assert index == self.order.index(self.next), "Prefetch serves the batches in order"
        self.next += 1
        return next(self.batches)


def prefetch(data, args, first, window=None):
    return Prefetch(data, args, first, window) if args.workers else data


def copy_of(generator):
    return torch.Generator().set_state(generator.get_state())


def clip_and_step(optimizer, params, max_norm):
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


def train_vae(args):
    """§4.2: reconstruction + adversarial + feature matching + KL on short crops (1.5 s)."""
    model, path, state = prepare(args, "vae")
    device, config = sa.pick_device(args.device), model.config
    if args.init and not state:    # e.g. phase 2 on the demo's VAE: --init checkpoints/demo.pt
        load_part(model, "vae", args.init, "--init")
    model.to(device).train()
    vae = model.vae
    disc = Discriminator(config.vae.channels, DISC_FILTERS.get(config.size, 32)).to(device)
    if state:
        disc.load_state_dict(state["discriminator"])
    vae.encoder.requires_grad_(not args.freeze_encoder)   # phase 2: fine-tune the decoder only
    if args.freeze_encoder and state:
        # The diffusion stage encodes with the EMA weights; phase 2 freezes exactly those, so the
        # latents a diffusion model was trained on stay the same while the decoder improves.
        ema = state["ema"]
        vae.encoder.load_state_dict({k[len("vae.encoder."):]: v for k, v in ema.items()
                                     if k.startswith("vae.encoder.")})
    # AdamW skips parameters without gradients, so the optimizer state keeps one layout across
    # both phases and a phase-1 checkpoint resumes into phase 2.
    opt_g = torch.optim.AdamW(vae.parameters(), args.lr, betas=(0.8, 0.99))
    opt_d = torch.optim.AdamW(disc.parameters(), args.lr, betas=(0.8, 0.99))
    trainer = Trainer(args, model, [opt_g, opt_d], path, state,
                      extra=lambda: {"discriminator": disc.state_dict()})
    crop = args.crop or 65536
    data, held = make_data(args, config)
    data = prefetch(data, args, trainer.first_step, window=crop)

    def reconstruct(vae, x, generator):
        """Audio (B, 2, N) -> x_hat (B, 2, N), posterior mean and std (B, 64, L)."""
        with autocast(device, args.dtype):
            mean, std = vae.encode(x)
            z = mean + std * sa.randn(mean.shape, generator, mean)
            return vae.decode(z)[..., :x.shape[-1]].float(), mean.float(), std.float()
    net = args.ranks.wrap(Forward(vae, reconstruct))
    critic = args.ranks.wrap(Forward(disc, discriminator_loss))

    def step(i, micro):
        K, losses, logs, graphs = len(micro), {}, {}, [None] * len(micro)
        audio = [batch["audio"].to(device) for batch, _ in micro]             # (B, 2, N) each
        # The released wrapper's `warmup_steps` (0 in the paper's config): before it, only the
        # reconstruction and KL terms train, at ~2/5 of the time per step on a CPU.
        if i >= args.disc_start:
            # The discriminator learns first, then the generator meets the updated one. With
            # several micro-batches, each is reconstructed again below from the same noise, so
            # that one graph at a time is alive; a single one keeps its graph for both.
            opt_d.zero_grad(set_to_none=True)
            for m, (x, (_, generator)) in enumerate(zip(audio, micro)):
                if K == 1:
                    graphs[m] = net(x, generator)
                    x_hat = graphs[m][0]
                else:
                    with torch.no_grad():
                        x_hat = net(x, copy_of(generator))[0]
                with args.ranks.sync(critic, m == K - 1):
                    d_loss = critic(x, x_hat)
                    (d_loss / K).backward()
                accumulate(logs, {"disc": d_loss}, K)
            clip_and_step(opt_d, disc.parameters(), args.clip)
        opt_g.zero_grad(set_to_none=True)
        for m, (x, (_, generator)) in enumerate(zip(audio, micro)):
            with args.ranks.sync(net, m == K - 1):
                x_hat, mean, std = graphs[m] or net(x, generator)
                parts = {"spectral": sa.stereo_loss(x_hat, x, config.sample_rate),
                         "kl": sa.kl_divergence(mean, std)}
                if i >= args.disc_start:
                    parts["adversarial"], parts["feature"] = generator_losses(disc, x, x_hat)
                loss = sum(LOSS_WEIGHTS[k] * v for k, v in parts.items())
                (loss / K).backward()
            accumulate(losses, parts, K)
        clip_and_step(opt_g, vae.parameters(), args.clip)
        return {**losses, **logs}

    @functools.cache
    def held_out(n, window):
        return held.batch(n, 0, window)["audio"].to(device)                  # (n, 2, window)

    def evaluate(model):
        """The reconstruction and KL terms on held-out clips, decoded from the posterior mean
        (as sample.py --reconstruct does): no sampled z in the figure."""
        x = held_out(EVAL_ITEMS["vae"], crop)
        mean, std = model.vae.encode(x)
        x_hat = model.vae.decode(mean)[..., :x.shape[-1]]
        return {"val_spectral": sa.stereo_loss(x_hat, x, config.sample_rate).item(),
                "val_kl": sa.kl_divergence(mean, std).item()}

    def demo(model, step):
        """Held-out clips of --demo-seconds and their reconstructions, to hear phase 1 and 2."""
        x = held_out(DEMO_CLIPS, round(args.demo_seconds * config.sample_rate))
        x_hat = model.vae.decode(model.vae.encode(x)[0])[..., :x.shape[-1]]
        return write_demos(args, step, torch.stack([x, x_hat], 1).flatten(0, 1),  # in pairs
                           [f"{i}_{name}" for i in range(len(x))
                            for name in ("heldout", "decoded")], config.sample_rate)
    return trainer.run(step, lambda index: data.batch(args.batch_size, index, window=crop), held,
                       evaluate, demo)


def train_clap(args):
    """§4.3: contrastive training of the text and audio towers on (caption, clip) pairs."""
    model, path, state = prepare(args, "clap")
    device, config = sa.pick_device(args.device), model.config
    if args.init and not state:    # e.g. the demo's CLAP, further on your own captions
        load_part(model, "clap", args.init, "--init")
    model.to(device).train()
    clap = model.clap
    opt = torch.optim.AdamW(clap.parameters(), args.lr)
    trainer = Trainer(args, model, [opt], path, state)
    crop = min(args.crop or 10 * config.sample_rate, config.window)
    data, held = make_data(args, config)
    data = prefetch(data, args, trainer.first_step, window=crop)

    def contrastive_loss(clap, tokens, mask, audio):
        # On R ranks every caption meets every clip of the R micro-batches, as in one process at
        # R times the batch (LAION-CLAP gathers the same way); --grad-accum averages K such losses.
        with autocast(device, args.dtype):
            return clap.loss(args.ranks.concat(clap.embed_text(tokens, mask)),
                             args.ranks.concat(clap.embed_audio(audio))).float()
    net = args.ranks.wrap(Forward(clap, contrastive_loss))

    def step(i, micro):
        K, losses = len(micro), {}
        opt.zero_grad(set_to_none=True)
        for m, (batch, _) in enumerate(micro):
            tokens, mask = clap.tokenize(batch["prompts"])
            with args.ranks.sync(net, m == K - 1):
                loss = net(tokens, mask, batch["audio"].to(device))
                (loss / K).backward()
            accumulate(losses, {"loss": loss}, K)
        clip_and_step(opt, clap.parameters(), args.clip)
        return losses

    @functools.cache
    def held_out():
        batch = held.batch(EVAL_ITEMS["clap"], 0, window=crop)
        return batch["prompts"], batch["audio"].to(device)

    def similarity(model):
        prompts, audio = held_out()
        text = model.clap.embed_text(*model.clap.tokenize(prompts))
        return text, model.clap.embed_audio(audio)

    def evaluate(model):
        """The contrastive loss over the held-out pairs, and how often a caption's closest clip
        is its own (or carries the same caption: a held-out file can come twice, cropped anew)."""
        prompts, _ = held_out()
        text, audio = similarity(model)
        best = (text @ audio.T).argmax(1).tolist()
        return {"val_loss": model.clap.loss(text, audio).item(),
                "val_top1": sum(prompts[j] == p for j, p in zip(best, prompts)) / len(prompts)}

    def demo(model, step):
        """A table to read: the first held-out captions against their clips."""
        text, audio = similarity(model)
        return retrieval_table((text @ audio.T)[:TABLE_ROWS, :TABLE_ROWS],
                               held_out()[0][:TABLE_ROWS])
    return trainer.run(step, lambda index: data.batch(args.batch_size, index, window=crop), held,
                       evaluate, demo)


# Fields that only choose how fresh weights start: a trained part is the same part either way.
INIT_ONLY = {"audible_init", "sinusoid_init"}


def config_differences(theirs, mine):
    """[(field, theirs, mine)] for the fields of two part configs that change the computation."""
    return [(f.name, getattr(theirs, f.name), getattr(mine, f.name)) for f in fields(mine)
            if f.name not in INIT_ONLY and getattr(theirs, f.name) != getattr(mine, f.name)]


def load_part(model, part, path, flag, needed_by=None):
    """Put a trained part into `model`: "vae" or "clap", or ("unet", "timing") for --init. The
    part arrives with its config (e.g. a format-1 U-Net's padding); refused if it computes
    something other than this run asks for. `flag` names the option that gives `path`;
    `needed_by`, the stage that reads it by default. -> the model it came from."""
    names = (part,) if isinstance(part, str) else part
    if not os.path.exists(path):
        raise TrainingError(f"{needed_by} needs a trained {part}: {path} not found; run `python "
                            f"train.py {part}` first or pass {flag} PATH" if needed_by else
                            f"{flag} {path} not found; pass a checkpoint train.py wrote")
    other, ckpt = sa.load_checkpoint(path, ema=True)
    if ckpt.get("stage") not in (*names, "diffusion", "export"):   # the last two hold all parts
        raise TrainingError(f"{flag} {path} is a {ckpt.get('stage')} checkpoint, not a "
                            f"{names[0]} one")
    for name in names:
        mine, theirs = getattr(model.config, name), getattr(other.config, name)
        if name == "clap":     # which layer conditions the U-Net is the diffusion stage's choice
            theirs = replace(theirs, feature_layer=mine.feature_layer)
            other.clap.config = theirs
        if name == "unet":     # a layout of the trained weights, not a choice of this run
            mine = replace(mine, symmetric_downsample=theirs.symmetric_downsample)
        wrong = config_differences(theirs, mine)
        if wrong:
            field, a, b = wrong[0]
            hint = (f"it is of size {ckpt['size']!r}: pass --size {ckpt['size']}"
                    if ckpt["size"] != model.config.size else
                    "pass the flags it was trained with, or train it again")
            raise TrainingError(f"{flag} {path} holds a {name} with {field} = {a!r}, but this "
                                f"run's has {b!r}; {hint}")
        setattr(model, name, getattr(other, name))
        setattr(model.config, name, theirs)
    return other


class Windows(torch.utils.data.Dataset):
    """Some items of the data at a window, for the latent cache (made by --workers)."""
    def __init__(self, data, window, indices):
        self.data, self.window, self.indices = data, window, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        return self.data.item(self.indices[k], self.window)


class LatentCache:
    """Items 0 … n-1 of the data, encoded once by the frozen VAE: posterior mean and std per
    window, with prompt and timing. Each step draws a batch from them and samples z afresh.
    Encoding dominates a diffusion step on a CPU, so this is what makes the stage fast there;
    the price is n fixed windows instead of an endless stream. Saved next to the checkpoint and
    reused while the VAE, window, data, seed and n are the same. Under torchrun rank r encodes
    items r, r + R, … and every rank then holds all n; OUT must be a folder every rank sees."""

    def __init__(self, model, data, n, device, args):
        self.seed, ranks = args.seed, args.ranks
        key = {"vae": hash_state(model.vae), "window": model.config.window, "data": args.data,
               "files": hash_files(data), "seed": args.seed, "n": n, "overfit": args.overfit}
        path = os.path.join(args.out, "latents.pt")
        cached = torch.load(path, weights_only=True) if os.path.exists(path) else None
        if not ranks.any(cached is None or cached["key"] != key)[0]:
            print(f"diffusion: using {n} cached latents from {path}")
        else:
            mine, items = range(ranks.rank, n, ranks.world), []
            windows = torch.utils.data.DataLoader(Windows(data, model.config.window, mine),
                                                  batch_size=None, num_workers=args.workers)
            for audio, prompt, start, total in tqdm(windows, desc="encoding latents",
                                                    total=len(mine), dynamic_ncols=True,
                                                    disable=not ranks.main):
                with torch.no_grad():
                    mean, std = model.vae.encode(audio[None].to(device).float())
                items.append((mean[0].cpu(), std[0].cpu(), prompt, start, total))
            shares = ranks.collect(items)                 # item i is on rank i % R
            mean, std, prompts, start, total = zip(*(shares[i % ranks.world][i // ranks.world]
                                                     for i in range(n)))
            cached = {"key": key, "mean": torch.stack(mean), "std": torch.stack(std),
                      "prompts": list(prompts), "seconds_start": torch.tensor(start),
                      "seconds_total": torch.tensor(total)}
            if ranks.main:
                sa.atomic_save(cached, path)
        self.cached = cached

    def batch(self, batch_size, index, window=None):
        pick = torch.as_tensor(np.random.default_rng([self.seed, 1, index]).integers(
            len(self.cached["prompts"]), size=batch_size))
        return {"mean": self.cached["mean"][pick], "std": self.cached["std"][pick],
                "prompts": [self.cached["prompts"][j] for j in pick.tolist()],
                "seconds_start": self.cached["seconds_start"][pick],
                "seconds_total": self.cached["seconds_total"][pick]}


def hash_files(data):
    """A short fingerprint of the files a folder's data trains on (None for the sound world):
    another held-out share, or files added, make other windows."""
    items = getattr(getattr(data, "data", data), "items", None)            # through Overfit
    return items and hashlib.sha256("\n".join(i["path"] for i in items).encode()).hexdigest()[:16]


def hash_state(module):
    """A short fingerprint of a module's weights, to tell whether a cache was made with them."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def encode_clips(vae, audio, device):
    """Audio (B, 2, N) -> posterior mean, std (B, 64, L), one clip at a time as the released
    code does: a 95 s window at full width takes about 16 GB to encode."""
    return (torch.cat(t) for t in zip(*(vae.encode(a[None].to(device)) for a in audio)))


def latent_scale(data, model, device, args):
    """--latent-scale auto: 1 / the std of z = mean + std * eps (Rombach et al. 2022). The noise
    schedule assumes data of unit variance; a VAE trained briefly on a CPU encodes far smaller
    latents (the demo's: std 0.44), whose details the noise then drowns at most noise levels."""
    if isinstance(data, LatentCache):
        mean, std = data.cached["mean"], data.cached["std"]
    else:
        with torch.no_grad():
            mean, std = encode_clips(model.vae, data.batch(args.batch_size, 0)["audio"], device)
    return round(float((mean.float().var() + std.float().pow(2).mean()).rsqrt()), 4)


def train_diffusion(args):
    """§4.4: v-objective on latents of the frozen VAE, conditioned by the frozen CLAP + timing."""
    model, path, state = prepare(args, "diffusion")
    if state is None:
        load_part(model, "vae", args.vae or os.path.join(args.out, "vae.pt"), "--vae",
                  "the diffusion stage")
        load_part(model, "clap", args.clap or os.path.join(args.out, "clap.pt"), "--clap",
                  "the diffusion stage")
        if args.init and args.stage == "diffusion":       # a fine-tune of another run's U-Net
            source = load_part(model, ("unet", "timing"), args.init, "--init")
            if args.latent_scale is None:                 # it keeps the scale it learned at
                model.config.latent_scale = source.config.latent_scale
    device, config = sa.pick_device(args.device), model.config
    model.to(device).train()
    for frozen in (model.vae, model.clap):
        frozen.requires_grad_(False).eval()
    model.timing.requires_grad_(config.timing.enabled)      # --no-timing leaves the tables unused
    model.unet.set_checkpointing(args.grad_checkpointing)
    params = [*model.unet.parameters(), *model.timing.parameters()]
    opt = torch.optim.Adam(params, args.lr)               # the paper: Adam, no weight decay
    trainer = Trainer(args, model, [opt], path, state)
    data, held = make_data(args, config)
    if args.latent_cache:
        data = LatentCache(model, data, args.latent_cache, device, args)
    if state is None and args.latent_scale == "auto":
        model.config.latent_scale = latent_scale(data, model, device, args)
    print(f"diffusion: latent scale {model.config.latent_scale:g}")
    if not args.latent_cache:
        data = prefetch(data, args, trainer.first_step)

    def v_loss(model, z, prompts, seconds_start, seconds_total, generator):
        with autocast(device, args.dtype):
            context, mask = model.condition(prompts, seconds_start, seconds_total)
            content_frames = model.content_frames(seconds_start, seconds_total)
            return sa.diffusion_loss(model.unet, z, context, mask, generator,
                                     content_frames=content_frames.to(device))
    net = args.ranks.wrap(Forward(model, v_loss))    # the U-Net and timing: the rest is frozen

    def step(i, micro):
        K, losses = len(micro), {}
        opt.zero_grad(set_to_none=True)
        for m, (batch, generator) in enumerate(micro):
            with torch.no_grad(), autocast(device, args.dtype):
                if "mean" in batch:
                    mean, std = batch["mean"].to(device), batch["std"].to(device)
                else:
                    mean, std = encode_clips(model.vae, batch["audio"], device)
                z = mean + std * sa.randn(mean.shape, generator, mean)   # (B, 64, L)
                z = z * config.latent_scale
            with args.ranks.sync(net, m == K - 1):
                loss = net(z, batch["prompts"], batch["seconds_start"], batch["seconds_total"],
                           generator)
                (loss / K).backward()
            accumulate(losses, {"loss": loss, "latent_std": z.float().std()}, K)
        clip_and_step(opt, params, args.clip)
        if i == trainer.first_step and device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            print(f"peak GPU memory after one step: {peak:.1f} GiB")
        return losses

    @functools.cache
    def held_out():
        return held.batch(EVAL_ITEMS["diffusion"], 0)

    @functools.cache
    def held_out_latents():
        mean, _ = encode_clips(model.vae, held_out()["audio"], device)    # the frozen VAE's
        return mean                                                       # (B, 64, L)

    def evaluate(model):
        """The v-loss on held-out latents (posterior means), conditioned on their captions, at
        the EVAL_T noise levels with noise from a generator of its own, seeded 0."""
        batch, z = held_out(), held_out_latents() * config.latent_scale
        timing = batch["seconds_start"], batch["seconds_total"]
        context, mask = model.condition(batch["prompts"], *timing)
        frames = model.content_frames(*timing).to(device)
        generator = torch.Generator().manual_seed(0)
        losses = [v_loss_at(model.unet, z, torch.full((len(z),), t, device=device),
                            sa.randn(z.shape, generator, z), context, mask, frames)
                  for t in EVAL_T]
        return {"val_loss": sum(losses) / len(losses)}

    def demo(model, step):
        """Samples of --demo-prompt (or held-out captions) from seed 0 on, at every demo step."""
        prompts = args.demo_prompt or held_out()["prompts"][:DEMO_PROMPTS]
        audio = sa.generate(model, prompts, seconds_total=args.demo_seconds,
                            steps=args.demo_steps, seed=0)
        return write_demos(args, step, audio, [f"{i}_{sound_world.slug(p)}" for i, p in
                                               enumerate(prompts)], config.sample_rate)
    return trainer.run(step, lambda index: data.batch(args.batch_size, index), held, evaluate,
                       demo)


STAGES = {"vae": train_vae, "clap": train_clap, "diffusion": train_diffusion}


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
        load_part(model, "vae", args.vae, "--vae")
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
    p = sa.Parser(description="Train Stable Audio's three stages (paper §4).")
    p.add_argument("stage", choices=[*STAGES, "all", "export"], help="what to train; `all` runs "
                   "the three in order (vae, clap, diffusion), each for --steps; `export` writes "
                   "OUT/diffusion.pt's EMA weights alone to --to")
    p.add_argument("--size", default="tiny", choices=sa.SIZES, help="model size (default tiny)")
    p.add_argument("--data", default=None, help="`toy` for the built-in sound world, or a "
                   "folder of audio files with same-name .txt captions or .json metadata")
    p.add_argument("--steps", type=int, default=1000, help="train until this step (default 1000)")
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
                   "size; full size: vae 1e-4, clap 1e-4, diffusion 4e-5 as in the paper; "
                   "with --resume: the checkpoint's rate unless given)")
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
                   "and use its losses from this step on (default 0, as in the paper); before it, "
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
                   f"put in OUT/STAGE.csv (default {EVAL_EVERY}; 0: never)")
    p.add_argument("--demo-every", type=int, default=None, metavar="N", help="every N steps, "
                   "demos from the EMA weights: diffusion writes fixed-seed samples, vae held-out "
                   "clips and their reconstructions (audio and spectrogram PNG, in OUT/demos/); "
                   f"clap prints a retrieval table (default {DEMO_EVERY}; 0: never)")
    p.add_argument("--demo-prompt", action="append", default=None, metavar="TEXT",
                   help="diffusion: a demo prompt; repeat the flag for more (default: the first "
                   f"{DEMO_PROMPTS} held-out captions)")
    p.add_argument("--demo-seconds", type=float, default=None, help="diffusion: seconds of each "
                   "demo sample; vae: of each demo clip (default 10)")
    p.add_argument("--demo-steps", type=int, default=None, help="diffusion: sampler steps of a "
                   "demo (default 20)")
    p.add_argument("--keep-best", action="store_true", default=None, help="keep the checkpoint "
                   "of the best held-out figure so far too, as OUT/STAGE_best.pt")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="default: cuda, then mps, then cpu")
    args = p.parse_args(argv)
    args.given = {name for name in RUN_FLAGS if getattr(args, name) is not None}
    for name, (default, _) in RUN_FLAGS.items():
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
    for name in ("steps", "save_every", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    check_watching(args)
    args.out = args.out or os.path.join("runs", args.size)
    if args.dtype is None:
        args.dtype = "bfloat16" if sa.pick_device(args.device).type == "cuda" else "float32"
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
    ranks = Ranks()
    try:
        args = parse_args(argv)
        if args.stage == "export":
            export(args)
            return 0
        args.ranks = ranks = Ranks.start(args.device)     # under torchrun: its process group
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
