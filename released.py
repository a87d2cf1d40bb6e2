"""Loading models released by stable-audio-tools: Stable Audio 1.0 and Stable Audio Open.

stable-audio-tools publishes a model as a config JSON plus weights (.ckpt or .safetensors).
`from_sat` builds the model the JSON describes with stable_audio.py's modules and renames the
released parameters to its names; the modules compute the same functions (tested against the
released code to 1e-4 of the largest output). The released text encoder (LAION CLAP, RoBERTa)
has no counterpart here: the loaded model's CLAP stays untrained, and from_sat says so.

    model = from_sat("model_config.json", "model.safetensors")           # StableAudio
    vae = from_sat("vae_config.json", "vae.ckpt")                         # an autoencoder alone
"""
import json
import math
import os
import re
import warnings

import torch

import stable_audio as sa


SAT_UNET_NAMES = [                       # released U-Net name -> ours, applied in order
    (r"^to_time\.0\.0\.weights$", "to_time.w"), (r"^to_time\.0\.1\.", "to_time.linear.0."),
    (r"^fixed_embedding\.embedding\.weight$", "null_context"),
    (r"^(to_in|to_out)\.block\.", r"\1."), (r"^downsamples\.", "down."), (r"^upsamples\.", "up."),
    (r"^bottleneck\.pre_block\.", "mid1."), (r"^bottleneck\.post_block\.", "mid2."),
    (r"^bottleneck\.transformer\.", "mid_transformer."),
    (r"^(down|up)\.(\d+)\.blocks\.", r"\1.\2.resnets."),
    (r"\.block1\.groupnorm\.", ".block1.0."), (r"\.block1\.project\.", ".block1.2."),
    (r"\.to_scale_shift\.to_scale_shift\.1\.", ".to_film.1."),
    (r"\.block2\.groupnorm\.", ".norm2."), (r"\.block2\.project\.", ".block2.1."),
    (r"^(to_in|to_out|mid1|mid2|(?:down|up)\.\d+\.resnets\.\d+)\.to_out\.", r"\1.skip."),
    (r"\.cross_attention\.attention\.to_out\.", ".cross_attn.to_out."),
    (r"\.cross_attention\.", ".cross_attn."),
    (r"\.attention\.attention\.to_out\.", ".self_attn.to_out."), (r"\.attention\.", ".self_attn."),
    (r"\.feed_forward\.", ".ff."),
    (r"transformer\.to_out\.1\.", "transformer.to_out."),
]
SAT_VAE_NAMES = [                        # DAC (Stable Audio 1.0) and Oobleck (Stable Audio Open)
    (r"^encoder\.encoder\.block\.", "encoder."), (r"^decoder\.decoder\.model\.", "decoder."),
    (r"^(encoder|decoder)\.layers\.", r"\1."),
    (r"^(encoder|decoder)\.(\d+)\.(?:block|layers)\.(\d+)\.", r"\1.\2.\3."),
    (r"\.layers\.", ".block."),
    (r"weight_g$", "parametrizations.weight.original0"),
    (r"weight_v$", "parametrizations.weight.original1"),
]


def rename(weights, prefix, rules):
    """The entries of `weights` under `prefix`, renamed by the (pattern, replacement) rules."""
    out = {}
    for key, value in weights.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
            for pattern, replacement in rules:
                key = re.sub(pattern, replacement, key)
            out[key] = value
    return out


def sat_vae_config(d):
    """A released autoencoder config ("model" of an autoencoder JSON) -> VAEConfig."""
    enc, dec = d["encoder"], d["decoder"]
    if enc["type"] == dec["type"] == "dac":
        e, c = enc["config"], dec["config"]
        strides = tuple(e["strides"])
        if tuple(c["rates"]) != strides[::-1]:
            raise ValueError("the decoder's rates must be the encoder's strides reversed")
        return sa.VAEConfig(channels=e.get("in_channels", 2), latent_dim=d["latent_dim"],
                            encoder_width=e["d_model"], decoder_width=c["channels"],
                            strides=strides,
                            multipliers=tuple(2 ** i for i in range(len(strides) + 1)))
    if enc["type"] == dec["type"] == "oobleck":
        e, c = enc["config"], dec["config"]
        if c.get("final_tanh", True) or e.get("antialias_activation") or \
                c.get("use_nearest_upsample"):
            raise ValueError("only Oobleck as Stable Audio Open uses it is supported (final_tanh "
                             "false, no antialiasing, transposed-conv upsampling)")
        mults = (1, *e["c_mults"])
        return sa.VAEConfig(channels=e.get("in_channels", 2), latent_dim=d["latent_dim"],
                            encoder_width=e["channels"], decoder_width=c["channels"] * mults[-1],
                            strides=tuple(e["strides"]), multipliers=mults, kind="oobleck",
                            activation="snake_beta" if e.get("use_snake") else "elu")
    raise ValueError(f"autoencoder type {enc['type']}/{dec['type']} is not supported "
                     f"(dac or oobleck)")


def sat_model_config(d):
    """A released diffusion_cond config with the Stable Audio 1.0 U-Net -> ModelConfig."""
    m = d["model"]
    u, conds = m["diffusion"]["config"], [c["id"] for c in m["conditioning"]["configs"]]
    if m["diffusion"]["type"] != "adp_cfg_1d":
        raise ValueError(f"diffusion type {m['diffusion']['type']!r} is not built here; the "
                         f"U-Net of Stable Audio 1.0 is adp_cfg_1d (pass vae_only=True for the "
                         f"autoencoder alone)")
    if m["diffusion"]["cross_attention_cond_ids"] != ["prompt", "seconds_start", "seconds_total"]:
        raise ValueError("the U-Net must cross-attend to prompt, seconds_start, seconds_total")
    if len(set(u["num_blocks"])) != 1 or u.get("kernel_multiplier_downsample", 2) != 2 or \
            u.get("use_nearest_upsample") or not u.get("use_skip_scale", True):
        raise ValueError("this U-Net config differs from Stable Audio 1.0's in a way not built "
                         "here")
    seconds = {c["id"]: c["config"] for c in m["conditioning"]["configs"] if c["type"] == "int"}
    if set(seconds) != {"seconds_start", "seconds_total"} or "prompt" not in conds:
        raise ValueError("expected a prompt and int seconds_start/seconds_total conditioners")
    C = u["context_embedding_features"]
    c = u["channels"]
    clap = sa.CLAPConfig(            # the released text encoder has no counterpart: untrained
        text_len=u["context_embedding_max_length"] - 2, text_width=C, text_heads=math.gcd(12, C),
        audio_width=C, audio_heads=math.gcd(8, C), embed_dim=min(512, C))
    unet = sa.UNetConfig(
        widths=tuple(c * k for k in u["multipliers"]), factors=tuple(u["factors"]),
        attentions=tuple(u["attentions"]), resnet_blocks=u["num_blocks"][0],
        heads=u["attention_heads"], ff_multiplier=u.get("attention_multiplier", 2),
        time_frequencies=c // 2, mapping_features=4 * c, resnet_groups=u.get("resnet_groups", 8))
    return sa.ModelConfig(
        size="released", sample_rate=d["sample_rate"], window=d["sample_size"],
        latent_scale=1 / m["pretransform"].get("scale", 1.0),
        vae=sat_vae_config(m["pretransform"]["config"]), clap=clap,
        timing=sa.TimingConfig(max_seconds=seconds["seconds_total"]["max_val"]), unet=unet)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """The .safetensors layout: the header's size (8 bytes, little-endian), a JSON header
    {name: {dtype, shape, data_offsets}}, then the tensors' bytes. Every entry is checked
    against the file's size before a byte of it is read."""
    data = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if not 2 <= n <= min(data - 8, 10 ** 8):
                raise ValueError
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise ValueError(f"{path} is not a complete .safetensors file (its header does not "
                             f"fit in its {data} bytes)") from None
        data -= 8 + n
        weights = {}
        for name, entry in header.items():
            try:
                dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
                begin, end = entry["data_offsets"]
                fits = all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)) and \
                    begin <= end <= data and end - begin == math.prod(shape) * dtype.itemsize
            except (KeyError, TypeError, ValueError):
                fits = False
            if not fits:
                raise ValueError(f"{path} is damaged or truncated: tensor {name!r} does not fit "
                                 f"in the file")
            buffer = bytearray(end - begin)
            f.seek(8 + n + begin)
            f.readinto(buffer)
            weights[name] = (torch.frombuffer(buffer, dtype=dtype) if buffer else
                             torch.zeros(0, dtype=dtype)).reshape(shape)
    return weights


def read_sat_weights(path):
    """A released .ckpt (Lightning: the weights under "state_dict") or .safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights {path} not found")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    weights = weights.get("state_dict", weights) if isinstance(weights, dict) else None
    if not sa.named_tensors(weights):
        raise ValueError(f"{path} holds no dictionary of named tensors; pass the model's .ckpt "
                         f"or .safetensors")
    return weights


def sat_vae_weights(vae, weights, prefix):
    """DAC's extra 1x1 conv ("proj_out") is the last module of our encoder."""
    rules = SAT_VAE_NAMES + [(r"^encoder\.proj_out\.", f"encoder.{len(vae.encoder) - 1}.")]
    return rename(weights, prefix, rules)


def from_sat(config, weights, vae_only=False):
    """A stable-audio-tools model: config (JSON path or dict) + weights (path or state dict).
    A diffusion_cond config -> StableAudio (or its VAE alone with vae_only); an autoencoder
    config -> VAE."""
    where = config if isinstance(config, str) else "the config"
    if not isinstance(config, dict):
        if not os.path.isfile(config):
            raise FileNotFoundError(f"config {config} not found")
        try:
            with open(config) as f:
                config = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{where} is not a JSON file ({e})") from None
    weights = read_sat_weights(weights) if isinstance(weights, str) else weights
    try:
        vae_only = vae_only or config["model_type"] == "autoencoder"
        if vae_only:
            ours = sat_vae_config(config["model"] if config["model_type"] == "autoencoder" else
                                  config["model"]["pretransform"]["config"])
        elif config["model_type"] != "diffusion_cond":
            raise ValueError(f"model_type {config['model_type']!r} is not supported")
        else:
            ours = sat_model_config(config)
    except KeyError as e:
        raise ValueError(f"{where} lacks {e}; pass a stable-audio-tools model config") from None
    except (TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{where} is not a config this code can read ({e})") from None
    if vae_only:
        prefix = "pretransform.model." if any(k.startswith("pretransform.model.")
                                              for k in weights) else ""
        parts = lambda vae: [(vae, sat_vae_weights(vae, weights, prefix), "autoencoder")]
        return sa.build_checked(ours, parts, where, build=sa.VAE).eval()
    tables = {f"{ours}.weight": weights.get(f"conditioner.conditioners.seconds_{ours}."
                                            f"int_embedder.weight") for ours in ("start", "total")}
    model = sa.build_checked(ours, lambda m: [
        (m.unet, rename(weights, "model.model.", SAT_UNET_NAMES), "U-Net"),
        (m.vae, sat_vae_weights(m.vae, weights, "pretransform.model."), "autoencoder"),
        (m.timing, {k: v for k, v in tables.items() if v is not None}, "timing")], where)
    warnings.warn("the released text encoder (LAION CLAP) has no counterpart here: this model's "
                  "CLAP is untrained, so prompts do not steer it; pass your own context",
                  stacklevel=2)
    return model.eval()
