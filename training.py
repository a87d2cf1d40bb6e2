"""The training machinery behind train.py's three stages, one job to a section: ranks (data
parallel under torchrun), the loop's course (noise streams, EMA, checkpoints, Ctrl-C, the log),
watching a run (held-out figures, demos, OUT/STAGE.csv), starting a run (fresh, --init or
--resume), and the data (batches by step, prefetching, the latent cache).

A stage in train.py reads:

    with training.Run(args, model, optimizers, state) as run:
        for step, micro in run.steps(batch_fn, figures):   # this rank's micro-batches of a step
            ... the paper's losses, backward, optimizer step ...
            run.record(losses)
            run.ema.update(model, step)

Shape alphabet: B batch, C channels, L latent frames, N samples.
"""
import argparse
import csv
import functools
import hashlib
import io
import math
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import fields, replace
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import stable_audio as sa
import sound_world

class TrainingError(Exception):
    """A problem the user can fix; printed as one line."""


class Stop(TrainingError):
    """A stop every rank reaches at the same step (Ctrl-C, a non-finite loss, a rank whose data
    failed): rank 0 alone says why, if anyone has not already."""


# -------------------------------------------------------------------------------------------------
# Ranks. Under torchrun, R ranks each take K micro-batches (--grad-accum) of B clips per optimizer
# step, an effective batch of B·R·K (the paper: 256 on 64 A100s for the U-Net);
# DistributedDataParallel averages the gradients. Without torchrun: rank 0 of 1.
# -------------------------------------------------------------------------------------------------
# Longer than rank 0 takes to write a full-size checkpoint (15.5 GB) while the others wait; a rank
# stuck for this long stops the run instead of holding every GPU.
DIST_TIMEOUT = timedelta(minutes=10)


def micro_index(step, m, rank, world, accum):
    """The data's batch index for micro-batch m of `step` on `rank`. A step's R·K micro-batches
    are consecutive batches of B: together the items one process draws in one batch of R·K·B."""
    return (step * world + rank) * accum + m


def stream_seed(seed, j):
    """Seed of the noise stream of micro-batch j = rank·K + m; stream 0: the one-process run's."""
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
        device = pick_device(device_name)
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


# -------------------------------------------------------------------------------------------------
# The loop's course: a step's noise streams, the EMA, the checkpoint, and Run, which steps until
# --steps and stops together on every rank (Ctrl-C, a non-finite loss, a rank whose data failed).
# -------------------------------------------------------------------------------------------------
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


class Streams:
    """One noise generator per micro-batch of a step, stream j = rank·K + m: how the R·K
    micro-batches are spread over ranks and --grad-accum does not change the run."""
    def __init__(self, args, state=None):
        K, self.ranks = args.grad_accum, args.ranks
        self.ids = range(self.ranks.rank * K, (self.ranks.rank + 1) * K)
        self.generators = [torch.Generator().manual_seed(stream_seed(args.seed, j))
                           for j in self.ids]
        if state:
            rng = state["rng"]
            states = rng if isinstance(rng, list) else [rng]     # one stream before --grad-accum
            for j, generator in zip(self.ids, self.generators):
                if j < len(states):
                    generator.set_state(states[j])

    def states(self):
        """Every stream's state in stream order, gathered from all ranks (on every rank)."""
        return [s for rank in self.ranks.collect([g.get_state() for g in self.generators])
                for s in rank]


def plain(value):
    """A value a checkpoint can hold and torch.load(weights_only=True) can read back."""
    return isinstance(value, (str, int, float, bool)) or value is None


class Checkpoint:
    """OUT/STAGE.pt: the model, its EMA, the optimizers, the step, the noise streams and the best
    held-out figure, written by rank 0 atomically; --resume reads it back (prepare), and here the
    optimizers take their state and the rate (--lr, or the checkpoint's)."""
    def __init__(self, args, model, optimizers, ema, streams, state, extra=dict):
        self.args, self.model, self.optimizers, self.ema, self.streams = (args, model, optimizers,
                                                                          ema, streams)
        self.path, self.ranks = os.path.join(args.out, f"{args.stage}.pt"), args.ranks
        self.extra = extra                       # more state to save, e.g. the discriminator
        self.step, self.best = 0, math.inf
        if state:
            self.step, self.best = state["step"], state.get("best", math.inf)
            for opt, saved in zip(optimizers, state["optimizers"]):
                opt.load_state_dict(saved)                   # restores the old rate too
                for group in opt.param_groups:
                    group["lr"] = group["lr"] if args.lr_from_checkpoint else args.lr
            self.note_new_split(state.get("args", {}))

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

    def save(self, step, path=None):
        """The whole state at `step` into `path` (default OUT/STAGE.pt), on every rank."""
        path = path or self.path
        rng = self.streams.states()
        if self.ranks.main:
            try:
                sa.save_checkpoint(
                    path, self.model, stage=self.args.stage, step=step, ema=self.ema.shadow,
                    rng=rng, best=self.best,
                    optimizers=[opt.state_dict() for opt in self.optimizers], **self.extra(),
                    args={**{k: v for k, v in vars(self.args).items()
                             if plain(v) or isinstance(v, list) and all(map(plain, v))},
                          "ranks": self.ranks.world})
            except (OSError, RuntimeError) as e:
                raise TrainingError(f"could not write {path} ({str(e).splitlines()[0]}); "
                                    f"is the disk full? The previous checkpoint is untouched"
                                    ) from None
        self.ranks.barrier()           # `all`: the next stage reads this checkpoint on every rank


class Run:
    """A stage's loop, `with Run(...) as run: for step, micro in run.steps(batch_fn, figures)`:
    each step, this rank's micro-batches [(batch, noise generator), …] (--grad-accum of them);
    the stage trains on them and run.record()s its losses. Between steps the losses are averaged
    over the ranks and a non-finite one stops the run; the log, the checkpoint (every
    --save-every steps and at the last) and the watch (figures, demos) take their turn. Ctrl-C
    saves and stops; under torchrun every rank finishes its step and they stop together."""
    def __init__(self, args, model, optimizers, state, extra=dict):
        self.args, self.model, self.ranks = args, model, args.ranks
        self.ema = EMA(model, STAGE_PARTS[args.stage],
                       state=state.get("ema") if state else None)
        self.streams = Streams(args, state)
        self.checkpoint = Checkpoint(args, model, optimizers, self.ema, self.streams, state,
                                     extra)
        self.step = self.first_step = self.checkpoint.step
        self.losses, self.averaged, self.interrupted, self.ctrl_c = {}, {}, False, None
        self.bar = self.metrics = None
        self.log = (open(os.path.join(args.out, f"{args.stage}.log"), "a", buffering=1)
                    if self.ranks.main else None)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        try:
            if kind is KeyboardInterrupt:
                self.checkpoint.save(self.step)
                raise Stop(f"interrupted after step {self.step}; saved {self.checkpoint.path}; "
                           f"continue with --resume") from None
        finally:
            if self.ctrl_c is not None:
                signal.signal(signal.SIGINT, self.ctrl_c)
            for part in (self.bar, self.log, self.metrics):
                if part is not None:
                    part.close()

    def on_ctrl_c(self, signum, frame):
        self.interrupted = True

    def sync(self, net, m):
        """Average the gradients over the ranks on a step's last micro-batch m only."""
        return self.ranks.sync(net, m == self.args.grad_accum - 1)

    def record(self, values):
        """Add a micro-batch's losses {name: tensor}: a step's are the means over its K."""
        for k, v in values.items():
            self.losses[k] = self.losses.get(k, 0.0) + v.item() / self.args.grad_accum

    def fetch(self, batch_fn):
        """This rank's micro-batches of the step, [(batch, noise generator), …]. Under torchrun
        the ranks first agree that each has its data and that nobody pressed Ctrl-C."""
        K, micro = self.args.grad_accum, None
        try:
            micro = [(batch_fn(self.ranks.index(self.step, m, K)), generator)
                     for m, generator in enumerate(self.streams.generators)]
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

    def steps(self, batch_fn, figures):
        """(step, micro-batches) until --steps; batch_fn(index) -> the data's batch `index` (see
        micro_index); figures: the stage's held-out figures and demos (HeldOut*)."""
        args, ranks = self.args, self.ranks
        self.bar = tqdm(total=args.steps, initial=self.step, desc=args.stage, dynamic_ncols=True,
                        disable=not ranks.main)
        watch = Watch(self, figures)
        self.metrics = (Metrics(os.path.join(args.out, f"{args.stage}.csv"), args.stage,
                                self.step) if ranks.main else None)
        # Under torchrun Ctrl-C reaches every rank (and torchrun passes it on): each finishes its
        # step and they stop together; torchrun kills them after --shutdown_timeout (30 s).
        self.ctrl_c = signal.signal(signal.SIGINT, self.on_ctrl_c) if ranks.on else None
        start = time.time()
        while self.step < args.steps:
            began, self.losses = time.time(), {}
            yield self.step, self.fetch(batch_fn)
            losses = ranks.mean({k: self.losses[k] for k in LOSSES[args.stage]
                                 if k in self.losses})
            if not all(math.isfinite(v) for v in losses.values()):
                raise Stop(f"{args.stage}: loss is not finite at step {self.step} ({losses}); "
                           f"the last good checkpoint {self.checkpoint.path} is untouched; lower "
                           f"--lr or use --dtype float32")
            if self.step == self.first_step and next(self.model.parameters()).is_cuda:
                peak = torch.cuda.max_memory_allocated() / 2 ** 30
                print(f"peak GPU memory after one step: {peak:.1f} GiB")
            self.step += 1
            self.averaged = losses
            seconds = time.time() - began
            text = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
            self.bar.set_postfix_str(text)
            self.bar.update()
            per_step = (time.time() - start) / (self.step - self.first_step)
            if self.log:
                self.log.write(f"step {self.step} {text} {per_step:.3f} s/step\n")
            figures, eval_seconds = watch.evaluate()
            if self.metrics:
                self.metrics.write({"step": self.step, **losses, **figures,
                                    "lr": self.checkpoint.optimizers[0].param_groups[0]["lr"],
                                    "step_seconds": seconds, "eval_seconds": eval_seconds})
            if self.step % args.save_every == 0 or self.step == args.steps:
                self.checkpoint.save(self.step)
            watch.demo()


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


class Watch:
    """A run's held-out figures every --eval-every steps and at the last, and its demos every
    --demo-every steps, both from the EMA weights on rank 0 (the others wait); with --keep-best,
    a better main figure than any before saves OUT/STAGE_best.pt."""
    def __init__(self, run, figures):
        self.run, self.figures, self.args = run, figures, run.args
        self.held_note = " on TRAINING data" if figures.held.trained_on else ""

    def evaluate(self):
        """-> (figures, seconds taken), or ({}, None) at a step without evaluation."""
        run, args = self.run, self.args
        if not args.eval_every or (run.step % args.eval_every and run.step != args.steps):
            return {}, None
        began, figures = time.time(), {}
        if run.ranks.main:
            with run.ema.weights(run.model), torch.no_grad():
                figures = self.figures.evaluate(run.model)
        figures = run.ranks.collect(figures)[0]           # rank 0's, for --keep-best's save
        seconds = time.time() - began
        main, kept = figures[VAL_FIGURES[args.stage][0]], ""
        if args.keep_best and main < run.checkpoint.best:
            run.checkpoint.best = main
            best = run.checkpoint.path.removesuffix(".pt") + "_best.pt"
            run.checkpoint.save(run.step, best)
            kept = f"; best so far, saved {best}"
        tqdm.write(f"{args.stage} step {run.step}: held-out{self.held_note} "
                   + ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in figures.items())
                   + f" ({seconds:.1f} s{kept})")
        return figures, seconds

    def demo(self):
        """Rank 0 makes the stage's demos and says what they are and how long they took."""
        run = self.run
        if not self.args.demo_every or run.step % self.args.demo_every:
            return
        if run.ranks.main:
            began = time.time()
            with run.ema.weights(run.model), torch.no_grad():
                head, *rest = self.figures.demo(run.model, run.step).split("\n")
            tqdm.write("\n".join([f"{self.args.stage} step {run.step}: {head} "
                                  f"({time.time() - began:.1f} s)", *rest]))
        run.ranks.barrier()


class HeldOutVAE:
    """The VAE's held-out figures (reconstruction and KL) and demos (clips and their
    reconstructions), from the posterior mean, as sample.py --reconstruct decodes."""
    def __init__(self, args, held, crop, device):
        self.args, self.held, self.crop, self.device = args, held, crop, device

    @functools.cache
    def clips(self, n, window):
        return self.held.batch(n, 0, window)["audio"].to(self.device)        # (n, 2, window)

    def reconstruct(self, model):
        """The held-out clips (B, 2, N), their reconstructions from the posterior mean, and
        the posterior's mean and std (B, 64, L)."""
        x = self.clips(EVAL_ITEMS["vae"], self.crop)
        mean, std = model.vae.encode(x)
        return x, model.vae.decode(mean)[..., :x.shape[-1]], mean, std

    def evaluate(self, model):
        x, x_hat, mean, std = self.reconstruct(model)
        return {"val_spectral": sa.stereo_loss(x_hat, x, model.config.sample_rate).item(),
                "val_kl": sa.kl_divergence(mean, std).item()}

    def demo(self, model, step):
        """Held-out clips of --demo-seconds and their reconstructions, to hear phase 1 and 2."""
        rate = model.config.sample_rate
        x = self.clips(DEMO_CLIPS, round(self.args.demo_seconds * rate))
        x_hat = model.vae.decode(model.vae.encode(x)[0])[..., :x.shape[-1]]
        return write_demos(self.args, step, torch.stack([x, x_hat], 1).flatten(0, 1),  # pairs
                           [f"{i}_{name}" for i in range(len(x))
                            for name in ("heldout", "decoded")], rate)


class HeldOutCLAP:
    """CLAP's held-out figures: the contrastive loss over held-out pairs, and how often a
    caption's closest clip is its own (or carries the same caption: a held-out file can come
    twice, cropped anew); its demo, a retrieval table to read."""
    def __init__(self, args, held, crop, device):
        self.held, self.crop, self.device = held, crop, device

    @functools.cache
    def pairs(self):
        batch = self.held.batch(EVAL_ITEMS["clap"], 0, window=self.crop)
        return batch["prompts"], batch["audio"].to(self.device)

    def similarity(self, model):
        prompts, audio = self.pairs()
        text = model.clap.embed_text(*model.clap.tokenize(prompts))
        return text, model.clap.embed_audio(audio)

    def evaluate(self, model):
        prompts, _ = self.pairs()
        text, audio = self.similarity(model)
        best = (text @ audio.T).argmax(1).tolist()
        return {"val_loss": model.clap.loss(text, audio).item(),
                "val_top1": sum(prompts[j] == p for j, p in zip(best, prompts)) / len(prompts)}

    def demo(self, model, step):
        text, audio = self.similarity(model)
        return retrieval_table((text @ audio.T)[:TABLE_ROWS, :TABLE_ROWS],
                               self.pairs()[0][:TABLE_ROWS])


class HeldOutDiffusion:
    """The U-Net's held-out figure, the v-loss on held-out latents (posterior means of the frozen
    VAE), conditioned on their captions, at the EVAL_T noise levels with noise from a generator
    of its own, seeded 0; its demos, samples of --demo-prompt (or held-out captions) from seed 0."""
    def __init__(self, args, held, device):
        self.args, self.held, self.device = args, held, device

    @functools.cache
    def batch(self):
        return self.held.batch(EVAL_ITEMS["diffusion"], 0)

    @functools.cache
    def latents(self, vae):
        mean, _ = encode_clips(vae, self.batch()["audio"], self.device)
        return mean                                                       # (B, 64, L)

    def evaluate(self, model):
        batch, z = self.batch(), self.latents(model.vae) * model.config.latent_scale
        losses = v_losses(model, z, batch, EVAL_T, self.device)
        return {"val_loss": sum(losses) / len(losses)}

    def demo(self, model, step):
        prompts = self.args.demo_prompt or self.batch()["prompts"][:DEMO_PROMPTS]
        audio = sa.generate(model, prompts, seconds_total=self.args.demo_seconds,
                            steps=self.args.demo_steps, seed=0)
        return write_demos(self.args, step, audio, [f"{i}_{sound_world.slug(p)}" for i, p in
                                                    enumerate(prompts)], model.config.sample_rate)


def v_losses(model, z, batch, ts, device):
    """The v-loss of latents z (B, 64, L) with their batch's captions and timing, at each noise
    level of ts, with noise from a generator of its own, seeded 0: the same figure every time."""
    timing = batch["seconds_start"], batch["seconds_total"]
    context, mask = model.condition(batch["prompts"], *timing)
    frames = model.content_frames(*timing).to(device)
    generator = torch.Generator().manual_seed(0)
    return [v_loss_at(model.unet, z, torch.full((len(z),), t, device=device),
                      sa.randn(z.shape, generator, z), context, mask, frames) for t in ts]


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


# -------------------------------------------------------------------------------------------------
# Starting a run: fresh, from --init, or --resume with the flags it was trained with; a trained
# part (the VAE, CLAP, a U-Net) put into a model, refused if it computes something else.
# -------------------------------------------------------------------------------------------------
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


def prepare(args, stage, model_config):
    """The model to train, fresh (built from model_config(args)) or restored for --resume, and
    the checkpoint's state (None for a fresh run)."""
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
        return model, state
    if os.path.exists(path) and not args.force:
        raise TrainingError(f"{path} exists; pass --resume to continue it or --force to start over")
    metrics = os.path.join(args.out, f"{stage}.csv")
    if os.path.exists(metrics) and not args.force:
        raise TrainingError(f"{metrics} holds the metrics of an earlier run that left no "
                            f"checkpoint; pass --force to start over")
    torch.manual_seed(args.seed)               # parameter initialisation draws from torch's RNG
    return sa.build_model(model_config(args)), None


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


# -------------------------------------------------------------------------------------------------
# The data: batches by step (batch k depends only on the seed and k), made ahead by --workers,
# or, for diffusion, drawn from latents encoded once (--latent-cache).
# -------------------------------------------------------------------------------------------------
class Overfit:
    """Every step sees the first batch: a sanity check that the loss can fall toward zero."""
    def __init__(self, data):
        self.data = data

    def batch(self, batch_size, step, window=None):
        return self.data.batch(batch_size, 0, window)

    def item(self, index, window):                  # the latent cache encodes the first items
        return self.data.item(index, window)


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
    return round(1 / float(latent_std(mean, std)), 4)


def latent_std(mean, std, dim=()):
    """The std of z = mean + std * eps from the posteriors (B, 64, L): the root of var(mean) +
    E[std^2], over everything, or per channel with dim=(0, 2)."""
    return (mean.float().var(dim) + std.float().pow(2).mean(dim)).sqrt()


# -------------------------------------------------------------------------------------------------
# Small steps the stages share.
# -------------------------------------------------------------------------------------------------
def autocast(device, dtype):
    """bf16/fp16 autocast on CUDA (the paper trains with AMP); plain float32 elsewhere."""
    return torch.autocast(device.type, getattr(torch, dtype), enabled=dtype != "float32")


def copy_of(generator):
    return torch.Generator().set_state(generator.get_state())


def clip_and_step(optimizer, params, max_norm):
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


# -------------------------------------------------------------------------------------------------
# Before training on your own audio (train.py check): what makes a model of a folder produce
# noise is usually ordinary and found in minutes: an autoencoder not trained for the material,
# windows that are mostly padding, latents far from the unit variance the noise schedule assumes
# (§4.4), captions missing or all alike, rates and channels. Each finding names its fix.
# -------------------------------------------------------------------------------------------------
CHECK_READ = 64            # files whose levels are read, spread evenly over a larger folder
SILENT_DBFS = -60.0        # a file whose peak is below this is silent
CLIPPED_SHARE = 1e-3       # of a file's samples at full scale: clipped
DC_SHARE = 0.1             # a channel's mean over its RMS: a DC offset
PADDED = 0.5               # a typical window with more padding than this is too long
SAME_CAPTION = 0.5         # one caption on this share of the files (and on 3 or more)
VAE_WORSE = 1.5            # the folder's reconstruction loss over the sound world's
# STFT loss on sound-world clips above which a VAE is untrained: a fresh tiny one scores about 7,
# the bundled demo's 3.5.
VAE_UNTRAINED = 5.0
TONAL = 0.2                # clips this tonal have notes to lose
TONES_KEPT = 0.5           # tonality kept on the folder, as a share of that kept on the sound world
LATENT_STD = (0.5, 2.0)    # the scaled latents' std outside this: rescale them
CHECK_STEPS = 50           # the trial run's steps, on one batch
CHECK_T = (0.125, 0.375, 0.625, 0.875)    # noise levels of the trial's fixed-noise v-loss
TRIAL_FALL = 1.25          # the trial's v-loss must fall by this factor (1.00 if nothing learns)
DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "demo.pt")
# Why inspect_file skips a file, by the words of its reason: what the files have, and the fix.
METADATA_FIX = 'make each .json an object of fields, e.g. {"genre": "techno", "bpm": 128}'
SKIPS = {"not readable": ("are not readable audio", "convert them to wav or flac, or remove them"),
         "no audio frames": ("have no audio frames", "remove them"),
         "no caption": ("have no caption", "add a caption beside each: song.wav + song.txt (the "
                        "prompt) or song.json (fields such as genre, bpm; §4.5)"),
         "is empty": ("have an empty .txt caption", "write each file's prompt into its .txt"),
         "JSON": ("have bad .json metadata", METADATA_FIX),
         "must be an object": ("have bad .json metadata", METADATA_FIX)}


def demo_path():
    """The bundled demo's checkpoint, as a path from here if it lies below, else in full."""
    near = os.path.relpath(DEMO)
    return DEMO if near.startswith("..") else near


class Findings:
    """What the check found: rows of its table as it goes, and problems, each with its fix."""
    def __init__(self):
        self.problems = []

    def section(self, title):
        print(f"\n{title}")

    def row(self, name, value):
        print(f"  {name:<36} {value}")

    def problem(self, what, fix):
        self.problems.append((what, fix))

    def verdict(self):
        """The verdict lines -> the exit status: 1 if anything needs fixing, else 0."""
        if not self.problems:
            print("\nverdict: no problem found")
            return 0
        print(f"\nverdict: {len(self.problems)} problem{'s' * (len(self.problems) > 1)}")
        for what, fix in self.problems:
            print(f"problem: {what}\n  fix: {fix}")
        return 1


def quietly(fn, *args):
    """fn(*args) without its prints (the loaders' notes, a training run's bar and log lines)."""
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        return fn(*args)


def percent(x):
    return f"{100 * x:.0f} %"


def share(n, of):
    return f"{n} of {of}" if n < of else f"all {of}"


def check_files(args, config, found):
    """The folder's files: which training would skip and why, and of those it would use, the
    levels, rates and channels, captions and lengths against the window."""
    files = sound_world.audio_files(args.data)
    items, skipped = [], {}
    for path in files:
        try:
            items.append(sound_world.inspect_file(path))
        except ValueError as err:
            kind = next((v for k, v in SKIPS.items() if k in str(err)),
                        (f"another fault ({err})", "fix or remove them"))
            skipped.setdefault(kind, []).append(path.name)
    if not items:
        kinds = sorted(skipped.items(), key=lambda kv: -len(kv[1]))
        raise TrainingError(
            f"nothing to train on in {args.data}: " + (", ".join(
                f"{len(names)} of {len(files)} audio files {kind}" for (kind, _), names
                in kinds) + f"; {kinds[0][0][1]}" if files else "no audio files (wav, flac, "
                "ogg, aiff, mp3, …); give a folder of audio files with captions"))
    found.section(f"folder {args.data}: {len(files)} audio files, {len(items)} used, "
                  f"{len(files) - len(items)} skipped")
    for (kind, fix), names in skipped.items():
        found.row(f"skipped: {kind}", f"{len(names)} ({', '.join(names[:3])}"
                  f"{', …' if len(names) > 3 else ''})")
        found.problem(f"{share(len(names), len(files))} audio files {kind}; training skips "
                      f"them", fix)
    check_levels(items, found)
    check_formats(items, config, found)
    check_captions(items, found)
    check_lengths(args, items, config, found)


# What a file's levels can say is wrong with it: (what such files are, why it matters, the fix).
LEVEL_PROBLEMS = {
    "silent": ("are silent", f"their peak is under {SILENT_DBFS:g} dBFS: the model learns their "
               f"captions as silence", "remove them, or export them again at their real level"),
    "clipped": ("are clipped", f"over {100 * CLIPPED_SHARE:g} % of their samples are at full "
                f"scale: the model learns the distortion", "export them again at a lower gain "
                "(peaks near -1 dBFS), or leave them out"),
    "DC offset": ("have a DC offset", f"a channel's mean is over {100 * DC_SHARE:g} % of its "
                  f"RMS: the VAE's A-weighted loss is blind to 0 Hz, so the offset only wastes "
                  f"headroom and clicks where a crop starts", "remove it before training: a "
                  "high-pass filter at about 20 Hz"),
    "unreadable": ("do not read", "their headers read but their audio does not: training stops "
                   "on them", "convert them to wav or flac, or remove them")}


def level_problem(path):
    """What is wrong with a file's levels, a key of LEVEL_PROBLEMS, or None."""
    try:
        level = sound_world.levels(path)
    except ValueError:
        return "unreadable"
    if level["peak_db"] < SILENT_DBFS:
        return "silent"
    if level["clipped"] > CLIPPED_SHARE:
        return "clipped"
    return "DC offset" if level["dc"] > DC_SHARE else None


def check_levels(items, found):
    """Silent, clipped and DC-offset files among (up to CHECK_READ of) the used ones."""
    read = items[::math.ceil(len(items) / CHECK_READ)]
    problems = [level_problem(item["path"]) for item in read]
    found.row("levels read", f"{share(len(read), len(items))} used files")
    for kind, (are, why, fix) in LEVEL_PROBLEMS.items():
        bad = [item["path"] for item, problem in zip(read, problems) if problem == kind]
        found.row(kind, len(bad))
        if bad:
            found.problem(f"{share(len(bad), len(read))} files read {are} ({bad[0]}, …): {why}",
                          fix)


def check_formats(items, config, found):
    """Sample rates and channel counts, and what they become (§4.4: 44.1 kHz stereo)."""
    sr = config.sample_rate
    formats = {}
    for item in items:
        formats.setdefault((item["sample_rate"], item["channels"]), []).append(item)
    for (rate, channels), group in sorted(formats.items()):
        found.row(f"{rate} Hz, {channels} channel{'s' * (channels > 1)}",
                  f"{len(group)} -> {sr} Hz stereo" + (" (resampled)" if rate != sr else ""))
    low = [i for i in items if i["sample_rate"] < sr]
    if low:
        rate = min(i["sample_rate"] for i in low)
        found.problem(f"{share(len(low), len(items))} files are at a lower rate than the "
                      f"model's {sr} Hz (down to {rate} Hz): resampled, they hold nothing above "
                      f"{rate / 2000:g} kHz, and neither will the model's audio",
                      f"train on {sr} Hz (or higher) sources if you have them; otherwise expect "
                      f"no highs above {rate / 2000:g} kHz")
    mono = [i for i in items if i["channels"] == 1]
    if mono:
        found.problem(f"{share(len(mono), len(items))} files are mono: each is copied to both "
                      f"channels, so the model learns no stereo image from them",
                      "train on stereo sources if you want stereo; a mono model needs nothing")


def check_captions(items, found):
    """Captions: how many, whether one caption covers most files, whether any is too long for
    the text encoder (it reads UTF-8 bytes, MAX_PROMPT_BYTES of them)."""
    captions = [i["caption"] for i in items if "caption" in i]
    found.row("captions (.txt), metadata (.json)", f"{len(captions)}, {len(items) - len(captions)}")
    if captions:
        top, count = max(((c, captions.count(c)) for c in set(captions)), key=lambda x: x[1])
        found.row("distinct captions", len(set(captions)))
        if count >= 3 and count >= SAME_CAPTION * len(items):
            found.problem(f"{share(count, len(items))} files share one caption ({top[:40]!r}): "
                          f"the text cannot tell them apart, so guidance has nothing to follow",
                          "give each file a caption that says what differs (sound, "
                          "instruments, genre, mood, tempo), or .json fields (§4.5)")
    limit = sound_world.MAX_PROMPT_BYTES
    long = [c for c in captions if len(c.encode()) > limit]
    found.row(f"captions over {limit} bytes (UTF-8)", len(long))
    if long:
        found.problem(f"{share(len(long), len(captions))} captions are longer than the {limit} "
                      f"bytes (UTF-8) the text encoder reads: the rest is cut off",
                      "shorten them to the words that matter, or use .json fields, which are "
                      "dropped one by one to fit")


def check_lengths(args, items, config, found):
    """File lengths against the window (§3.2): a short file is padded to the window with
    silence, which the model learns to make; and against CLAP's 10 s crops."""
    sr = config.sample_rate
    seconds = np.array([i["seconds"] for i in items])
    window = config.window / sr
    typical = float(np.median(seconds))
    padding = max(0.0, 1 - typical / window)
    found.row("length: median (10 %-90 %)", f"{typical:.3g} s ({np.quantile(seconds, 0.1):.3g}-"
              f"{np.quantile(seconds, 0.9):.3g} s)")
    found.row("window", f"{window:.3g} s" + (" (--window-seconds)" if args.window_seconds else
                                                 f" (size {config.size})"))
    found.row("padding in a typical window", percent(padding))
    found.row("files longer than the window", f"{int((seconds > window).sum())} (cropped)")
    if padding > PADDED:
        fit = math.ceil(np.quantile(seconds, 0.9) * 2) / 2
        crop = (f", and --crop {round(fit * sr)} for clap (default 10 s)" if fit < 10 else "")
        found.problem(f"the typical file lasts {typical:.3g} s and the window {window:.3g} s: "
                      f"{percent(padding)} of a typical window is padding, so the model learns "
                      f"mostly silence", f"--window-seconds {fit:g} (it holds 90 % of your "
                      f"files whole){crop}")


def check_held_out(args, config, found):
    """The held-out share (sound_world.split_data): what a run is watched on."""
    train, held, note = quietly(sound_world.split_data, args.data, args.val, config.window,
                                config.sample_rate, args.seed)
    found.row("held out", note)
    if held.trained_on:
        found.problem("too few files to hold any out: a run's held-out figures would come from "
                      "its training files", "give more files, or --val DIR with files of its own")
    return train, held


@torch.no_grad()
def check_vae(args, config, train, held, device, found):
    """The VAE on clips of the folder beside held-out sound-world clips: the §4.2 reconstruction
    loss and the tonality it keeps (a note it turns into noise, no U-Net can play). The folder's
    clips come from as many files as the sound world's, held-out ones first: one file's figure
    says more about its sound than about the VAE."""
    model = sa.build_model(config)
    load_part(model, "vae", args.vae, "--vae")
    model.to(device).eval()
    n = EVAL_ITEMS["vae"]
    items = held.items + train.items[::max(1, len(train.items) // n)]
    folder = sound_world.FolderData(args.data, config.window, config.sample_rate,
                                    items=items[:max(n, len(held.items))], in_turn=True)
    toy = sound_world.split_data("toy", None, config.window, config.sample_rate)[1]
    figures = {}
    for name, data in (("your folder", folder), ("the sound world", toy)):
        x, x_hat, _, _ = HeldOutVAE(args, data, args.crop, device).reconstruct(model)
        audible = x.abs().amax((1, 2)) > 10 ** (SILENT_DBFS / 20)
        if not audible.any():
            figures[name] = None
            continue
        x, x_hat = x[audible].float().cpu(), x_hat[audible].float().cpu()
        tones = [np.mean([sound_world.tonality(a) for a in y.numpy()]) for y in (x, x_hat)]
        figures[name] = (sa.stereo_loss(x_hat, x, model.config.sample_rate).item(), *tones)
    found.section(f"autoencoder {args.vae}: {n} clips of {args.crop} samples, from "
                  f"{min(len(folder.items), n)} files here ({len(held.items)} held out) and "
                  f"from the sound world")
    for name, figure in figures.items():
        found.row(name, "every clip silent" if figure is None else
                  f"STFT loss {figure[0]:.3g}; tonality {figure[1]:.2f} -> {figure[2]:.2f}")
    mine, world = figures["your folder"], figures["the sound world"]
    if mine is None:
        return
    fine_tune = (f"fine-tune it on this folder first: train.py vae --data {args.data} --init "
                 f"{args.vae} (--freeze-encoder to train the decoder alone), then "
                 f"train.py diffusion --vae OUT/vae.pt")
    if min(mine[0], world[0]) > VAE_UNTRAINED:
        found.problem(f"the autoencoder reconstructs nothing well (STFT loss {mine[0]:.3g} "
                      f"here, {world[0]:.3g} on the sound world): it is untrained, and a "
                      f"U-Net on its latents learns noise", f"train it first: train.py vae "
                      f"--data {args.data} (or --init {demo_path()} to start from the demo's)")
    elif mine[0] > VAE_WORSE * world[0]:
        found.problem(f"the autoencoder reconstructs your clips worse than the sound world "
                      f"(STFT loss {mine[0]:.3g} against {world[0]:.3g})", fine_tune)
    elif min(mine[1], world[1]) > TONAL and mine[2] / mine[1] < TONES_KEPT * world[2] / world[1]:
        found.problem(f"the autoencoder turns your notes into noise (tonality {mine[1]:.2f} -> "
                      f"{mine[2]:.2f}; on the sound world {world[1]:.2f} -> {world[2]:.2f})",
                      fine_tune)


def check_latents(cached, scale, found):
    """The latents' spread, overall and per channel, at the run's latent scale, and the scale
    that makes them of unit variance (--latent-scale auto)."""
    std = float(latent_std(cached["mean"], cached["std"]))
    channels = latent_std(cached["mean"], cached["std"], (0, 2))
    found.section(f"latents of {len(cached['mean'])} windows (z = mean + std * eps)")
    found.row("std of z, overall", f"{std:.3g}")
    found.row("std per channel: min, median, max", ", ".join(
        f"{v:.3g}" for v in (channels.min(), channels.median(), channels.max())))
    found.row("latent scale of the run, scaled std", f"{scale:g}, {std * scale:.3g}")
    found.row("--latent-scale for unit variance", f"{1 / std:.4g}")
    if not LATENT_STD[0] <= std * scale <= LATENT_STD[1]:
        found.problem(f"the latents' std is {std * scale:.3g} at latent scale {scale:g}; the "
                      f"noise schedule assumes about 1, so " + (
                          "noise drowns their detail at most noise levels" if std * scale < 1
                          else "the first steps of sampling barely denoise"),
                      f"--latent-scale auto for the diffusion stage (here {1 / std:.4g})")


def check_trial(args, model_config, train_diffusion, device, found):
    """A short trial of the diffusion stage itself (train_diffusion, --overfit, in a folder
    deleted after): its v-loss on the batch at fixed noise levels before and after. A pipeline
    that cannot learn one batch in a few steps will not learn a folder in hours."""
    with tempfile.TemporaryDirectory() as out:
        trial = argparse.Namespace(**{
            **vars(args), "stage": "diffusion", "out": out, "overfit": True,
            "latent_cache": args.batch_size, "eval_every": 0, "demo_every": 0,
            "save_every": args.steps, "init": None, "resume": False,
            "lr_from_checkpoint": False, "ranks": Ranks()})
        try:
            quietly(train_diffusion, trial)
        except Stop as e:                      # a non-finite loss: it is a finding
            found.section("trial")
            found.problem(f"the trial run stopped: {e}", "lower --lr, and see the latents above")
            return
        trained, _ = sa.load_checkpoint(os.path.join(out, "diffusion.pt"), ema=False)
        cached = torch.load(os.path.join(out, "latents.pt"), weights_only=True)
    torch.manual_seed(args.seed)                       # the trial's initial weights (prepare)
    fresh = sa.build_model(model_config(trial))
    fresh.load_state_dict({k: v for k, v in trained.state_dict().items()
                           if not k.startswith(STAGE_PARTS["diffusion"])}, strict=False)
    check_latents(cached, trained.config.latent_scale, found)
    z = cached["mean"].to(device) * trained.config.latent_scale
    with torch.no_grad():
        before, after = (v_losses(m.to(device).eval(), z, cached, CHECK_T, device)
                         for m in (fresh, trained))
    fall = sum(before) / max(sum(after), 1e-12)
    found.section(f"trial: {args.steps} steps of the diffusion stage on one batch of "
                  f"{len(z)} windows (--lr {args.lr:g})")
    found.row("noise level t", "  ".join(f"{t:>6.3f}" for t in CHECK_T))
    for name, losses in (("v-loss before", before), ("v-loss after", after)):
        found.row(name, "  ".join(f"{v:>6.3f}" for v in losses))
    found.row("mean v-loss fell by", f"{fall:.2f}x (at least {TRIAL_FALL:g}x expected)")
    if fall < TRIAL_FALL:
        found.problem(f"the diffusion stage did not learn one batch in {args.steps} steps (its "
                      f"v-loss fell {fall:.2f}x, not {TRIAL_FALL:g}x): something in the "
                      f"pipeline keeps it from learning", "fix the findings above first; then "
                      "train.py diffusion --overfit with more --steps, or another --lr, and "
                      "watch its loss")


def check(args, model_config, train_diffusion):
    """train.py check: the folder, the autoencoder on it, its latents and a short trial of the
    diffusion stage, as a table and then one line per problem with its fix; writes nothing.
    -> the exit status: 0 when nothing needs fixing, 1 when something does."""
    config, device = model_config(args), pick_device(args.device)
    if args.size != "tiny" and not (args.vae and args.clap):
        raise TrainingError(f"the bundled demo's VAE and CLAP are of size tiny; pass --vae CKPT "
                            f"and --clap CKPT of size {args.size}")
    demo = demo_path()
    args = argparse.Namespace(**{**vars(args), "vae": args.vae or demo, "clap": args.clap or demo})
    found = Findings()
    check_files(args, config, found)
    train, held = check_held_out(args, config, found)
    check_vae(args, config, train, held, device, found)
    check_trial(args, model_config, train_diffusion, device, found)
    return found.verdict()


# -------------------------------------------------------------------------------------------------
# What every script shares (sample.py, bench.py and the rest import it from here): the device, the
# precision, one-line argument errors.
# -------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name="auto"):
    """auto: cuda, then mps, then cpu. Naming a missing accelerator is an error."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    name = next(d for d, ok in available.items() if ok) if name == "auto" else name
    if not available[name]:
        gpu = {"cuda": "CUDA GPU", "mps": "Apple MPS device"}[name]
        raise ValueError(f"--device {name} but no {gpu} is visible; use --device cpu")
    return torch.device(name)


def cpu_has_bf16():
    """Whether the CPU multiplies bf16 in hardware (AMX, AVX-512 BF16, Arm BF16), as Linux's
    /proc/cpuinfo lists; elsewhere bf16 is emulated, many times slower than float32."""
    if not os.path.isfile("/proc/cpuinfo"):
        return False
    with open("/proc/cpuinfo") as f:
        return bool({"amx_bf16", "avx512_bf16", "bf16"} & set(f.read().split()))


def pick_dtype(name, device):
    """"auto": bfloat16 on CUDA (the paper's), float32 elsewhere (the same numbers on any CPU).
    bfloat16 runs on CPUs with bf16 units (cpu_has_bf16); other requests fall back to float32."""
    name = ("bfloat16" if device.type == "cuda" else "float32") if name == "auto" else name
    if name == "float32" or device.type == "cuda" or (
            name == "bfloat16" and device.type == "cpu" and cpu_has_bf16()):
        return DTYPES[name]
    units = " or a CPU with bf16 units (AMX, AVX-512 BF16)" if name == "bfloat16" else ""
    print(f"note: --dtype {name} needs cuda{units}; running in float32 on {device.type}")
    return torch.float32


class UsageError(ValueError):
    """Bad input to a script: its main() prints it as one `error:` line and exits with 2."""


class Parser(argparse.ArgumentParser):
    """argparse for the scripts: a bad flag is one line (UsageError), not a usage dump and exit."""
    def error(self, message):
        raise UsageError(f"{message} (see --help)")
