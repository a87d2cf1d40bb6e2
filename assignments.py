"""Course assignments: write the paper's key pieces yourself; an autograder says whether each is
right and, when not, what is most likely wrong.

    python assignments.py list                        # the assignments, their sections and points
    python assignments.py starter --out student.py    # the blank file to hand out
    python assignments.py solution --out key.py       # the instructor's key
    python assignments.py grade student.py [--only A1,A6] [--seed N] [--csv]

The starter is made from stable_audio.py each time: every piece keeps the reference's signature and
docstring, and its body raises NotImplementedError. A piece is a top-level function (`snake`) or a
method (`Attention.forward`, written inside a class of the same name that holds just that method).

While one assignment is graded, its pieces alone are swapped into stable_audio and run there as if
written in that file: every other name they use is the reference's, so the assignments are
independent. The checks compare with closed forms computed here in float64, or test properties that
must hold (masked keys change nothing, a sampler's measured order, guidance at scale 1 is the
conditional prediction), on inputs drawn anew from --seed, so hard-coded outputs fail. When a check
fails, its message names the mistake its numbers match, if they match a known one.
"""
import argparse
import ast
import concurrent.futures
import contextlib
import csv
import importlib.util
import inspect
import io
import json
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sound_world
import stable_audio as sa
import training

HERE = Path(__file__).resolve().parent


class Wrong(Exception):
    """A check that failed; the message says what was expected and, if known, the likely bug."""


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# A correct piece may compute in float32 (each rounding 6e-8 of the values it works on, a few dozen
# of them in a piece) or add a small epsilon to a division (1e-9 .. 1e-6): both stay below RTOL of
# the largest expected value at every seed, and every mistake the grader names is off by far more.
RTOL = 1e-5


def close(got, want, rtol, atol=None):
    """|got - want| <= atol + rtol |want| everywhere; atol defaults to rtol times the largest
    |want|: float32 round-off scales with the values a piece works on, not with each output."""
    atol = rtol * want.abs().max().item() if atol is None and want.numel() else atol or 0.0
    return bool(((got - want).abs() <= atol + rtol * want.abs()).all())


def compare(got, want, what, suspects=(), rtol=RTOL, atol=None):
    """Raise Wrong unless got equals want to rtol/atol; if got matches one of the suspects (hint,
    value) instead, the message is that suspect's hint."""
    if isinstance(got, (int, float)) and want.numel() == 1:
        got = torch.tensor(float(got), dtype=torch.float64).reshape(want.shape)
    if not isinstance(got, torch.Tensor):
        raise Wrong(f"{what}: expected a tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        raise Wrong(f"{what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    got = got.detach().double()
    if close(got, want, rtol, atol):
        return
    for hint, value in suspects:
        value = torch.as_tensor(value, dtype=torch.float64)
        if value.shape == got.shape and close(got, value, rtol, atol):
            raise Wrong(f"{what}: {hint}")
    if not torch.isfinite(got).all():
        raise Wrong(f"{what} holds nan or inf")
    raise Wrong(f"{what} {signature(got, want, rtol)}")


def signature(got, want, rtol):
    """What a wrong answer's numbers say when no named mistake matches: the wrong sign, a constant
    factor or offset everywhere, or right at some indices of an axis and wrong at others."""
    scale = want.abs().max().item()
    same = lambda a, b: close(a, b, rtol, rtol * scale)
    if want.numel() > 1 and want.std() > rtol * scale:       # a constant says nothing of factors
        factor = ((got * want).sum() / (want * want).sum()).item()
        offset = (got - want).mean().item()
        if same(got, -want):
            return "has the expected values with the wrong sign"
        if abs(factor - 1) > 1e-3 and same(got, factor * want):
            return (f"is {factor:.4g} times the expected values everywhere: a factor is missing "
                    f"or extra")
        if abs(offset) > rtol * scale and same(got, want + offset):
            return (f"is the expected values plus {offset:.4g} everywhere: a term is missing or "
                    f"extra")
    if want.numel() > 1:
        for dim in range(want.ndim):
            right = [same(g, w) for g, w in zip(got.unbind(dim), want.unbind(dim))]
            if 0 < sum(right) < len(right):
                wrong = [i for i, r in enumerate(right) if not r]
                return (f"is right at indices {[i for i, r in enumerate(right) if r][:6]} of axis "
                        f"{dim} (of {len(right)}) and wrong at {wrong[:6]}: look at what differs "
                        f"between them")
    return (f"is off by up to {(got - want).abs().max().item():.3g} (the expected values reach "
            f"{scale:.3g})")


def is_zero(value):
    """True for 0 given as a number or as a tensor of zeros (either is "0" in a docstring)."""
    try:
        return bool((torch.as_tensor(value).abs() == 0).all())
    except (TypeError, ValueError, RuntimeError):
        return False


def nontrivial(got, *inputs, what):
    """A property check earns nothing from a piece that returns zeros or one of its inputs."""
    got = got.detach().double()
    if is_zero(got) or any(isinstance(i, torch.Tensor) and i.shape == got.shape
                           and torch.equal(got, i.detach().double()) for i in inputs):
        raise Wrong(f"{what} returns {'zeros' if is_zero(got) else 'its input unchanged'}: "
                    f"write the formula first")


def cosine(t):
    """The v-model's schedule, (alpha, sigma) = (cos, sin)(pi t / 2), in float64."""
    return torch.cos(math.pi * t.double() / 2), torch.sin(math.pi * t.double() / 2)


def expect(condition, message):
    if not condition:
        raise Wrong(message)


class Recorder(nn.Module):
    """Stands in for the U-Net: keeps what each call was given and answers answer(x, t, ...)."""
    def __init__(self, answer, null_context):
        super().__init__()
        self.answer, self.calls = answer, []
        self.null_context = nn.Parameter(null_context)

    def forward(self, x, t, context, mask, content_frames=None):
        self.calls.append(dict(x=x, t=t, context=context, mask=mask, frames=content_frames))
        return self.answer(x, t, context, mask)


# -------------------------------------------------------------------------------------------------
# A1 §3.1 Snake, x + sin^2(alpha x) / alpha, and the VAE's KL term
# -------------------------------------------------------------------------------------------------
def snake_formula(g):
    x, alpha = 3 * randn(g, 2, 3, 40), 0.2 + 2 * torch.rand(1, 3, 1, generator=g).double()
    s = torch.sin(alpha * x)
    compare(sa.snake(x, alpha), x + s ** 2 / alpha, "snake(x, alpha)", [
        ("the 1/alpha is missing: Snake is x + sin^2(alpha x) / alpha", x + s ** 2),
        ("sin, not sin squared: Snake is x + sin^2(alpha x) / alpha", x + s / alpha),
        ("sin^2 is multiplied by alpha; it is divided by it", x + alpha * s ** 2),
        ("x is missing: Snake is x plus the periodic term sin^2(alpha x) / alpha", s ** 2 / alpha),
        ("that is x alone: add the periodic term sin^2(alpha x) / alpha", x)])


def snake_beta(g):
    x = 3 * randn(g, 2, 3, 40)
    alpha, beta = (0.2 + 2 * torch.rand(1, 3, 1, generator=g).double() for _ in range(2))
    compare(sa.snake(x, alpha, beta), x + torch.sin(alpha * x) ** 2 / beta,
            "snake(x, alpha, beta)", [
                ("beta is ignored: the magnitude is 1/beta when beta is given (SnakeBeta)",
                 x + torch.sin(alpha * x) ** 2 / alpha),
                ("alpha and beta swapped: frequency alpha, magnitude 1/beta",
                 x + torch.sin(beta * x) ** 2 / alpha)])


def snake_at_alpha_zero(g):
    x, a = randn(g, 2, 2, 10), 0.5 + torch.rand(1, generator=g).item()
    alpha = torch.tensor([0.0, a], dtype=torch.float64).reshape(1, 2, 1)
    got = sa.snake(x, alpha)
    expect(isinstance(got, torch.Tensor) and bool(torch.isfinite(got).all()),
           "snake at alpha = 0 gives nan: divide by alpha + 1e-9, as DAC does (sin^2(alpha x) / "
           "alpha tends to 0, and a learned alpha can reach 0)")
    want = torch.cat([x[:, :1], x[:, 1:] + torch.sin(a * x[:, 1:]) ** 2 / a], 1)
    compare(got, want, "snake with alpha = 0 in one channel (where it is x) and not the other",
            [("that is x alone: add the periodic term sin^2(alpha x) / alpha", x)])


def kl_closed_form(g):
    mean, std = randn(g, 3, 8, 20), torch.exp(0.5 * randn(g, 3, 8, 20))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                             torch.distributions.Normal(0.0, 1.0))
    terms = lambda var, log_var: 0.5 * (mean ** 2 + var - log_var - 1)
    compare(sa.kl_divergence(mean, std), want.sum(1).mean(), "kl_divergence(mean, std)", [
        ("twice the KL: the 1/2 is missing (the released code leaves it out; the paper's KL has "
         "it)", 2 * want.sum(1).mean()),
        ("std was used as the variance: the terms are std^2 and log std^2 = 2 log std",
         terms(std, torch.log(std)).sum(1).mean()),
        ("log std^2 is 2 log std, not log std", terms(std ** 2, torch.log(std)).sum(1).mean()),
        ("-log std^2 has the wrong sign: the terms are mean^2 + std^2 - log std^2 - 1",
         terms(std ** 2, -2 * torch.log(std)).sum(1).mean()),
        ("the -1 is missing: the terms are mean^2 + std^2 - log std^2 - 1",
         (want + 0.5).sum(1).mean()),
        ("+1 where -1 belongs: the terms are mean^2 + std^2 - log std^2 - 1",
         (want + 1).sum(1).mean()),
        ("the reverse KL, KL(N(0, 1) || N(mean, std^2)); the VAE's term is KL(posterior || "
         "prior)", (0.5 * ((1 + mean ** 2) / std ** 2 + 2 * torch.log(std) - 1)).sum(1).mean()),
        ("summed over frames and averaged over channels: sum over channels (dim 1), average over "
         "batch and frames", want.sum(2).mean()),
        ("averaged over channels: sum them (one latent frame's KL), then average over batch and "
         "frames", want.mean()),
        ("summed over frames as well as channels: sum over channels only, then average over "
         "batch and frames", want.sum((1, 2)).mean()),
        ("summed over the batch: average over batch and frames", want.sum(1).mean(1).sum()),
        ("summed over everything: sum over channels, average over batch and frames", want.sum())])


def kl_zero_at_the_prior(g):
    mean, std = torch.zeros(2, 4, 5, dtype=torch.float64), torch.ones(2, 4, 5, dtype=torch.float64)
    expect(abs(sa.kl_divergence(mean, std).item()) < 1e-12,
           "kl_divergence of N(0, 1) from itself must be 0")
    expect(sa.kl_divergence(mean + randn(g, 2, 4, 5), std).item() > 0,
           "kl_divergence must be positive when the mean moves off 0")


# -------------------------------------------------------------------------------------------------
# A2 §4.3 CLAP's symmetric contrastive loss with a learned, clamped temperature
# -------------------------------------------------------------------------------------------------
def clap_with_scale(value, dtype=torch.float64):
    return types.SimpleNamespace(logit_scale=nn.Parameter(torch.tensor(math.log(value),
                                                                       dtype=dtype)))


def infonce(logits):
    """Mean over rows of -log softmax(row)[own], by hand."""
    return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()


def unit_rows(g, B, D):
    return F.normalize(randn(g, B, D), dim=-1)


def clap_loss_formula(g):
    text, audio, s = unit_rows(g, 6, 16), unit_rows(g, 6, 16), 10.0
    logits = s * text @ audio.T                                   # not symmetric
    want = (infonce(logits) + infonce(logits.T)) / 2
    compare(sa.CLAP.loss(clap_with_scale(s), text, audio), want, "CLAP.loss", [
        ("caption -> clip only: average it with clip -> caption (§4.3's loss is symmetric)",
         infonce(logits)),
        ("clip -> caption only: average it with caption -> clip (§4.3's loss is symmetric)",
         infonce(logits.T)),
        ("summed over both directions: average them", 2 * want),
        ("no temperature: multiply the cosines by exp(logit_scale)",
         (infonce(logits / s) + infonce(logits.T / s)) / 2),
        ("logit_scale is a log: multiply by its exp", (infonce(logits * math.log(s) / s)
                                                       + infonce(logits.T * math.log(s) / s)) / 2),
        ("the temperature divides the cosines; they are multiplied by exp(logit_scale)",
         (infonce(logits / s ** 2) + infonce(logits.T / s ** 2)) / 2),
        ("the cross-entropies are summed over the batch: average them (cross_entropy's default)",
         len(logits) * want),
        ("summed over the batch and both directions: average over both",
         2 * len(logits) * want),
        ("the clamp is at ln 100; it bounds exp(logit_scale) at 100 (ln 100 bounds logit_scale)",
         (infonce(logits * math.log(100) / s) + infonce(logits.T * math.log(100) / s)) / 2),
        ("clamp(min=100) pins the temperature at 100 or more; it is clamp(max=100)",
         (infonce(logits * 100 / s) + infonce(logits.T * 100 / s)) / 2),
        ("nll_loss (or a plain mean) on raw logits: they need log_softmax first; "
         "F.cross_entropy does both", -logits.diagonal().mean()),
        ("nll_loss on raw logits in one direction: it needs log_softmax first; F.cross_entropy "
         "does both", (-logits.diagonal().mean() + infonce(logits.T)) / 2),
        ("the logits are T^T A, (D, D); they are T A^T, (B, B): caption i against clip j",
         (infonce(s * text.T @ audio) + infonce(s * audio.T @ text)) / 2)])


def clap_stable_in_float32(g):
    # At the clamp (logits up to +-100), caption 0 points away from its clip and at clip 1: its
    # right answer has probability e^-200, below float32's smallest number.
    audio, text = unit_rows(g, 6, 16).float(), unit_rows(g, 6, 16).float()
    audio[1], text[0] = -audio[0], -audio[0]
    got = sa.CLAP.loss(clap_with_scale(1000.0, torch.float32), text, audio)
    logits = 100 * text.double() @ audio.double().T
    expect(isinstance(got, torch.Tensor) and bool(torch.isfinite(got).all()),
           "CLAP.loss is inf or nan in float32 at large logits: log(softmax(x)) underflows to "
           "log 0 (and exp(x) overflows past 88); use F.cross_entropy or log_softmax, which "
           "subtract the largest logit first")
    compare(got, (infonce(logits) + infonce(logits.T)) / 2,
            "CLAP.loss in float32 with logits at +-100")


def clap_temperature_clamped(g):
    text, audio = unit_rows(g, 5, 8), unit_rows(g, 5, 8)
    logits = text @ audio.T
    compare(sa.CLAP.loss(clap_with_scale(1000.0), text, audio),
            (infonce(100 * logits) + infonce(100 * logits.T)) / 2, "CLAP.loss at exp(scale) 1000",
            [("the temperature must be clamped at 100 (as CLIP does), or the logits grow without "
              "bound", (infonce(1000 * logits) + infonce(1000 * logits.T)) / 2)])


def clap_temperature_learned(g):
    clap = clap_with_scale(10.0)
    loss = sa.CLAP.loss(clap, unit_rows(g, 4, 8), unit_rows(g, 4, 8))
    expect(isinstance(loss, torch.Tensor) and loss.requires_grad,
           "CLAP.loss: no gradient: the temperature is learned, keep exp(logit_scale) in the graph")
    loss.backward()
    expect(clap.logit_scale.grad is not None and clap.logit_scale.grad.abs().item() > 0,
           "CLAP.loss: no gradient reaches logit_scale: use self.logit_scale.exp(), not .item()")


def clap_prefers_matched_pairs(g):
    emb = unit_rows(g, 6, 32)
    matched = sa.CLAP.loss(clap_with_scale(20.0), emb, emb).item()
    shuffled = sa.CLAP.loss(clap_with_scale(20.0), emb, emb.roll(1, 0)).item()
    expect(matched < shuffled, f"CLAP.loss is {matched:.3g} for matched pairs and {shuffled:.3g} "
                               "for shuffled ones: matched pairs must score lower")


# -------------------------------------------------------------------------------------------------
# A3 §3.2 Timing embedding, and the conditioning context with its mask
# -------------------------------------------------------------------------------------------------
def timing_module(g, features=8):
    timing = sa.TimingEmbedding(sa.TimingConfig(), features).double()
    with torch.no_grad():
        for table in (timing.start, timing.total):
            table.weight.copy_(randn(g, *table.weight.shape))
    return timing


def timing_rows(g):
    timing = timing_module(g)
    start, total = torch.tensor([3.7, 0.0, 100.0]), torch.tensor([30.0, 512.0, 45.2])
    s, T = timing.start.weight[[3, 0, 100]], timing.total.weight[[30, 512, 45]]
    compare(timing(start, total), torch.stack([s, T], 1), "TimingEmbedding.forward", [
        ("the two tokens are in the wrong order: seconds_start first, then seconds_total",
         torch.stack([T, s], 1)),
        ("start and total swapped: seconds_start indexes self.start, seconds_total self.total",
         torch.stack([timing.start.weight[[30, 512, 45]], timing.total.weight[[3, 0, 100]]], 1)),
        ("seconds are rounded: drop the fraction (3.7 s -> row 3), as the released IntConditioner",
         torch.stack([timing.start.weight[[4, 0, 100]], timing.total.weight[[30, 512, 45]]], 1)),
        ("clamped from 1: 0 s has a row of its own, clamp to 0..self.max_seconds",
         torch.stack([timing.start.weight[[3, 1, 100]], T], 1)),
        ("clamped one short: the tables have max_seconds + 1 rows, 0..512 s, so clamp to "
         "0..self.max_seconds", torch.stack([s, timing.total.weight[[30, 511, 45]]], 1)),
        ("one table for both tokens: seconds_total indexes self.total",
         torch.stack([s, timing.start.weight[[30, 512, 45]]], 1)),
        ("one table for both tokens: seconds_start indexes self.start",
         torch.stack([timing.total.weight[[3, 0, 100]], T], 1))])


def timing_clamped(g):
    timing = timing_module(g)
    try:
        got = timing(torch.tensor([-5.0, 600.0]), torch.tensor([1000.0, -1.0]))
    except IndexError:
        raise Wrong("TimingEmbedding.forward: index out of range: clamp seconds to "
                    "0..self.max_seconds (the tables have 513 rows)") from None
    want = torch.stack([timing.start.weight[[0, 512]], timing.total.weight[[512, 0]]], 1)
    compare(got, want, "TimingEmbedding.forward outside 0..512 s", [
        ("clamped one short: the tables have max_seconds + 1 rows, 0..512 s, so clamp to "
         "0..self.max_seconds", torch.stack([timing.start.weight[[0, 511]],
                                             timing.total.weight[[511, 0]]], 1)),
        ("clamped from 1: 0 s has a row of its own, clamp to 0..self.max_seconds",
         torch.stack([timing.start.weight[[1, 512]], timing.total.weight[[512, 1]]], 1))])


def call_condition(model, start, total):
    """condition(PROMPTS, start, total) as generate calls it: Python lists of whole seconds."""
    try:
        with torch.no_grad():
            return sa.StableAudio.condition(model, PROMPTS, start, total)
    except (AttributeError, TypeError) as e:
        raise Wrong(f"condition({PROMPTS!r}, {start}, {total}) fails with {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}; generate passes Python lists, "
                    "so turn them into tensors (torch.as_tensor)") from None


def conditioner(g):
    """The parts of StableAudio that condition() uses, small: a CLAP of width 8, timing tables."""
    clap_config = sa.CLAPConfig(text_len=24, text_width=8, text_layers=2, text_heads=2,
                                feature_layer=-2, audio_width=8, audio_layers=1, audio_heads=1,
                                n_mels=8, n_fft=64, mel_hop=16, patch=2, embed_dim=8)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=g)))
        clap = sa.CLAP(clap_config, 44100).double().eval()
    config = types.SimpleNamespace(timing=sa.TimingConfig())
    return types.SimpleNamespace(clap=clap, timing=timing_module(g), config=config)


PROMPTS = ["rain", "ocean waves crashing on a rocky beach, wide"]


def condition_context(g):
    model = conditioner(g)
    context, mask = call_condition(model, [0, 12], [30, 47])
    with torch.no_grad():
        tokens, text_mask = model.clap.tokenize(PROMPTS)
        text = model.clap.text_features(tokens, text_mask)
        last = model.clap.text_hidden(tokens, text_mask, len(model.clap.text_layers))
        unmasked = model.clap.text_features(tokens, None)
        s, T = model.timing.start.weight[[0, 12]], model.timing.total.weight[[30, 47]]
    timing = torch.stack([s, T], 1)
    compare(context, torch.cat([text, timing], 1), "condition's context", [
        ("the timing tokens come after the text features, not before",
         torch.cat([timing, text], 1)),
        ("start and total swapped: timing(seconds_start, seconds_total)",
         torch.cat([text, torch.stack([model.timing.start.weight[[30, 47]],
                                       model.timing.total.weight[[0, 12]]], 1)], 1)),
        ("the text features come from CLAP's last layer; §3.2 takes the next-to-last "
         "(clap.text_features)", torch.cat([last, timing], 1)),
        ("the text features come from CLAP's last layer, normed; §3.2 takes the next-to-last "
         "(clap.text_features)", torch.cat([model.clap.text_norm(last), timing], 1)),
        ("the text tower ran without the tokenizer's mask: pass it, so no token attends to "
         "padding", torch.cat([unmasked, timing], 1))])
    ones = torch.ones(2, 2, dtype=torch.bool)
    expect(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool,
           "condition's mask must be a bool tensor (True: a real token)")
    expect(mask.shape == (2, text_mask.shape[1] + 2),
           f"condition's mask has shape {tuple(mask.shape)}, expected "
           f"{(2, text_mask.shape[1] + 2)}: the text's mask, then one entry per timing token")
    expect(not torch.equal(mask, torch.cat([text_mask, ~ones], 1)),
           "condition's mask hides the timing tokens: they are real tokens, mark them True")
    expect(torch.equal(mask, torch.cat([text_mask, ones], 1)),
           "condition's mask: the tokenizer's mask for the text (False on padding), then True "
           "for the two timing tokens")


def condition_without_timing(g):
    model = conditioner(g)
    model.config.timing.enabled = False
    context, mask = call_condition(model, [0, 0], [10, 20])
    with torch.no_grad():
        tokens, text_mask = model.clap.tokenize(PROMPTS)
        text = model.clap.text_features(tokens, text_mask)
    compare(context, text, "condition with config.timing.enabled False (the text-only ablation)")
    expect(torch.equal(mask, text_mask), "condition without timing: the mask is the text's")


# -------------------------------------------------------------------------------------------------
# A4 §3.3 Multi-head attention with a padding mask
# -------------------------------------------------------------------------------------------------
def attention_module(g, features=24, heads=4, context_features=None):
    """Four heads of six features: a head size equal to the number of heads would hide a split
    of the features the wrong way round ((B, S, C / heads, heads))."""
    attention = sa.Attention(features, heads, context_features).double()
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(randn(g, *p.shape) / math.sqrt(p.shape[-1]) + (1 if p.ndim == 1 else 0))
    return attention


def attention_by_hand(m, x, context=None, mask=None, heads=None, scale=0.5, keys_norm=None,
                      invert=False, softmax_dim=-1, transpose=(True, True), kv=(0, 1),
                      query_norm=True, additive=False, out=True):
    """softmax(q k^T / sqrt(d) over the kept keys) v, head by head, written out; the keywords
    make the near misses: d**-scale, the softmax's axis, the heads' (split, join) transposes, which
    half of to_kv is k and which v (kv="interleaved": alternate features), the norms, a mask added
    to the logits as 0/1, no to_out."""
    B, S, C = x.shape
    heads = heads or m.heads
    keys_norm = keys_norm or m.norm_context
    q = (m.norm(x) if query_norm else x) @ m.to_q.weight.T
    kv_out = keys_norm(x if context is None else context) @ m.to_kv.weight.T
    kv_halves = (kv_out[..., 0::2], kv_out[..., 1::2]) if kv == "interleaved" else \
        kv_out.chunk(2, -1)
    k, v = kv_halves if kv == "interleaved" else (kv_halves[kv[0]], kv_halves[kv[1]])
    if transpose[0]:
        split = lambda t: t.reshape(B, t.shape[1], heads, C // heads).transpose(1, 2)
    else:
        split = lambda t: t.reshape(B, heads, t.shape[1], C // heads)
    q, k, v = split(q), split(k), split(v)                            # (B, h, S, d)
    logits = q @ k.transpose(-1, -2) / (C // heads) ** scale
    if mask is not None and additive:
        logits = logits + mask[:, None, None, :].double()
    elif mask is not None:
        keep = ~mask if invert else mask
        logits = logits.masked_fill(~keep[:, None, None, :], -math.inf)
    joined = logits.softmax(softmax_dim).nan_to_num() @ v             # (B, h, S, d)
    joined = joined.transpose(1, 2).reshape(B, S, C) if transpose[1] else joined.reshape(B, S, C)
    return joined @ m.to_out.weight.T + m.to_out.bias if out else joined


def attention_suspects(m, x, context=None, mask=None):
    by_hand = lambda **kw: attention_by_hand(m, x, context, mask, **kw)
    found = [("no 1/sqrt(d) on the logits (d = features / heads)", by_hand(scale=0)),
             ("the logits are divided by d; by sqrt(d) (d = features / heads)", by_hand(scale=1)),
             ("one head: split the features into `heads` heads of features/heads each",
              by_hand(heads=1)),
             ("features/heads heads of `heads` features each: reshape to (B, S, heads, "
              "features/heads), heads first", by_hand(heads=x.shape[-1] // m.heads)),
             ("the softmax runs over the queries; it runs over the keys (the last axis)",
              by_hand(softmax_dim=-2)),
             ("the heads are reshaped without the transpose: (B, S, C) -> (B, S, heads, C/heads), "
              "then transpose to (B, heads, S, C/heads), and back the same way",
              by_hand(transpose=(False, False))),
             ("the heads are split without the transpose: (B, S, C) -> (B, S, heads, C/heads), "
              "then transpose to (B, heads, S, C/heads)", by_hand(transpose=(False, True))),
             ("the heads are joined without the transpose: (B, heads, S, C/heads) -> transpose "
              "to (B, S, heads, C/heads), then reshape to (B, S, C)",
              by_hand(transpose=(True, False))),
             ("k and v swapped: to_kv's output is k (the first half), then v", by_hand(kv=(1, 0))),
             ("k used as the values too: to_kv's output is k (the first half), then v",
              by_hand(kv=(0, 0))),
             ("k and v taken as alternate features: to_kv's output is k (its first half), then "
              "v (its second half): .chunk(2, dim=-1)", by_hand(kv="interleaved")),
             ("the queries come from x: they come from norm(x)", by_hand(query_norm=False)),
             ("to_out is missing: the joined heads go through to_out", by_hand(out=False)),
             ("the keys and values come from the context as given: normalise it first "
              "(norm_context)", by_hand(keys_norm=lambda t: t))]
    if context is None:
        found.append(("keys and values from norm(x): as released, they come from "
                      "norm_context(x), in self-attention too",
                      attention_by_hand(m, x, keys_norm=m.norm)))
    if mask is not None:
        found += [("the mask is ignored: padded keys must get no weight",
                   attention_by_hand(m, x, context)),
                  ("the mask is the wrong way round: True marks a real token (attend), False "
                   "padding", by_hand(invert=True)),
                  ("the mask was added to the logits as 0/1 (a float mask adds); a bool mask "
                   "keeps the True keys: pass it as bool, or fill False with -inf",
                   by_hand(additive=True))]
    return found


def self_attention(g):
    m, x = attention_module(g), randn(g, 2, 7, 24)
    with torch.no_grad():
        got = m(x)
        expect(torch.equal(got, m(x)), "Attention.forward gives another output for the same "
                                       "input: no dropout (dropout_p=0) and no other randomness")
        compare(got, attention_by_hand(m, x), "Attention.forward (self-attention)",
                attention_suspects(m, x))


def cross_attention(g):
    m, x, context = attention_module(g, context_features=12), randn(g, 2, 7, 24), randn(g, 2, 5, 12)
    with torch.no_grad():
        compare(m(x, context), attention_by_hand(m, x, context),
                "Attention.forward (cross-attention)", attention_suspects(m, x, context))


def padded_cross_attention(g):
    m, x, context = attention_module(g, context_features=12), randn(g, 2, 7, 24), randn(g, 2, 6, 12)
    mask = torch.tensor([[True] * 5 + [False], [True] * 3 + [False] * 3])
    with torch.no_grad():
        compare(m(x, context, mask), attention_by_hand(m, x, context, mask),
                "Attention.forward with a padding mask", attention_suspects(m, x, context, mask))


def masked_keys_change_nothing(g):
    m, x, context = attention_module(g, context_features=12), randn(g, 2, 7, 24), randn(g, 2, 4, 12)
    junk = torch.cat([context, 100 * randn(g, 2, 3, 12)], 1)
    mask = torch.tensor([[True] * 4 + [False] * 3] * 2)
    with torch.no_grad():
        got = m(x, junk, mask)
        nontrivial(got, x, what="Attention.forward")
        compare(got, m(x, context, torch.ones(2, 4, dtype=torch.bool)),
                "Attention.forward: appending masked (padded) keys changed the output; they must "
                "get exactly zero weight (mask them out of the softmax)")


# -------------------------------------------------------------------------------------------------
# A5 §4.4 The v-objective with conditioning dropout
# -------------------------------------------------------------------------------------------------
def schedule(g):
    t = torch.rand(50, generator=g).double()
    alpha, sigma = sa.alpha_sigma(t)
    c, s = cosine(t)
    compare(torch.stack([alpha, sigma]), torch.stack([c, s]), "alpha_sigma(t)", [
        ("alpha and sigma swapped: at t = 0 there is no noise, (alpha, sigma) = (1, 0)",
         torch.stack([s, c])),
        ("the angle is pi t / 2, so that t = 1 is pure noise", torch.stack([t.cos(), t.sin()])),
        ("the angle is pi t / 2: at pi t, t = 1 is back to alpha = -1",
         torch.stack([torch.cos(math.pi * t), torch.sin(math.pi * t)])),
        ("a linear schedule (1 - t, t); §4.4's is the cosine (cos, sin)(pi t / 2)",
         torch.stack([1 - t, t])),
        ("cos^2 and sin^2 are the variances alpha^2 and sigma^2; alpha and sigma are cos and sin",
         torch.stack([c ** 2, s ** 2]))])


def v_loss_setup(g, B=256, dropout=0.0, mask=None):
    z, out = randn(g, B, 4, 8), randn(g, B, 4, 8)
    context, null = randn(g, B, 3, 8), randn(g, 3, 8)
    unet = Recorder(lambda *a: out, null)
    mask = torch.ones(B, 3, dtype=torch.bool) if mask is None else mask
    frames = torch.randint(1, 9, (B,), generator=g)
    generator = torch.Generator().manual_seed(int(torch.randint(2 ** 31, (1,), generator=g)))
    loss = sa.diffusion_loss(unet, z.clone(), context.clone(), mask.clone(), generator, dropout,
                             frames.clone())
    expect(len(unet.calls) == 1, f"diffusion_loss called the U-Net {len(unet.calls)} times, "
                                 "expected once")
    seen = unet.calls[0]["frames"]
    expect(isinstance(seen, torch.Tensor) and torch.equal(seen, frames),
           "diffusion_loss: pass content_frames on to the U-Net, unet(z_t, t, context, mask, "
           "content_frames)")
    return loss, z, out, context, mask, unet.null_context.detach(), unet.calls[0]


def v_target(g):
    loss, z, out, _, _, _, call = v_loss_setup(g)
    t = call["t"].double()
    expect(t.shape == (len(z),) and 0 <= t.min() and t.max() <= 1,
           "diffusion_loss: t must be one noise level per sample (B,), in [0, 1]")
    expect(t.min() < 0.1 and t.max() > 0.9, "diffusion_loss: t ~ U[0, 1] (torch.rand with the "
                                            "generator), spread over the whole range")
    alpha, sigma = (a[:, None, None] for a in cosine(t))
    eps = (call["x"].double() - alpha * z) / sigma            # the noise they must have drawn
    expect(abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1,
           f"diffusion_loss: z_t = alpha z + sigma eps with eps ~ N(0, 1); the noise recovered "
           f"from your z_t has mean {eps.mean():.3g} and std {eps.std():.3g}")
    v = alpha * eps - sigma * z
    mse = lambda target: ((out - target) ** 2).mean()
    compare(loss, mse(v), "diffusion_loss", [
        ("the target is eps; §4.4's is v = alpha eps - sigma z", mse(eps)),
        ("the target is z (x0); §4.4's is v = alpha eps - sigma z", mse(z)),
        ("the target is -v: v = alpha eps - sigma z", mse(-v)),
        ("v with alpha and sigma swapped: v = alpha eps - sigma z", mse(sigma * eps - alpha * z)),
        ("the squared error is summed: take its mean over every element (F.mse_loss)",
         mse(v) * out.numel()),
        ("the absolute error; §4.4's loss is the mean squared error", (out - v).abs().mean())])


def v_loss_uses_the_generator(g):
    seed = int(torch.randint(2 ** 31, (1,), generator=g))
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        loss, *_, call = v_loss_setup(torch.Generator().manual_seed(seed), dropout=0.5)
        runs.append((loss.item(), call["t"], call["x"], call["context"]))
    expect(runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in
                                            zip(runs[0][1:], runs[1][1:])),
           "diffusion_loss: draw t, eps and the dropout with the generator passed in "
           "(torch.rand(B, generator=generator), sa.randn(shape, generator, like)); the global "
           "RNG makes runs unrepeatable")


def inputs_left_alone(g):
    B = 64
    z, context, mask = randn(g, B, 4, 8), randn(g, B, 3, 8), torch.ones(B, 3, dtype=torch.bool)
    mask[::2, 2] = False
    before = z.clone(), context.clone(), mask.clone()
    unet = Recorder(lambda x, *a: x, randn(g, 3, 8))
    generator = torch.Generator().manual_seed(int(torch.randint(2 ** 31, (1,), generator=g)))
    sa.diffusion_loss(unet, z, context, mask, generator, 0.5, None)
    for name, now, then in zip(("z", "context", "mask"), (z, context, mask), before):
        expect(torch.equal(now, then), f"diffusion_loss changed the caller's {name} in place: "
                                       "build new tensors (torch.where, mask | drop) instead of "
                                       "writing into the ones passed in")


def dropout_rate(g):
    for p, low, high in ((0.25, 0.15, 0.35), (0.0, 0, 0), (1.0, 1, 1)):
        _, _, _, context, _, null, call = v_loss_setup(g, B=400, dropout=p)
        seen = call["context"].double()
        dropped = (seen == null).flatten(1).all(1)
        kept = (seen == context).flatten(1).all(1)
        expect(bool((dropped | kept).all()), "diffusion_loss: each sample's context must be its "
                                             "own or the whole null context (unet.null_context)")
        rate = dropped.double().mean().item()
        expect(not (p == 0.25 and 0.65 <= rate <= 0.85),
               f"diffusion_loss drops {rate:.0%} of contexts at cond_dropout 0.25: the wrong way "
               "round; drop where rand < cond_dropout")
        expect(low <= rate <= high, f"diffusion_loss drops {rate:.0%} of contexts at "
                                    f"cond_dropout {p}")


def dropped_mask(g):
    B = 400
    mask = torch.ones(B, 3, dtype=torch.bool)
    mask[:, 2] = False                                        # one padded token per prompt
    _, _, _, _, _, null, call = v_loss_setup(g, B=B, dropout=0.5, mask=mask)
    dropped = (call["context"].double() == null).flatten(1).all(1)
    expect(torch.equal(call["mask"][~dropped], mask[~dropped]),
           "diffusion_loss changed the mask of samples that keep their context")
    expect(bool(call["mask"][dropped].all()), "diffusion_loss: the null context has no padding: "
                                              "the mask of a dropped sample is all True")


# -------------------------------------------------------------------------------------------------
# A6 §3.4 Classifier-free guidance with the CFG rescale
# -------------------------------------------------------------------------------------------------
def answer_v(x, t, context, mask):
    """A stand-in v-model: any deterministic function of its inputs, row by row."""
    B, C, L = x.shape
    w = context.flatten(1)[:, :C * L].reshape(B, C, L)
    return x * (1 + context[:, :1, :1]) + w * t[:, None, None] + mask.sum(1)[:, None, None] / 8


def guidance_setup(g, B=3):
    z, t = randn(g, B, 4, 12), torch.rand(B, generator=g).double()
    context, uncond = randn(g, B, 6, 8), randn(g, B, 6, 8)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[0, 4:] = False
    uncond_mask = torch.ones(B, 6, dtype=torch.bool)
    unet = Recorder(answer_v, uncond[0])
    v_c, v_u = answer_v(z, t, context, mask), answer_v(z, t, uncond, uncond_mask)
    return unet, (context, mask, uncond, uncond_mask), z, t, v_c, v_u


def rescaled(v, v_c, phi, dims=1):
    return phi * v * v_c.std(dims, keepdim=True) / v.std(dims, keepdim=True) + (1 - phi) * v


def guidance_formula(g):
    unet, cond, z, t, v_c, v_u = guidance_setup(g)
    s, phi = 6.0, 0.7
    v = v_u + s * (v_c - v_u)
    got = sa.guided_v(unet, *cond, s, phi)(z, t)
    context, mask, uncond, uncond_mask = cond
    v_u_masked = answer_v(z, t, uncond, mask)
    compare(got, rescaled(v, v_c, phi), "guided_v at scale 6, rescale 0.7", [
        ("the rescale's std runs over frames (dim 2); it is over channels (dim 1), frame by frame",
         rescaled(v, v_c, phi, 2)),
        ("the rescale's std runs over channels and frames together; it is over channels (dim 1), "
         "frame by frame", rescaled(v, v_c, phi, (1, 2))),
        ("phi weights the wrong term: phi * rescaled + (1 - phi) * guided",
         rescaled(v, v_c, 1 - phi)),
        ("no rescale: mix phi of the rescaled prediction in", v),
        ("guidance runs the wrong way: v = v_u + scale (v_c - v_u)",
         rescaled(v_c + s * (v_u - v_c), v_c, phi)),
        ("guidance starts from v_c: v = v_u + scale (v_c - v_u)",
         rescaled(v_c + s * (v_c - v_u), v_c, phi)),
        ("the rescale ratio is inverted: v times std(v_c) / std(v), pulling v's spread to v_c's",
         phi * v * v.std(1, keepdim=True) / v_c.std(1, keepdim=True) + (1 - phi) * v),
        ("the rescale uses variances; it matches standard deviations, std(v_c) / std(v)",
         phi * v * v_c.var(1, keepdim=True) / v.var(1, keepdim=True) + (1 - phi) * v),
        ("the conditional and unconditional halves are swapped: the batch is (context, uncond), "
         "so .chunk(2) gives v_c first", rescaled(v_c + s * (v_u - v_c), v_u, phi)),
        ("the rescale matches v_u's std; it pulls v toward v_c's", rescaled(v, v_u, phi)),
        ("the rescale's std runs over the batch (dim 0); it is over channels (dim 1), frame by "
         "frame", rescaled(v, v_c, phi, 0)),
        ("the rescaled v is mixed with v_c; it is mixed with the guided v: "
         "phi * rescaled + (1 - phi) * v", rescaled(v, v_c, 1) * phi + (1 - phi) * v_c),
        ("the unconditional branch got the conditional mask: it takes uncond_mask",
         rescaled(v_u_masked + s * (v_c - v_u_masked), v_c, phi))])


def guidance_at_scale_one(g):
    unet, cond, z, t, v_c, v_u = guidance_setup(g)
    compare(sa.guided_v(unet, *cond, 1.0, 0.4)(z, t), v_c,
            "guided_v at scale 1 must be the conditional prediction v_c", [
                ("that is v_u: at scale 1 guidance gives the conditional prediction v_c", v_u)])


def guidance_without_rescale(g):
    unet, cond, z, t, v_c, v_u = guidance_setup(g)
    compare(sa.guided_v(unet, *cond, 3.0, 0.0)(z, t), v_u + 3 * (v_c - v_u),
            "guided_v with rescale 0 must be plain guidance, v_u + scale (v_c - v_u)")


def guidance_one_forward(g):
    unet, cond, z, t, v_c, v_u = guidance_setup(g)
    sa.guided_v(unet, *cond, 6.0, 0.4)(z, t)
    expect(len(unet.calls) == 1 and unet.calls[0]["x"].shape[0] == 2 * len(z),
           f"guided_v called the U-Net {len(unet.calls)} times: call it once on the conditional "
           f"and unconditional halves together (torch.cat along the batch), as released")


def guidance_past_the_end(g):
    unet, cond, z, t, v_c, v_u = guidance_setup(g)
    frames = torch.tensor([12, 5, 0])
    got = sa.guided_v(unet, *cond, 6.0, 0.4, content_frames=frames)(z, t)
    inside = torch.arange(12) < frames[:, None]
    guided = rescaled(v_u + 6 * (v_c - v_u), v_c, 0.4)
    want = torch.where(inside[:, None], guided, v_c)
    compare(got, want, "guided_v with content_frames: frames past each content's end take v_c "
                       "alone, the frames inside the guided v", [
                           ("the wrong way round: v_c past the end, the guided v inside",
                            torch.where(inside[:, None], v_c, guided)),
                           ("content_frames is ignored: frames past the end take v_c alone",
                            guided)])
    expect(all(c["frames"] is not None and len(c["frames"]) == len(c["x"]) for c in unet.calls),
           "guided_v: pass content_frames to the U-Net, one per row it is given")


# -------------------------------------------------------------------------------------------------
# A7 §3.4 The sampling schedule, and a v-model as a denoiser
# -------------------------------------------------------------------------------------------------
def sigmas_spacing(g):
    steps = int(torch.randint(5, 40, (1,), generator=g))
    lo, hi = (a + b * torch.rand(1, generator=g).item() for a, b in ((0.01, 0.1), (10, 90)))
    got = sa.get_sigmas(steps, lo, hi)
    log_spaced = torch.exp(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64))
    zero = torch.zeros(1, dtype=torch.float64)
    compare(got, torch.cat([log_spaced, zero]), f"get_sigmas({steps}, {lo:.3g}, {hi:.3g})", [
        ("no final 0: the last step goes to sigma = 0, the denoiser's own estimate", log_spaced),
        ("evenly spaced in sigma; the schedule is even in log sigma",
         torch.cat([torch.linspace(hi, lo, steps, dtype=torch.float64), zero])),
        ("one level too many: `steps` levels from sigma_max to sigma_min, then 0",
         torch.cat([torch.exp(torch.linspace(math.log(hi), math.log(lo), steps + 1,
                                             dtype=torch.float64)), zero])),
        ("one level too few: `steps` levels from sigma_max to sigma_min, then 0",
         torch.cat([torch.exp(torch.linspace(math.log(hi), math.log(lo), steps - 1,
                                             dtype=torch.float64)), zero])),
        ("Karras et al.'s rho = 7 spacing; this schedule is even in log sigma",
         torch.cat([(hi ** (1 / 7) + torch.linspace(0, 1, steps, dtype=torch.float64)
                     * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7, zero])),
        ("the schedule ascends: sampling starts at sigma_max and descends to sigma_min, then 0",
         torch.cat([log_spaced.flip(0), zero])),
        ("torch.logspace takes base-10 exponents: give it log10 of the ends (or exp a linspace "
         "of natural logs)", torch.cat([torch.logspace(math.log(hi), math.log(lo), steps,
                                                        dtype=torch.float64), zero]))],
            atol=1e-12)


def point_mass_v(x0, seen):
    """The exact v-model for data that is always x0: eps = (z - alpha x0) / sigma."""
    def v_fn(z, t):
        seen.append((z, t))
        alpha, sigma = (a[:, None, None] for a in cosine(t))
        eps = (z - alpha * x0) / sigma
        return alpha * eps - sigma * x0
    return v_fn


def denoiser_of_a_point_mass(g):
    x0 = randn(g, 3, 4, 6)
    for sigma in (0.5, 2.0, 10.0):
        seen = []
        x = x0 + sigma * randn(g, 3, 4, 6)
        got = sa.v_to_denoiser(point_mass_v(x0, seen))(x, sigma)
        expect(len(seen) == 1, f"v_to_denoiser called the v-model {len(seen)} times, expected once")
        z, t = seen[0]
        expect(t.shape == (3,), "v_to_denoiser: t must have one entry per batch row, (B,)")
        compare(t.double(), torch.full((3,), 2 / math.pi * math.atan(sigma), dtype=torch.float64),
                f"the t given to the v-model at sigma {sigma}", [
                    ("t = sigma; t is the v-model's time with tan(pi t / 2) = sigma, "
                     "t = (2 / pi) atan(sigma)", torch.full((3,), sigma)),
                    ("t = atan(sigma): scale it by 2 / pi, so that t = 1 at sigma = inf",
                     torch.full((3,), math.atan(sigma)))])
        compare(z.double(), x / math.sqrt(1 + sigma ** 2), f"the z given to the v-model at sigma "
                f"{sigma}", [("the v-model was given x: it needs the VP latent "
                              "z = x / sqrt(1 + sigma^2) (alpha_t x)", x),
                             ("the square root is missing: z = x / sqrt(1 + sigma^2)",
                              x / (1 + sigma ** 2)),
                             ("multiplied where it divides: z = x / sqrt(1 + sigma^2)",
                              x * math.sqrt(1 + sigma ** 2))])
        a_t, s_t = 1 / math.sqrt(1 + sigma ** 2), sigma / math.sqrt(1 + sigma ** 2)
        v = point_mass_v(x0, [])(z.double(), t.double())
        compare(got, x0, f"v_to_denoiser on data that is always x0, at sigma {sigma}: the "
                         f"denoiser must return x0 = alpha_t z - sigma_t v", [
                             ("the sign of sigma_t v: x0 = alpha_t z - sigma_t v",
                              a_t * z + s_t * v),
                             ("alpha_t and sigma_t swapped: x0 = alpha_t z - sigma_t v",
                              s_t * z - a_t * v),
                             ("x given where z belongs: x0 = alpha_t z - sigma_t v, with "
                              "z = alpha_t x", a_t * x - s_t * v)])


# -------------------------------------------------------------------------------------------------
# A8 §3.4 DPM-Solver++(2M) and (3M)
# -------------------------------------------------------------------------------------------------
def quadratic(g):
    a, b, c = randn(g, 3, 4), randn(g, 3, 4), randn(g, 3, 4) / 4
    return (lambda lam: a + b * lam + c * lam ** 2), (lambda lam: b + 2 * c * lam), 2 * c


def derivatives_exact(g):
    p, dp, d2p = quadratic(g)
    lams = torch.sort(4 * torch.rand(3, generator=g).double() - 2).values.tolist()
    lam_2, lam_1, lam = lams
    expect(all(map(is_zero, sa.dpm_derivatives([], lam, p(lam)))),
           "dpm_derivatives with no history must return (0, 0)")
    d1, d2 = sa.dpm_derivatives([(lam_1, p(lam_1))], lam, p(lam))
    slope = (p(lam) - p(lam_1)) / (lam - lam_1)
    expect(not (is_zero(d1) and not is_zero(d2)), "dpm_derivatives: p' and p'' swapped: return "
                                                  "(p', p''); with one past value p'' is 0")
    compare(d1, slope, "dpm_derivatives' p' from one past value: the divided difference "
            "(D_i - D_{i-1}) / (lam_i - lam_{i-1})",
            [("the sign is flipped: (D_i - D_{i-1}) / (lam_i - lam_{i-1})", -slope),
             ("divided by the step ahead, h, not by lam_i - lam_{i-1}: the past values are "
              "behind", slope * (lam - lam_1))])
    expect(is_zero(d2), "dpm_derivatives: with one past value p'' is 0")
    d1, d2 = sa.dpm_derivatives([(lam_2, p(lam_2)), (lam_1, p(lam_1))], lam, p(lam))
    slope = (p(lam) - p(lam_1)) / (lam - lam_1)
    compare(d1, dp(lam), "dpm_derivatives' p'(lam_i) through three values of a quadratic", [
        ("that is the slope between the last two points, p' half a step back; at lam_i add h_1 "
         "times the second divided difference", slope),
        ("p' and p'' swapped: return (p', p'')", d2p),
        ("p' = slope + h_2 f; it is slope + h_1 f, h_1 = lam_i - lam_{i-1}",
         slope + (lam_1 - lam_2) * d2p / 2),
        ("the second divided difference is over h_1 alone; it is over lam_i - lam_{i-2} = h_1 + "
         "h_2", slope + (slope - (p(lam_1) - p(lam_2)) / (lam_1 - lam_2))),
        ("history read oldest first: history[-1] is the newest (lam_{i-1}, D_{i-1})",
         (p(lam) - p(lam_2)) / (lam - lam_2))])
    compare(d2, d2p, "dpm_derivatives' p'' through three values of a quadratic", [
        ("p'' is twice the second divided difference", d2p / 2),
        ("p' and p'' swapped: return (p', p'')", dp(lam))])


def d_of_lambda(p):
    """A denoiser that ignores x: D depends on lam = -log sigma alone, through p."""
    return lambda x, sigma: p(-math.log(sigma))


def taper(h, I0):
    """sample_dpmpp_3m's weight on p'': I2 / (1 + h), I2 = h^2 / 2 - I1, I1 = h - I0."""
    return (h * h / 2 - (h - I0)) / (1 + h)


def midpoint(r, D_i, D_j):
    """2M's D at the step's midpoint, extrapolated through D_{i-1} and D_i."""
    return (1 + 1 / (2 * r)) * D_i - D_j / (2 * r)


def multistep_by_hand(p, x, sigmas, order, w2=taper, I0_sign=1, past=1, swap=False, mix=midpoint,
                      r_of=lambda h_1, h: h_1 / h, I1_sign=1, decay=-1):
    """The samplers' updates written out, for a denoiser D(lam) = p(lam); the keywords make the
    near misses: the p'' weight, I0's and I1's signs, e^{decay h}, which past value 2M reads, 2M's
    r and its mix of D_i and D_{i-1}, p' and p'' swapped."""
    lams = [-math.log(s) for s in sigmas]
    D = [p(lam) for lam in lams]
    for i in range(len(sigmas) - 1):
        h = lams[i + 1] - lams[i]
        if order == 2 and i:
            j = i - past if i >= past else i - 1
            x = ddim(x, mix(r_of(lams[i] - lams[j], h), D[i], D[j]), h)
            continue
        d1, d2 = 0, 0
        if order == 3 and i:
            d1 = (D[i] - D[i - 1]) / (lams[i] - lams[i - 1])
        if order == 3 and i > 1:
            f = (d1 - (D[i - 1] - D[i - 2]) / (lams[i - 1] - lams[i - 2])) / (lams[i] - lams[i - 2])
            d1, d2 = d1 + (lams[i] - lams[i - 1]) * f, 2 * f
        if swap:
            d1, d2 = d2, d1
        I0 = -I0_sign * math.expm1(-h)
        x = math.exp(decay * h) * x + I0 * D[i] + I1_sign * (h - I0) * d1 + w2(h, I0) * d2
    return x


def ddim(x, D, h):
    return math.exp(-h) * x - math.expm1(-h) * D


def sampler_steps(g, sampler, order):
    p, _, _ = quadratic(g)
    x = randn(g, 3, 4)
    # Uneven steps, h from 0.3 to 1.5: at h = 1 the taper 1 / (1 + h) is k-diffusion's 1/2.
    h = 0.3 + 1.2 * torch.rand(6, generator=g).double()
    sigmas = 20 * torch.exp(-torch.cat([torch.zeros(1, dtype=torch.float64), h.cumsum(0)]))
    got = sampler(d_of_lambda(p), x, sigmas)
    name = sampler.__name__
    suspects = [("a first-order (DDIM/Euler) update: use the past denoised values",
                 multistep_by_hand(p, x, sigmas, 1))]
    by_hand = lambda **kw: multistep_by_hand(p, x, sigmas, order, **kw)
    if order == 2:
        suspects += [("the oldest history entry was read: history[-1] is the newest "
                      "(lam_{i-1}, D_{i-1})", by_hand(past=2)),
                     ("r is inverted: r = h_{i-1} / h, the last step over this one",
                      by_hand(r_of=lambda h_1, h: h / h_1)),
                     ("r is h_{i-1} alone: r = h_{i-1} / h", by_hand(r_of=lambda h_1, h: h_1)),
                     ("D_i and D_{i-1} swapped: (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}",
                      by_hand(mix=lambda r, D_i, D_j: midpoint(r, D_j, D_i))),
                     ("D extrapolated to the step's end; 2M takes the midpoint: "
                      "(1 + 1/(2r)) D_i - 1/(2r) D_{i-1}",
                      by_hand(mix=lambda r, D_i, D_j: (1 + 1 / r) * D_i - D_j / r))]
    if order == 3:
        I2 = lambda h, I0: h * h / 2 - (h - I0)
        suspects += [("p'' weighted by I2 / 2, as k-diffusion does (order 2): the exact weight is "
                      "I2, tapered by 1 / (1 + h)", by_hand(w2=lambda h, I0: I2(h, I0) / 2)),
                     ("the p'' weight is I2 / (1 + h): the taper is missing", by_hand(w2=I2)),
                     ("p'' is left out: this is a second-order update", by_hand(w2=lambda *a: 0)),
                     ("I0's sign is flipped: I0 = 1 - e^{-h} = -expm1(-h), positive",
                      by_hand(I0_sign=-1)),
                     ("p' and p'' swapped: dpm_derivatives returns (p', p'')", by_hand(swap=True)),
                     ("I1's sign is flipped: I1 = h - I0 weights p' (and gives I2 = h^2 / 2 - "
                      "I1)", by_hand(I1_sign=-1, w2=lambda h, I0: (h * h / 2 + h - I0) / (1 + h))),
                     ("I2 = h^2 / 2 - I1, the integral against tau^2 / 2 (this is tau^2)",
                      by_hand(w2=lambda h, I0: (h * h - (h - I0)) / (1 + h))),
                     ("the taper multiplies: the p'' weight is I2 / (1 + h)",
                      by_hand(w2=lambda h, I0: taper(h, I0) * (1 + h) ** 2)),
                     ("x grows by e^{h}: it decays, x_{i+1} = e^{-h} x_i + ...", by_hand(decay=1))]
    compare(got, multistep_by_hand(p, x, sigmas, order), f"{name}'s six steps on a denoiser "
            f"quadratic in lam", suspects)


def measured_order(sampler, order, low, high):
    steps = [50, 100]
    errors = [e for e, _ in sound_world.gaussian_sampler_errors(sampler, steps)]
    p = sound_world.measured_orders(errors, steps)[0]
    hint = (" (k-diffusion's I2 / 2 weight on p'' gives about 2.4)" if order == 3 else "")
    expect(low <= p <= high, f"{sampler.__name__}: measured order {p:.2f} on the exact Gaussian "
                             f"ODE, expected about {order}{hint}")


def dpmpp_2m_steps(g):
    sampler_steps(g, sa.sample_dpmpp_2m, 2)


def dpmpp_3m_steps(g):
    sampler_steps(g, sa.sample_dpmpp_3m, 3)


def dpmpp_2m_order(g):
    measured_order(sa.sample_dpmpp_2m, 2, 1.5, 2.5)


def dpmpp_3m_order(g):
    measured_order(sa.sample_dpmpp_3m, 3, 2.7, 3.5)


# -------------------------------------------------------------------------------------------------
# The assignments
# -------------------------------------------------------------------------------------------------
@dataclass
class Assignment:
    key: str
    section: str
    title: str
    pieces: tuple             # "function" or "Class.method", as named in stable_audio.py
    points: int
    minutes: int
    read: str                 # what to read first, for the starter's banner
    checks: tuple


ASSIGNMENTS = {a.key: a for a in [
    Assignment("A1", "§3.1", "Snake and the VAE's KL term", ("snake", "kl_divergence"), 10, 40,
               "the Snake banner; Snake and SnakeBeta (how they call snake); VAE.encode",
               (snake_formula, snake_beta, snake_at_alpha_zero, kl_closed_form,
                kl_zero_at_the_prior)),
    Assignment("A2", "§4.3", "CLAP's symmetric contrastive loss", ("CLAP.loss",), 10, 30,
               "the CLAP banner; CLAP.__init__ (logit_scale), embed_text, embed_audio",
               (clap_loss_formula, clap_temperature_clamped, clap_temperature_learned,
                clap_prefers_matched_pairs, clap_stable_in_float32)),
    Assignment("A3", "§3.2", "Timing embedding and the conditioning context",
               ("TimingEmbedding.forward", "StableAudio.condition"), 10, 45,
               "the timing banner; TimingEmbedding.__init__; CLAP.tokenize and text_features",
               (timing_rows, timing_clamped, condition_context, condition_without_timing)),
    Assignment("A4", "§3.3", "Multi-head attention with a padding mask", ("Attention.forward",),
               10, 60, "the U-Net banner; Attention.__init__; F.scaled_dot_product_attention",
               (self_attention, cross_attention, padded_cross_attention,
                masked_keys_change_nothing)),
    Assignment("A5", "§4.4", "The v-objective with conditioning dropout",
               ("alpha_sigma", "diffusion_loss"), 10, 60,
               "the diffusion objective banner; randn; UNet.forward's arguments",
               (schedule, v_target, v_loss_uses_the_generator, dropout_rate, dropped_mask,
                inputs_left_alone)),
    Assignment("A6", "§3.4", "Classifier-free guidance with the CFG rescale", ("guided_v",), 10,
               45, "the sampling banner; content_mask; how generate calls guided_v",
               (guidance_formula, guidance_at_scale_one, guidance_without_rescale,
                guidance_one_forward, guidance_past_the_end)),
    Assignment("A7", "§3.4", "The noise schedule and the v-model as a denoiser",
               ("get_sigmas", "v_to_denoiser"), 10, 45,
               "the sampling banner; alpha_sigma; how generate calls both",
               (sigmas_spacing, denoiser_of_a_point_mass)),
    Assignment("A8", "§3.4", "DPM-Solver++(2M) and (3M)",
               ("dpm_derivatives", "sample_dpmpp_2m", "sample_dpmpp_3m"), 15, 90,
               "dpmpp_multistep's docstring (the exact integral); ddim_step; sample_euler",
               (derivatives_exact, dpmpp_2m_steps, dpmpp_3m_steps, dpmpp_2m_order,
                dpmpp_3m_order)),
]}
PIECES = [piece for a in ASSIGNMENTS.values() for piece in a.pieces]


def reference(piece):
    """The reference's function for a piece, as stable_audio defines it."""
    owner, _, name = piece.rpartition(".")
    return (getattr(sa, owner).__dict__ if owner else vars(sa))[name]


ORIGINALS = {piece: reference(piece) for piece in PIECES}   # kept before anything is swapped in


# -------------------------------------------------------------------------------------------------
# The starter and the key, made from stable_audio.py's own text
# -------------------------------------------------------------------------------------------------
HEADER = '''"""Stable Audio, the pieces you write ({what}).

Made by `python assignments.py {command}` from stable_audio.py. Each function keeps the
reference's signature and docstring; write its body. Grade with
`python assignments.py grade {name}` (one assignment: `--only A3`).

While an assignment is graded, its functions replace the reference's inside stable_audio and run
there: every other name they use (alpha_sigma, content_mask, torch, F, ...) is the reference's, so
each assignment is graded on its own. A method is written inside a class of the same name that
holds just that method; `self` is then the reference's module, with its __init__'s attributes.
"""
'''


def definitions():
    """stable_audio.py's lines, and the ast node of every function, class and method in it."""
    source = Path(sa.__file__).read_text(encoding="utf-8")
    nodes = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            nodes[node.name] = node
        if isinstance(node, ast.ClassDef):
            nodes.update({f"{node.name}.{m.name}": m for m in node.body
                          if isinstance(m, ast.FunctionDef)})
    return source.splitlines(), nodes


def piece_text(lines, node, blank, note):
    """The function's lines as in stable_audio.py; blank: its signature and docstring, then a
    raise of NotImplementedError."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    if not blank:
        return lines[first - 1:node.end_lineno]
    body = node.body[0]
    has_doc = isinstance(body, ast.Expr) and isinstance(getattr(body, "value", None), ast.Constant)
    last = body.end_lineno if has_doc else body.lineno - 1
    indent = " " * body.col_offset
    return lines[first - 1:last] + [f"{indent}raise NotImplementedError({note!r})"]


def student_file(blank, name):
    """The text of the starter (blank) or of the key."""
    lines, nodes = definitions()
    top = {p for p in PIECES if "." not in p}
    used = {n.id for p in PIECES for n in ast.walk(nodes[p]) if isinstance(n, ast.Name)}
    names = sorted(used & set(vars(sa)) - top - {"math", "torch", "F", "nn"}, key=str.lower)
    imports = textwrap.fill(", ".join(names), 96, initial_indent="    ", subsequent_indent="    ")
    out = [HEADER.format(what="the starter: bodies to write" if blank else
                         "the key: the reference's bodies",
                         command="starter" if blank else "solution", name=name),
           "import math\n\nimport torch\nimport torch.nn.functional as F\nfrom torch import nn\n",
           f"from stable_audio import (  # noqa: F401  names the reference's bodies use\n"
           f"{imports})"]
    for a in ASSIGNMENTS.values():
        read = textwrap.fill(f"Read first, in stable_audio.py: {a.read}.", 97,
                             initial_indent="# ", subsequent_indent="# ")
        out.append(f"\n\n# {'=' * 97}\n# {a.key} {a.section} {a.title}: {a.points} points, "
                   f"about {a.minutes} minutes.\n{read}\n# {'=' * 97}")
        for piece in a.pieces:
            owner, _, method = piece.rpartition(".")
            note = f"{a.key}: write {piece} ({a.section})"
            text = piece_text(lines, nodes[piece], blank, note)
            if owner:
                text = [f"class {owner}:", f'    """Your {owner}.{method}; self is a '
                        f'stable_audio.{owner}."""', ""] + text
            out.append(("\n\n" if piece != a.pieces[0] else "") + "\n".join(text))
    return "\n".join(out) + "\n"


def write_new(path, text, force):
    """Write a file, refusing to replace one without --force; temp file, then rename."""
    path = Path(path)
    if path.exists() and not force:
        raise training.UsageError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# -------------------------------------------------------------------------------------------------
# The student's pieces, swapped into stable_audio
# -------------------------------------------------------------------------------------------------
class NotImportable(Exception):
    """The student's file does not import; one line says why."""


def reference_state():
    """stable_audio's names, its classes' attributes and its tables (sa.SAMPLERS), as they are."""
    spaces = [sa] + [c for c in vars(sa).values()
                     if isinstance(c, type) and c.__module__ == sa.__name__]
    return ([(space, dict(vars(space))) for space in spaces],
            [(t, dict(t)) for t in vars(sa).values() if isinstance(t, dict)])


def restore(state):
    """Put stable_audio back as reference_state found it -> the names that had changed."""
    spaces, tables = state
    changed = []
    for space, names in spaces:
        prefix = "" if space is sa else f"{space.__name__}."
        for name in set(vars(space)) - set(names):
            changed.append(prefix + name)
            delattr(space, name)
        for name, value in names.items():
            if vars(space).get(name) is not value:
                changed.append(prefix + name)
                setattr(space, name, value)
    for table, items in tables:
        if table != items:
            changed.append(next(n for n, t in vars(sa).items() if t is table))
            table.clear()
            table.update(items)
    return sorted(changed)


def load_student(path):
    """The student's file as a module. Whatever its top level does to stable_audio (say,
    `stable_audio.ddim_step = mine`) is undone, so every piece is graded on the reference's."""
    path = Path(path)
    if not path.is_file():
        raise training.UsageError(f"{path}: no such file; make one with "
                            f"`python assignments.py starter --out {path}`")
    spec = importlib.util.spec_from_file_location(f"student_{path.stem}", str(path))
    module = importlib.util.module_from_spec(spec)
    state = reference_state()
    try:
        spec.loader.exec_module(module)
    except BaseException as e:                          # a student's file may raise anything
        if isinstance(e, KeyboardInterrupt):
            raise
        message = (f"{e.msg}, line {e.lineno}" if isinstance(e, SyntaxError) else
                   str(e).splitlines()[0] if str(e) else "")
        raise NotImportable(f"{path} does not import: {type(e).__name__}: {message}") from None
    finally:
        module.__undone__ = restore(state)       # what its top level changed in stable_audio
    return module


def their_function(module, piece):
    """The student's function for a piece, or None where their file has none."""
    owner, _, name = piece.rpartition(".")
    found = getattr(getattr(module, owner, None) if owner else module, name, None)
    return found if isinstance(found, types.FunctionType) else None


def missing(module, piece):
    """Stands in for a piece the student's file does not define: it is not done."""
    name = Path(module.__file__).name

    def missing_piece(*args, **kwargs):
        raise NotImplementedError(f"{piece} is missing from {name}")
    return missing_piece


def not_written(function):
    """True for a body that only raises NotImplementedError, as the starter's do."""
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    body = [s for s in node.body if not (isinstance(s, ast.Expr)
                                         and isinstance(s.value, ast.Constant))]
    return (len(body) == 1 and isinstance(body[0], ast.Raise) and body[0].exc is not None
            and "NotImplementedError" in ast.dump(body[0].exc))


def written_pieces(module):
    """The pieces the student's file defines with a body of its own."""
    return [p for p in PIECES if their_function(module, p) is not None
            and not not_written(their_function(module, p))]


@contextlib.contextmanager
def swapped_in(module, pieces):
    """Put the student's functions for `pieces` into stable_audio for the duration. They run with
    stable_audio's names (and their file's own helpers), so every other piece is the reference's;
    tables that hold a reference function (sa.SAMPLERS) hold theirs too."""
    names = {**vars(module), **vars(sa)}
    theirs = {}
    for piece in pieces:
        f = their_function(module, piece)
        if f is None:
            theirs[piece] = missing(module, piece)
            continue
        g = types.FunctionType(f.__code__, names, f.__name__, f.__defaults__, f.__closure__)
        g.__kwdefaults__, g.__qualname__, g.__doc__ = f.__kwdefaults__, f.__qualname__, f.__doc__
        theirs[piece] = g
    undo = []
    try:
        for piece, g in theirs.items():
            owner, _, name = piece.rpartition(".")
            target = getattr(sa, owner) if owner else sa
            undo.append((target, name, reference(piece)))
            setattr(target, name, g)
            if not owner:
                names[name] = g
            for table in (t for t in vars(sa).values() if isinstance(t, dict)):
                for key in [k for k, v in table.items() if v is ORIGINALS[piece]]:
                    undo.append((table, key, table[key]))
                    table[key] = g
        yield theirs
    finally:
        for target, name, value in reversed(undo):
            if isinstance(target, dict):
                target[name] = value
            else:
                setattr(target, name, value)


def code_objects(function):
    """A function's code and the code of every function defined inside it."""
    found, todo = set(), [function.__code__]
    while todo:
        code = todo.pop()
        found.add(code)
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return found


def piece_of(module, pieces):
    """Each code object of the student's functions for `pieces` -> the piece it belongs to."""
    return {code: piece for piece in pieces if their_function(module, piece)
            for code in code_objects(their_function(module, piece))}


@contextlib.contextmanager
def tripwire(module, pieces):
    """Notes every call, from the student's file, of a reference function that `pieces` replace,
    as (the student's piece that called it, the piece called): such a piece grades the reference,
    not the student."""
    watched = {code: piece for piece in pieces for code in code_objects(ORIGINALS[piece])}
    theirs, caught = piece_of(module, pieces), []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            caller = frame.f_back
            while caller is not None:
                if caller.f_code.co_filename == module.__file__:
                    name = getattr(caller.f_code, "co_qualname", caller.f_code.co_name)
                    caught.append((theirs.get(caller.f_code, name), watched[frame.f_code]))
                    return
                caller = caller.f_back
    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield caught
    finally:
        sys.setprofile(previous)


def recursing_piece(module, pieces, error):
    """The student's piece that recurs most often in a RecursionError's traceback."""
    theirs, counts, tb = piece_of(module, pieces), {}, error.__traceback__
    while tb is not None:
        piece = theirs.get(tb.tb_frame.f_code)
        if piece:
            counts[piece] = counts.get(piece, 0) + 1
        tb = tb.tb_next
    return max(counts, key=counts.get) if counts else pieces[0]


# -------------------------------------------------------------------------------------------------
# Grading one file, in this process
# -------------------------------------------------------------------------------------------------
@dataclass
class Result:
    assignment: Assignment
    passed: int = 0
    status: str = "passed"   # passed, failed, not done, refused, timed out, crashed, import error
    message: str = ""
    seconds: float = 0.0

    @property
    def points(self):
        return self.assignment.points * self.passed / len(self.assignment.checks)


def grade_one(module, assignment, seed):
    """Run one assignment's checks with its pieces, and only those, swapped in."""
    result, start, not_done, refused = Result(assignment), time.perf_counter(), 0, None
    with swapped_in(module, assignment.pieces), tripwire(module, assignment.pieces) as caught:
        for i, check in enumerate(assignment.checks):
            failure = None
            try:
                with torch.random.fork_rng():
                    check(torch.Generator().manual_seed(seed * 1000 + i))
            except NotImplementedError as e:
                not_done += 1
                failure = f"not done: {e}" if str(e) else "not done"
            except Wrong as e:
                failure = str(e)
            except RecursionError as e:
                piece = recursing_piece(module, assignment.pieces, e)
                refused = (f"{piece} calls itself without end: while it is graded, "
                           f"stable_audio.{piece.rpartition('.')[2]} is yours, not the "
                           f"reference; write it without calling it")
            except SystemExit as e:
                failure = f"{check.__name__}: the piece calls exit({e.code!r}); it must return"
            except Exception as e:
                line = str(e).splitlines()[0] if str(e) else ""
                failure = f"{check.__name__}: {type(e).__name__}: {line}"
            if caught:
                caller, called = caught[0]
                refused = (f"{caller} calls stable_audio's own {called}, which {assignment.key} "
                           f"asks you to write: that grades the reference, not you; write it")
            if refused:
                break
            result.passed += failure is None
            if failure and not result.message:
                result.message = failure
    if refused:
        result.status, result.passed, result.message = "refused", 0, refused
    elif not_done == len(assignment.checks):
        result.status, result.message = "not done", ""
    elif result.passed < len(assignment.checks):
        result.status = "failed"
    result.seconds = time.perf_counter() - start
    return result


# -------------------------------------------------------------------------------------------------
# Each file in processes of its own, each assignment under a time limit
# -------------------------------------------------------------------------------------------------
TIMEOUT_S = 60.0        # per assignment; the slowest correct one takes about 0.05 s on 2 CPU cores
STARTUP_S = 60.0        # a worker's own start (Python, torch), on top of the file's import
WORKER = ("import sys; sys.path.insert(0, {here!r}); import assignments; "
          "assignments.worker(*sys.argv[1:])")


def worker(path, keys, seed, log):
    """Grade one file in this process (started by grade_file): one JSON line per event on stdout,
    which is then pointed elsewhere, so whatever the student's code prints goes to `log`."""
    report = os.fdopen(os.dup(1), "w")
    printed = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(printed, 1)
    os.dup2(printed, 2)
    torch.set_num_threads(1)                 # small tensors; files may be graded side by side

    def send(**event):
        report.write(json.dumps(event) + "\n")
        report.flush()
    send(event="started")
    try:
        module = load_student(path)
    except NotImportable as e:
        return send(event="import error", message=str(e))
    send(event="imported", undone=module.__undone__)
    for key in keys.split(","):
        send(event="start", key=key)
        r = grade_one(module, ASSIGNMENTS[key], int(seed))
        send(event="result", key=key, passed=r.passed, status=r.status, message=r.message,
             seconds=r.seconds)
        sys.stdout.flush()


def ended(code):
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def run_worker(path, todo, seed, timeout, log, results, undone):
    """One worker process on the assignments in `todo`, until it finishes them, stalls or dies;
    each result goes into `results` and out of `todo`; what the file's import changed in
    stable_audio (and grading undid) into `undone`."""
    with open(log, "ab") as printed:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER.format(here=str(HERE)), str(path), ",".join(todo),
             str(seed), str(log)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=printed, start_new_session=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    current, deadline = None, time.monotonic() + STARTUP_S + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = "stalled"
            if line is None or line == "stalled":
                how = (f"timed out after {timeout:g} s" if line == "stalled" else
                       f"ended the grading process ({ended(proc.wait())})")
                if current:
                    status = "timed out" if line == "stalled" else "crashed"
                    results[current] = Result(ASSIGNMENTS[current], status=status,
                                              message=f"{current} {how}",
                                              seconds=time.monotonic() - began)
                    todo.remove(current)
                elif todo:
                    fail_all(results, todo, f"{path}: importing it {how}")
                return
            event = json.loads(line)
            if event["event"] == "import error":
                return fail_all(results, todo, event["message"])
            if event["event"] == "started":
                deadline = time.monotonic() + timeout
            elif event["event"] == "imported":
                undone[:] = event["undone"]
            elif event["event"] == "start":
                current, began = event["key"], time.monotonic()
                deadline = began + timeout
            elif event["event"] == "result":
                key = event.pop("key")
                results[key] = Result(ASSIGNMENTS[key], event["passed"], event["status"],
                                      event["message"], event["seconds"])
                todo.remove(key)
                current = None
                if not todo:        # done: a process the file started may hold the pipe open
                    return
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def fail_all(results, todo, message):
    for key in todo:
        results[key] = Result(ASSIGNMENTS[key], status="import error", message=message)
    todo.clear()


def grade_file(path, keys, seed, timeout):
    """Grade one file apart from every other: -> (its results, what its code printed, what its
    import changed in stable_audio)."""
    results, todo, undone = {}, list(keys), []
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "printed.txt"
        while todo:                                 # a stall or a crash ends one assignment
            run_worker(path, todo, seed, timeout, log, results, undone)
        printed = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return [results[key] for key in keys], printed, undone


# -------------------------------------------------------------------------------------------------
# Grades out: a table, CSV rows, a gradebook, Gradescope's results.json
# -------------------------------------------------------------------------------------------------
def print_table(path, seed, results, printed_lines, undone):
    print(f"{path} (seed {seed})")
    print(f"{'':3} {'':5} {'assignment':48} {'checks':>10} {'points':>8} {'time':>6}  "
          f"first failure")
    for r in results:
        a = r.assignment
        checks = f"{r.passed}/{len(a.checks)}" if r.status in ("passed", "failed") else r.status
        print(f"{a.key:3} {a.section:5} {a.title:48} {checks:>10} {r.points:4.1f}/{a.points:<3}"
              f" {r.seconds:5.1f}s  {r.message}")
    total = sum(r.points for r in results)
    print(f"{'':61} total {total:5.1f}/{sum(r.assignment.points for r in results)}")
    if printed_lines:
        print(f"({path} printed {printed_lines} lines while graded, kept out of this table; "
              f"--log FILE keeps them)")
    if undone:
        print(f"({path} changed stable_audio's {', '.join(undone)} when imported; undone: every "
              f"piece it does not write is graded as the reference's)")


CSV_FIELDS = ["student", "file", "seed", "assignment", "status", "passed", "checks", "points",
              "max_points", "seconds", "message"]


def csv_rows(path, seed, results):
    return [{"student": Path(path).stem, "file": str(path), "seed": seed,
             "assignment": r.assignment.key, "status": r.status, "passed": r.passed,
             "checks": len(r.assignment.checks), "points": f"{r.points:.1f}",
             "max_points": r.assignment.points, "seconds": f"{r.seconds:.2f}",
             "message": r.message} for r in results]


def gradebook_text(graded, seed, chosen):
    """One row per student: each assignment's points and the total."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["student", "file", "seed", *[a.key for a in chosen], "total", "max_points"])
    for path, results in graded:
        writer.writerow([Path(path).stem, str(path), seed, *[f"{r.points:.1f}" for r in results],
                         f"{sum(r.points for r in results):.1f}", sum(a.points for a in chosen)])
    return out.getvalue()


def gradescope_text(results, seed):
    """Gradescope's autograder results: the score, and one test per assignment."""
    tests = [{"name": f"{r.assignment.key} {r.assignment.section} {r.assignment.title}",
              "score": round(r.points, 2), "max_score": r.assignment.points,
              "output": f"{r.status}: {r.message}" if r.message else r.status} for r in results]
    return json.dumps({"score": round(sum(r.points for r in results), 2), "tests": tests,
                       "output": f"graded at seed {seed}"}, indent=2) + "\n"


def student_files(paths):
    """The files to grade: each file named, and every .py file of each folder named."""
    files = []
    for path in map(Path, paths):
        found = sorted(path.glob("*.py")) if path.is_dir() else [path]
        if not found:
            raise training.UsageError(f"{path} holds no .py file to grade")
        files += found
    for path in files:
        if not path.is_file():
            raise training.UsageError(f"{path}: no such file; make one with "
                                f"`python assignments.py starter --out {path}`")
    return files


def grade(paths, only=None, seed=0, as_csv=False, timeout=TIMEOUT_S, jobs=1, gradebook=None,
          gradescope=None, log=None, force=False):
    """Grade each file (or folder of files) on the chosen assignments, each file in processes of
    its own; 0 when every one passes, 1 otherwise."""
    chosen, paths = [ASSIGNMENTS[k] for k in (only or ASSIGNMENTS)], student_files(paths)
    if gradescope and len(paths) != 1:
        raise training.UsageError(f"--gradescope grades one submission, got {len(paths)} files; "
                            "name the one file")
    for out in (gradebook, gradescope, log):
        if out and Path(out).exists() and not force:
            raise training.UsageError(f"{out} exists; pass --force to replace it")
    writer = csv.DictWriter(sys.stdout, CSV_FIELDS) if as_csv else None
    if writer:
        writer.writeheader()
    graded, printed_all, ok = [], [], True
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        keys = [a.key for a in chosen]
        for path, (results, printed, undone) in zip(paths, pool.map(
                lambda p: grade_file(p, keys, seed, timeout), paths)):
            ok &= all(r.status == "passed" for r in results)
            graded.append((path, results))
            if printed:
                printed_all.append(f"==== {path}\n{printed}")
            if writer:
                writer.writerows(csv_rows(path, seed, results))
                sys.stdout.flush()
            elif results and all(r.status == "import error" for r in results):
                print(results[0].message)
            else:
                print_table(path, seed, results, 0 if log else printed.count("\n"), undone)
    if gradebook:
        write_new(gradebook, gradebook_text(graded, seed, chosen), force)
    if gradescope:
        write_new(gradescope, gradescope_text(graded[0][1], seed), force)
    if log:
        write_new(log, "".join(printed_all), force)
    return 0 if ok else 1


def list_assignments():
    print(f"{'':3} {'':5} {'assignment':48} {'points':>6} {'minutes':>7}  write")
    for a in ASSIGNMENTS.values():
        print(f"{a.key:3} {a.section:5} {a.title:48} {a.points:6} {a.minutes:7}  "
              f"{', '.join(a.pieces)}")


def assignment_keys(text):
    keys = [k.strip().upper() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ASSIGNMENTS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown assignment {', '.join(unknown) or text!r}: "
                                         f"choose from {', '.join(ASSIGNMENTS)}")
    return keys


def parse_args(argv):
    p = training.Parser(description="Course assignments on Stable Audio: write the paper's key "
                        "pieces, graded against closed forms and properties.")
    commands = p.add_subparsers(dest="command", required=True, parser_class=training.Parser)
    commands.add_parser("list", help="each assignment, its section, pieces, points and minutes")
    for name, what in (("starter", "the blank file to hand out"),
                       ("solution", "the instructor's key: the reference's bodies")):
        c = commands.add_parser(name, help=f"write {what}")
        c.add_argument("--out", required=True, help="the file to write")
        c.add_argument("--force", action="store_true", help="replace --out if it exists")
    c = commands.add_parser("grade", help="grade students' files: a table, or CSV rows")
    c.add_argument("files", nargs="+",
                   help="the students' files (a starter filled in), or folders of them")
    c.add_argument("--only", type=assignment_keys, default=None, metavar="A1,A6",
                   help="grade these assignments only (default: all)")
    c.add_argument("--seed", type=int, default=0,
                   help="draws the checks' inputs (default 0, the public seed students grade "
                        "with; instructors: pick a private one)")
    c.add_argument("--csv", action="store_true",
                   help="CSV rows on stdout, one per student and assignment (student, file, seed, "
                        "assignment, status, points, ...)")
    c.add_argument("--gradebook", metavar="FILE",
                   help="also write a CSV with one row per student: each assignment's points "
                        "and the total")
    c.add_argument("--gradescope", metavar="FILE",
                   help="also write Gradescope's results.json for the one file graded")
    c.add_argument("--log", metavar="FILE",
                   help="keep what the students' code printed while graded (default: dropped)")
    c.add_argument("--timeout", type=positive_seconds, default=TIMEOUT_S, metavar="S",
                   help=f"seconds each assignment may take per file (default {TIMEOUT_S:g}; "
                        "a correct one takes well under 1)")
    c.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="files graded side by side (default: the cores, at most 4)")
    c.add_argument("--force", action="store_true",
                   help="replace --gradebook, --gradescope and --log files that exist")
    return p.parse_args(argv)


def positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"--timeout takes a positive number of seconds, got "
                                         f"{text!r}")
    return value


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.command == "list":
            list_assignments()
            return 0
        if args.command in ("starter", "solution"):
            blank = args.command == "starter"
            write_new(args.out, student_file(blank, Path(args.out).name), args.force)
            print(f"wrote {args.out}: {len(PIECES)} pieces in {len(ASSIGNMENTS)} assignments"
                  + ("; grade it with `python assignments.py grade " + args.out + "`"
                     if blank else ""))
            return 0
        if args.jobs < 1:
            raise training.UsageError(f"--jobs must be at least 1, got {args.jobs}")
        return grade(args.files, args.only, args.seed, args.csv, args.timeout, args.jobs,
                     args.gradebook, args.gradescope, args.log, args.force)
    except (training.UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
