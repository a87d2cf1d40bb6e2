"""Text to stereo audio with a Stable Audio checkpoint: `python sample.py "ambient rain"`.

Writes one file per sample (wav, flac or ogg, from the --out extension) at the checkpoint's sample
rate, and a spectrogram PNG beside it. Sample i starts from the noise of seed + i and its file name
carries that seed, so `--seed S` alone re-makes any one file of a batch.
"""
import json
import os
import re
import secrets
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

import released
import sound_world
import stable_audio as sa
import training

DEMO_CKPT = Path(__file__).resolve().parent / "checkpoints" / "demo.pt"
FORMATS = (".wav", ".flac", ".ogg")          # soundfile picks the container from the extension
SILENCE = 1e-4                               # a peak below -80 dBFS: nothing audible came out
CLIError = training.UsageError     # what main() reports as one `error:` line, with exit status 2
# generate's arguments by the flags that set them: its checks, in the words the user typed.
FLAGS = {"seconds_total": "--seconds", "seconds_start": "--start", "cfg_rescale": "--cfg-rescale",
         "decode_chunk": "--decode-chunk", "init_audio": "--init-audio",
         "init_strength": "--init-strength", "inpaint": "--inpaint"}


def parse_args(argv):
    p = training.Parser(description="Text to stereo audio with a Stable Audio checkpoint: one "
                              "batch, then one audio file and one spectrogram PNG per sample.")
    add = p.add_argument
    add("prompt", nargs="?", default="", help='what it should sound like, e.g. "ambient rain"')
    add("--seconds", type=float, help="seconds_total (§3.2): the whole piece's length, at most "
        f"{sa.TimingConfig.max_seconds}; the file holds min(seconds - start, the model's window) "
        "(default: --start + 30, or --start + the length of --init-audio)")
    add("--start", type=float, default=0.0, help="seconds_start (§3.2): where the clip begins "
        "within the piece of --seconds, 0 <= start < seconds (default 0)")
    add("--steps", type=int, default=100, help="sampler steps (default 100, the paper)")
    add("--cfg-scale", type=float, default=sa.CFG_SCALE,
        help=f"classifier-free guidance scale (default {sa.CFG_SCALE:g}, the paper); 1 turns "
        "guidance off")
    add("--cfg-rescale", type=float, default=sa.CFG_RESCALE, metavar="PHI", help="how far "
        "guidance's output is pulled back to the conditional one's spread, in [0, 1] (default "
        f"{sa.CFG_RESCALE:g}, as released); 0 turns the rescale off, so large scales over-saturate")
    add("--sampler", choices=sa.SAMPLERS, default="dpmpp-3m",
        help="DPM-Solver++ multistep of order 2 or 3 (default dpmpp-3m), or Euler, the "
        "first-order baseline")
    add("--seed", type=int, help="seed of sample 0; sample i uses seed + i "
        "(default: random, printed and put in the file name)")
    add("--n", type=int, default=1, help="number of samples, made as one batch (default 1)")
    add("--negative", help="negative prompt: guidance steers away from it, not the null context")
    add("--init-audio", metavar="FILE", help="start from this clip instead of pure noise (any "
        "rate and channel count; resampled and made stereo): a variation of it, or see --inpaint")
    add("--init-strength", type=float, metavar="S", help="how far from --init-audio to go, in "
        "(0, 1]: near 0 returns it, 1 ignores it (default 0.6; 1 with --inpaint)")
    add("--inpaint", type=float, nargs=2, metavar=("START", "END"), help="regenerate the "
        "--init-audio between START and END seconds and keep the rest")
    add("--unconditional", action="store_true",
        help='allow an empty prompt: the text is "" (the timing still conditions the sample)')
    add("--out", help="a .wav, .flac or .ogg file (_SEED is added when --n > 1) or a directory "
        "(default: out/PROMPT_SEED.wav)")
    add("--ckpt", default=str(DEMO_CKPT),
        help="checkpoint (default: the bundled demo model, checkpoints/demo.pt by this script)")
    add("--from-sat", nargs=2, metavar=("CONFIG", "WEIGHTS"), help="a stable-audio-tools model "
        "instead of --ckpt: its config JSON and .ckpt or .safetensors weights (Stable Audio "
        "1.0's to generate, whose text encoder stays untrained; any released autoencoder, e.g. "
        "Stable Audio Open's, with --reconstruct)")
    add("--reconstruct", metavar="FILE", help="no generation: encode FILE with the model's VAE "
        "and decode the posterior mean, writing the result and its spectrogram")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
        help="auto picks cuda, then mps, then cpu (default auto)")
    add("--dtype", choices=training.DTYPES, default="float32", help="the U-Net's precision "
        "(default float32); bfloat16 runs on cuda and on CPUs with bf16 units (AMX, AVX-512 BF16), "
        "float16 on cuda; elsewhere they fall back to float32, with a note")
    add("--no-ema", action="store_true", help="use the raw weights, not the EMA ones (if saved)")
    add("--decode-chunk", type=int, default=None, help="latent frames the VAE decodes at a time, "
        f"which bounds memory; more than {sa.DECODE_OVERLAP} (default 128 on a CPU, 512 on a GPU)")
    add("--no-trim", action="store_true", help="keep the whole window: the silent tail too")
    add("--force", action="store_true", help="overwrite existing files")
    return p.parse_args(argv)


def check_args(args):
    """Reject bad flags that need no model, before anything slow happens. generate's own checks
    of the request follow once the model is loaded (check_request)."""
    if args.reconstruct is not None:
        if args.prompt or args.init_audio:
            raise CLIError("--reconstruct FILE takes no prompt and no --init-audio")
        return
    empty = not args.prompt.strip()
    problems = [
        (args.unconditional and not empty, "--unconditional takes no prompt; drop one of them"),
        (empty and not args.unconditional,
         'empty prompt; describe the sound (e.g. "ambient rain") or pass --unconditional'),
        (args.seconds is not None and not args.seconds > 0,
         f"--seconds must be more than 0, got {args.seconds}"),
        (args.init_audio is None and (args.init_strength, args.inpaint) != (None, None),
         "--init-strength and --inpaint need --init-audio FILE"),
        (args.inpaint is not None and not 0 <= args.inpaint[0] < args.inpaint[1],
         "--inpaint START END needs 0 <= START < END (seconds)"),
        (args.steps < 1, f"--steps must be at least 1, got {args.steps}"),
        (args.n < 1, f"--n must be at least 1, got {args.n}"),
        (args.seed is not None and not 0 <= args.seed < 2 ** 63,
         f"--seed must be in [0, 2^63), got {args.seed}; leave it out for a random one"),
    ]
    for bad, message in problems:
        if bad:
            raise CLIError(message)
    if args.seconds is not None and not args.start < args.seconds:
        raise CLIError(f"--start {args.start:g} must be less than --seconds {args.seconds:g}, the "
                       f"whole piece's length (§3.2); for {args.seconds:g} s of audio from "
                       f"{args.start:g} s on, pass --seconds {args.start + args.seconds:g}")


def output_paths(out, prompt, seed, n):
    """Audio paths of samples 0..n-1: `out` is a file name (.wav, .flac, .ogg) or a directory."""
    path = Path(out or "out")
    if out is None or out.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        return [path / f"{sound_world.slug(prompt)}_{seed + i}.wav" for i in range(n)]
    if path.suffix.lower() not in FORMATS:
        raise CLIError(f"--out {out}: unsupported extension {path.suffix}; "
                       f"use {', '.join(FORMATS)} or a directory")
    return [path] if n == 1 else [path.with_name(f"{path.stem}_{seed + i}{path.suffix}")
                                  for i in range(n)]


def prepare_outputs(paths, force):
    """Check every target before generating, so no computed audio is lost to a bad path."""
    taken = [p for a in paths for p in (a, a.with_suffix(".png")) if p.exists()]
    if taken and not force:
        raise CLIError(f"{taken[0]} exists; pass --force to overwrite it or choose another --out")
    for folder in {p.parent for p in paths}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise CLIError(f"cannot write to {folder} ({e.strerror or e}); "
                           f"choose another --out") from None


def load_released(args, vae_only=False):
    """--from-sat CONFIG WEIGHTS -> (StableAudio or VAE, sample rate), notes as one line each."""
    config, weights = args.from_sat
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = released.from_sat(config, weights, vae_only=vae_only)
        with open(config) as f:
            sample_rate = json.load(f)["sample_rate"]
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise CLIError(f"--from-sat: {e}") from None
    for w in caught:
        print(f"note: {w.message}")
    return model, sample_rate


def load_ckpt(args, device="cpu"):
    """--ckpt's model and checkpoint dict; a missing or broken file is one error line."""
    if not os.path.isfile(args.ckpt):
        raise CLIError(f"--ckpt {args.ckpt} not found; pass a checkpoint train.py wrote "
                       f"(train.py export --to FILE) or leave out --ckpt for the bundled demo")
    try:
        return sa.load_checkpoint(args.ckpt, ema=not args.no_ema, device=device)
    except ValueError as e:
        raise CLIError(e) from None


def load_model(args, device):
    """Load the checkpoint, say what was loaded, and check the flags that depend on it."""
    try:
        if args.from_sat:
            model, _ = load_released(args)
            model, ckpt = model.to(device), {"weights": f"released weights {args.from_sat[1]}"}
            args.ckpt = args.from_sat[0]
        else:
            model, ckpt = load_ckpt(args, device)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(e) from None
    config = model.config
    window = config.window / config.sample_rate
    if ckpt.get("weights"):                      # train.py export: one set, described
        weights = ckpt["weights"]
    elif ckpt.get("ema") is None:
        weights = "raw weights (the checkpoint has no EMA)"
    else:
        weights = "raw weights (--no-ema)" if args.no_ema else "EMA weights"
    step = f", step {ckpt['step']}" if "step" in ckpt else ""
    print(f"loaded {args.ckpt}: size {config.size}, window {window:.1f} s at "
          f"{config.sample_rate} Hz, {weights}{step}")
    init = read_init_audio(args, config)
    if args.seconds > config.timing.max_seconds:
        raise CLIError(f"--seconds {args.seconds:g} (the whole piece) is past the timing "
                       f"embedding's range of {config.timing.max_seconds} s; pass a shorter "
                       f"--seconds, or a smaller --start when --seconds is left out")
    check_request(config, args, init)
    return model, init


def request(args, init):
    """The flags as generate's request arguments; `init` is --init-audio as read, or None."""
    return {"seconds_total": args.seconds, "seconds_start": args.start,
            "cfg_rescale": args.cfg_rescale, "decode_chunk": args.decode_chunk, "init_audio": init,
            "init_strength": 1.0 if args.init_strength is None else args.init_strength,
            "inpaint": args.inpaint}


def check_request(config, args, init):
    """generate's own checks of the request (sa.check_request) before sampling, in flags."""
    try:
        sa.check_request(config, **request(args, init))
    except ValueError as e:
        words = r"\b(" + "|".join(FLAGS) + r")\b"
        raise CLIError(re.sub(words, lambda m: FLAGS[m[1]], str(e))) from None


def read_init_audio(args, config):
    """--init-audio as stereo at the model's rate (None without it); fills in the defaults of
    --seconds (--start + 30 s, or + the clip's length) and --init-strength (0.6, or 1 for
    inpainting)."""
    if args.init_audio is None:
        args.seconds = args.start + 30.0 if args.seconds is None else args.seconds
        return None
    if not os.path.isfile(args.init_audio):
        raise CLIError(f"--init-audio {args.init_audio}: no such file")
    try:
        audio = sound_world.read_audio(args.init_audio, config.sample_rate)     # (2, N)
    except ValueError as e:
        raise CLIError(e) from None
    if not torch.isfinite(audio).all():
        raise CLIError(f"--init-audio {args.init_audio} has NaN or infinite samples")
    seconds, window = audio.shape[-1] / config.sample_rate, config.window / config.sample_rate
    if seconds > window:
        raise CLIError(f"--init-audio lasts {seconds:.1f} s, longer than the model's window of "
                       f"{window:.1f} s; cut it to at most that")
    if args.inpaint is not None and args.inpaint[1] > seconds:
        raise CLIError(f"--inpaint {args.inpaint[0]:g} {args.inpaint[1]:g} reaches past the end "
                       f"of --init-audio ({seconds:.2f} s); pick a gap inside the clip")
    args.seconds = args.start + seconds if args.seconds is None else args.seconds
    if args.init_strength is None:
        args.init_strength = 1.0 if args.inpaint is not None else 0.6
    what = (f"inpainting {args.inpaint[0]:g}-{args.inpaint[1]:g} s" if args.inpaint is not None
            else "a variation")
    print(f"init audio {args.init_audio}: {seconds:.2f} s, {what}, strength "
          f"{args.init_strength:g}")
    return audio[..., :round((args.seconds - args.start) * config.sample_rate)]   # §3.2's content


def sample_batch(model, args, seed, dtype, init=None):
    """All --n samples in one batch (one U-Net call per step), with a progress bar -> (n, 2, N)."""
    with tqdm(total=args.steps, desc="sampling", unit="step") as bar:
        def callback(i, n_steps):
            bar.total = n_steps                         # fewer than --steps from --init-audio
            bar.update(1)
            if i + 1 == n_steps:
                bar.set_description("decoding")         # the VAE decode runs after the last step
        try:
            audio = sa.generate(
                model, [args.prompt] * args.n, **request(args, init), steps=args.steps,
                cfg_scale=args.cfg_scale, negative_prompt=args.negative, seed=seed,
                sampler=args.sampler, trim=not args.no_trim, dtype=dtype, callback=callback)
        except FloatingPointError as e:
            raise CLIError(e) from None
        return audio.cpu().numpy()                      # waits for the device to finish


def write_results(paths, audio, sample_rate, seed, name=None):
    """Write each sample and its spectrogram (DC removed, peak-limited); flag near-silent ones."""
    for i, path in enumerate(paths):
        try:
            peak, scaled = sound_world.write_clip(path, audio[i], sample_rate)
        except (OSError, sf.LibsndfileError) as e:
            raise CLIError(f"could not write {path}: {e}") from None
        level = f"peak {20 * np.log10(peak):+.1f} dBFS" if peak > 0 else "peak 0"
        print(f"wrote {path} (+ .png), {name or f'seed {seed + i}'}, "
              f"{audio.shape[-1] / sample_rate:g} s, {level}"
              + (", scaled down to -1 dBFS" if scaled else ""))
        if peak < SILENCE:
            print(f"warning: {path} is near-silent: the model produced silence; try another "
                  f"--seed or prompt, more --steps, or a better-trained checkpoint",
                  file=sys.stderr)


def reconstruct(args, device):
    """--reconstruct FILE: audio -> VAE posterior mean -> audio, written with its spectrogram."""
    if args.from_sat:
        vae, sample_rate = load_released(args, vae_only=True)
    else:
        model, _ = load_ckpt(args)
        vae, sample_rate = model.vae, model.config.sample_rate
    source = Path(args.reconstruct)
    out = [Path(args.out)] if args.out and Path(args.out).suffix else \
        [Path(args.out or "out") / f"{source.stem}_reconstructed.wav"]
    if out[0].suffix.lower() not in FORMATS:
        raise CLIError(f"--out {args.out}: unsupported extension; use {', '.join(FORMATS)}")
    prepare_outputs(out, args.force)
    if not source.is_file():
        raise CLIError(f"--reconstruct {source}: no such file")
    try:
        audio = sound_world.read_audio(str(source), sample_rate)                  # (2, N)
    except ValueError as e:
        raise CLIError(e) from None
    vae = vae.to(device).eval()
    with torch.inference_mode():
        z = vae.encode(audio[None].to(device))[0]                           # (1, C, N / hop)
        chunk = args.decode_chunk or sa.default_decode_chunk(device)
        decoded = vae.decode(z, chunk=chunk)[0, :, :audio.shape[-1]].float().cpu().numpy()
    print(f"{source}: {audio.shape[-1] / sample_rate:.2f} s -> latent {tuple(z.shape[1:])} "
          f"-> audio")
    write_results(out, decoded[None], sample_rate, seed=0, name="reconstruction")
    return 0


def run(args):
    """The whole command: check everything, load, generate one batch, write, report times."""
    check_args(args)
    try:
        device = training.pick_device(args.device)
    except ValueError as e:
        raise CLIError(e) from None
    if args.reconstruct is not None:
        return reconstruct(args, device)
    dtype = training.pick_dtype(args.dtype, device)
    seed = secrets.randbelow(2 ** 31) if args.seed is None else args.seed
    paths = output_paths(args.out, args.prompt, seed, args.n)
    prepare_outputs(paths, args.force)
    t0 = time.perf_counter()
    model, init = load_model(args, device)
    if dtype != torch.float32:       # half-precision weights: half the memory, no per-step casts
        model.unet.to(dtype)
    if args.negative is not None and args.cfg_scale == 1:
        print("note: --negative has no effect at --cfg-scale 1 (guidance is off)")
    seeds = f"seed {seed}" if args.n == 1 else f"seeds {seed}..{seed + args.n - 1}"
    content = min(args.seconds - args.start, model.config.window / model.config.sample_rate)
    print(f"generating {args.n} x {content:g} s from {args.start:g} s into a {args.seconds:g} s "
          f"piece, {seeds}, {args.steps} {args.sampler} steps, "
          f"cfg scale {args.cfg_scale:g} (rescale {args.cfg_rescale:g}), on {device.type} in "
          f"{str(dtype).removeprefix('torch.')}")
    t1 = time.perf_counter()
    audio = sample_batch(model, args, seed, dtype, init)            # (n, 2, N)
    t2 = time.perf_counter()
    write_results(paths, audio, model.config.sample_rate, seed)
    seconds = audio.shape[0] * audio.shape[-1] / model.config.sample_rate
    # bench.py reads this line (TIME_LINE): keep the two figures' wording if it changes.
    print(f"time: loading {t1 - t0:.1f} s + sampling and decoding {t2 - t1:.1f} s = "
          f"{t2 - t0:.1f} s; {seconds:g} s of audio, real-time factor {seconds / (t2 - t1):.2f} "
          f"(seconds of audio per second)")
    return 0


def main(argv=None):
    """Run the command; returns the exit code (2 for bad input, after one `error:` line)."""
    try:
        return run(parse_args(argv))
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
