"""Mutation testing of test_stable_audio.py: does the suite catch the bugs a person could write?

Each mutant below is one plausible bug in stable_audio.py (or, by its section in FILES, in
released.py, sound_world.py, sample.py, train.py, training.py or assignments.py), written as a
change of one line (one two-line call, where the bug is a swap across its lines). For each,
this script copies the repository to a temporary folder, makes the change there (the original
text must occur exactly once) and runs pytest in the copy with `-x -q -p no:cacheprovider`: first
the few tests named by the mutant's -k expression (or by -k EXPR), then, if they all pass, the
whole suite. A mutant is killed by the first failing test; it survives only if the whole suite
passes. Not run by CI: a survivor costs a full suite run (7 min or more on 2 cores).
docs/mutation-testing.md has the method and results.

    python docs/mutants.py                      # every mutant; a table and the survival rate
    python docs/mutants.py --only 10 11         # some of them, by number
    python docs/mutants.py --tests old_tests.py # the same mutants against another test file
    python docs/mutants.py --quick              # each mutant's -k subset only: a first look
    python docs/mutants.py --only 70 -k "safetensors or released" --quick   # another subset
    python docs/mutants.py --list               # check that every mutant applies; run nothing
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL, TESTS = "stable_audio.py", "test_stable_audio.py"
FILES = {"from_sat": "released.py", "released config": "released.py",  # a section's file,
         "released": "released.py", "prompts": "sound_world.py",    # where it is not MODEL
         "sound world": "sound_world.py", "sample.py": "sample.py", "train.py": "train.py",
         "training": "training.py", "grader": "assignments.py"}
SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", "runs", "out"}

MUTANTS = [  # (section, bug, original text, replacement, -k expression for the first run)
    ("Snake", "sin instead of sin^2",
     "torch.sin(alpha * x).pow(2)", "torch.sin(alpha * x)", "snake_matches"),
    ("Snake", "SnakeBeta's alpha and beta swapped",
     "snake(x, self.alpha.exp(), self.beta.exp())", "snake(x, self.beta.exp(), self.alpha.exp())",
     "released_autoencoders"),
    ("VAE", "KL without its 1/2",
     "return 0.5 * (mean.pow(2) + std.pow(2)", "return (mean.pow(2) + std.pow(2)", "kl"),
    ("VAE", "posterior std from exp, not softplus",
     "return mean, F.softplus(scale) + 1e-4", "return mean, scale.exp() + 1e-4",
     "released_autoencoders or audible_init"),
    ("VAE", "audio padded by N % hop instead of -N % hop",
     "F.pad(audio, (0, -audio.shape[-1] % self.hop))",
     "F.pad(audio, (0, audio.shape[-1] % self.hop))", "vae_zero_pads"),
    ("VAE", "chunked decode keeps each chunk's edges (no overlap discarded)",
     "edge, step = overlap // 2, chunk - overlap", "edge, step = 0, chunk - overlap",
     "chunked_decode or short_chunks"),
    ("VAE", "[e] chunked decode without overlap by default",
     "def decode(self, z, chunk=None, overlap=DECODE_OVERLAP):",
     "def decode(self, z, chunk=None, overlap=0):", "chunked_decode or short_chunks"),
    ("CLAP", "tokenizer keeps one byte fewer than fits",
     'p.encode("utf-8")[:length - 2]', 'p.encode("utf-8")[:length - 3]', "tokeniz"),
    ("CLAP", "[b] contrastive loss in one direction only",
     "return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2",
     "return F.cross_entropy(logits, labels)", "clap_loss"),
    ("CLAP", "[c] text embedding pools the padding too",
     "self.text_proj((h * m).sum(1) / m.sum(1))", "self.text_proj(h.mean(1))", "text_embedding"),
    ("CLAP", "features from the last layer, not the next-to-last",
     "len(self.text_layers) + 1 + self.config.feature_layer",
     "len(self.text_layers) + 2 + self.config.feature_layer", "text_features"),
    ("CLAP", "attention ignores the padding mask",
     "F.scaled_dot_product_attention(q, k, v, attn_mask=mask)",
     "F.scaled_dot_product_attention(q, k, v)",
     "mask_hides_padding or padded_context"),
    ("CLAP", "log-mel of the left channel instead of the mono mix",
     "mono = audio.float().mean(1)", "mono = audio.float()[:, 0]", "log_mel"),
    ("timing", "[a] condition hands start and total to the timing embedding swapped",
     "self.timing(torch.as_tensor(seconds_start, device=text.device),\n"
     "                             torch.as_tensor(seconds_total, device=text.device))",
     "self.timing(torch.as_tensor(seconds_total, device=text.device),\n"
     "                             torch.as_tensor(seconds_start, device=text.device))",
     "start_token"),
    ("timing", "seconds clamped one short of the table",
     "s.long().clamp(0, self.max_seconds)", "s.long().clamp(0, self.max_seconds - 1)",
     "timing_tokens"),
    ("timing", "seconds rounded to the nearest instead of dropping the fraction",
     "lambda s: s.long()", "lambda s: s.round().long()", "timing_tokens"),
    ("timing", "content frames rounded down",
     "self.vae.hop).ceil().long()", "self.vae.hop).floor().long()", "content_frames"),
    ("U-Net", "padding mask one frame too long",
     "torch.arange(L, device=device) < content_frames",
     "torch.arange(L, device=device) <= content_frames",
     "padding_mask or extent or length_frames"),
    ("U-Net", "noise-level features cos before sin",
     "torch.cat([t, angles.sin(), angles.cos()], dim=-1)",
     "torch.cat([t, angles.cos(), angles.sin()], dim=-1)", "released_unet"),
    ("U-Net", "FiLM scale without its + 1",
     "self.norm2(h) * (scale + 1) + shift", "self.norm2(h) * scale + shift", "released_unet"),
    ("U-Net", "skips not scaled by 1/sqrt 2",
     "skips.pop() * 2 ** -0.5", "skips.pop()", "released_unet"),
    ("U-Net", "downsampling padding sides swapped",
     "(factor + 2) // 2, (factor + 1) // 2)", "(factor + 1) // 2, (factor + 2) // 2)",
     "released_unet"),
    ("U-Net", "cross-attention replaces the stream instead of adding to it",
     "x = x + self.cross_attn(x, context, mask)", "x = self.cross_attn(x, context, mask)",
     "released_unet"),
    ("U-Net", "initial parameters not halved",
     "p.mul_(0.5)", "p.mul_(1.0)", "initial_parameters"),
    ("diffusion", "alpha and sigma swapped in the schedule",
     "return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)",
     "return torch.sin(t * math.pi / 2), torch.cos(t * math.pi / 2)", "noise_level"),
    ("diffusion", "v target as alpha z - sigma eps",
     "v = alpha * eps - sigma * z", "v = alpha * z - sigma * eps", "diffusion_loss"),
    ("diffusion", "conditioning dropout keeps 90 % null instead of 10 %",
     "< cond_dropout).to(z.device)", "> cond_dropout).to(z.device)", "conditioning_dropout"),
    ("diffusion", "[d] dropped samples keep the text's padding mask on the null context",
     "mask = mask | drop[:, None]", "mask = mask", "whole_null_context"),
    ("samplers", "schedule runs from sigma_min up to sigma_max",
     "torch.linspace(math.log(sigma_max), math.log(sigma_min), steps)",
     "torch.linspace(math.log(sigma_min), math.log(sigma_max), steps)", "schedule"),
    ("samplers", "v-denoiser adds sigma v",
     "return alpha_t * z - sigma_t * v_fn(z, t)", "return alpha_t * z + sigma_t * v_fn(z, t)",
     "denoiser"),
    ("samplers", "noise level t not scaled by 2/pi",
     "2 / math.pi * math.atan(sigma)", "math.atan(sigma)", "denoiser"),
    ("samplers", "DDIM step with the wrong sign on the denoised term",
     "math.exp(-h) * x - math.expm1(-h) * denoised", "math.exp(-h) * x + math.expm1(-h) * denoised",
     "euler_is_first or sampler_ending"),
    ("samplers", "2M ratio r inverted",
     "r = (lam - lam_1) / h", "r = h / (lam - lam_1)", "dpmpp_2m"),
    ("samplers", "second divided difference over the newer step",
     "f = (d1_0 - (D_1 - D_2) / h_2) / (h_1 + h_2)", "f = (d1_0 - (D_1 - D_2) / h_1) / (h_1 + h_2)",
     "3m"),
    ("samplers", "3M weights p'' by I2 / 2 (k-diffusion) instead of the taper",
     "I2 / (1 + h) * d2", "I2 / 2 * d2", "3m"),
    ("samplers", "multistep history keeps one value only",
     "history = history[-1:] + [(lam, denoised)]", "history = [(lam, denoised)]", "3m"),
    ("guidance", "guidance around v_c instead of v_u",
     "v = v_u + scale * (v_c - v_u)", "v = v_c + scale * (v_c - v_u)", "cfg"),
    ("guidance", "CFG rescale ratio inverted",
     "v * (v_c.std(dim=1, keepdim=True) / v.std(dim=1, keepdim=True))",
     "v * (v.std(dim=1, keepdim=True) / v_c.std(dim=1, keepdim=True))", "rescale"),
    ("guidance", "past the requested end the guided v, inside it v_c",
     "z.device)[:, None], v, v_c)", "z.device)[:, None], v_c, v)", "cfg"),
    ("guidance", "negative prompt conditioned with start and total swapped",
     "model.condition([negative_prompt] * len(start), start, total)",
     "model.condition([negative_prompt] * len(start), total, start)", "guidance_nothing"),
    ("generate", "every sample from the noise of seed, not seed + i",
     "generator=torch.Generator().manual_seed(seed + i)",
     "generator=torch.Generator().manual_seed(seed)", "same_seed"),
    ("generate", "start rounded up instead of down",
     "[math.floor(seconds_start)] * B", "[math.ceil(seconds_start)] * B",
     "whole_seconds"),
    ("generate", "padding-mask extent from total and start swapped",
     "model.content_frames(start, total)", "model.content_frames(total, start)", "extent"),
    ("generate", "sigma_min and sigma_max swapped on the way to the schedule",
     "init_sigmas(steps, init_strength, sigma_min, sigma_max)",
     "init_sigmas(steps, init_strength, sigma_max, sigma_min)",
     "latent_scale_is_applied or init_strength"),
    ("generate", "content length ignores seconds_start",
     "content = min(seconds_total - seconds_start,", "content = min(seconds_total,",
     "total_minus_start"),
    ("generate", "latent scale applied again before decoding instead of undone",
     "z.float() / model.config.latent_scale", "z.float() * model.config.latent_scale",
     "latent_scale_is_applied"),
    ("generate", "init strength picks the schedule from the wrong end",
     "[round((1 - strength) * steps):]", "[round(strength * steps):]",
     "init_sigmas or init_strength"),
    ("generate", "inpainting keeps the gap and regenerates the rest",
     "keep * z0 + (1 - keep) * denoiser(x, sigma)", "(1 - keep) * z0 + keep * denoiser(x, sigma)",
     "inpainting_keeps or inpaint_mask"),
    ("checkpoints", "model weights override the EMA weights",
     '{**ckpt["model"], **(ckpt.get("ema") or {} if ema else {})}',
     '{**(ckpt.get("ema") or {} if ema else {}), **ckpt["model"]}', "prefers_ema"),
    ("checkpoints", "format-1 upgrade keeps the released padding",
     '"symmetric_downsample": True}}', '"symmetric_downsample": False}}', "format_1"),
    ("from_sat", "[f] released latent scale inverted",
     'latent_scale=1 / m["pretransform"].get("scale", 1.0)',
     'latent_scale=m["pretransform"].get("scale", 1.0)', "pretransform_scale"),
    ("from_sat", "decoder width read from the encoder's",
     'decoder_width=c["channels"] * mults[-1]', 'decoder_width=e["channels"] * mults[-1]',
     "released_autoencoders or oobleck_decoder"),
    # 2026-12-07: bugs written by reading the code, not the tests, that once survived the suite.
    ("VAE", "KL averaged over channels instead of summed",
     ".sum(1).mean()", ".mean()", "kl"),
    ("VAE", "spectral convergence normalised by the reconstruction, not the target",
     "torch.linalg.norm(Y - X) / torch.linalg.norm(X)",
     "torch.linalg.norm(Y - X) / torch.linalg.norm(Y)", "stft or spectral"),
    ("released config", "an Oobleck decoder without final_tanh read as False",
     'c.get("final_tanh", True)', 'c.get("final_tanh", False)', "oobleck"),
    ("released config", "a .ckpt holding a plain state dict refused",
     'weights.get("state_dict", weights) if isinstance(weights, dict)',
     'weights.get("state_dict") if isinstance(weights, dict)', "state_dict or lightning"),
    ("prompts", "prompt limit in characters, not UTF-8 bytes",
     "if len(prompt.encode()) <= MAX_PROMPT_BYTES", "if len(prompt) <= MAX_PROMPT_BYTES",
     "prompt"),
    ("sample.py", "--init-audio cut to --seconds, ignoring --start",
     "audio[..., :round((args.seconds - args.start) * config.sample_rate)]",
     "audio[..., :round(args.seconds * config.sample_rate)]", "init_audio"),
    ("training", "EMA follows the raw weights (lerp weight decay, not 1 - decay)",
     "self.shadow[k].lerp_(v, 1 - decay)", "self.shadow[k].lerp_(v, decay)", "ema"),
    # The grader: a grader that passes a wrong answer is the worst bug a course can meet.
    ("grader", "tolerance a thousand times too loose",
     "RTOL = 1e-5", "RTOL = 1e-2", "catalogued or typical_mistake"),
    ("grader", "a property check earns points from a piece that returns its input",
     "nontrivial(got, x, what=\"Attention.forward\")", "got", "zeros_or"),
    ("grader", "a refused piece keeps the points of the checks it passed",
     "result.status, result.passed, result.message = \"refused\", 0, refused",
     "result.status, result.message = \"refused\", refused", "refused_in"),
    ("grader", "SAMPLERS keeps the reference sampler while a student's is graded",
     "                    table[key] = g\n", "", "swaps_pieces"),
    ("grader", "what a student prints reaches the grade table",
     "    os.dup2(printed, 1)\n", "", "whatever_one"),
    ("grader", "a hard-coded seed: every seed draws the same inputs",
     "check(torch.Generator().manual_seed(seed * 1000 + i))",
     "check(torch.Generator().manual_seed(i))", "hard_coded"),
    # 2026-12-07: the modules around the model, each bug written by reading the module's code,
    # before looking at its tests.
    ("released", "DAC: the decoder's rates checked against the strides unreversed",
     'if tuple(c["rates"]) != strides[::-1]:', 'if tuple(c["rates"]) != strides:',
     "released_autoencoders"),
    ("released", "Oobleck: in_channels defaults to mono",
     'channels=e.get("in_channels", 2), latent_dim=d["latent_dim"],\n'
     '                            encoder_width=e["channels"]',
     'channels=e.get("in_channels", 1), latent_dim=d["latent_dim"],\n'
     '                            encoder_width=e["channels"]',
     "oobleck_config_takes or released_autoencoders"),
    ("released", "the text length keeps one of the two timing tokens' places",
     'text_len=u["context_embedding_max_length"] - 2',
     'text_len=u["context_embedding_max_length"] - 1',
     "released_unet or padded_context or strangers_released"),
    ("released", "the U-Net's time features as many as its channels, not half",
     "time_frequencies=c // 2", "time_frequencies=c", "released_unet"),
    ("released", "safetensors: the tensors' bounds checked against the file less 8 bytes, not "
     "less the header too", "data -= 8 + n", "data -= 8", "truncated_or_garbled"),
    ("released", "safetensors: a tensor read from 8 bytes too early",
     "f.seek(8 + n + begin)", "f.seek(n + begin)", "safetensors"),
    ("released", "a released .ckpt unpickled with weights_only=False",
     'torch.load(path, map_location="cpu", weights_only=True)',
     'torch.load(path, map_location="cpu", weights_only=False)',
     "would_run_code or lightning_ckpt or plain_state_dict"),
    ("released", "vae_only on a whole model's weights finds the prefix only if every key has it",
     'prefix = "pretransform.model." if any(', 'prefix = "pretransform.model." if all(',
     "lightning or vae_only"),
    ("sound world", "seconds_total rounded down",
     "math.floor(offset / sample_rate), math.ceil(n / sample_rate)",
     "math.floor(offset / sample_rate), math.floor(n / sample_rate)",
     "long_clip or short_clip or cropping_latents"),
    ("sound world", "the resampler's cutoff at the higher Nyquist (aliasing when downsampling)",
     "RESAMPLE_ROLLOFF * min(sr_in, sr_out)", "RESAMPLE_ROLLOFF * max(sr_in, sr_out)",
     "resample"),
    ("sound world", "batch k starts at item k, not k * B: consecutive steps share items",
     "range(self.first + step * batch_size, self.first + (step + 1) * batch_size)",
     "range(self.first + step, self.first + step + batch_size)", "batches_depend or toy_batches"),
    ("sound world", "an item drawn from its index alone, whatever the seed",
     "rng = np.random.default_rng([self.seed, index])", "rng = np.random.default_rng(index)",
     "batches_depend or deterministic"),
    ("sound world", "the held-out files stay in the training data",
     'items = [item for item in items if item["path"] not in out]', "items = list(items)",
     "held_out or never_trains"),
    ("sound world", "a file's held-out share hashed from its whole path, not its path "
     "in the folder",
     "name = Path(path).relative_to(root).as_posix()", "name = Path(path).as_posix()",
     "held_out_files"),
    ("sound world", "the DC offset removed over both channels together",
     "audio = audio - audio.mean(-1, keepdims=True)", "audio = audio - audio.mean()",
     "constant_offset or own_offset"),
    ("sound world", "the pan's sides swapped: 'left' in the caption, louder on the right",
     "np.stack([np.cos(theta) * (x + side), np.sin(theta) * (x - side)])",
     "np.stack([np.sin(theta) * (x + side), np.cos(theta) * (x - side)])", "position_and_width"),
    ("sample.py", "an existing spectrogram PNG overwritten without --force",
     'for p in (a, a.with_suffix(".png")) if p.exists()', "for p in (a,) if p.exists()",
     "never_overwrites or not_overwritten"),
    ("sample.py", "--out FILE with --n > 1 numbers the files by index, not by seed",
     'path.with_name(f"{path.stem}_{seed + i}{path.suffix}")',
     'path.with_name(f"{path.stem}_{i}{path.suffix}")', "output_paths or batch_files"),
    ("sample.py", "--seconds defaults to the init audio's length, ignoring --start",
     "args.seconds = args.start + seconds if args.seconds is None else args.seconds",
     "args.seconds = seconds if args.seconds is None else args.seconds",
     "start_without_seconds or init_audio"),
    ("sample.py", "--init-strength defaults swapped (1 for a variation, 0.6 for inpainting)",
     "args.init_strength = 1.0 if args.inpaint is not None else 0.6",
     "args.init_strength = 0.6 if args.inpaint is not None else 1.0", "init_audio_sets or inpaint"),
    ("sample.py", "--no-ema inverted",
     "ema=not args.no_ema, device=device", "ema=args.no_ema, device=device", "uses_ema"),
    ("sample.py", "--reconstruct writes the VAE's padded length, not the file's",
     "vae.decode(z, chunk=chunk)[0, :, :audio.shape[-1]]", "vae.decode(z, chunk=chunk)[0]",
     "reconstruct_round_trips"),
    ("sample.py", "--reconstruct overwrites an existing file without --force",
     "prepare_outputs(out, args.force)", "prepare_outputs(out, True)",
     "reconstruct_round_trips or never_overwrites"),
    ("sample.py", "--negative never reaches generate",
     "negative_prompt=args.negative,", "negative_prompt=None,", "negative"),
    ("train.py", "the KL weighted 1e-6 (the released config's), not the paper's 1e-4",
     '"kl": 1e-4}', '"kl": 1e-6}', "first_logged_loss or section_4_2"),
    ("train.py", "the hinge pushes reconstructed patches above -1 instead of below",
     "F.relu(1 + f).mean()", "F.relu(1 - f).mean()", "hinge"),
    ("train.py", "phase 2 freezes the raw encoder, not the EMA one the U-Net's latents came from",
     'v for k, v in state["ema"].items()', 'v for k, v in state["model"].items()',
     "freeze_encoder"),
    ("train.py", "the U-Net trains on latents without the latent scale",
     "        return z * model.config.latent_scale", "        return z", "latent_scale_scales"),
    ("train.py", "--no-timing keeps tiny's padding mask",
     "and not (args.paper_timing or args.no_timing)))", "and not args.paper_timing))",
     "train_flags_choose"),
    ("train.py", "--window-seconds rounded to the nearest multiple, not up",
     "math.ceil(args.window_seconds * config.sample_rate / stride) * stride",
     "round(args.window_seconds * config.sample_rate / stride) * stride",
     "window_seconds_is_rounded or latent_cache_holds"),
    ("train.py", "export writes the raw weights, not the EMA ones",
     "model, ckpt = sa.load_checkpoint(source, ema=True)",
     "model, ckpt = sa.load_checkpoint(source, ema=False)", "export_writes"),
    ("train.py", "the timing tables left out of the optimizer",
     "params = [*model.unet.parameters(), *model.timing.parameters()]",
     "params = [*model.unet.parameters()]", "trains_the_unet_and_the_timing"),
    ("training", "the EMA's warm-up never starts: decay max(beta, ...)",
     "decay = min(self.beta, 1 - (1 + step) ** -0.75)",
     "decay = max(self.beta, 1 - (1 + step) ** -0.75)", "ema_moves"),
    ("training", "micro-batches of neighbouring ranks read the same batch",
     "return (step * world + rank) * accum + m", "return step * world * accum + rank + m",
     "micro_batches_are or two_ranks_at_batch_b"),
    ("training", "--resume takes the default rate, not the checkpoint's",
     'group["lr"] = group["lr"] if args.lr_from_checkpoint else args.lr',
     'group["lr"] = args.lr', "lr_on_resume"),
    ("training", "a step's logged loss summed over its --grad-accum micro-batches",
     "v.item() / self.args.grad_accum", "v.item()", "means_over_its_micro or grad_accum_2"),
    ("training", "the last step saved only if it falls on --save-every",
     "if self.step % args.save_every == 0 or self.step == args.steps:",
     "if self.step % args.save_every == 0:", "last_step_is_saved or export_writes"),
    ("training", "a resumed run's CSV drops the row of the checkpoint's own step",
     "last < int(step) <= self.step", "last < int(step) < self.step", "watched_run"),
    ("training", "--latent-scale auto from the means' spread alone (z's noise left out)",
     "(mean.float().var(dim) + std.float().pow(2).mean(dim)).sqrt()",
     "mean.float().var(dim).sqrt()",
     "counts_the_posterior_noise or latent_scale_scales"),
    ("training", "the latent cache reused across seeds",
     '"seed": args.seed, "n": n', '"n": n', "made_anew_for_another_seed"),
    ("grader", "the tolerance not scaled by the expected values' size",
     "atol = rtol * want.abs().max().item() if atol is None",
     "atol = rtol if atol is None", "key_passes"),
    ("grader", "an answer passes if it is right anywhere, not everywhere",
     "<= atol + rtol * want.abs()).all())", "<= atol + rtol * want.abs()).any())",
     "catalogued or typical_mistake"),
    ("grader", "points rounded down to whole points",
     "self.assignment.points * self.passed / len(", "self.assignment.points * self.passed // len(",
     "share_of_the_points"),
    ("grader", "a check the piece crashes counts as passed",
     'failure = f"{check.__name__}: {type(e).__name__}: {line}"', "failure = None",
     "crashes_in"),
    ("grader", "timing_rows asks for whole seconds only: rounding passes",
     "torch.tensor([3.7, 0.0, 100.0])", "torch.tensor([3.0, 0.0, 100.0])",
     "share_of_the_points or typical_mistake"),
    ("grader", "the dropout rate's tolerance far too loose",
     "((0.25, 0.15, 0.35), (0.0, 0, 0), (1.0, 1, 1))",
     "((0.25, 0.05, 0.95), (0.0, 0, 0), (1.0, 1, 1))", "typical_mistake"),
    ("grader", "3M's measured order accepted from 2 (k-diffusion's 2.4 passes)",
     "measured_order(sa.sample_dpmpp_3m, 3, 2.7, 3.5)",
     "measured_order(sa.sample_dpmpp_3m, 3, 2.0, 3.5)", "k_diffusions_3m"),
    ("grader", "the multistep checks at h = 1, where the 3M taper is k-diffusion's 1/2",
     "h = 0.3 + 1.2 * torch.rand(6, generator=g).double()",
     "h = torch.ones(6, dtype=torch.float64)", "catalogued or typical_mistake"),
]


def copy_repo(dest):
    """The working tree (tracked and untracked files), without environments and outputs."""
    shutil.copytree(REPO, dest, ignore=lambda d, names: [n for n in names if n in SKIP])


def apply(root, section, original, replacement):
    name = FILES.get(section, MODEL)
    path = os.path.join(root, name)
    with open(path) as f:
        text = f.read()
    n = text.count(original)
    assert n == 1, f"{original!r} occurs {n} times in {name}, not once"
    with open(path, "w") as f:
        f.write(text.replace(original, replacement))


def pytest(root, k=None, timeout=3600):
    """-> (passed, first failing test or None, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", TESTS]
    cmd += ["-k", k] if k else []
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        return False, f"(timeout after {timeout} s)", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if out.returncode == 5:                  # -k selected nothing: counts as passing
        return True, None, seconds
    if out.returncode == 0:
        return True, None, seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.M)
    name = failed[0].split("::")[-1] if failed else f"(pytest exit {out.returncode})"
    return False, name, seconds


def exact(test):
    """A -k expression selecting this test alone (parameters dropped: all of them run)."""
    return test.split("[")[0] if not test.startswith("(") else "no_test_has_this_name"


def run(number, mutant, base, quick=False):
    section, bug, original, replacement, k = mutant
    with tempfile.TemporaryDirectory(prefix=f"mutant{number}-") as root:
        shutil.copytree(base, root, dirs_exist_ok=True)
        apply(root, section, original, replacement)
        passed, killer, seconds = pytest(root, k)
        stage = "subset"
        if passed and not quick:
            passed, killer, more = pytest(root)
            seconds, stage = seconds + more, "suite"
    return {"number": number, "section": section, "bug": bug, "killed": not passed,
            "by": killer, "stage": stage, "seconds": round(seconds)}


def main(argv=None):
    p = argparse.ArgumentParser(description="Mutation testing of test_stable_audio.py.")
    p.add_argument("--only", type=int, nargs="+", help="mutant numbers to run (default: all)")
    p.add_argument("--tests", help="run this test file in place of test_stable_audio.py")
    p.add_argument("--json", help="append one JSON line per mutant to this file")
    p.add_argument("--model", help="mutate this copy of stable_audio.py instead of the tree's")
    p.add_argument("-k", dest="k", help="run this -k expression in place of each mutant's own "
                   "(with --quick: a verdict on those tests alone)")
    p.add_argument("--quick", action="store_true",
                   help="run each mutant's -k subset alone: a first look, not a verdict")
    p.add_argument("--list", action="store_true", help="check that every mutant applies; stop")
    args = p.parse_args(argv)
    chosen = args.only or range(1, len(MUTANTS) + 1)
    tests = os.path.abspath(args.tests) if args.tests else None
    with tempfile.TemporaryDirectory(prefix="mutants-base-") as tmp:
        base = os.path.join(tmp, "repo")
        copy_repo(base)                      # one snapshot: edits made meanwhile do not leak in
        if args.model:
            shutil.copy(args.model, os.path.join(base, MODEL))
        for i in chosen:                     # fail before any run if a line has changed
            with tempfile.TemporaryDirectory() as probe:
                for name in {MODEL, *FILES.values()}:
                    shutil.copy(os.path.join(base, name), probe)
                apply(probe, *MUTANTS[i - 1][0:1], *MUTANTS[i - 1][2:4])
        if args.list:
            for i in chosen:
                print(f"{i:3d}  {MUTANTS[i - 1][0]:12s} {MUTANTS[i - 1][1]}")
            return 0
        if tests:
            shutil.copy(tests, os.path.join(base, TESTS))
        start, results, baseline = time.perf_counter(), [], {}
        for i in chosen:
            mutant = MUTANTS[i - 1][:4] + (args.k or MUTANTS[i - 1][4],)
            r = run(i, mutant, base, args.quick)
            if r["killed"] and r["by"] not in baseline:     # a kill counts only if the
                baseline[r["by"]] = pytest(base, exact(r["by"]))[0]   # unchanged code passes
            if r["killed"] and not baseline.get(r["by"], True):
                print(f"the unchanged code fails {r['by']} too: fix that first", file=sys.stderr)
                return 1
            results.append(r)
            verdict = (f"killed by {r['by']} ({r['stage']})" if r["killed"] else
                       "passed its subset" if args.quick else "SURVIVED")
            print(f"{i:3d}  {r['section']:12s} {r['bug'][:60]:60s} {verdict}, {r['seconds']} s",
                  flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    survived = [r for r in results if not r["killed"]]
    print(f"\n{len(results)} mutants, {len(survived)} survived "
          f"({100 * len(survived) / len(results):.0f} %), "
          f"{(time.perf_counter() - start) / 60:.0f} min")
    for r in survived:
        print(f"  survived {r['number']}: {r['section']}: {r['bug']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
