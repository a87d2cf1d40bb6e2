"""Draft tests for sample.py (to merge into test_stable_audio.py): the command end to end on a tiny
checkpoint, its refusals of bad input, and its pure helpers."""
import dataclasses
import struct
import zlib

import numpy as np
import pytest
import soundfile as sf
import torch

import sample
import stable_audio

# A 4-second window keeps generation fast; 32 kHz shows the rate comes from the checkpoint.
CFG = dataclasses.replace(stable_audio.SIZES["tiny"], window=2 ** 17, sample_rate=32000)


def silence_decoder(model):
    """Zero the VAE's last conv, so the tanh output (and every sample) is exactly 0."""
    conv = model.vae.decoder[-2]
    with torch.no_grad():
        conv.parametrizations.weight.original0.zero_()
        conv.bias.zero_()
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    stable_audio.save_checkpoint(path, stable_audio.build_model(CFG))
    return path


def generate(ckpt, out, *args, prompt="ambient rain"):
    return sample.main([prompt, "--ckpt", str(ckpt), "--steps", "2", "--seconds", "1.5",
                        "--out", str(out), *args])


def read_png(path):
    """Check the signature and every chunk's CRC -> (width, height, colour type, raw IDAT)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = {}, 8
    while i < len(data):
        (length,), tag = struct.unpack(">I", data[i:i + 4]), data[i + 4:i + 8]
        body = data[i + 8:i + 8 + length]
        (crc,) = struct.unpack(">I", data[i + 8 + length:i + 12 + length])
        assert zlib.crc32(tag + body) == crc, tag
        chunks[tag] = chunks.get(tag, b"") + body
        i += 12 + length
    assert list(chunks)[0] == b"IHDR" and list(chunks)[-1] == b"IEND"
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8
    return width, height, colour, zlib.decompress(chunks[b"IDAT"])


# ---------------------------------------------------------------------------------- end to end
def test_writes_stereo_file_of_the_requested_seconds_at_the_checkpoint_rate(ckpt, tmp_path,
                                                                             capsys):
    assert generate(ckpt, tmp_path, "--seed", "7") == 0
    path = tmp_path / "ambient-rain_7.wav"
    audio, sr = sf.read(path)
    assert sr == CFG.sample_rate
    assert audio.shape == (round(1.5 * sr), 2)
    assert np.abs(audio).max() <= 10 ** (-1 / 20) + 1e-4       # peak-limited, not clipped
    out = capsys.readouterr().out
    assert "seed 7" in out and str(path) in out and "real-time factor" in out


def test_default_out_is_out_slug_seed_wav(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sample.main(["Rain!", "--ckpt", str(ckpt), "--steps", "2", "--seconds", "1",
                        "--seed", "3"]) == 0
    assert (tmp_path / "out" / "rain_3.wav").is_file()
    assert (tmp_path / "out" / "rain_3.png").is_file()


@pytest.mark.parametrize("ext", ["flac", "ogg"])
def test_format_follows_the_extension(ckpt, tmp_path, ext):
    assert generate(ckpt, tmp_path / f"a.{ext}", "--seed", "1") == 0
    assert sf.info(tmp_path / f"a.{ext}").format == ext.upper()


def test_no_trim_keeps_the_whole_window(ckpt, tmp_path):
    assert generate(ckpt, tmp_path / "a.wav", "--no-trim") == 0
    assert sf.info(tmp_path / "a.wav").frames == CFG.window


def test_batch_files_carry_seed_plus_i_and_each_regenerates_alone(ckpt, tmp_path):
    assert generate(ckpt, tmp_path / "b.wav", "--n", "2", "--seed", "11") == 0
    first, second = sf.read(tmp_path / "b_11.wav")[0], sf.read(tmp_path / "b_12.wav")[0]
    assert np.abs(first - second).max() > 1e-3                 # different seeds, different audio
    assert generate(ckpt, tmp_path / "c.wav", "--seed", "12") == 0
    np.testing.assert_allclose(sf.read(tmp_path / "c.wav")[0], second, atol=1e-4)


def test_never_overwrites_without_force(ckpt, tmp_path, capsys):
    path = tmp_path / "a.wav"
    assert generate(ckpt, path, "--seed", "1") == 0
    before = path.read_bytes()
    capsys.readouterr()
    assert generate(ckpt, path, "--seed", "2") != 0
    out, err = capsys.readouterr()
    assert err.startswith("error:") and "--force" in err and "loaded" not in out  # no work done
    assert path.read_bytes() == before
    assert generate(ckpt, path, "--seed", "2", "--force") == 0
    assert path.read_bytes() != before


def test_uses_ema_weights_when_saved_and_warns_on_silence(tmp_path, capsys):
    torch.manual_seed(0)
    model = stable_audio.build_model(CFG)
    silent = silence_decoder(stable_audio.build_model(CFG)).state_dict()
    stable_audio.save_checkpoint(tmp_path / "m.pt", model, ema=silent)
    assert generate(tmp_path / "m.pt", tmp_path / "ema.wav") == 0
    out, err = capsys.readouterr()
    assert "EMA weights" in out and "warning:" in err and "silence" in err
    assert np.abs(sf.read(tmp_path / "ema.wav")[0]).max() == 0
    assert generate(tmp_path / "m.pt", tmp_path / "raw.wav", "--no-ema") == 0
    out, err = capsys.readouterr()
    assert "raw weights" in out and "warning:" not in err
    assert np.abs(sf.read(tmp_path / "raw.wav")[0]).max() > 1e-3


def test_half_precision_off_cuda_falls_back_to_float32(ckpt, tmp_path, capsys):
    assert generate(ckpt, tmp_path / "a.wav", "--device", "cpu", "--dtype", "bfloat16") == 0
    assert "float32" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- bad input
def assert_one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for word in words:
        assert word in lines[0]


BAD = {
    "zero seconds": (["x", "--seconds", "0"], "--seconds"),
    "negative seconds": (["x", "--seconds", "-2"], "--seconds"),
    "seconds not a number": (["x", "--seconds", "abc"], "--seconds"),
    "seconds past the window": (["x", "--seconds", "60"], "window of 4.1 s"),
    "negative start": (["x", "--start", "-1"], "--start"),
    "zero steps": (["x", "--steps", "0"], "--steps"),
    "zero samples": (["x", "--n", "0"], "--n"),
    "negative seed": (["x", "--seed", "-1"], "--seed"),
    "empty prompt": ([""], "--unconditional"),
    "blank prompt": (["  "], "--unconditional"),
    "prompt and --unconditional": (["x", "--unconditional"], "--unconditional"),
    "mp3": (["x", "--out", "OUT/a.mp3"], ".mp3"),
    "decode chunk below the overlap": (["x", "--decode-chunk", "16"], "--decode-chunk"),
    "unwritable folder": (["x", "--out", "OUT/file/a.wav"], "cannot write"),
    "missing checkpoint": (["x", "--ckpt", "OUT/none.pt"], "not found"),
    "damaged checkpoint": (["x", "--ckpt", "OUT/file"], "damaged"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_exit_2(ckpt, tmp_path, capsys, case):
    (tmp_path / "file").write_bytes(b"not a checkpoint")
    args, word = BAD[case]
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    assert sample.main(["--ckpt", str(ckpt), "--steps", "2", "--seconds", "1",
                        "--out", str(tmp_path / "o.wav"), *args]) == 2
    assert_one_error_line(capsys, word)
    assert not (tmp_path / "o.wav").exists()


def test_checkpoint_that_does_not_match_its_config_is_one_error_line(ckpt, tmp_path, capsys):
    state = torch.load(ckpt, weights_only=True)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, tmp_path / "bad.pt")
    assert generate(tmp_path / "bad.pt", tmp_path / "a.wav") == 2
    assert_one_error_line(capsys, "does not match")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_error_line(ckpt, tmp_path, capsys):
    assert generate(ckpt, tmp_path / "a.wav", "--device", "cuda") == 2
    assert_one_error_line(capsys, "no CUDA GPU", "--device cpu")


def test_non_finite_output_is_one_error_line(tmp_path, capsys):
    model = stable_audio.build_model(CFG)
    with torch.no_grad():
        model.unet.to_out.block2[-1].bias.fill_(float("nan"))
    stable_audio.save_checkpoint(tmp_path / "nan.pt", model)
    assert generate(tmp_path / "nan.pt", tmp_path / "a.wav") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and "float32" in errors[0]
    assert not (tmp_path / "a.wav").exists()


# ---------------------------------------------------------------------------------- helpers
def test_spectrogram_png_is_valid_with_frequency_up(tmp_path):
    sr = 32000
    t = np.arange(sr) / sr
    tone = np.sin(2 * np.pi * 4000 * t)                      # a quarter of the way to Nyquist
    sample.write_spectrogram_png(tmp_path / "s.png", np.stack([tone, tone]))
    width, height, colour, raw = read_png(tmp_path / "s.png")
    assert colour == 2 and 500 <= width <= 2000 and 150 <= height <= 600
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()                           # filter type byte of every row
    brightness = rows[:, 1:].reshape(height, width, 3).astype(int).sum((1, 2))
    assert abs(brightness.argmax() - 0.75 * (height - 1)) <= 2


def test_command_writes_a_valid_png_beside_the_audio(ckpt, tmp_path):
    assert generate(ckpt, tmp_path / "a.flac") == 0
    width, height, colour, raw = read_png(tmp_path / "a.png")
    assert len(raw) == height * (1 + 3 * width)


def test_peak_limiter_scales_loud_clips_to_minus_1_dbfs_and_leaves_quiet_ones():
    loud = np.array([[0.5, -2.0, 1.0], [0.1, 0.2, 0.3]])
    out, scaled = sample.limit_peak(loud)
    assert scaled and np.abs(out).max() == 10 ** (-1 / 20)
    np.testing.assert_allclose(out / loud, 10 ** (-1 / 20) / 2)     # one gain: shape unchanged
    quiet = np.array([[0.5, -0.3], [0.1, 0.0]])
    out, scaled = sample.limit_peak(quiet)
    assert not scaled and np.array_equal(out, quiet)


@pytest.mark.parametrize("prompt", ["Ambient rain!!", "", "../../etc/passwd", "Café ночь 🌧",
                                    "ночь", "x" * 200, "  --  "])
def test_slug_is_a_safe_nonempty_file_name(prompt):
    name = sample.slug(prompt)
    assert name and len(name) <= 40 and "/" not in name and ".." not in name
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert not name.startswith("-")


def test_slug_keeps_the_words():
    assert sample.slug("Ambient rain!!") == "ambient-rain"
    assert sample.slug("Café") == "cafe"
    assert sample.slug("") == "untitled"


def test_output_paths_file_directory_and_batch(tmp_path):
    assert sample.output_paths(None, "Rain", 5, 1) == [sample.Path("out/rain_5.wav")]
    assert sample.output_paths(str(tmp_path), "Rain", 5, 1) == [tmp_path / "rain_5.wav"]
    assert sample.output_paths("d/x.flac", "Rain", 5, 2) == [sample.Path("d/x_5.flac"),
                                                             sample.Path("d/x_6.flac")]
    assert sample.output_paths("d/x.wav", "Rain", 5, 1) == [sample.Path("d/x.wav")]
