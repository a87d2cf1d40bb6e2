"""The data Stable Audio learns from here: audio files in and out, a procedural sound world, the
prompts made from metadata (§4.5), the datasets that cut clips into training windows, and the
held-out data a training run is watched on.

Audio files of any rate and channel count become 44.1 kHz stereo (§4.4) with a windowed-sinc
resampler. The procedural sound world ("--data toy") synthesises eleven sounds with captions in
the §4.5 metadata form, so the whole pipeline trains on a CPU without downloading anything. Last,
a Gaussian world whose exact solution is known, to measure the samplers against.
"""
import hashlib
import json
import math
import re
import struct
import sys
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

import stable_audio as sa


# -------------------------------------------------------------------------------------------------
# Audio at the model's rate (§4.4: 44.1 kHz stereo). For init audio and training data: any rate
# is resampled with a windowed sinc, and any channel count becomes stereo.
# -------------------------------------------------------------------------------------------------
RESAMPLE_ZEROS = 32        # sinc zero crossings on each side of the resampling filter
RESAMPLE_ROLLOFF = 0.94    # cutoff as a fraction of the lower Nyquist: room for the transition band
KAISER_BETA = 8.0          # stopband ~ -80 dB
FULL_SCALE = 0.999         # a sample this loud (of 1) was likely clipped; 16-bit's top: 0.99997


def resample(audio, sr_in, sr_out):
    """Band-limited resampling of (C, N) audio with a Kaiser-windowed sinc, evaluated polyphase."""
    if sr_in == sr_out:
        return audio
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g          # output j lies at input position j·down/up
    fc = RESAMPLE_ROLLOFF * min(sr_in, sr_out) / (2 * sr_in)   # cutoff, cycles per input sample
    half = RESAMPLE_ZEROS / (2 * fc)            # filter half-length in input samples
    pad = math.ceil(half)
    # Outputs m·up … m·up + up−1 all read from inputs m·down − pad … m·down + down + pad, so one
    # convolution with stride `down` and `up` output channels (one per phase) computes them all.
    taps = down + 2 * pad
    t = (torch.arange(up, dtype=torch.float64)[:, None] * down / up
         - (torch.arange(taps, dtype=torch.float64) - pad))       # (up, taps) distance in samples
    kaiser = torch.special.i0(KAISER_BETA * (1 - (t / half) ** 2).clamp(min=0).sqrt())
    kaiser = kaiser * (t.abs() <= half) / torch.special.i0(torch.tensor(KAISER_BETA))
    kernel = 2 * fc * torch.sinc(2 * fc * t) * kaiser
    C, N = audio.shape
    n_out = round(N * sr_out / sr_in)
    x = F.pad(audio[:, None], (pad, taps))                         # (C, 1, N + pad + taps)
    y = F.conv1d(x, kernel[:, None].to(audio.dtype), stride=down)   # (C, up, frames)
    return y.transpose(1, 2).reshape(C, -1)[:, :n_out]             # (C, N·up/down)


def to_stereo(audio):
    """(C, N) → (2, N): mono is duplicated, more than two channels are averaged into both sides."""
    if audio.shape[0] == 2:
        return audio
    # A plain average ignores surround layouts (5.1 centre, LFE); good enough for training data.
    return audio.mean(dim=0, keepdim=True).repeat(2, 1)


def read_audio(path, sample_rate):
    """Any file libsndfile reads -> float32 stereo (2, N) at `sample_rate`. For sample.py's
    --init-audio and --reconstruct, FolderData below, and generate(init_audio=...)."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)    # (N, C)
    except sf.SoundFileError as err:
        raise ValueError(f"cannot read audio file {path}: {err}") from err
    if len(data) == 0:
        raise ValueError(f"audio file {path} is empty (0 frames)")
    return resample(to_stereo(torch.from_numpy(data.T.copy())), sr, sample_rate)


def levels(path):
    """A file's levels as read, before any conversion: peak (dBFS), the share of its samples at
    full scale (clipped), and its largest DC offset as a share of that channel's RMS."""
    try:
        x, _ = sf.read(str(path), dtype="float64", always_2d=True)           # (N, C)
    except (sf.SoundFileError, RuntimeError) as err:
        raise ValueError(f"not readable audio ({err})") from err
    peak = float(np.abs(x).max(initial=0))
    rms = np.sqrt(np.mean(np.square(x), 0))
    return {"peak_db": 20 * math.log10(peak) if peak else -math.inf,
            "clipped": float(np.mean(np.abs(x) >= FULL_SCALE)),
            "dc": float(np.max(np.abs(x.mean(0)) / np.maximum(rms, 1e-12)))}


# -------------------------------------------------------------------------------------------------
# Audio files out (sample.py's results, train.py's demos): the clip without its DC offset, scaled
# below -1 dBFS if louder, and a spectrogram picture beside it. The PNG is written by hand here,
# so that no imaging package is needed.
# -------------------------------------------------------------------------------------------------
CEILING = 10 ** (-1 / 20)                    # -1 dBFS: headroom for lossy encoders and resamplers
# Spectrogram colours from quiet to loud; their brightness rises monotonically.
COLOURS = np.array([[0, 0, 0], [60, 0, 110], [200, 40, 60], [255, 170, 0], [255, 255, 200]])


def slug(prompt, length=40):
    """A short filesystem-safe name for a prompt: lowercase ASCII letters, digits and '-'."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:length].strip("-") or "untitled"


def limit_peak(audio, ceiling=CEILING):
    """Scale the whole clip so its peak is at most `ceiling` (never clips) -> (audio, scaled)."""
    peak = float(np.abs(audio).max())
    if peak <= ceiling:
        return audio, False
    return audio * (ceiling / peak), True


def write_audio(path, audio, sample_rate):
    """Write (2, N) float audio; the format (wav, flac, ogg) follows the file extension."""
    sf.write(str(path), audio.T, sample_rate)


def spectrogram(audio, width=1000, height=300, n_fft=2048, floor_db=100):
    """Log-magnitude STFT of the mono mix, 0 dBFS -> 1, (height, width), highest row first."""
    mono = np.pad(audio.mean(0), (0, max(0, n_fft - audio.shape[-1])))
    window = np.hanning(n_fft)
    starts = np.linspace(0, len(mono) - n_fft, width).astype(int)       # one frame per column
    frames = mono[starts[:, None] + np.arange(n_fft)] * window          # (width, n_fft)
    # Dividing by sum(window) / 2 puts a full-scale sine at 0 dB.
    db = 20 * np.log10(np.abs(np.fft.rfft(frames)) / (window.sum() / 2) + 1e-10)
    rows = np.linspace(0, n_fft // 2, height).round().astype(int)       # linear frequency axis
    return np.clip(db[:, rows].T[::-1] / floor_db + 1, 0, 1)           # high frequencies on top


def write_png(path, rgb):
    """Write an (H, W, 3) uint8 image as a PNG: signature, IHDR, one zlib IDAT, IEND."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, 3 * w)], 1)  # filter 0
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)       # 8-bit RGB, no interlace
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                          + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))


def write_spectrogram_png(path, audio):
    """Spectrogram picture of (2, N) audio: frequency up, time right, quiet dark, loud bright."""
    level = spectrogram(audio)
    stops = np.linspace(0, 1, len(COLOURS))
    rgb = np.stack([np.interp(level, stops, COLOURS[:, c]) for c in range(3)], -1)
    write_png(path, rgb.round().astype(np.uint8))


def write_clip(path, audio, sample_rate):
    """(2, N) float audio -> `path` and its spectrogram beside it (.png), without its DC offset and
    peak-limited -> (its peak before limiting, whether it was scaled down)."""
    # The VAE's A-weighted loss is blind to 0 Hz, so a small VAE decodes silence as a constant
    # offset: inaudible, but it wastes headroom and clicks where playback starts and stops.
    audio = audio - audio.mean(-1, keepdims=True)
    clip, scaled = limit_peak(audio)
    write_audio(path, clip, sample_rate)
    write_spectrogram_png(Path(path).with_suffix(".png"), clip)
    return float(np.abs(audio).max()), scaled


# -------------------------------------------------------------------------------------------------
# Notes or noise: the share of a clip's power in spectral peaks, for bench.py's descriptors and
# train.py check's look at an autoencoder (a note the VAE turns into noise, no U-Net can play).
# -------------------------------------------------------------------------------------------------
N_FFT, HOP = 2048, 1024                     # 46 ms frames at 44.1 kHz
AUDIBLE_DB = -40.0                          # frames this far under the loudest count as silence
PEAK_NEIGHBOURS, PEAK_DB = 8, 10.0          # a tonal peak: 10 dB over the median of +-8 bins


def stft_power(audio, n_fft=N_FFT, hop=HOP):
    """Power spectra of Hann-windowed frames, summed over channels. (frames, n_fft / 2 + 1)"""
    x = np.asarray(audio, dtype=np.float64).reshape(-1, np.shape(audio)[-1])      # (C, N)
    x = np.pad(x, ((0, 0), (0, max(0, n_fft - x.shape[1]))))
    frames = sliding_window_view(x, n_fft, axis=1)[:, ::hop] * np.hanning(n_fft)
    return np.square(np.abs(np.fft.rfft(frames))).sum(0)


def audible_frames(power):
    """Frames within AUDIBLE_DB of the loudest: silence has no spectral shape to measure."""
    energy = power.sum(1)
    return power[energy >= energy.max() * 10 ** (AUDIBLE_DB / 10)]


def tonality(audio):
    """Share of each frame's power in spectral peaks (bins PEAK_DB over the median of their
    +-PEAK_NEIGHBOURS bins), averaged over frames: ~1 for notes, ~0 for noise."""
    power = audible_frames(stft_power(audio))                            # (frames, bins)
    k = PEAK_NEIGHBOURS
    padded = np.pad(power, ((0, 0), (k, k)), mode="edge")
    local = np.median(sliding_window_view(padded, 2 * k + 1, axis=1), axis=-1)
    peaks = power > local * 10 ** (PEAK_DB / 10)
    return float(((power * peaks).sum(1) / power.sum(1)).mean())


# -------------------------------------------------------------------------------------------------
# The procedural sound world ("--data toy"): eleven sounds that differ by ear and by simple
# spectral features, alone or in pairs, with tempo, key, level, position and width written into
# the metadata. All numpy and vectorised: a 47 s stereo clip takes a fraction of a second.
# -------------------------------------------------------------------------------------------------
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)
PROGRESSIONS = ((0, 5, 3, 4), (0, 3, 4, 0), (0, 4, 5, 3))   # scale degrees, two bars per chord
LEVELS = {"soft": 0.25, "medium": 0.5, "loud": 0.9}         # peak level after normalising
PANS = {"left": -0.7, "center": 0.0, "right": 0.7}
WIDTHS = {"narrow": 0.0, "wide": 0.5}
TABLE = 4096                                                 # wavetable length (a power of two)


def unit_rms(x):
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def noise(rng, n, sr, lo, hi, tilt=0.0):
    """Unit-RMS Gaussian noise, 2nd-order skirts at lo and hi Hz, power ∝ f^tilt between."""
    # Drawn directly in the frequency domain: a single inverse FFT, in float32, keeps it fast.
    m = 1 << (n - 1).bit_length()                           # power-of-two FFTs are the fastest
    f = np.linspace(0, sr / 2, m // 2 + 1, dtype=np.float32)
    f[0] = f[1]
    gain = 1 / np.sqrt((1 + (lo / f) ** 4) * (1 + (f / min(hi, 0.45 * sr)) ** 4))
    if tilt:
        gain *= (f / lo) ** (tilt / 2)
    spec = rng.standard_normal((m // 2 + 1, 2), dtype=np.float32).view(np.complex64)[:, 0]
    return unit_rms(np.fft.irfft(spec * gain, m)[:n])


def wander(rng, n, sr, rate, lo, hi):
    """A random curve between lo and hi that changes about `rate` times a second."""
    knots = rng.uniform(lo, hi, int(n / sr * rate) + 2)
    return np.interp(np.arange(n) * ((len(knots) - 1) / n), np.arange(len(knots)), knots)


def add_at(out, start, x):
    """out[start:] += x, cut at the end of out."""
    x = x[: max(0, len(out) - start)]
    out[start:start + len(x)] += x


def ring(freqs, amps, decays, seconds, sr):
    """A struck tone: sine partials decaying exponentially, 2 ms attack, 50 ms fade at the end."""
    t = np.arange(int(seconds * sr))[:, None] / sr
    amps = np.where(freqs < 0.45 * sr, amps, 0.0)           # drop partials that would alias
    # float32 sine is several times faster; its phase error (< 0.01 rad) is inaudible here
    x = (np.sin((2 * np.pi * freqs * t).astype(np.float32)) * np.exp(-t / decays)) @ amps
    t = t[:, 0]
    return x * np.minimum(1, t / 0.002) * np.minimum(1, (seconds - t) / 0.05)


def oscillator(phase, harmonics):
    """Wavetable oscillator: phase (N,) in cycles; harmonics: amplitudes of partials 1, 2, …"""
    k = np.arange(1, len(harmonics) + 1)
    table = np.sin(2 * np.pi * np.arange(TABLE)[:, None] * k / TABLE) @ np.array(harmonics)
    return table[(phase * TABLE).astype(np.int64) & (TABLE - 1)]


def hz(music, degree, octave):
    """Frequency of scale degree `degree` (0 = tonic, 7 = tonic an octave up) in `octave`."""
    o, d = divmod(degree, 7)
    midi = 12 * (octave + 1 + o) + music["tonic"] + music["scale"][d]
    return 440.0 * 2 ** ((midi - 69) / 12)


def rain(rng, n, sr, music):
    """Bright steady hiss (mostly above 1 kHz) with droplet ticks in it."""
    drops = np.zeros(n)
    k = rng.poisson(rng.uniform(50, 200) * n / sr)
    drops[rng.integers(0, n, k)] = rng.uniform(0, 3, k)
    ticks = np.diff(drops, prepend=0.0)                     # a difference: a click with no bass
    return (noise(rng, n, sr, 800, 12000, -0.5) + ticks) * wander(rng, n, sr, 0.3, 0.8, 1.0)


def wind(rng, n, sr, music):
    """Dark noise (below ~600 Hz) in slow irregular gusts; a whistling band in the strong ones."""
    gust = wander(rng, n, sr, 0.4, 0.05, 1.0) ** 2
    f = rng.uniform(400, 900)
    whistle = noise(rng, n, sr, 0.8 * f, 1.2 * f)
    return gust * (noise(rng, n, sr, 40, 600, -1.0) + 0.4 * gust * whistle)


def waves(rng, n, sr, music):
    """A swell every 5–10 s: a roar that rises, breaks into bright hiss and washes out."""
    period = rng.uniform(5, 10)
    starts = np.cumsum(period * rng.uniform(0.8, 1.2, int(n / sr / period / 0.8) + 3))
    phi = np.interp(np.arange(n) / sr, starts - starts[0] - rng.uniform(0, period),
                    np.arange(len(starts))) % 1            # where each sample is within its wave
    swell = np.where(phi < 0.6, (phi / 0.6) ** 3, np.exp(-(phi - 0.6) / 0.12))
    roar = noise(rng, n, sr, 60, 2500, -1.0)
    hiss = unit_rms(np.diff(roar, prepend=0.0))             # the roar tilted up 6 dB per octave
    return (0.15 + swell) * roar + swell**2 * hiss


def thunder(rng, n, sr, music):
    """Low rumble (below ~250 Hz) in bursts: each strike swells in 0.1 s, rolls on for seconds."""
    env = np.full(n, 0.02)
    strikes = [rng.uniform(0, 0.3)] + list(rng.uniform(0, 1, rng.poisson(n / sr / 10)))
    for at in strikes:
        tau = rng.uniform(1.5, 4)
        t = np.arange(int(5 * tau * sr)) / sr
        add_at(env, int(at * n), rng.uniform(0.4, 1) * (1 - np.exp(-t / 0.1)) * np.exp(-t / tau))
    return noise(rng, n, sr, 25, 250, -1.0) * env * wander(rng, n, sr, 8, 0.3, 1.0)


def chirp(rng, sr):
    """One bird syllable: a 40–150 ms sweep between 2 and 7 kHz, perhaps trilled."""
    d = rng.uniform(0.04, 0.15)
    t = np.arange(int(d * sr)) / sr
    f = (rng.uniform(2500, 5000) + rng.uniform(-1500, 2500) * t / d
         + rng.uniform(0, 400) * np.sin(2 * np.pi * rng.uniform(20, 60) * t))
    phase = np.cumsum(np.minimum(f, 0.45 * sr)) / sr
    return np.sin(2 * np.pi * phase) * np.sin(np.pi * t / d) ** 2


def birdsong(rng, n, sr, music):
    """Phrases of a few repeated chirps, with pauses of 0.4–2.5 s between phrases."""
    syllables = [chirp(rng, sr) for _ in range(rng.integers(2, 4))]
    out, at = np.zeros(n), int(rng.uniform(0, 0.3) * sr)
    while at < n:
        syllable = syllables[rng.integers(len(syllables))]
        for _ in range(rng.integers(2, 7)):
            add_at(out, at, rng.uniform(0.6, 1.0) * syllable)
            at += len(syllable) + int(rng.uniform(0.02, 0.08) * sr)
        at += int(rng.uniform(0.4, 2.5) * sr)
    return out


def fire(rng, n, sr, music):
    """Crackles (bursts of sharp clicks, a few very loud) over a soft low roar."""
    clicks = np.zeros(n)
    k = rng.poisson(rng.uniform(8, 25) * n / sr)
    at = rng.integers(0, n, (k, 1)) + (rng.exponential(0.01, (k, 4)) * sr).astype(int)
    size = np.minimum(rng.pareto(2.5, (k, 4)), 8) * rng.choice([-1, 1], (k, 4))  # few loud pops
    np.add.at(clicks, np.minimum(at, n - 1), size)
    crackle = np.diff(clicks, 2, prepend=[0.0, 0.0])       # a second difference: highs only
    roar = noise(rng, n, sr, 30, 400, -1.0) * wander(rng, n, sr, 1.0, 0.5, 1.0)
    return crackle / np.abs(crackle).max() + 0.1 * roar


KICKS = ("x...x...x...x...", "x.....x...x.....", "x.......x.x.....")
SNARES = ("....x.......x...", "....x.......x..x")
HATS = ("x.x.x.x.x.x.x.x.", "xxxxxxxxxxxxxxxx", "..x...x...x...x.")


def drums(rng, n, sr, music):
    """A kit on a 16-step grid: kick (a 155 → 45 Hz sine), snare (noise + 185 Hz), hi-hat (hiss)."""
    t = np.arange(int(0.4 * sr)) / sr
    kick = np.sin(2 * np.pi * np.cumsum(45 + 110 * np.exp(-t / 0.03)) / sr) * np.exp(-t / 0.15)
    snare = 0.3 * noise(rng, len(t), sr, 1000, 8000) + np.sin(2 * np.pi * 185 * t)
    snare *= np.exp(-t / 0.06)
    hat = 0.2 * noise(rng, len(t), sr, 7000, 16000) * np.exp(-t / 0.015)
    step = 15 / music["bpm"] * sr                           # a sixteenth note, in samples
    out = np.zeros(n)
    for hit, patterns, level in ((kick, KICKS, 1.0), (snare, SNARES, 0.8), (hat, HATS, 0.4)):
        pattern = patterns[rng.integers(len(patterns))]
        for i in range(int(n / step) + 1):
            if pattern[i % 16] == "x":
                add_at(out, int(i * step), level * rng.uniform(0.8, 1.0) * hit)
    return out


def piano(rng, n, sr, music):
    """A melody on the scale in octave 4: struck, slightly sharp partials, upper ones die first."""
    k = np.arange(1, 9)
    stretch = k * np.sqrt(1 + 3e-4 * k**2)                  # a stiff string's partials run sharp
    notes, out, at, degree = {}, np.zeros(n), 0.0, 7
    while at < n:
        if at == 0 or rng.random() > 0.15:                  # the odd rest shapes phrases
            degree = int(np.clip(degree + rng.integers(-2, 3), 0, 11))
            if degree not in notes:
                notes[degree] = ring(hz(music, degree, 4) * stretch, k**-1.5, 0.9 / k**0.5, 1.2, sr)
            add_at(out, int(at), rng.uniform(0.6, 1.0) * notes[degree])
        at += rng.choice([1, 1, 2, 2, 4]) * 30 / music["bpm"] * sr     # in eighth notes
    return out


BELL_RATIOS = np.array([0.5, 1.0, 1.19, 1.51, 2.0, 2.51, 2.66, 3.01, 4.16])  # hum, prime, tierce…
BELL_AMPS = np.array([0.6, 1.0, 0.7, 0.4, 0.6, 0.3, 0.25, 0.25, 0.15])


def bells(rng, n, sr, music):
    """Bells in octave 5 struck every 2–4 beats: inharmonic partials that ring for seconds."""
    tones = [ring(hz(music, d, 5) * BELL_RATIOS, BELL_AMPS, 2.0 / BELL_RATIOS**0.5, 2.5, sr)
             for d in (0, 2, 4, 7)]
    out, at = np.zeros(n), 0.0
    while at < n:
        add_at(out, int(at), rng.uniform(0.6, 1.0) * tones[rng.integers(len(tones))])
        at += rng.integers(2, 5) * 60 / music["bpm"] * sr
    return out


def bass(rng, n, sr, music):
    """A plucked bass in octave 2 on the chord roots: root, fifth or octave on each eighth note."""
    eighth = 30 / music["bpm"] * sr
    i = (np.arange(n) / eighth).astype(int)                 # which eighth each sample is in
    m = i[-1] + 1
    roots = np.array([hz(music, music["progression"][j // 16 % 4], 2) for j in range(m)])
    freq = (roots * 2 ** (rng.choice([0, 0, 0, 7, 12], m) / 12))[i]      # root, fifth, octave
    play = (rng.random(m) < 0.7) | (np.arange(m) == 0)
    t = (np.arange(n) - i * eighth) / sr                    # time since the note started
    env = play[i] * np.exp(-t / 0.25) * np.minimum(1, t / 0.004)
    env *= np.minimum(1, (eighth / sr - t) / 0.01)          # 4 ms attack, 10 ms release
    return env * oscillator(np.cumsum(freq) / sr, [1, 0.5, 0.3, 0.15, 0.08])


def pad(rng, n, sr, music):
    """Sustained triads in octave 3, two bars each, from pairs of detuned soft oscillators."""
    chord = (np.arange(n) / (480 / music["bpm"] * sr)).astype(int) % 4    # two bars = 8 beats
    out = np.zeros(n)
    for voice in range(3):                                  # root, third, fifth
        freq = np.array([hz(music, d + 2 * voice, 3) for d in music["progression"]])[chord]
        phase = np.cumsum(freq) / sr
        out += oscillator(0.997 * phase, [1, 0.35, 0.15]) + oscillator(1.003 * phase, [1, 0.35])
    return out * wander(rng, n, sr, 0.25, 0.6, 1.0) * np.minimum(1, np.arange(n) / sr / 1.5)


SOUNDS = {"rain": rain, "wind": wind, "ocean waves": waves, "thunder": thunder,
          "birdsong": birdsong, "crackling fire": fire, "drums": drums, "piano": piano,
          "bass": bass, "synth pad": pad, "bells": bells}
DESCRIPTIONS = {
    "rain": ("steady rain", "rain on a roof"), "wind": ("gusty wind", "wind howling"),
    "ocean waves": ("waves breaking on a beach", "ocean surf"),
    "thunder": ("rolling thunder", "a distant thunderstorm"),
    "birdsong": ("a bird singing", "birds chirping"),
    "crackling fire": ("a crackling campfire", "wood burning in a fireplace"),
    "drums": ("a drum beat", "a drum kit groove"), "piano": ("a piano melody", "solo piano"),
    "bass": ("a bass line", "a plucked bass groove"),
    "synth pad": ("warm synth pad chords", "an ambient pad"), "bells": ("ringing bells", "chimes")}
MUSIC = ("drums", "piano", "bass", "synth pad", "bells")    # get bpm, genre, mood, instruments
MIX_P = 0.3                                                  # share of clips that mix two sounds


def spatialise(x, pan, width, sr):
    """Mono (N,) → (2, N): mid ± width·(copy delayed 10 ms) decorrelates; constant-power pan."""
    d = int(0.01 * sr)
    side = width * np.concatenate([np.zeros(d), x[:-d]])
    theta = (pan + 1) * np.pi / 4
    return np.stack([np.cos(theta) * (x + side), np.sin(theta) * (x - side)])


def music_meta(names, music):
    """bpm, key, genre, mood, instruments: the fields a music library would have (§4.5)."""
    played = [s for s in names if s in MUSIC]
    if not played:
        return {}
    bpm, minor = music["bpm"], music["scale"] == MINOR
    meta = {"bpm": bpm, "instruments": ", ".join(played),
            "genre": "ambient" if set(played) <= {"synth pad", "bells"}
            else "lo-fi" if bpm < 95 else "pop" if bpm < 125 else "dance",
            "mood": ("melancholic" if bpm < 110 else "tense") if minor
            else ("peaceful" if bpm < 110 else "uplifting")}
    if played != ["drums"]:
        meta["key"] = f"{NOTE_NAMES[music['tonic']]} {'minor' if minor else 'major'}"
    return meta


def make_clip(seed, sample_rate, max_seconds, sound=None):
    """One sound-world clip, 1 to max_seconds long: (float32 (2, N), metadata dict)."""
    if max_seconds < 1:
        raise ValueError(f"max_seconds must be at least 1, got {max_seconds}")
    rng = np.random.default_rng(seed)
    # Uniform lengths: every seconds_total is seen about as often (§6.3: timing is least accurate
    # for the lengths that were rare in training).
    n = round(rng.uniform(1, max_seconds) * sample_rate)
    if sound is None:
        count = 2 if rng.random() < MIX_P else 1
        names = [str(s) for s in rng.choice(list(SOUNDS), count, replace=False)]
    else:
        names = sound.split(" and ")
        if not set(names) <= set(SOUNDS):
            raise ValueError(f"unknown sound {sound!r}: use one of {list(SOUNDS)} or 'A and B'")
    music = {"bpm": int(rng.integers(70, 151)), "tonic": int(rng.integers(12)),
             "scale": MINOR if rng.random() < 0.5 else MAJOR,
             "progression": PROGRESSIONS[rng.integers(len(PROGRESSIONS))]}
    mono = sum(g * unit_rms(SOUNDS[s](rng, n, sample_rate, music))
               for g, s in zip((1.0, rng.uniform(0.4, 0.8)), names))
    fade = np.minimum(1, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * sample_rate))
    intensity, position, width = (str(rng.choice(list(d))) for d in (LEVELS, PANS, WIDTHS))
    audio = spatialise(mono * fade, PANS[position], WIDTHS[width], sample_rate)
    audio *= LEVELS[intensity] / np.abs(audio).max()        # peak at the level: never clips
    meta = {"sound": " and ".join(names), "seconds": n / sample_rate,
            "description": " with ".join(str(rng.choice(DESCRIPTIONS[s])) for s in names),
            "intensity": intensity, "position": position, "width": width,
            **music_meta(names, music)}
    return torch.from_numpy(audio.astype(np.float32)), meta


# -------------------------------------------------------------------------------------------------
# §4.5 prompts from metadata: a random subset of the fields, shuffled, as "Field: value | ..."
# or "value, ...", always naming the sound, and short enough for the text encoder (126 bytes).
# -------------------------------------------------------------------------------------------------
PROMPT_MAIN = ("sound", "description")   # the first of these present is in every prompt
NOT_IN_PROMPT = {"seconds"}              # timing reaches the model through the timing tokens
MAX_PROMPT_BYTES = 126     # the tokenizer keeps 128 bytes including BOS and EOS


def prompt_fields(meta):
    """The metadata fields that can go into a prompt, values as text (lists joined by commas)."""
    def text(v):
        if isinstance(v, (list, tuple)):
            return ", ".join(map(str, v))
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip()
    fields = {k: text(v) for k, v in meta.items() if k not in NOT_IN_PROMPT and v is not None}
    return {k: v for k, v in fields.items() if v}


def build_prompt(meta, rng):
    """§4.5: a random subset of the fields, shuffled, as 'Field: value | …' or 'value, …'."""
    fields = prompt_fields(meta)
    main = next((k for k in PROMPT_MAIN if k in fields), None)
    keep = [k for k in fields if k != main and rng.random() < 0.5]
    if main is not None:
        keep.append(main)                                    # the prompt always names the sound
    elif not keep:
        keep = [list(fields)[rng.integers(len(fields))]]
    keep = [keep[i] for i in rng.permutation(len(keep))]
    structured = rng.random() < 0.5
    while True:
        if structured:
            prompt = " | ".join(f"{'BPM' if k == 'bpm' else k.capitalize()}: {fields[k]}"
                                for k in keep)
        else:
            prompt = ", ".join(f"{fields[k]} bpm" if k == "bpm" else fields[k] for k in keep)
        optional = [k for k in keep if k != main]
        if len(prompt.encode()) <= MAX_PROMPT_BYTES or not optional:
            return prompt
        keep.remove(optional[-1])        # too long for the text encoder: drop a field


def adherence_prompt(sound):
    """The prompt bench.py and the exercises ask for `sound` with, in a form build_prompt makes:
    its first description, then its name."""
    return f"{DESCRIPTIONS[sound][0]}, {sound}"


# -------------------------------------------------------------------------------------------------
# Datasets (§4.4): a folder of audio files with captions, or the sound world. Every clip becomes
# stereo at the model's rate, a window cropped at random or padded with silence, plus
# seconds_start (where the window starts, whole seconds) and seconds_total (the whole file's
# length, rounded up) for the timing tokens, and a prompt: a caption, or one built from metadata.
# -------------------------------------------------------------------------------------------------
# Every format libsndfile reads, except headerless RAW, which cannot be read without being told how.
AUDIO_EXTENSIONS = {"." + f.lower() for f in sf.available_formats() if f != "RAW"}
AUDIO_EXTENSIONS |= {".aif", ".oga", ".opus"}
TOY_OVERHANG = 1.25        # toy clips last up to 1.25 windows: most are padded, some get cropped


def inspect_file(path):
    """One dataset entry for an audio file, or ValueError saying why it cannot be used."""
    try:
        info = sf.info(str(path))
    except sf.SoundFileError as err:
        raise ValueError(f"not readable audio ({err})") from err
    if info.frames == 0:
        raise ValueError("no audio frames")
    item = {"path": str(path), "seconds": info.frames / info.samplerate,
            "sample_rate": info.samplerate, "channels": info.channels}
    txt, meta = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.is_file():
        caption = txt.read_text(encoding="utf-8").strip()
        if not caption:
            raise ValueError(f"{txt.name} is empty")
        return {**item, "caption": caption}
    if meta.is_file():
        try:
            fields = json.loads(meta.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta.name} is not valid JSON ({err})") from err
        if not isinstance(fields, dict) or not prompt_fields(fields):
            raise ValueError(f"{meta.name} must be an object of fields (description, genre, …)")
        return {**item, "meta": fields}
    raise ValueError(f"no caption: add {txt.name} (the prompt) or {meta.name} (metadata fields)")


def audio_files(path):
    """The audio files under folder `path`, by their extensions, in path order."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; give a folder of audio files with captions")
    return [p for p in sorted(root.rglob("*")) if p.suffix.lower() in AUDIO_EXTENSIONS
            and p.is_file()]


def scan_folder(path):
    """Usable audio files under `path` with their captions: (items, [(path, reason), …] skipped)."""
    root, files = Path(path), audio_files(path)
    items, skipped = [], []
    for p in files:
        try:
            items.append(inspect_file(p))
        except ValueError as err:
            skipped.append((str(p), str(err)))
            print(f"warning: skipping {p}: {err}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} of {len(files)} files", file=sys.stderr)
    if not items:
        raise ValueError(
            f"no usable audio in {root}: found {len(files)} audio files, {len(skipped)} skipped. "
            "A usable file is audio that libsndfile reads (wav, flac, ogg, aiff, mp3, …) with a "
            "caption of the same name beside it: song.wav + song.txt (the prompt) or song.json "
            '(metadata such as {"description": "…", "genre": "…", "bpm": 120}).')
    return items, skipped


def crop_or_pad(audio, window, rng, sample_rate):
    """§3.2, §4.4: a random window (C, window) of (C, N) and its seconds_start, seconds_total."""
    # Also right for latents (C, L): pass the latent frame rate, sample_rate / hop, as sample_rate.
    n = audio.shape[-1]
    offset = int(rng.integers(0, n - window + 1)) if n > window else 0
    x = audio[:, offset:offset + window]
    x = F.pad(x, (0, window - x.shape[-1]))                 # shorter clips: silence at the end
    return x, math.floor(offset / sample_rate), math.ceil(n / sample_rate)


class AudioData:
    """Batches of windows from `clip(rng, window, index) -> (audio (2, N), prompt)` of a subclass.
    Item `index` depends only on (seed, index): a run resumed at step k sees the same batches.
    Batches count items from `first`: a held-out set starts where no training run reaches."""
    trained_on = False         # held-out data that training reads too: a folder with few files

    def __init__(self, window, sample_rate, seed=0, first=0):
        self.window, self.sample_rate, self.seed, self.first = window, sample_rate, seed, first

    def item(self, index, window):
        """Item `index`: audio (2, window), prompt, seconds_start, seconds_total."""
        rng = np.random.default_rng([self.seed, index])
        clip, prompt = self.clip(rng, window, index)
        x, start, total = crop_or_pad(clip, window, rng, self.sample_rate)
        x = -x if rng.random() < 0.5 else x                 # released code: random polarity flip
        return x, prompt, start, total

    def batch(self, batch_size, step, window=None):
        """Items step·B … step·B + B−1 (after `first`): audio (B, 2, window), prompts,
        seconds_start/total (B,)."""
        indices = range(self.first + step * batch_size, self.first + (step + 1) * batch_size)
        audio, prompts, start, total = zip(*(self.item(i, window or self.window) for i in indices))
        return {"audio": torch.stack(audio), "prompts": list(prompts),
                "seconds_start": torch.tensor(start), "seconds_total": torch.tensor(total)}


class ToyData(AudioData):
    """The procedural sound world: an endless stream of fresh clips."""

    def clip(self, rng, window, index):
        # Clips up to 1.25 windows: most are padded (so the model learns to end on time), some are
        # cropped (so seconds_start varies); none is made longer than needed just to be cut away.
        max_seconds = max(1.0, TOY_OVERHANG * window / self.sample_rate)
        audio, meta = make_clip(int(rng.integers(2**63)), self.sample_rate, max_seconds)
        return audio, build_prompt(meta, rng)


class FolderData(AudioData):
    """Audio files with same-name .txt captions or .json metadata, read on demand: the usable files
    of folder `path`, or the `items` of its scan_folder given. `in_turn`: item j reads file j mod F
    instead of one at random, so that every file of a held-out set counts."""

    def __init__(self, path, window, sample_rate, seed=0, items=None, in_turn=False):
        super().__init__(window, sample_rate, seed)
        self.items = scan_folder(path)[0] if items is None else items
        self.in_turn = in_turn

    def summary(self):
        """The files in one line: how many, how long, at which rates and channel counts."""
        rates = sorted({item["sample_rate"] for item in self.items})
        channels = sorted({item["channels"] for item in self.items})
        hours = sum(item["seconds"] for item in self.items) / 3600
        return (f"{len(self.items)} files, {hours:.3g} h, sample rates {rates} Hz, channels "
                f"{channels}; read as stereo at {self.sample_rate} Hz")

    def clip(self, rng, window, index):
        # Training draws with replacement: item `index` needs no shuffled epoch order to be
        # reproduced.
        n = len(self.items)
        item = self.items[index % n if self.in_turn else rng.integers(n)]
        audio = read_audio(item["path"], self.sample_rate)
        return audio, item["caption"] if "caption" in item else build_prompt(item["meta"], rng)


# -------------------------------------------------------------------------------------------------
# Held-out data, to watch a training run on: what it evaluates and makes demos from, and never
# trains on. From a folder: the files of another (--val), or a share of its own picked by a hash
# of each file's path, so that adding files moves no other file in or out. From the sound world:
# items from an index no run reaches, at seed 0 whatever the run's, so that runs compare.
# -------------------------------------------------------------------------------------------------
HELD_OUT_SHARE = 0.05      # of a folder's files, and at least one
MIN_TO_SPARE = 3           # a folder of fewer files keeps them all for training
HELD_OUT_FIRST = 2 ** 48   # a run draws items from 0 on, steps x batch of them


def path_share(path, root):
    """Where a file falls in [0, 1): a hash of its path inside the folder, the same anywhere."""
    name = Path(path).relative_to(root).as_posix()
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2 ** 64


def split_data(data, val, window, sample_rate, seed=0):
    """--data (`toy` or a folder) and --val (a folder or None) -> (data to train on, held-out
    data, what is held out in words). A folder too small to spare a file is evaluated on its
    training files (held-out data with `trained_on` set), and the words say so."""
    held = None
    if val is not None:
        try:
            held = FolderData(val, window, sample_rate, in_turn=True)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"--val {val}: {err}") from None
        note = f"the {len(held.items)} files of {val}"
    if data == "toy":
        if held is None:
            held = ToyData(window, sample_rate, 0, first=HELD_OUT_FIRST)
            note = "sound-world items from 2^48 on, at seed 0 (never trained on)"
        return ToyData(window, sample_rate, seed), held, note
    items, _ = scan_folder(data)
    if held is None and len(items) < MIN_TO_SPARE:
        held = FolderData(data, window, sample_rate, items=items, in_turn=True)
        held.trained_on = True
        note = (f"none of {len(items)} files (too few to spare one): evaluating on TRAINING "
                f"data; give more files or --val DIR")
    elif held is None:
        share = {item["path"]: path_share(item["path"], data) for item in items}
        out = {p for p, x in share.items() if x < HELD_OUT_SHARE} or {min(share, key=share.get)}
        held = FolderData(data, window, sample_rate, items=[i for i in items if i["path"] in out],
                          in_turn=True)
        items = [item for item in items if item["path"] not in out]
        note = f"{len(out)} of {len(share)} files (a share picked by path; --val DIR to choose)"
    train = FolderData(data, window, sample_rate, seed, items)
    print(f"data: {train.summary()}")
    return train, held, note


def make_toy_folder(path, sample_rate, n=10, max_seconds=10.0, seed=0):
    """Write n sound-world clips as clip_000.wav + clip_000.txt (a caption) into `path`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        audio, meta = make_clip(int(rng.integers(2**63)), sample_rate, max_seconds)
        name = folder / f"clip_{i:03d}"
        sf.write(str(name.with_suffix(".wav")), audio.T.numpy(), sample_rate, subtype="PCM_16")
        name.with_suffix(".txt").write_text(build_prompt(meta, rng) + "\n", encoding="utf-8")
    return folder


# -------------------------------------------------------------------------------------------------
# A Gaussian world whose exact solution is known: for data N(0, s^2) the denoiser and the
# probability-flow ODE have closed forms, so a sampler's error and its order can be measured
# (bench.py samplers, exercise 3).
# -------------------------------------------------------------------------------------------------
# Data std 0.1 puts the part of the flow where the denoiser changes x (sigma ~ s) well inside
# generate's sigma range; sigma_max / s = 800 damps the first low-order steps, so the asymptotic
# orders show from about 20 steps on.
DATA_STD = 0.1
SIGMA_MIN, SIGMA_MAX = 0.03, 80.0                        # generate's sigma range
GAUSS_SAMPLES = 16
SAMPLERS_BY_ORDER = ("euler", "dpmpp-2m", "dpmpp-3m")    # sa.SAMPLERS by order: 1, 2, 3


def gaussian_sampler_errors(sampler, steps_list, s=DATA_STD, sigma_min=SIGMA_MIN,
                            sigma_max=SIGMA_MAX):
    """Relative errors (at sigma_min, at 0) of a sampler on generate's schedule, data N(0, s^2).

    With x = x0 + sigma eps the ideal denoiser is D(x, sigma) = x s^2 / (s^2 + sigma^2) and the
    probability-flow ODE solves exactly: x(sigma) = x(sigma_max) sqrt(s^2 + sigma^2) /
    sqrt(s^2 + sigma_max^2). get_sigmas ends at 0, where each sampler returns D(x, sigma_min): the
    x the denoiser sees at sigma_min is the ODE solution after steps - 1 steps."""
    x = torch.randn(GAUSS_SAMPLES, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64) * math.hypot(s, sigma_max)            # x(sigma_max)
    errors = []
    for steps in steps_list:
        sigmas = sa.get_sigmas(steps, sigma_min, sigma_max)
        seen = {}

        def denoiser(x_sigma, sigma):
            seen[sigma] = x_sigma
            return x_sigma * s ** 2 / (s ** 2 + sigma ** 2)
        out = sampler(denoiser, x, sigmas)
        hi, lo = sigmas[0].item(), sigmas[-2].item()
        exact = [x * math.sqrt((s ** 2 + sigma ** 2) / (s ** 2 + hi ** 2)) for sigma in (lo, 0)]
        errors.append(tuple(((a - b).norm() / b.norm()).item()
                            for a, b in zip((seen[lo], out), exact)))
    return errors


def measured_orders(errors, steps_list):
    """Slopes of -log(error) against log(steps - 1) between consecutive step counts: the order
    p in error ~ h^p, h = log(sigma_max / sigma_min) / (steps - 1) ODE steps."""
    return [math.log(e0 / e1) / math.log((n1 - 1) / (n0 - 1))
            for e0, e1, n0, n1 in zip(errors, errors[1:], steps_list, steps_list[1:])]
