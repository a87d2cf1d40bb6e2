"""Benchmarks for the Stable Audio reference: speed, throughput, timing accuracy, sampler accuracy
and prompt adherence. Prints a markdown table per measurement and writes the same figures to JSON.

    python bench.py --quick                          # a few minutes on a CPU (tiny size)
    python bench.py --size full --device cuda        # the paper's setting: 95 s, 100 steps, bf16
    python bench.py --only samplers,throughput --out samplers.json
    python bench.py --gpu-check                      # a self-test of a CUDA GPU, one table

Sections (run in this order; --only picks some):
  speed       wall time of `generate` for 10 s, 30 s and the whole window, split into text
              encoding, diffusion steps and VAE decoding (median of --repeats after a warm-up), and
              seconds of audio per second. cli: the README's sample.py command
              `python sample.py "ambient rain" --seconds 30 ...` as a subprocess, start-up included.
  throughput  U-Net forward (batch 2: the CFG pair) and VAE decode per latent length, peak memory;
              on CUDA also the largest training batch with and without gradient checkpointing.
  cpu-bf16    the U-Net forward on the CPU in float32 and under bf16 autocast: time, difference,
              and whether the CPU has bf16 units (AMX, AVX-512 BF16) so --dtype bfloat16 uses it.
  vae         reconstruction of unseen sound-world clips by a checkpoint's VAE (STFT loss, SNR,
              log-spectral distance) and its compression ratio.
  timing      §6.3 timing accuracy: request durations across the window, find where the untrimmed
              output stops being audible, report the errors.
  samplers    Euler and DPM-Solver++(2M, 3M) against the exact probability-flow solution for
              Gaussian data: errors and measured orders; with --ckpt also on the model, against
              a run of twice the most steps.
  adherence   CLAP scores of generated audio against every prompt, a Fréchet distance to real
              sound-world clips, and acoustic descriptors beside those of real clips. The CLAP
              is this project's own small one, so its figures are not the paper's.
  grading     assignments.py grading the instructor's key on every assignment, as a subprocess,
              then a class's folder with a submission that hangs and one that exits (--quick:
              4 keys, and the hang stopped by --timeout 5 instead of the default minute).
  check       `python train.py check --data DIR` as a subprocess, on a folder of sound-world
              clips at the tiny size's window and defaults, --latent-scale auto (--quick: 2 s
              clips in 1.9 s windows, batch 2): wall time, exit status and verdict.
Every table names the machine (CPU model and torch threads, or GPU), the torch version and dtype.
speed and throughput use random weights of --size unless --ckpt is given; vae, timing, adherence
and the cli run need a checkpoint (default checkpoints/demo.pt) and are skipped when it is missing.
--gpu-check runs none of them: correctness on the GPU against the CPU, the attention kernels, the
paper's 95 s headline, training steps of each stage and a torchrun run, a row each (GPU_CHECKS).
"""
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import sound_world
import stable_audio as sa
import training

HERE = Path(__file__).resolve().parent
DEMO_CKPT = HERE / "checkpoints" / "demo.pt"
SECTIONS = ("speed", "throughput", "cpu-bf16", "vae", "timing", "samplers", "adherence",
            "grading", "check")
SIZE_ORDER = ("tiny", "small", "full")      # throughput measures every size up to --size

# speed
SPEED_SECONDS = (10, 30)                    # and the whole window
SPEED_PROMPT = "ambient rain"
PAPER_STEPS = 100
H100_TARGET_S = 4.0          # 95 s, 100 steps, CFG 6, batch 1, bf16 (the paper: 8 s on an A100)
CLI_SECONDS = 30
CLI_TARGET_S = 20.0                         # the README's command: at most 20 s on 2 CPU cores
GRADING_TARGET_S = 60.0                     # assignments.py grading all of a key: 2 CPU cores
CLASS_SIZE, CLASS_TARGET_S = 20, 180.0      # a folder of keys, one hang, one exit: 2 CPU cores
QUICK_CLASS_SIZE, QUICK_TIMEOUT_S = 4, 5    # --quick: 4 keys, and the hang stopped after 5 s
CHECK_TARGET_S = 300.0                      # train.py check: minutes, not hours, on 2 CPU cores
CHECK_CLIPS, CHECK_CLIP_SECONDS = 8, 95     # its folder: sound-world clips of 1 to 95 s
TIME_LINE = re.compile(r"time: loading ([\d.]+) s \+ sampling and decoding ([\d.]+) s")

# throughput
LATENT_DIVISORS = (16, 4, 1)                # latent lengths: a 16th, a quarter and the window
MAX_TRAIN_BATCH = 1024
TRAIN_TIMED_STEPS = 3

# timing
TIMING_SOUNDS = ("rain", "ocean waves", "synth pad")  # steady: the end is where the sound stops
TIMING_EVERY_S, QUICK_TIMING_EVERY_S = 5, 10          # requested durations: every 5 s (quick 10)
# The audible end is judged relative to the clip's loudest frame, so a soft clip (the sound world
# peaks anywhere from -12 to -1 dBFS) is judged like a loud one: 40 dB down is where a sound fades
# into the background at a normal listening level. The absolute floor keeps a very quiet clip from
# calling the VAE's residual hiss in the silent tail audible: -70 dBFS RMS is far below anything
# heard at a level where the clip's peaks are comfortable.
SILENCE_DB = -40.0
SILENCE_FLOOR_DBFS = -70.0
FRAME_SECONDS = 0.05

# samplers
SAMPLER_STEPS = (5, 10, 20, 50, 100)
MODEL_SAMPLER_STEPS = (5, 10, 20, 50)       # on a checkpoint (--quick: the first three)

# adherence
ADHERENCE_SOUNDS = ("rain", "piano", "drums", "birdsong", "ocean waves", "synth pad")
QUICK_SOUNDS = 3                            # --quick: rain, piano, drums
ADHERENCE_SECONDS = 10
VAE_SECONDS = 5
REAL_CLIPS = 4                              # real sound-world clips per sound, the reference set
REAL_SEED = 1000              # training draws 63-bit seeds, so clips from here on are unseen
FLATNESS_BAND = 16                          # bins per band for flatness (344 Hz at 44.1 kHz)
ENVELOPE_SECONDS = 0.01
SPECTRUM_FLOOR_DB = -80.0                   # log spectra are floored 80 dB under their maximum
CLAP_NOTE = ("CLAP figures use this project's own small CLAP (train.py clap), not OpenL3, PaSST "
             "or LAION-CLAP as in the paper, so they are not comparable with the paper's numbers")


# -------------------------------------------------------------------------------------------------
# Measuring: the machine, clocks that wait for the GPU, peak memory, tables.
# -------------------------------------------------------------------------------------------------
def cpu_model():
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(device, dtype):
    """Where a figure comes from: processor or GPU, torch threads, torch version, dtype."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"device": f"{name} ({device.type})", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch.")}


def sync(device):
    """Wait for queued GPU work, so a clock read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_seconds(fn, device, repeats):
    """Median wall time of fn() over `repeats` runs, after one warm-up run."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    kib = 1 / 1024 if sys.platform == "darwin" else 1        # ru_maxrss: bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 2 ** 20


def table(title, where, rows, *notes):
    """One printed table: {title, machine, notes, rows}; rows are dicts with the same keys."""
    return {"title": title, "machine": where, "notes": list(notes), "rows": rows}


def fmt(v):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "0" if v == 0 else f"{v:.2e}" if not 0.01 <= abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def markdown(t):
    """A table as markdown: title, machine line, notes, then the rows."""
    m = t["machine"]
    lines = [f"### {t['title']}",
             f"machine: {m['device']}, torch threads {m['threads']}, torch {m['torch']}, "
             f"{m['dtype']}", *t["notes"]]
    if t["rows"]:
        keys = list(t["rows"][0])
        lines += ["", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in t["rows"]]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------
# speed: generate's wall time, split by its own stopwatch, and the CLI as a user runs it.
# -------------------------------------------------------------------------------------------------
def time_generate(model, seconds, steps, dtype):
    """One `generate` call -> seconds on text, sampling, decoding, and in all (bench's clock)."""
    laps = {}
    t0 = time.perf_counter()
    sa.generate(model, [SPEED_PROMPT], seconds_total=seconds, steps=steps, dtype=dtype,
                laps=laps)
    sync(next(model.parameters()).device)
    return {**laps, "total": time.perf_counter() - t0}


def speed_rows(model, steps, dtype, repeats):
    """Median times of `generate` for 10 s, 30 s and the whole window (those that fit)."""
    config = model.config
    window = config.window / config.sample_rate
    durations = [s for s in SPEED_SECONDS if s < window] + [window]
    # A whole run as warm-up: on an H100 a short one left the first timed runs 1.5x slower.
    time_generate(model, durations[-1], steps, dtype)
    rows = []
    for seconds in tqdm(durations, desc="speed", leave=False):
        runs = [time_generate(model, seconds, steps, dtype) for _ in range(repeats)]
        t = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append({"audio s": round(seconds, 1), "steps": steps, "text s": t["text"],
                     "sampling s": t["sampling"], "decoding s": t["decoding"],
                     "total s": t["total"], "audio s per s": seconds / t["total"]})
    return rows


def time_cli(ckpt, device):
    """Wall time of the README's sample.py command as a subprocess, split by its `time:` line."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(HERE / "sample.py"), SPEED_PROMPT,
                   "--seconds", str(CLI_SECONDS), "--ckpt", str(ckpt), "--out", f"{tmp}/x.wav",
                   "--seed", "0", "--device", device.type]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
        wall = time.perf_counter() - t0
    row = {"command": f'sample.py "{SPEED_PROMPT}" --seconds {CLI_SECONDS} --seed 0',
           "wall s": wall}
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**row, "failed": f"exit {done.returncode}: {error}"}
    found = TIME_LINE.search(done.stdout)
    loading, generating = (float(g) for g in found.groups()) if found else (None, None)
    return {**row, "loading s": loading, "sampling and decoding s": generating,
            "start-up and writing s": wall - loading - generating if found else None}


def bench_speed(setup):
    model, where = setup["speed_model"], machine(setup["device"], setup["dtype"])
    config, steps = model.config, setup["steps"]
    weights = (f"checkpoint {setup['ckpt']}" if setup["ckpt_given"]
               else "random weights (no --ckpt; speed does not depend on the weights)")
    rows = speed_rows(model, steps, setup["dtype"], setup["repeats"])
    notes = [f"size {config.size}, {weights}; CFG {sa.CFG_SCALE:g}, batch 1, median of "
             f"{setup['repeats']} after a warm-up; the diffusion always runs on the whole window, "
             "so only the decoding grows with the seconds asked for"]
    if setup["device"].type == "cuda" and config.size == "full" and steps == PAPER_STEPS:
        for row in rows:
            full_window = row is rows[-1]
            row["target s (H100)"] = f"< {H100_TARGET_S:g}" if full_window else None
            row["met"] = row["total s"] < H100_TARGET_S if full_window else None
        notes.append(f"target: the whole 95 s window, {PAPER_STEPS} steps, CFG 6, batch 1, bf16 "
                     f"in under {H100_TARGET_S:g} s on one H100 (the paper: 8 s on an A100)")
    yield table("speed: generate", where, rows, *notes)
    if not setup["ckpt"].is_file():
        yield table("speed: cli", where, [], f"skipped: no checkpoint at {setup['ckpt']}")
        return
    row = time_cli(setup["ckpt"], setup["device"])
    if setup["device"].type == "cpu" and "failed" not in row:
        row["target s (2 CPU cores)"] = f"<= {CLI_TARGET_S:g}"
        row["met"] = row["wall s"] <= CLI_TARGET_S
    yield table("speed: cli", machine(setup["device"], torch.float32), [row],
                "the README's sample.py command as a subprocess (start-up included), "
                f"checkpoint {setup['ckpt']}, float32, the same torch threads as this process")


# -------------------------------------------------------------------------------------------------
# throughput: the U-Net and the VAE decoder on their own; on CUDA, training batch sizes.
# -------------------------------------------------------------------------------------------------
def build_parts(size, device):
    """Random-weight U-Net and VAE of a size, built on the device (no slow CPU init first)."""
    config = sa.SIZES[size]
    with torch.device(device):
        unet = sa.UNet(config.unet, config.vae.latent_dim, config.clap.text_width,
                       config.context_len)
        return config, unet, sa.VAE(config.vae)


def random_inputs(config, batch, L, device):
    """Latents (B, 64, L), t (B,), context (B, S, C) and an all-true mask (B, S)."""
    g = torch.Generator().manual_seed(0)
    S, C = config.context_len, config.clap.text_width
    return (torch.randn(batch, config.vae.latent_dim, L, generator=g).to(device),
            torch.rand(batch, generator=g).to(device),
            torch.randn(batch, S, C, generator=g).to(device),
            torch.ones(batch, S, dtype=torch.bool, device=device))


@torch.inference_mode()
def throughput_rows(size, device, dtype, repeats):
    """U-Net forward (batch 2) and VAE decode (batch 1) per latent length, with peak memory."""
    config, unet, vae = build_parts(size, device)
    unet.eval()
    vae.eval()
    unet.to(dtype)                         # weights in the run's precision, as sample.py does
    frames, chunk = config.window // vae.hop, sa.default_decode_chunk(device)
    rows = []
    for L in tqdm([frames // d for d in LATENT_DIVISORS], desc=f"throughput {size}", leave=False):
        x, t, context, mask = random_inputs(config, 2, L, device)
        reset_peak_memory(device)
        unet_s = median_seconds(lambda: unet(x.to(dtype), t, context.to(dtype), mask), device,
                                repeats)
        unet_gib = peak_memory_gib(device)
        reset_peak_memory(device)          # generate decodes in float32, chunk by chunk
        decode_s = median_seconds(lambda: vae.decode(x[:1], chunk=chunk), device, repeats)
        rows.append({"size": size, "latent frames": L,
                     "audio s": round(L * vae.hop / config.sample_rate, 1),
                     "U-Net forward s (B=2)": unet_s, "U-Net peak GiB": unet_gib,
                     "VAE decode s (B=1)": decode_s, "decode peak GiB": peak_memory_gib(device)})
    return rows


def train_step_seconds(unet, opt, config, batch, device, dtype):
    """Median seconds of one U-Net training step (Adam, the v-loss), or None if out of memory."""
    L = config.window // math.prod(config.vae.strides)
    z, _, context, mask = random_inputs(config, batch, L, device)
    generator = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            loss = sa.diffusion_loss(unet, z, context, mask, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    try:
        return median_seconds(step, device, TRAIN_TIMED_STEPS)
    except torch.OutOfMemoryError:
        pass
    opt.zero_grad(set_to_none=True)   # outside the handler: its traceback holds the activations
    torch.cuda.empty_cache()
    return None


def train_batch_rows(size, device, dtype, checkpointing):
    """Training steps at batch 1, 2, 4, ... until one runs out of memory (CUDA only)."""
    config, unet, _ = build_parts(size, device)
    unet.train().set_checkpointing(checkpointing)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-5)     # the paper trains with Adam
    rows, batch = [], 1
    while batch <= MAX_TRAIN_BATCH:
        reset_peak_memory(device)
        seconds = train_step_seconds(unet, opt, config, batch, device, dtype)
        fits = seconds is not None
        rows.append({"size": size, "checkpointing": checkpointing, "batch": batch, "fits": fits,
                     "steps per s": 1 / seconds if fits else None,
                     "samples per s": batch / seconds if fits else None,
                     "peak GiB": peak_memory_gib(device) if fits else None})
        if not fits:
            break
        batch *= 2
    del unet, opt
    torch.cuda.empty_cache()
    return rows


def bench_throughput(setup):
    device, dtype, size = setup["device"], setup["dtype"], setup["size"]
    where = machine(device, dtype)
    sizes = [size] if setup["quick"] else SIZE_ORDER[:SIZE_ORDER.index(size) + 1]
    rows = [r for s in sizes for r in throughput_rows(s, device, dtype, setup["repeats"])]
    memory = ("peak allocated per call, weights included" if device.type == "cuda" else
              "CPU memory is the whole process's peak resident set so far (ru_maxrss): it only "
              "grows")
    yield table("throughput: U-Net forward and VAE decode", where, rows,
                f"random weights, the U-Net's in {str(dtype).removeprefix('torch.')}; median of "
                f"{setup['repeats']} after a warm-up; the decode runs in float32 in chunks of "
                f"{sa.default_decode_chunk(device)} frames, as generate does; {memory}")
    if device.type != "cuda":
        yield table("throughput: training batch", where, [], "skipped: CUDA only")
        return
    rows = [r for on in (False, True) for r in train_batch_rows(size, device, dtype, on)]
    largest = {on: max([r["batch"] for r in rows if r["checkpointing"] == on and r["fits"]],
                       default=0) for on in (False, True)}
    yield table(f"throughput: training batch at {size}", where, rows,
                "one Adam step of the v-loss on random latents spanning the window, "
                f"median of {TRAIN_TIMED_STEPS}; largest batch that fits: {largest[False]} "
                f"without, {largest[True]} with gradient checkpointing")


# -------------------------------------------------------------------------------------------------
# timing (§6.3): where does the untrimmed output stop being audible?
# -------------------------------------------------------------------------------------------------
def frame_levels_db(audio, sample_rate, frame_seconds):
    """RMS level in dBFS of consecutive frames over both channels, each frame's mean removed.
    (frames,)"""
    x = np.asarray(audio, dtype=np.float64).reshape(-1, np.shape(audio)[-1])      # (C, N)
    n = max(1, round(frame_seconds * sample_rate))
    # The last partial frame is filled with its own last sample: zeros after a DC offset would
    # be a step, and every 47.6 s window (not a whole number of frames) would end "audible".
    x = np.pad(x, ((0, 0), (0, -x.shape[1] % n)), mode="edge").reshape(x.shape[0], -1, n)
    # A constant offset is inaudible, and the VAE's loss is blind to it (A-weighting is 0 at
    # 0 Hz): a small VAE decodes silence as a DC offset, which must not count as sound.
    x = x - x.mean(-1, keepdims=True)
    # Power over both channels, not of their sum: opposite-phase channels would cancel in a mix.
    power = np.square(x).mean((0, 2))
    return 10 * np.log10(power + 1e-20)


def audible_end(audio, sample_rate, threshold_db=SILENCE_DB, floor_dbfs=SILENCE_FLOOR_DBFS,
                frame_seconds=FRAME_SECONDS):
    """Seconds to the end of the last frame above max(loudest frame + threshold_db, floor_dbfs).
    audio: (C, N) or (N,); 0 when nothing is audible."""
    levels = frame_levels_db(audio, sample_rate, frame_seconds)
    loud = np.flatnonzero(levels > max(levels.max() + threshold_db, floor_dbfs))
    if len(loud) == 0:
        return 0.0
    n = np.shape(audio)[-1]
    return min((loud[-1] + 1) * max(1, round(frame_seconds * sample_rate)), n) / sample_rate


def level_drop_db(audio, sample_rate, seconds, frame_seconds=FRAME_SECONDS):
    """Mean frame level (dB) after `seconds` minus the mean level before it: how much quieter
    the window gets past the requested end, a graded view of what audible_end sees as yes or no."""
    levels = frame_levels_db(audio, sample_rate, frame_seconds)
    k = round(seconds / frame_seconds)
    return float(levels[k:].mean() - levels[:k].mean())


def timing_durations(window_seconds, every):
    """Whole seconds every `every` s below the window (every 1 s when the window is short)."""
    every = every if window_seconds > 2 * every else 1
    return list(range(every, math.ceil(window_seconds), every))


def real_clip(sound, seed, sample_rate, seconds):
    """The first `seconds` of the first sound-world clip of `sound` that lasts that long, trying
    seeds seed, seed + 1e5, ... (clip lengths are random)."""
    n = round(seconds * sample_rate)
    while True:
        audio, _ = sound_world.make_clip(seed, sample_rate, max(1.0, 2 * seconds), sound=sound)
        if audio.shape[-1] >= n:
            return audio[:, :n]
        seed += 100_000


def timing_rows(model, durations, seeds, steps, dtype, cfg_scale=sa.CFG_SCALE):
    """Detected audible end of untrimmed outputs per requested duration, against a real clip;
    then the same figures per sound, and over all clips."""
    sr, window = model.config.sample_rate, model.config.window
    clips, real_errors = [], []
    for i, seconds in enumerate(tqdm(durations, desc="timing", leave=False)):
        sounds = [TIMING_SOUNDS[(i + j) % len(TIMING_SOUNDS)] for j in range(seeds)]
        prompts = [sound_world.adherence_prompt(s) for s in sounds]
        audio = sa.generate(model, prompts, seconds_total=seconds, steps=steps,
                            cfg_scale=cfg_scale, seed=0, trim=False, dtype=dtype)
        for sound, a in zip(sounds, audio.cpu().numpy()):
            levels = frame_levels_db(a, sr, FRAME_SECONDS)
            k = round(seconds / FRAME_SECONDS)
            clips.append({"seconds": seconds, "sound": sound,
                          "error": audible_end(a, sr) - seconds,       # > 0: the sound runs on
                          "drop": level_drop_db(a, sr, seconds),
                          "inside": float(levels[:k].mean()),
                          "loudest after": float(levels[k:].max() - levels.max())})
        # The detector on a real clip of that length, padded with silence to the window.
        real = np.pad(real_clip(sounds[0], REAL_SEED + i, sr, seconds).numpy(),
                      ((0, 0), (0, window - round(seconds * sr))))
        real_errors.append(audible_end(real, sr) - seconds)
    rows = [timing_summary(seconds, [c for c in clips if c["seconds"] == seconds], real)
            for seconds, real in zip(durations, real_errors)]
    rows += [timing_summary(sound, [c for c in clips if c["sound"] == sound])
             for sound in TIMING_SOUNDS if any(c["sound"] == sound for c in clips)]
    return rows + [timing_summary("all", clips)]


def timing_summary(name, clips, real_error=None):
    """One row of the timing table over some clips (dicts from timing_rows)."""
    mean = lambda key: float(np.mean([c[key] for c in clips]))
    errors = np.array([c["error"] for c in clips])
    return {"requested s": name,
            "detected s (mean)": float(np.mean([c["seconds"] for c in clips]) + errors.mean()),
            "error s (mean)": float(errors.mean()),
            "abs error s (mean)": float(np.abs(errors).mean()),
            "within 1 s": float((np.abs(errors) <= 1).mean()),
            "level inside, dBFS": mean("inside"),
            "after the end, dB": mean("drop"),
            "loudest frame after the end, dB": mean("loudest after"),
            "detector on a real clip: error s": real_error}


def bench_timing(setup):
    model = setup["ckpt_model"]
    if model is None:
        yield table("timing: §6.3 timing accuracy", machine(setup["device"], setup["dtype"]), [],
                    f"skipped: no checkpoint at {setup['ckpt']}")
        return
    config = model.config
    every = QUICK_TIMING_EVERY_S if setup["quick"] else TIMING_EVERY_S
    durations = timing_durations(config.window / config.sample_rate, every)
    rows = timing_rows(model, durations, setup["seeds"], setup["eval_steps"], setup["dtype"],
                       setup["cfg_scale"])
    yield table("timing: §6.3 timing accuracy", machine(setup["device"], setup["dtype"]), rows,
                f"checkpoint {setup['ckpt']} (size {config.size}), {setup['seeds']} seed(s) per "
                f"duration, {setup['eval_steps']} dpmpp-3m steps, CFG {setup['cfg_scale']:g}, "
                f"trim=False; "
                f"prompts: {', '.join(sound_world.adherence_prompt(s) for s in TIMING_SOUNDS)}",
                f"audible end: end of the last {FRAME_SECONDS * 1000:g} ms frame whose RMS over "
                f"both channels is above max(loudest frame {SILENCE_DB:+g} dB, "
                f"{SILENCE_FLOOR_DBFS:g} dBFS); error = detected - requested; level inside: mean "
                "frame level before the request; after the end: mean frame level past the "
                "request minus the mean before it; loudest frame after the end: against the "
                "loudest frame of the clip (the detector needs it under "
                f"{SILENCE_DB:+g} dB); rows by sound pool the durations; the last column "
                "runs the detector on a real clip of the requested length padded with silence")


# -------------------------------------------------------------------------------------------------
# samplers: against the exact probability-flow solution for Gaussian data.
# -------------------------------------------------------------------------------------------------
def model_sampler_rows(model, steps_list, reference_steps, dtype, cfg_scale, seconds):
    """Each sampler at few steps against DPM-Solver++(3M) at `reference_steps`, same prompt and
    noise: relative RMS difference of the audio (what a listener gets)."""
    run = lambda sampler, steps: sa.generate(
        model, [sound_world.adherence_prompt("rain")], seconds_total=seconds, steps=steps,
        cfg_scale=cfg_scale, sampler=sampler, seed=0, dtype=dtype).cpu()
    reference = run("dpmpp-3m", reference_steps)
    rows = []
    for steps in tqdm(steps_list, desc="samplers on the model", leave=False):
        row = {"steps": steps}
        for name in sound_world.SAMPLERS_BY_ORDER:
            row[f"{name} difference"] = float((run(name, steps) - reference).norm()
                                              / reference.norm())
        rows.append(row)
    return rows


def bench_samplers(setup):
    s, sigma_min, sigma_max = sound_world.DATA_STD, sound_world.SIGMA_MIN, sound_world.SIGMA_MAX
    rows = [{"steps": n} for n in SAMPLER_STEPS]
    at_zero = {}
    for name in sound_world.SAMPLERS_BY_ORDER:
        errors = sound_world.gaussian_sampler_errors(sa.SAMPLERS[name], SAMPLER_STEPS)
        at_sigma_min = [e for e, _ in errors]
        orders = [None] + sound_world.measured_orders(at_sigma_min, SAMPLER_STEPS)
        for row, error, order in zip(rows, at_sigma_min, orders):
            row[f"{name} error"], row[f"{name} order"] = error, order
        at_zero[name] = errors[-1][1]
    floor = 1 - s / math.hypot(s, sigma_min)
    yield table("samplers: error against the exact Gaussian solution",
                machine(torch.device("cpu"), torch.float64), rows,
                f"data x0 ~ N(0, {s:g}^2); generate's schedule (get_sigmas, sigma "
                f"{sigma_max:g} -> {sigma_min:g}, then 0); relative RMS error of x at sigma_min, "
                "i.e. after steps - 1 ODE steps; order: slope against the previous row, "
                f"expected 1, 2, 3 once h = {math.log(sigma_max / sigma_min):.1f} / (steps - 1) "
                "is small (at few steps, errors of opposite sign can cancel)",
                "the final sigma_min -> 0 step returns D(x, sigma_min), which is off the exact "
                f"x(0) by 1 - s / sqrt(s^2 + sigma_min^2) = {floor:.2e} at any step count; "
                f"measured error at 0 after {SAMPLER_STEPS[-1]} steps: "
                + ", ".join(f"{k} {v:.2e}" for k, v in at_zero.items()))
    model = setup["ckpt_model"]
    if setup["ckpt_given"] and model is not None:
        steps_list = MODEL_SAMPLER_STEPS[:3] if setup["quick"] else MODEL_SAMPLER_STEPS
        reference = 2 * steps_list[-1]
        seconds = min(ADHERENCE_SECONDS, model.config.window / model.config.sample_rate)
        yield table("samplers: on the model, against a long run", machine(setup["device"],
                                                                          setup["dtype"]),
                    model_sampler_rows(model, steps_list, reference, setup["dtype"],
                                       setup["cfg_scale"], seconds),
                    f"checkpoint {setup['ckpt']}; prompt {sound_world.adherence_prompt('rain')!r}, "
                    f"{seconds:g} s, seed 0, CFG {setup['cfg_scale']:g}; relative RMS difference "
                    f"of the audio from dpmpp-3m at {reference} steps")


# -------------------------------------------------------------------------------------------------
# vae: how well the autoencoder reconstructs clips it never saw, at what compression.
# -------------------------------------------------------------------------------------------------
@torch.inference_mode()
def vae_rows(vae, sounds, clips, sample_rate, seconds):
    """Reconstruction of held-out sound-world clips (posterior mean, no sampling) per sound."""
    rows = []
    for sound in tqdm(sounds, desc="vae", leave=False):
        x = torch.stack([real_clip(sound, REAL_SEED + 7 * k, sample_rate, seconds)
                         for k in range(clips)])                               # (K, 2, N)
        x_hat = vae.decode(vae.encode(x)[0])[..., :x.shape[-1]]
        noise = (x_hat - x).pow(2).sum((1, 2)) / x.pow(2).sum((1, 2))
        rows.append({"sound": sound,
                     "STFT loss": float(sa.stereo_loss(x_hat, x, sample_rate)),
                     "SNR dB": float((-10 * noise.log10()).mean()),
                     "log-spectral distance dB": float(np.mean(
                         [log_spectral_distance(a, b) for a, b in zip(x_hat.numpy(), x.numpy())])),
                     # Notes the VAE cannot keep, no diffusion model on its latents can play.
                     "tonality real": float(np.mean(list(map(sound_world.tonality, x.numpy())))),
                     "tonality decoded": float(np.mean(list(map(sound_world.tonality,
                                                                x_hat.numpy()))))})
    rows.append({"sound": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]
                                     if k != "sound"}})
    return rows


def bench_vae(setup):
    model, where = setup["ckpt_model"], machine(setup["device"], torch.float32)
    if model is None:
        yield table("vae: reconstruction", where, [], f"skipped: no checkpoint at {setup['ckpt']}")
        return
    config, vae = model.config, model.vae.float()
    sounds = ADHERENCE_SOUNDS[:QUICK_SOUNDS] if setup["quick"] else ADHERENCE_SOUNDS
    clips = 2 if setup["quick"] else REAL_CLIPS
    values_in = config.vae.channels * vae.hop
    yield table("vae: reconstruction of unseen clips", where,
                vae_rows(vae.cpu() if setup["device"].type == "cpu" else vae, sounds, clips,
                         config.sample_rate, VAE_SECONDS),
                f"checkpoint {setup['ckpt']} (size {config.size}, activation "
                f"{config.vae.activation}, strides {config.vae.strides}); {clips} sound-world "
                f"clips of {VAE_SECONDS:g} s per sound, never seen in training, encoded to the "
                "posterior mean and decoded",
                f"compression: {values_in} samples ({config.vae.channels} channels x hop "
                f"{vae.hop}) -> {config.vae.latent_dim} latent values per frame, "
                f"{values_in / config.vae.latent_dim:g}x; "
                f"latent rate {config.sample_rate / vae.hop:.1f} frames/s",
                "STFT loss: stable_audio.stereo_loss, A-weighted multi-resolution on mid/side and "
                "L/R (the training objective); SNR: waveform signal-to-error ratio (phase-"
                "sensitive, low for noise even when it sounds right); log-spectral distance: "
                "average spectra; tonality: share of power in spectral peaks, as in the adherence "
                "section")


# -------------------------------------------------------------------------------------------------
# adherence: CLAP scores, a Fréchet distance, and descriptors that need no learned model.
# The CLAP is this project's own small one, not OpenL3, PaSST or LAION-CLAP as in the paper: its
# scores and distances rank checkpoints of this project and cannot be compared with the paper's.
# -------------------------------------------------------------------------------------------------
def spectral_flatness(audio, band=FLATNESS_BAND):
    """Geometric over arithmetic mean of the frame-averaged power spectrum, within bands of
    `band` bins, weighted by band power: ~1 for noise (band-limited or tilted too), ~0 for tones.

    Averaging power over frames first removes the periodogram's own scatter (one frame of white
    noise has flatness e^-gamma = 0.56). Bands keep coloured noise flat: rain is noise from 0.8 to
    12 kHz, whose flatness over the whole spectrum would be low."""
    power = sound_world.audible_frames(sound_world.stft_power(audio)).mean(0)[1:]   # drop DC
    power = power[:len(power) // band * band].reshape(-1, band) + 1e-30
    flatness = np.exp(np.log(power).mean(1)) / power.mean(1)
    return float((flatness * power.sum(1)).sum() / power.sum())


def percussiveness(audio, sample_rate):
    """Crest factor of the 10 ms energy envelope in dB, 10 log10(max / mean): ~1 dB for steady
    sound, high for sharp hits with quieter gaps between them."""
    energy = 10 ** (frame_levels_db(audio, sample_rate, ENVELOPE_SECONDS) / 10)
    return float(10 * np.log10(energy.max() / energy.mean()))


def log_spectrum_db(audio):
    """Frame-averaged power spectrum in dB, normalised to total power 1 (shape, not loudness),
    floored SPECTRUM_FLOOR_DB under its maximum."""
    power = sound_world.audible_frames(sound_world.stft_power(audio)).mean(0)[1:]
    db = 10 * np.log10(power / power.sum() + 1e-30)
    return np.maximum(db, db.max() + SPECTRUM_FLOOR_DB)


def log_spectral_distance(a, b):
    """RMS difference in dB between two clips' average log spectra."""
    return float(np.sqrt(np.mean(np.square(log_spectrum_db(a) - log_spectrum_db(b)))))


def frechet_gaussians(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for Gaussians N(mu1, S1), N(mu2, S2).

    Tr (S1 S2)^(1/2) = Tr (A S2 A)^(1/2) with A = S1^(1/2): a symmetric matrix, so both square
    roots come from eigh, and rounding cannot make them complex."""
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(np.sum(np.square(mu1 - mu2)) + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to two sets of embeddings (n, D) and (m, D)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return frechet_gaussians(a.mean(0), np.cov(a, rowvar=False),
                             b.mean(0), np.cov(b, rowvar=False))


@torch.inference_mode()
def clap_audio(model, clips):
    """Unit-norm CLAP audio embeddings of clips (B, 2, N). (B, D)"""
    device = next(model.parameters()).device
    return model.clap.embed_audio(clips.to(device)).float().cpu().numpy()


@torch.inference_mode()
def clap_text(model, prompts):
    """Unit-norm CLAP text embeddings. (P, D)"""
    return model.clap.embed_text(*model.clap.tokenize(prompts)).float().cpu().numpy()


def clap_summary(scores, labels):
    """From cosine scores (B, P) and each clip's prompt (B,): own-prompt score, mean score of the
    other prompts, and top-1 accuracy (the own prompt scores highest)."""
    own = scores[np.arange(len(labels)), labels]
    others = (scores.sum(1) - own) / (scores.shape[1] - 1)
    return {"own prompt": float(own.mean()), "other prompts": float(others.mean()),
            "top-1 accuracy": float((scores.argmax(1) == labels).mean())}


def generate_clips(model, sounds, seeds, seconds, steps, dtype, cfg_scale=sa.CFG_SCALE):
    """One clip per sound and seed (batch 1, so seed k is the same noise for every prompt).
    -> (len(sounds) * seeds, 2, N), sound-major."""
    jobs = [(s, k) for s in sounds for k in range(seeds)]
    return torch.cat([sa.generate(model, [sound_world.adherence_prompt(s)], seconds_total=seconds,
                                  steps=steps, cfg_scale=cfg_scale, seed=k, dtype=dtype).cpu()
                      for s, k in tqdm(jobs, desc="adherence", leave=False)])


def real_set(sounds, first, count, sample_rate, seconds):
    """`count` real clips per sound, seeds first, first + 1, ... -> (sounds, count, 2, N)."""
    return torch.stack([torch.stack([real_clip(s, REAL_SEED + 1000 * i + first + k, sample_rate,
                                               seconds) for k in range(count)])
                        for i, s in enumerate(sounds)])


def descriptor_rows(sounds, generated, real, sample_rate):
    """Flatness, tonality and percussiveness per sound: generated beside real clips."""
    measures = {"flatness": spectral_flatness, "tonality": sound_world.tonality,
                "percussive dB": lambda a: percussiveness(a, sample_rate)}
    rows = []
    for i, sound in enumerate(sounds):
        row = {"sound": sound}
        for name, f in measures.items():
            row[f"{name} gen"] = float(np.mean([f(a) for a in generated[i]]))
            row[f"{name} real"] = float(np.mean([f(a) for a in real[i]]))
        rows.append(row)
    return rows


def lsd_rows(generated, real):
    """Log-spectral distance: two prompts with the same seed against two seeds of one prompt."""
    def pairs(clips):
        across = [log_spectral_distance(clips[i][0], clips[j][0])
                  for i in range(len(clips)) for j in range(i + 1, len(clips))]
        within = [log_spectral_distance(c[0], c[1]) for c in clips]
        return float(np.mean(across)), float(np.mean(within))
    (gen_across, gen_within), (real_across, real_within) = pairs(generated), pairs(real)
    return [{"pair": "different prompts, same seed", "generated dB": gen_across,
             "real dB": real_across},
            {"pair": "same prompt, two seeds", "generated dB": gen_within,
             "real dB": real_within}]


def bench_adherence(setup):
    model, where = setup["ckpt_model"], machine(setup["device"], setup["dtype"])
    if model is None:
        yield table("adherence", where, [], f"skipped: no checkpoint at {setup['ckpt']}")
        return
    config = model.config
    sounds = ADHERENCE_SOUNDS[:QUICK_SOUNDS] if setup["quick"] else ADHERENCE_SOUNDS
    prompts, seeds = [sound_world.adherence_prompt(s) for s in sounds], max(2, setup["seeds"])
    seconds = min(ADHERENCE_SECONDS, config.window / config.sample_rate)
    generated = generate_clips(model, sounds, seeds, seconds, setup["eval_steps"], setup["dtype"],
                               setup["cfg_scale"])
    generated = generated.view(len(sounds), seeds, *generated.shape[1:])   # (sounds, seeds, 2, N)
    real = real_set(sounds, 0, REAL_CLIPS, config.sample_rate, seconds)
    real_b = real_set(sounds, REAL_CLIPS, seeds, config.sample_rate, seconds)   # as many as made
    setting = (f"checkpoint {setup['ckpt']} (size {config.size}); {seconds:.1f} s, {seeds} seeds "
               f"per prompt, {setup['eval_steps']} dpmpp-3m steps, CFG {setup['cfg_scale']:g}; "
               f"real: {REAL_CLIPS} sound-world clips per sound")
    text = clap_text(model, prompts)
    gen_emb, real_emb, real_b_emb = (clap_audio(model, clips.flatten(0, 1))
                                     for clips in (generated, real, real_b))
    gen_scores, real_scores = gen_emb @ text.T, real_emb @ text.T
    matrix = [{"generated for": p, **{q: float(v) for q, v in
                                      zip(prompts, gen_scores[i * seeds:(i + 1) * seeds].mean(0))}}
              for i, p in enumerate(prompts)]
    yield table("adherence: CLAP score matrix (generated audio x prompt)", where, matrix,
                CLAP_NOTE, setting, "cosine similarity, mean over seeds; rows: the prompt the "
                "audio was made for, columns: every prompt")
    labels = np.arange(len(sounds))
    rows = [{"audio": "generated", **clap_summary(gen_scores, labels.repeat(seeds)),
             "Fréchet distance to real": frechet_distance(gen_emb, real_emb)},
            {"audio": "real (reference)", **clap_summary(real_scores, labels.repeat(REAL_CLIPS)),
             "Fréchet distance to real": frechet_distance(real_b_emb, real_emb)}]
    yield table("adherence: CLAP scores and Fréchet distance", where, rows, CLAP_NOTE, setting,
                f"Fréchet distance on CLAP audio embeddings against the {len(real_emb)} real "
                f"clips; the reference row uses {len(real_b_emb)} other real clips, as many as "
                "generated ones: the distance between two real sets of that size, its noise floor")
    yield table("adherence: acoustic descriptors", where,
                descriptor_rows(sounds, generated.numpy(), real.numpy(), config.sample_rate),
                setting, "no learned model: flatness ~1 for noise (rain), tonality ~1 for notes "
                "(piano), percussiveness: crest factor of the 10 ms envelope (drums high)")
    yield table("adherence: log-spectral distance", where,
                lsd_rows(generated.numpy(), real.numpy()), setting,
                "RMS dB difference of average log spectra (shape only, loudness removed); "
                "different prompts should be further apart than two seeds of one prompt")


# -------------------------------------------------------------------------------------------------
# grading: the course's autograder on every assignment, as an instructor runs it (a subprocess,
# start-up included), on the key, which runs every check to its end.
# -------------------------------------------------------------------------------------------------
def bench_grading(setup):
    # The default --timeout (a minute) is most of the class's time: --quick gives the hang 5 s.
    size, timeout = (QUICK_CLASS_SIZE, ["--timeout", str(QUICK_TIMEOUT_S)]) if setup["quick"] \
        else (CLASS_SIZE, [])
    limits = f"--timeout {QUICK_TIMEOUT_S}" if setup["quick"] else "--timeout"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key.py"
        subprocess.run([sys.executable, str(HERE / "assignments.py"), "solution", "--out",
                        str(key)], capture_output=True, text=True, cwd=HERE, check=True)
        text = key.read_text()
        class_dir = Path(tmp) / "class"
        class_dir.mkdir()
        for i in range(size):
            (class_dir / f"student_{i:02}.py").write_text(text)
        (class_dir / "hangs.py").write_text(text.replace(
            "    return 0.5 * (mean", "    while True:\n        pass\n    return 0.5 * (mean"))
        (class_dir / "exits.py").write_text("import os\nos._exit(3)\n" + text)
        runs = [("assignments.py grade key.py", [str(key)], GRADING_TARGET_S),
                (f"a class: {size} keys, one that hangs, one that exits (default --jobs and "
                 f"{limits})", [str(class_dir), "--csv", *timeout], CLASS_TARGET_S)]
        for command, argv, target in runs:
            for _ in range(setup["repeats"]):
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, str(HERE / "assignments.py"), "grade",
                                       *argv], capture_output=True, text=True, cwd=HERE)
                wall = time.perf_counter() - t0
                ok = done.returncode == (0 if command.endswith("key.py") else 1)
                rows.append({"command": command, "wall s": wall, "exit": done.returncode,
                             "target s (2 CPU cores)": f"<= {target:g}",
                             "met": ok and wall <= target})
    yield table("grading: every assignment", machine(torch.device("cpu"), torch.float32), rows,
                "the instructor's key graded on all eight assignments, start-up included "
                "(exit 0: every check passed), then a folder as a class hands it in (exit 1: "
                "the hang and the exit fail, each in its own rows)")


# -------------------------------------------------------------------------------------------------
# check: train.py check as someone runs it before training on their folder (a subprocess, start-up
# included): the files, the bundled demo's VAE on them, the latents and the 50-step trial run.
# -------------------------------------------------------------------------------------------------
def bench_check(setup):
    # --latent-scale auto, as the check advises for the demo's VAE, whose latents are small
    quick = ["--window-seconds", "1", "--batch-size", "2", "--crop", "16384"] * setup["quick"]
    flags = ["--latent-scale", "auto", *quick]
    clips, seconds = (6, 2) if setup["quick"] else (CHECK_CLIPS, CHECK_CLIP_SECONDS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = sound_world.make_toy_folder(Path(tmp) / "clips", 44100, n=clips,
                                             max_seconds=seconds)
        for _ in range(setup["repeats"]):
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, str(HERE / "train.py"), "check", "--data",
                                   str(folder), *flags], capture_output=True, text=True, cwd=HERE)
            wall = time.perf_counter() - t0
            lines = done.stdout.splitlines()
            verdict = next((line for line in lines if line.startswith("verdict:")),
                           (done.stderr.strip().splitlines() or ["no verdict"])[-1])
            rows.append({"command": " ".join(["train.py check --data DIR", *flags]),
                         "wall s": wall, "exit": done.returncode,
                         "verdict": " / ".join([verdict] + [line.removeprefix("problem: ")[:60]
                                                           for line in lines
                                                           if line.startswith("problem:")]),
                         "target s (2 CPU cores)": f"<= {CHECK_TARGET_S:g}",
                         "met": done.returncode in (0, 1) and wall <= CHECK_TARGET_S})
    yield table("check: a folder before training", machine(torch.device("cpu"), torch.float32),
                rows, f"{clips} sound-world clips of 1 to {seconds} s with captions; size tiny, "
                "the bundled demo's VAE and CLAP (exit 1: it found something to fix, named in "
                "the verdict)")


# -------------------------------------------------------------------------------------------------
# cpu-bf16: the U-Net forward in float32 and under bf16 autocast on this CPU. bf16 halves the bytes
# moved and, on CPUs that multiply bf16 in hardware (AMX, AVX-512 BF16), the arithmetic time; on
# others it is emulated and many times slower, so training.pick_dtype keeps float32 there.
# -------------------------------------------------------------------------------------------------
CPU_BF16_FRAMES = 256                       # latent frames (5.9 s), batch 2: the CFG pair


def relative_error(a, b):
    """||a - b|| / ||b|| over all elements, in float64 on the CPU: b is the reference."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def cpu_bf16_rows(sizes, repeats):
    cpu, rows = torch.device("cpu"), []
    for size in tqdm(sizes, desc="cpu-bf16", leave=False):
        config, unet, _ = build_parts(size, cpu)
        unet.eval()
        x, t, context, mask = random_inputs(config, 2, CPU_BF16_FRAMES, cpu)
        forward = lambda: unet(x, t, context, mask)
        v, fp32_s = forward(), median_seconds(forward, cpu, repeats)
        with torch.autocast("cpu", torch.bfloat16):
            v_bf16, bf16_s = forward(), median_seconds(forward, cpu, repeats)
        unet.to(torch.bfloat16)              # the weights cast, as sample.py --dtype does
        half = lambda: unet(x.bfloat16(), t, context.bfloat16(), mask)
        cast_s = median_seconds(half, cpu, repeats)
        rows.append({"size": size, "latent frames": CPU_BF16_FRAMES, "float32 s": fp32_s,
                     "bf16 autocast s": bf16_s, "autocast speed-up": fp32_s / bf16_s,
                     "bf16 weights s": cast_s, "weights speed-up": fp32_s / cast_s,
                     "relative difference": relative_error(v_bf16, v)})
    return rows


def bench_cpu_bf16(setup):
    cpu = torch.device("cpu")
    sizes = ["tiny"] if setup["quick"] else SIZE_ORDER[:SIZE_ORDER.index(setup["size"]) + 1]
    units = training.cpu_has_bf16()
    choice = ("bfloat16 when asked (--dtype bfloat16)" if units else
              "float32 even when asked for bfloat16")
    yield table("cpu-bf16: U-Net forward, float32 and bf16 autocast", machine(cpu, torch.float32),
                cpu_bf16_rows(sizes, setup["repeats"]),
                f"CPU {cpu_model()}: bf16 matrix units (AMX, AVX-512 BF16) "
                f"{'present' if units else 'absent'}, so sample.py and generate run in {choice}; "
                "float32 stays the default on every CPU, so a seed gives the same audio anywhere",
                f"random weights, batch 2, median of {setup['repeats']} after a warm-up; relative "
                "difference: ||v_bf16 - v_fp32|| / ||v_fp32||")


# -------------------------------------------------------------------------------------------------
# --gpu-check: a self-test of a user's GPU in a few minutes, one row per check. Each check is a
# function yielding rows; one that raises becomes a FAIL row saying why, and the rest still run.
# The CPU tests run the same checks with a plan of tiny sizes, so the logic cannot rot.
# -------------------------------------------------------------------------------------------------
PARITY_TOLERANCE = 1e-4      # float32 on the GPU against the CPU, relative: rounding-order only
BF16_TOLERANCE = 0.05        # bf16 autocast against float32: 0.5-0.7 % at small, 2.4 % tiny VAE
PAPER_A100_S = 8.0           # the paper: 95 s of audio in 8 s on one A100
TRAIN_BATCH = {"vae": 8, "clap": 64, "diffusion": 8}     # train.py's defaults at full size
VAE_CROP, CLAP_SECONDS = 65536, 10                       # train.py's clips for vae and clap
SDPA_KERNELS = {"aten::_scaled_dot_product_flash_attention": "flash",
                "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
                "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
                "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
                "aten::_scaled_dot_product_attention_math": "math"}


@dataclasses.dataclass
class GPUPlan:
    """What --gpu-check runs. A size: a name in sa.SIZES or a ModelConfig (the tests' tiny ones)."""
    reduced: object = "small"          # correctness and attention kernels
    frames: int = 128                  # latent frames of the correctness inputs
    full: object = "full"              # the headline and the training steps
    steps: int = PAPER_STEPS           # the headline's sampler steps
    dtype: torch.dtype = torch.bfloat16
    batch: dict = dataclasses.field(default_factory=lambda: dict(TRAIN_BATCH))
    vae_crop: int = VAE_CROP
    clap_seconds: float = CLAP_SECONDS
    train_steps: int = 3               # timed, after one warm-up step
    ddp_size: str = "tiny"             # the torchrun run: train.py all, then a resumed step
    ddp_steps: int = 2
    ddp_flags: tuple = ()


def check_row(check, ok, figure, criterion):
    return {"check": check, "result": "pass" if ok else "FAIL", "figure": figure,
            "criterion": criterion}


def size_name(size):
    return size if isinstance(size, str) else size.size


def build_on(size, device):
    """A random-weight model of `size` built on the device (seeded: a rerun builds the same)."""
    torch.manual_seed(0)
    with torch.device(device):
        return sa.build_model(size).eval()


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls and convolutions on the GPU: cuDNN convolutions default to TF32, whose
    10-bit mantissa alone would miss PARITY_TOLERANCE."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


PARTS = ("U-Net", "VAE", "CLAP")


def part_outputs(model, inputs, part):
    """A part's outputs on fixed inputs: U-Net v, VAE posterior mean and decoded audio, CLAP text
    features and audio embedding."""
    z, t, context, mask, audio, tokens, token_mask = inputs
    if part == "U-Net":
        return [model.unet(z, t, context, mask)]
    if part == "VAE":
        return [model.vae.encode(audio)[0], model.vae.decode(z[:1])]
    return [model.clap.text_features(tokens, token_mask), model.clap.embed_audio(audio)]


@torch.inference_mode()
def check_correctness(device, plan):
    """The reduced size's parts on the device against the same weights on the CPU: float32 within
    PARITY_TOLERANCE, bf16 autocast within BF16_TOLERANCE and finite. A part that fails on the
    device is one row; the next part still runs."""
    model = build_on(plan.reduced, "cpu")
    prompts = ["ambient rain", "a slow piano melody in a large hall"]       # unequal padding
    context, mask = model.condition(prompts, [0, 10], [30, 95])
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, model.config.vae.latent_dim, plan.frames, generator=g)
    audio = 0.1 * torch.randn(2, 2, plan.frames * model.vae.hop, generator=g)
    inputs = (z, torch.tensor([0.3, 0.8]), context, mask, audio, *model.clap.tokenize(prompts))
    reference = {part: part_outputs(model, inputs, part) for part in PARTS}
    model.to(device)
    inputs = tuple(x.to(device) for x in inputs)
    name, low_name = size_name(plan.reduced), str(plan.dtype).removeprefix("torch.")
    for part in PARTS:
        failure = None               # a row after the handler, whose traceback holds tensors
        try:
            with no_tf32():
                fp32 = part_outputs(model, inputs, part)
            with torch.autocast(device.type, plan.dtype):
                low = part_outputs(model, inputs, part)
        except Exception as e:       # noqa: BLE001 (this part's row; the next part still runs)
            failure = (type(e).__name__, first_line(e))
        if failure is not None:
            yield check_row(f"{part} on {device.type} ({name})", False, *failure)
            continue
        error = max(relative_error(a, b) for a, b in zip(fp32, reference[part]))
        yield check_row(f"{part} float32 on {device.type} = CPU ({name})",
                        error <= PARITY_TOLERANCE, f"{error:.1e}",
                        f"relative error <= {PARITY_TOLERANCE:g}")
        error = max(relative_error(a, b) for a, b in zip(low, reference[part]))
        finite = all(torch.isfinite(a).all() for a in low)
        yield check_row(f"{part} {low_name} autocast on {device.type} ({name})",
                        finite and error <= BF16_TOLERANCE, f"{error:.1e}" if finite else "NaN/inf",
                        f"finite, relative error <= {BF16_TOLERANCE:g}")


def sdpa_kernel_used(module, args, device, dtype):
    """The kernel F.scaled_dot_product_attention ran for module(*args): the profiler names the
    aten op the dispatcher picked (flash, cuDNN, memory-efficient or math)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            module(*args)
    ran = [SDPA_KERNELS[e.name] for e in prof.events() if e.name in SDPA_KERNELS]
    return ran[0] if ran else "none seen"


@torch.inference_mode()
def check_attention_kernels(device, plan):
    """Which SDPA kernel the U-Net's self- and cross-attention run at the plan's dtype: each
    module's first call is captured, then replayed alone under the profiler. A fused kernel
    (anything but math) passes: math materialises the L x L attention matrix."""
    model = build_on(plan.reduced, device)
    block = next(m for m in model.unet.modules() if isinstance(m, sa.TransformerBlock))
    calls = {}
    hooks = [getattr(block, name).register_forward_pre_hook(
        lambda module, args, name=name: calls.setdefault(name, args)) for name in
        ("self_attn", "cross_attn")]
    context, mask = model.condition(["ambient rain"], [0], [30])
    z = torch.randn(1, model.config.vae.latent_dim, model.latent_frames, device=device)
    with torch.autocast(device.type, plan.dtype):
        model.unet(z, torch.tensor([0.5], device=device), context, mask)
    for hook in hooks:
        hook.remove()
    for name, label in (("self_attn", "self-attention"), ("cross_attn", "cross-attention")):
        kernel = sdpa_kernel_used(getattr(block, name), calls[name], device, plan.dtype)
        yield check_row(f"U-Net {label} kernel ({str(plan.dtype).removeprefix('torch.')}, "
                        f"{size_name(plan.reduced)})", kernel not in ("math", "none seen"),
                        kernel, "a fused SDPA kernel, not math")


@torch.inference_mode()
def check_headline(device, plan):
    """§6's headline: the whole window, CFG 6, the plan's steps and dtype (the U-Net's weights cast,
    as sample.py --dtype does), timed after a whole warm-up run."""
    model = build_on(plan.full, device)
    model.unet.to(plan.dtype)
    seconds = model.config.window / model.config.sample_rate
    run = lambda: sa.generate(model, [SPEED_PROMPT], seconds_total=seconds, steps=plan.steps,
                              cfg_scale=sa.CFG_SCALE, dtype=plan.dtype)
    run()
    sync(device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    audio = run()
    sync(device)
    wall = time.perf_counter() - t0
    yield check_row(f"generate {seconds:.1f} s, {plan.steps} steps, CFG {sa.CFG_SCALE:g} "
                    f"({size_name(plan.full)}, {str(plan.dtype).removeprefix('torch.')})",
                    bool(torch.isfinite(audio).all()),
                    f"{wall:.2f} s ({PAPER_A100_S / wall:.2f}x the paper's speed), "
                    f"{peak_memory_gib(device):.1f} GiB peak",
                    f"finite audio; the paper: {PAPER_A100_S:g} s on one A100")


def stage_loss(model, stage, batch, plan, generator):
    """One training batch's loss for a stage, on random data shaped like train.py's: the VAE's
    reconstruction and KL terms (train.py adds a discriminator), CLAP's contrastive loss, the
    U-Net's v-loss on latents spanning the window."""
    config, device = model.config, next(model.parameters()).device
    noise = lambda *shape: torch.randn(*shape, generator=generator).to(device)
    with torch.autocast(device.type, plan.dtype, enabled=plan.dtype != torch.float32):
        if stage == "vae":
            x = 0.1 * noise(batch, 2, plan.vae_crop)
            mean, std = model.vae.encode(x)
            x_hat = model.vae.decode(mean + std * noise(*mean.shape))[..., :plan.vae_crop]
            return (sa.stereo_loss(x_hat.float(), x, config.sample_rate)
                    + 1e-4 * sa.kl_divergence(mean.float(), std.float()))
        if stage == "clap":
            tokens, mask = model.clap.tokenize([f"sound number {i}" for i in range(batch)])
            audio = 0.1 * noise(batch, 2, round(plan.clap_seconds * config.sample_rate))
            return model.clap.loss(model.clap.embed_text(tokens, mask),
                                   model.clap.embed_audio(audio)).float()
        z, _, context, mask = random_inputs(config, batch, model.latent_frames, device)
        return sa.diffusion_loss(model.unet, z, context, mask, generator)


def check_training(device, plan):
    """A few Adam steps of each stage at the plan's full size and dtype: seconds per step and
    peak memory; the diffusion stage with and without gradient checkpointing."""
    model = build_on(plan.full, device).train()
    for stage, checkpointing in (("vae", False), ("clap", False), ("diffusion", False),
                                 ("diffusion", True)):
        part = {"vae": model.vae, "clap": model.clap, "diffusion": model.unet}[stage]
        model.unet.set_checkpointing(checkpointing)
        opt = torch.optim.Adam(part.parameters(), lr=1e-5)
        generator, losses = torch.Generator().manual_seed(0), []

        def step():
            loss = stage_loss(model, stage, plan.batch[stage], plan, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        name = (f"train {stage}{' --grad-checkpointing' if checkpointing else ''} "
                f"({size_name(plan.full)}, batch {plan.batch[stage]}, "
                f"{str(plan.dtype).removeprefix('torch.')})")
        reset_peak_memory(device)
        failure = None               # a row after the handler, whose traceback holds tensors
        try:
            seconds = median_seconds(step, device, plan.train_steps)
        except torch.OutOfMemoryError:
            failure = ("out of memory", "runs: lower the batch, or add --grad-checkpointing "
                       "(diffusion)")
        except Exception as e:       # noqa: BLE001 (this stage's row; the next stage still runs)
            failure = (type(e).__name__, first_line(e))
        opt.zero_grad(set_to_none=True)
        del opt                      # and its state: the next stage needs the memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if failure is not None:
            yield check_row(name, False, *failure)
        else:
            yield check_row(name, all(math.isfinite(x) for x in losses),
                            f"{seconds:.2f} s/step, {peak_memory_gib(device):.1f} GiB peak",
                            "runs, finite losses")


def first_line(error):
    return (str(error).strip().splitlines() or [""])[0][:200]


def last_line(done):
    return (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1][:200]


def check_data_parallel(device, plan):
    """train.py under torchrun, one rank per visible GPU (NCCL; gloo on a CPU): every stage for a
    few steps, then the diffusion stage resumed for one more from its checkpoint, which must then
    load and generate."""
    ranks = torch.cuda.device_count() if device.type == "cuda" else 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as out:
        common = ["--size", plan.ddp_size, "--data", "toy", "--out", out, "--device", device.type,
                  "--eval-every", "0", "--demo-every", "0", *plan.ddp_flags]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={ranks}", str(HERE / "train.py")]
        t0 = time.perf_counter()
        for stage, steps in (("all", plan.ddp_steps), ("diffusion", plan.ddp_steps + 1)):
            resume = ["--resume"] if stage == "diffusion" else []
            done = subprocess.run([*torchrun, stage, *resume, "--steps", str(steps), *common],
                                  capture_output=True, text=True, cwd=HERE, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"torchrun train.py {stage} exited {done.returncode}: "
                                   f"{last_line(done)}")
        wall = time.perf_counter() - t0
        model, state = sa.load_checkpoint(Path(out) / "diffusion.pt", device=device)
        audio = sa.generate(model, [SPEED_PROMPT], seconds_total=1, steps=2)
    ok = state["step"] == plan.ddp_steps + 1 and bool(torch.isfinite(audio).all())
    yield check_row(f"torchrun: {ranks} rank{'s' * (ranks > 1)} ({backend}), train.py all and "
                    f"a resumed diffusion step ({plan.ddp_size})", ok,
                    f"{wall:.0f} s, checkpoint at step {state['step']}",
                    "runs; the checkpoint reloads at its step and generates")


GPU_CHECKS = (check_correctness, check_attention_kernels, check_headline, check_training,
              check_data_parallel)


def run_checks(device, plan, checks=GPU_CHECKS):
    """Every check's rows; a check that raises adds a FAIL row with the error; the rest run."""
    rows = []
    for check in tqdm(checks, desc="gpu-check", leave=False):
        try:
            for row in check(device, plan):
                rows.append(row)
        except Exception as e:        # noqa: BLE001 (any failure is a row, not the end)
            rows.append(check_row(check.__name__.removeprefix("check_").replace("_", " "), False,
                                  type(e).__name__, first_line(e)))
        gc.collect()                  # the failed check's tensors, before the next needs memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def no_gpu_message():
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"--gpu-check needs a CUDA GPU and torch {torch.__version__} ({build}) sees none; "
            "run it where nvidia-smi lists a GPU, with a CUDA build of torch")


def gpu_check(args):
    """python bench.py --gpu-check: the table, the JSON, exit 0 if every check passed, else 1."""
    if not torch.cuda.is_available():
        raise training.UsageError(no_gpu_message())
    device = torch.device("cuda")
    rows = run_checks(device, GPUPlan())
    passed = sum(r["result"] == "pass" for r in rows)
    t = table("gpu-check", machine(device, torch.bfloat16), rows,
              f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
              f"{torch.cuda.device_count()} GPU(s) visible; {passed} of {len(rows)} checks passed")
    print(markdown(t), flush=True)
    Path(args.out).write_text(json.dumps({"created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                          "gpu-check": t}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["result"] == "pass" for r in rows) else 1


# -------------------------------------------------------------------------------------------------
# Command line.
# -------------------------------------------------------------------------------------------------
BENCHES = {"speed": bench_speed, "throughput": bench_throughput, "vae": bench_vae,
           "timing": bench_timing, "samplers": bench_samplers, "adherence": bench_adherence,
           "grading": bench_grading, "cpu-bf16": bench_cpu_bf16, "check": bench_check}


def parse_args(argv):
    p = training.Parser(description="Benchmark the Stable Audio reference; prints markdown tables "
                              "and writes the figures to a JSON file.")
    add = p.add_argument
    add("--gpu-check", action="store_true", help="instead of the sections: a self-test of this "
        "machine's CUDA GPU in about five minutes (correctness against the CPU, attention "
        "kernels, the paper's 95 s headline, training steps, torchrun), one table; exit 1 if "
        "a check fails, 2 without a GPU")
    add("--quick", action="store_true", help="a CPU run of a few minutes: 1 repeat, 1 seed, "
        "25 steps for timing and adherence, fewer durations and prompts, one size, a class of 4 "
        "graded with a 5 s limit")
    add("--size", choices=list(sa.SIZES), help="model size for speed and throughput (default: "
        "the --ckpt's size if given, else full on cuda and tiny elsewhere)")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
        help="auto picks cuda, then mps, then cpu (default auto)")
    add("--dtype", choices=["auto", *training.DTYPES], default="auto", help="the U-Net's precision "
        "(default auto: bfloat16 on cuda as in the paper, float32 elsewhere; bfloat16 also runs "
        "on CPUs with bf16 units, AMX or AVX-512 BF16)")
    add("--ckpt", help="checkpoint for timing, adherence and the cli run, and for speed when "
        "given (default checkpoints/demo.pt beside this script; those parts are skipped if "
        "it is missing)")
    add("--out", default="bench.json", help="JSON file for the figures (default bench.json)")
    add("--only", help=f"comma-separated sections to run, from {', '.join(SECTIONS)} "
        "(default all)")
    add("--steps", type=int, default=PAPER_STEPS,
        help=f"sampler steps for speed (default {PAPER_STEPS}, the paper)")
    add("--eval-steps", type=int, help="sampler steps for timing and adherence "
        f"(default {PAPER_STEPS}; --quick 25)")
    add("--cfg-scale", type=float, default=sa.CFG_SCALE, help="classifier-free guidance scale "
        f"for timing, adherence and the model part of samplers (default {sa.CFG_SCALE:g}, the "
        "paper)")
    add("--repeats", type=int, help="timed runs per speed and throughput figure, after a "
        "warm-up; the median is reported (default 3; --quick 1)")
    add("--seeds", type=int, help="seeds per duration for timing and per prompt for adherence, "
        "which uses at least 2 (default 3; --quick 1)")
    args = p.parse_args(argv)
    for flag, default, quick in (("eval_steps", PAPER_STEPS, 25), ("repeats", 3, 1),
                                 ("seeds", 3, 1)):
        if getattr(args, flag) is None:
            setattr(args, flag, quick if args.quick else default)
    return args


def check_args(args):
    """Reject bad flags before anything slow -> the sections to run, in SECTIONS order."""
    only = SECTIONS if args.only is None else [s.strip() for s in args.only.split(",")]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise training.UsageError(f"unknown section {unknown[0]!r} in --only; choose from "
                            f"{', '.join(SECTIONS)}")
    for flag in ("steps", "eval_steps", "repeats", "seeds"):
        if getattr(args, flag) < 1:
            raise training.UsageError(f"--{flag.replace('_', '-')} must be at least 1, "
                                f"got {getattr(args, flag)}")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        raise training.UsageError(f"checkpoint {args.ckpt} not found; train one with train.py or "
                                  "leave out --ckpt")
    folder = Path(args.out).resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass                                             # reported just below
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise training.UsageError(f"--out {args.out}: cannot write to folder {folder}; "
                            "choose another --out")
    return [s for s in SECTIONS if s in only]


def prepare(args, sections):
    """Device, dtype, models and settings the sections share."""
    given = args.ckpt is not None
    ckpt = Path(args.ckpt) if given else DEMO_CKPT
    ckpt_model = None
    try:
        device = training.pick_device(args.device)
        if ckpt.is_file() and (given or {"vae", "timing", "adherence"} & set(sections)):
            # A size asked for must match a checkpoint given; the default one is only a fallback.
            ckpt_model = sa.load_checkpoint(ckpt, size=args.size if given else None,
                                            device=device)[0]
    except (FileNotFoundError, ValueError) as e:
        raise training.UsageError(e) from None
    size = args.size or (ckpt_model.config.size if given else
                         "full" if device.type == "cuda" else "tiny")
    speed_model = None
    if "speed" in sections:
        if given:
            speed_model = ckpt_model
        else:
            with torch.device(device):
                speed_model = sa.build_model(size).eval()
    dtype = training.pick_dtype(args.dtype, device)
    for model in {id(m): m for m in (ckpt_model, speed_model) if m is not None}.values():
        model.unet.to(dtype)               # half-precision weights, as sample.py --dtype uses
    return {"device": device, "dtype": dtype, "size": size,
            "ckpt": ckpt, "ckpt_given": given, "ckpt_model": ckpt_model,
            "speed_model": speed_model, "quick": args.quick, "steps": args.steps,
            "eval_steps": args.eval_steps, "repeats": args.repeats, "seeds": args.seeds,
            "cfg_scale": args.cfg_scale}


def run(args):
    """Run the chosen sections, print each table when done, write the JSON after each section."""
    sections = check_args(args)
    if args.gpu_check:
        return gpu_check(args)
    setup = prepare(args, sections)
    report = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args), "sections": {}}
    for name in sections:
        report["sections"][name] = []
        for t in BENCHES[name](setup):
            print(markdown(t), flush=True)
            report["sections"][name].append(t)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def main(argv=None):
    """Run the benchmark; returns the exit code (2 for bad input, after one `error:` line)."""
    try:
        return run(parse_args(argv))
    except training.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
