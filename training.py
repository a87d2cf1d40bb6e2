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
import math
import os
import shlex
import signal
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
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

    def evaluate(self, model):
        x = self.clips(EVAL_ITEMS["vae"], self.crop)
        mean, std = model.vae.encode(x)
        x_hat = model.vae.decode(mean)[..., :x.shape[-1]]
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
        timing = batch["seconds_start"], batch["seconds_total"]
        context, mask = model.condition(batch["prompts"], *timing)
        frames = model.content_frames(*timing).to(self.device)
        generator = torch.Generator().manual_seed(0)
        losses = [v_loss_at(model.unet, z, torch.full((len(z),), t, device=self.device),
                            sa.randn(z.shape, generator, z), context, mask, frames)
                  for t in EVAL_T]
        return {"val_loss": sum(losses) / len(losses)}

    def demo(self, model, step):
        prompts = self.args.demo_prompt or self.batch()["prompts"][:DEMO_PROMPTS]
        audio = sa.generate(model, prompts, seconds_total=self.args.demo_seconds,
                            steps=self.args.demo_steps, seed=0)
        return write_demos(self.args, step, audio, [f"{i}_{sound_world.slug(p)}" for i, p in
                                                    enumerate(prompts)], model.config.sample_rate)


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
    return round(float((mean.float().var() + std.float().pow(2).mean()).rsqrt()), 4)


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
