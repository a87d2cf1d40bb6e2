"""The data Stable Audio learns from here: audio files from disk, and a procedural sound world.

Audio files of any rate and channel count become 44.1 kHz stereo (§4.4) with a windowed-sinc
resampler. The procedural sound world ("--data toy") synthesises eleven sounds with captions in
the §4.5 metadata form, so the whole pipeline trains on a CPU without downloading anything.
"""
import math

import soundfile as sf
import torch
import torch.nn.functional as F


# -------------------------------------------------------------------------------------------------
# Audio at the model's rate (§4.4: 44.1 kHz stereo). For init audio and training data: any rate
# is resampled with a windowed sinc, and any channel count becomes stereo.
# -------------------------------------------------------------------------------------------------
RESAMPLE_ZEROS = 32        # sinc zero crossings on each side of the resampling filter
RESAMPLE_ROLLOFF = 0.94    # cutoff as a fraction of the lower Nyquist: room for the transition band
KAISER_BETA = 8.0          # stopband ~ -80 dB


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
    --init-audio and --reconstruct, train.py's folders, and generate(init_audio=...)."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)    # (N, C)
    except sf.SoundFileError as err:
        raise ValueError(f"cannot read audio file {path}: {err}") from err
    if len(data) == 0:
        raise ValueError(f"audio file {path} is empty (0 frames)")
    return resample(to_stereo(torch.from_numpy(data.T.copy())), sr, sample_rate)
