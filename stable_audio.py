"""Stable Audio in one file: a readable reference of timing-conditioned latent audio diffusion.

Evans, Carr, Taylor, Hawley, Pons. "Fast Timing-Conditioned Latent Audio Diffusion." ICML 2024,
arXiv:2402.04825. Stable Audio generates up to 95 s of 44.1 kHz stereo from a text prompt and a
requested duration. A VAE squeezes audio 1024x in time into a 64-channel latent; a U-Net denoises
such latents, steered by text features from a CLAP text encoder and by two timing tokens
(where the clip starts, how long the whole piece is); DPM-Solver++ runs the denoising in 100 steps.

    audio (B, 2, N) --VAE.encode--> z (B, 64, L)                 L = N / 1024 latent frames
    prompt ---------> CLAP text, next-to-last layer --+
    seconds_start, seconds_total -> 2 timing tokens --+--> context (B, S, 768), mask (B, S)
    noise (B, 64, L) --U-Net (v) + CFG + DPM-Solver++--> z --VAE.decode--> audio (B, 2, N)

Shapes: B batch, C channels, L latent frames, N audio samples, S tokens, M the noise-level
embedding's width; W, A, D CLAP's text, audio and joint widths (in the samplers D: the denoiser).
Masks: `mask` (B, S) real context tokens; content_mask (B, L) frames inside the request;
inpaint_mask (L,) the latent inpainting keeps. `python stable_audio.py`: a `tiny` shape trace.
"""
import copy
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm  # the old hook fails under bf16 autocast
from torch.utils.checkpoint import checkpoint

CHECKPOINT_FORMAT = "stable-audio-reference/2"
FORMAT_1 = "stable-audio-reference/1"     # still read: see upgrade_format_1
PAD, BOS, EOS, VOCAB = 256, 257, 258, 259   # byte tokenizer: 256 byte values, then 3 specials
STFT_SIZES = (2048, 1024, 512, 256, 128, 64, 32)   # §4.2: the reconstruction loss's windows
DECODE_OVERLAP = 32        # latent frames shared by neighbouring decode chunks
CFG_SCALE, CFG_RESCALE = 6.0, 0.4   # §3.4 guidance: the paper's scale, the released rescale phi
SIGMA_MIN, SIGMA_MAX = 0.03, 80.0   # §3.4 schedule ends, the released UI's (the paper gives none)


# -------------------------------------------------------------------------------------------------
# Configs and sizes: one dataclass per component, its defaults the paper's full size (as in the
# released stable_audio_1_0.json); `small` and `tiny` change widths, depths, the window, no more.
@dataclass
class VAEConfig:
    channels: int = 2                    # stereo
    latent_dim: int = 64
    encoder_width: int = 128             # DAC d_model: the first conv's width
    decoder_width: int = 1536            # the decoder's widest layer, right after its first conv
    strides: tuple = (4, 4, 8, 8)        # product 1024; the decoder uses them reversed
    multipliers: tuple = (1, 2, 4, 8, 16)  # encoder widths: encoder_width x these, one per stride
    activation: str = "snake"            # §3.1; "snake_beta" (Oobleck), "elu" (EnCodec) to compare
    kind: str = "dac"                    # "oobleck": Stable Audio Open's ends (see VAE)
    audible_init: bool = False           # `tiny` only: see VAE.audible_init


# Stable Audio Open's autoencoder (released as stable_audio_2_0_vae.json): 1/2048 of the length.
OOBLECK = VAEConfig(encoder_width=128, decoder_width=2048, strides=(2, 4, 4, 8, 8),
                    multipliers=(1, 1, 2, 4, 8, 16), activation="snake_beta", kind="oobleck")


@dataclass
class CLAPConfig:
    text_len: int = 77                   # tokens incl. BOS/EOS, as released (see the CLAP section)
    text_width: int = 768                # = the U-Net's context width, as in the paper
    text_layers: int = 12
    text_heads: int = 12
    feature_layer: int = -2              # §3.2: condition on the next-to-last layer
    audio_width: int = 512
    audio_layers: int = 8
    audio_heads: int = 8
    n_mels: int = 64
    n_fft: int = 2048
    mel_hop: int = 512
    patch: int = 4                       # mel frames per audio token
    embed_dim: int = 512                 # joint text-audio space


@dataclass
class TimingConfig:
    max_seconds: int = 512               # released IntConditioner: whole seconds 0..512
    enabled: bool = True                 # False: text-only context, for the timing exercise
    sinusoid_init: bool = False          # `tiny` only: see TimingEmbedding


@dataclass
class UNetConfig:
    widths: tuple = (1024, 1024, 1024, 1280, 1280)  # to_in, then the output of each level
    factors: tuple = (1, 2, 2, 4)        # downsampling per level
    attentions: tuple = (1, 3, 3, 3, 3)  # transformer blocks per level; the last: bottleneck
    resnet_blocks: int = 2
    heads: int = 16
    ff_multiplier: int = 4               # feed-forward width over the transformer's width
    time_frequencies: int = 128          # learned Fourier frequencies of the noise level t
    mapping_features: int = 1024         # width of the noise-level embedding fed to FiLM
    resnet_groups: int = 16
    symmetric_downsample: bool = False   # checkpoints of format 1: see upgrade_format_1
    padding_mask: bool = False           # `tiny` only (not train.py --paper-timing): content_mask


@dataclass
class ModelConfig:
    size: str = "full"
    sample_rate: int = 44100
    window: int = 2 ** 22                # samples: 95.1 s, 4096 latent frames
    # Not the paper's (latent scale): diffusion runs on z * latent_scale (released: 1; a briefly
    # trained VAE's latents are smaller than the schedule assumes); generate divides it out.
    latent_scale: float = 1.0
    vae: VAEConfig = field(default_factory=VAEConfig)
    clap: CLAPConfig = field(default_factory=CLAPConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    @property
    def context_len(self):
        """Tokens the U-Net cross-attends to: the text, then the two timing tokens (§3.2)."""
        return self.clap.text_len + (2 if self.timing.enabled else 0)

    @classmethod
    def from_dict(cls, d):
        """Rebuild a config from `asdict` output (as stored in a checkpoint)."""
        parts = {"vae": VAEConfig, "clap": CLAPConfig, "timing": TimingConfig, "unet": UNetConfig}
        d = {k: parts[k](**{f: tuple(v) if isinstance(v, list) else v for f, v in d[k].items()})
             if k in parts else v for k, v in d.items()}
        return cls(**d)


SIZES = {
    "full": ModelConfig(),
    "small": ModelConfig(  # trains on a 16-24 GB card
        size="small", window=2 ** 21, vae=VAEConfig(encoder_width=64, decoder_width=768),
        clap=CLAPConfig(text_len=128, text_width=512, text_layers=8, text_heads=8,
                        audio_width=256, audio_layers=4, audio_heads=4, embed_dim=256),
        unet=UNetConfig(widths=(512, 512, 512, 640, 640), attentions=(1, 2, 2, 2, 2), heads=8,
                        mapping_features=512)),
    "tiny": ModelConfig(  # trains in minutes on 2 CPU cores
        # Not the paper's (first-level attention): none, as self-attention over the first level's
        # 2048 frames dominates a CPU forward pass. (The other `tiny` only fields: see each.)
        size="tiny", window=2 ** 21, timing=TimingConfig(sinusoid_init=True),
        vae=VAEConfig(encoder_width=16, decoder_width=128, audible_init=True),
        clap=CLAPConfig(text_len=128, text_width=64, text_layers=3, text_heads=4, audio_width=64,
                        audio_layers=2, audio_heads=4, embed_dim=64),
        unet=UNetConfig(widths=(64, 64, 64, 96, 96), attentions=(0, 1, 1, 1, 1), heads=4,
                        mapping_features=128, padding_mask=True)),
}


# -------------------------------------------------------------------------------------------------
# §3.1 Snake (Ziyin et al. 2020, as in DAC): x + 1/alpha sin^2(alpha x), alpha learned per channel.
# A periodic bump on top of the identity lets convolutions model oscillations, which is what audio
# is made of; ReLU-type activations must build every period out of pieces.
def snake(x, alpha, beta=None):
    """x + 1/beta sin^2(alpha x), beta None: alpha (DAC's Snake). x (B, C, N); alpha, beta (1, C, 1)
    or broadcastable; divides by beta + 1e-9 (a learned beta can reach 0). -> x's shape."""
    beta = alpha if beta is None else beta
    return x + (beta + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


class Snake(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))  # DAC starts at alpha = 1

    def forward(self, x):
        return snake(x, self.alpha)


class SnakeBeta(nn.Module):
    """Stable Audio Open's: frequency alpha, magnitude 1/beta, as logs (from 0) to stay positive."""
    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x):
        return snake(x, self.alpha.exp(), self.beta.exp())


ACTIVATIONS = {"snake": Snake, "snake_beta": SnakeBeta, "elu": lambda channels: nn.ELU()}


# -------------------------------------------------------------------------------------------------
# §3.1 VAE: the Descript Audio Codec encoder/decoder without its quantizer. Stereo 44.1 kHz -> 64
# channels at 1/1024 of the length (strides 4, 4, 8, 8), a 32x smaller tensor. Full size: encoder
# 89.6 M + decoder 43.9 M = 133 M parameters. Its §4.2 losses (KL, multi-resolution STFT) follow.
# The same code builds Stable Audio Open's OOBLECK (SnakeBeta, strides 2, 4, 4, 8, 8, no tanh).
WNConv1d = lambda *args, **kwargs: weight_norm(nn.Conv1d(*args, **kwargs))
WNConvTranspose1d = lambda *args, **kwargs: weight_norm(nn.ConvTranspose1d(*args, **kwargs))


class ResidualUnit(nn.Module):
    """Snake -> dilated conv (k=7) -> Snake -> 1x1 conv, added back to the input."""
    def __init__(self, channels, dilation, act=Snake):
        super().__init__()
        self.block = nn.Sequential(
            act(channels), WNConv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            act(channels), WNConv1d(channels, channels, 1))

    def forward(self, x):
        return x + self.block(x)


def encoder_block(c_in, c_out, stride, act=Snake):
    """Residual units (dilations 1, 3, 9), then a strided conv: length / stride, width c_out."""
    return nn.Sequential(
        *[ResidualUnit(c_in, dilation, act) for dilation in (1, 3, 9)], act(c_in),
        WNConv1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2)))


def decoder_block(c_in, c_out, stride, act=Snake):
    """A transposed conv that upsamples by `stride`, then residual units (dilations 1, 3, 9)."""
    return nn.Sequential(act(c_in), WNConvTranspose1d(c_in, c_out, 2 * stride, stride=stride,
                                                      padding=math.ceil(stride / 2)),
                         *[ResidualUnit(c_out, dilation, act) for dilation in (1, 3, 9)])


class VAE(nn.Module):
    """Encoder -> posterior mean and std, decoder -> audio. Released ends by `kind`: "dac" (1.0) a
    1x1 conv after the encoder, a tanh after the decoder; "oobleck" (Open) neither, no last bias."""
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.hop = math.prod(config.strides)
        act, dac = ACTIVATIONS[config.activation], config.kind == "dac"
        enc = [config.encoder_width * m for m in config.multipliers]                # 128 .. 2048
        dec = [config.decoder_width * m // config.multipliers[-1] for m in config.multipliers[::-1]]
        latent2 = 2 * config.latent_dim                                         # mean and scale
        self.encoder = nn.Sequential(
            WNConv1d(config.channels, enc[0], 7, padding=3),
            *[encoder_block(enc[i], enc[i + 1], s, act) for i, s in enumerate(config.strides)],
            act(enc[-1]), WNConv1d(enc[-1], enc[-1] if dac else latent2, 3, padding=1),
            *([nn.Conv1d(enc[-1], latent2, 1)] if dac else []))
        self.decoder = nn.Sequential(                                        # 1536 .. 96
            WNConv1d(config.latent_dim, dec[0], 7, padding=3),
            *[decoder_block(dec[i], dec[i + 1], s, act)
              for i, s in enumerate(config.strides[::-1])],
            act(dec[-1]), WNConv1d(dec[-1], config.channels, 7, padding=3, bias=dac),
            *([nn.Tanh()] if dac else []))
        if config.audible_init:
            self.audible_init(config.latent_dim)

    @torch.no_grad()
    def audible_init(self, latent_dim):
        """Not the paper's (initialisation), `tiny` only: under PyTorch's default init (as released)
        the tiny decoder at step 0 barely uses the latent (biases, Snake's sin^2 offsets drown it)
        and CPU-sized training collapses. So: biases 0; decoder convs outside residual units
        variance-preserving, the last at 1/10 (tanh unsaturated); posterior std small."""
        inside = {id(m) for unit in self.decoder.modules() if isinstance(unit, ResidualUnit)
                  for m in unit.modules()}
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)) and m.bias is not None:
                m.bias.zero_()
        for m in self.decoder.modules():
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)) and id(m) not in inside:
                fan_in = m.in_channels * m.kernel_size[0] // m.stride[0]    # taps per output
                v = m.parametrizations.weight.original1.normal_(0, fan_in ** -0.5)
                m.parametrizations.weight.original0.copy_(v.norm(dim=(1, 2), keepdim=True))  # w = v
        last = [m for m in self.decoder if isinstance(m, nn.Conv1d)][-1]
        last.parametrizations.weight.original0.mul_(0.1)
        self.encoder[-1].bias[latent_dim:] = -5.0          # std softplus(-5) ~ 0.007, not 0.69

    def encode(self, audio):
        """Posterior mean and std. Audio is zero-padded on the right to a multiple of the hop."""
        audio = F.pad(audio, (0, -audio.shape[-1] % self.hop))      # (B, 2, L * 1024)
        mean, scale = self.encoder(audio).chunk(2, dim=1)           # (B, 64, L) each
        return mean, F.softplus(scale) + 1e-4

    def decode(self, z, chunk=None, overlap=DECODE_OVERLAP):
        """Latent (B, 64, L) -> audio (B, 2, L * 1024), `chunk` latent frames at a time if given.
        Chunks overlap by `overlap` frames, each kept in its centre: overlap/2 = 16 frames exceed
        the receptive field (~10), so this is a one-shot decode (overlap-add is not)."""
        L = z.shape[-1]
        if chunk is None or L <= chunk:
            return self.decoder(z)
        assert chunk > overlap, "decode chunk must be longer than the overlap"
        edge, step = overlap // 2, chunk - overlap
        pieces, done = [], 0
        for s in list(range(0, L - chunk, step)) + [L - chunk]:     # the last chunk ends at L
            audio = self.decoder(z[..., s:s + chunk])               # (B, 2, chunk * 1024)
            keep_to = chunk if s + chunk == L else chunk - edge
            pieces.append(audio[..., (done - s) * self.hop:keep_to * self.hop])
            done = s + keep_to
        return torch.cat(pieces, dim=-1)


def kl_divergence(mean, std):
    """KL(N(mean, std^2) || N(0, 1)), summed over channels, averaged over batch and frames, with
    the 1/2; mean, std (B, C, L), std > 0 -> a scalar (0-d tensor).
    Released, not the paper (KL term): no 1/2 (twice this), weight 1e-6; paper: 1e-4."""
    return 0.5 * (mean.pow(2) + std.pow(2) - 2 * torch.log(std) - 1).sum(1).mean()


def a_weighting(freqs):
    """IEC 61672 A-weighting as a linear gain (1 at 1 kHz) for frequencies in Hz."""
    f2 = freqs ** 2
    r = 12194.0 ** 2 * f2 ** 2 / ((f2 + 20.6 ** 2) * (f2 + 12194.0 ** 2)
                                  * torch.sqrt((f2 + 107.7 ** 2) * (f2 + 737.9 ** 2)))
    return r * 10 ** (2.0 / 20)


def stft_loss(x_hat, x, sample_rate):
    """Spectral convergence + log magnitude between (B, N) signals, A-weighted so errors count as
    the ear hears them, averaged over the STFT_SIZES windows."""
    x_hat, x = x_hat.float(), x.float()            # STFT losses in float32: fp16 overflows
    total = 0.0
    for n_fft in STFT_SIZES:
        window = torch.hann_window(n_fft, device=x.device)
        weight = a_weighting(torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, device=x.device))
        mag = lambda s: (weight[:, None] * torch.stft(s, n_fft, n_fft // 4, window=window,
                                                      return_complex=True).abs()).clamp(min=1e-4)
        Y, X = mag(x_hat), mag(x)                  # (B, F, T)
        spectral_convergence = torch.linalg.norm(Y - X) / torch.linalg.norm(X)
        log_magnitude = (Y.log() - X.log()).abs().mean()
        total = total + spectral_convergence + log_magnitude
    return total / len(STFT_SIZES)


def stereo_loss(x_hat, x, sample_rate):
    """§4.2 reconstruction: the STFT loss on mid (L + R) and side (L - R), normalised together so a
    nearly mono clip (side ~ 0) does not divide by ~0, plus L and R as released: mid and side
    alone cannot see a left/right swap, since |STFT(L - R)| = |STFT(R - L)|."""
    mid_side = lambda a: torch.cat([a.sum(1), a[:, 0] - a[:, 1]])         # (2B, N)
    return (stft_loss(mid_side(x_hat), mid_side(x), sample_rate)
            + stft_loss(x_hat.flatten(0, 1), x.flatten(0, 1), sample_rate))


# -------------------------------------------------------------------------------------------------
# §3.2, §4.3 A small CLAP: text and audio (log-mel) transformers trained contrastively so that
# matching captions and clips land close; the diffusion model reads the text encoder's next-to-last
# layer (768 features per token at full size). Not the paper's (text encoder): RoBERTa there (77 BPE
# tokens, frozen); ours reads UTF-8 bytes, so it needs no vocabulary file and trains here. `full`
# keeps 77 tokens (context 79); `small`, `tiny` read 128 bytes (a BPE token is ~4 characters).
def tokenize(prompts, length):
    """UTF-8 bytes between BOS and EOS, cut to `length`, padded -> tokens (B, S), mask (B, S):
    the context's token mask, True at real tokens (not PAD)."""
    tokens = torch.full((len(prompts), length), PAD, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [BOS, *p.encode("utf-8")[:length - 2], EOS]
        tokens[i, :len(ids)] = torch.tensor(ids)
    return tokens, tokens != PAD


class Attention(nn.Module):
    """Multi-head attention (F.scaled_dot_product_attention): self-attention, or queries from x and
    keys/values from `context`; as released, both streams get a LayerNorm, in self-attention too."""
    def __init__(self, features, heads, context_features=None):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(features)
        self.norm_context = nn.LayerNorm(context_features or features)
        self.to_q = nn.Linear(features, features, bias=False)
        self.to_kv = nn.Linear(context_features or features, 2 * features, bias=False)
        self.to_out = nn.Linear(features, features)

    def forward(self, x, context=None, mask=None):
        """x (B, S, C): S tokens (the U-Net's L frames); context (B, S', C_ctx), S' tokens, or None:
        self-attention, keys and values from norm_context(x) as released. q = to_q(norm(x));
        to_kv(norm_context(context)) splits on its last axis into k (first half), then v. C splits
        into `heads` contiguous groups, (B, S, heads, C / heads) -> (B, heads, S, C / heads);
        softmax(q k^T / sqrt(C / heads)) v over the keys where mask (B, S') bool is True (a real
        token; None: all); heads joined back to (B, S, C), then to_out. -> (B, S, C)"""
        B, S, C = x.shape                                            # (B, S, C)
        context = self.norm_context(x if context is None else context)
        q, (k, v) = self.to_q(self.norm(x)), self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.reshape(B, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # Not the paper's (padded context tokens): the released model zeroes padded keys and values,
        # left in the softmax at logit 0; a boolean mask removes them: padding changes nothing.
        mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # (B, heads, S, C / h)
        return self.to_out(out.transpose(1, 2).reshape(B, S, C))


class CLAPLayer(nn.Module):
    """Pre-norm transformer layer used by both CLAP towers."""
    def __init__(self, width, heads):
        super().__init__()
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x, mask=None):
        x = x + self.attn(x, mask=mask)
        return x + self.mlp(x)


def mel_filterbank(n_fft, n_mels, sample_rate):
    """Triangular filters evenly spaced on the mel scale m = 2595 log10(1 + f / 700)."""
    mel_max = 2595 * math.log10(1 + sample_rate / 2 / 700)
    f = 700 * (10 ** (torch.linspace(0, mel_max, n_mels + 2) / 2595) - 1)   # filter edges, Hz
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    rise = (freqs - f[:-2, None]) / (f[1:-1] - f[:-2])[:, None]
    fall = (f[2:, None] - freqs) / (f[2:] - f[1:-1])[:, None]
    return torch.minimum(rise, fall).clamp(min=0)                       # (n_mels, n_fft/2 + 1)


def sinusoids(S, C):
    """Fixed sinusoidal positions (S, C) for the audio tower, which sees clips of any length."""
    freqs = torch.exp(-math.log(10000) * torch.arange(C // 2) / (C // 2))
    angles = torch.arange(S)[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class CLAP(nn.Module):
    def __init__(self, config: CLAPConfig, sample_rate):
        super().__init__()
        self.config, self.sample_rate = config, sample_rate
        W, A, D = config.text_width, config.audio_width, config.embed_dim
        self.token_embedding = nn.Embedding(VOCAB, W)
        self.position = nn.Parameter(0.02 * torch.randn(config.text_len, W))
        self.text_layers = nn.ModuleList(CLAPLayer(W, config.text_heads)
                                         for _ in range(config.text_layers))
        self.text_norm = nn.LayerNorm(W)
        self.register_buffer("mel", mel_filterbank(config.n_fft, config.n_mels, sample_rate),
                             persistent=False)
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        self.patchify = nn.Conv1d(config.n_mels, A, config.patch, stride=config.patch)
        self.audio_layers = nn.ModuleList(CLAPLayer(A, config.audio_heads)
                                          for _ in range(config.audio_layers))
        self.audio_norm = nn.LayerNorm(A)
        self.text_proj = nn.Sequential(nn.Linear(W, D), nn.GELU(), nn.Linear(D, D))
        self.audio_proj = nn.Sequential(nn.Linear(A, D), nn.GELU(), nn.Linear(D, D))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learned temperature

    def tokenize(self, prompts):
        return tuple(t.to(self.position.device) for t in tokenize(prompts, self.config.text_len))

    def text_hidden(self, tokens, mask, layers):
        """Hidden state after the first `layers` transformer layers. (B, S, W)"""
        h = self.token_embedding(tokens) + self.position[:tokens.shape[1]]
        for layer in self.text_layers[:layers]:
            h = layer(h, mask)
        return h

    def text_features(self, tokens, mask):
        """§3.2: per-token features (B, S, W) for cross-attention, from layer `feature_layer`."""
        return self.text_hidden(tokens, mask, len(self.text_layers) + 1 + self.config.feature_layer)

    def embed_text(self, tokens, mask):
        """Unit-norm text embedding: last layer, mean over real tokens, projection. (B, D)"""
        h = self.text_norm(self.text_hidden(tokens, mask, len(self.text_layers)))
        m = mask[..., None].to(h.dtype)
        return F.normalize(self.text_proj((h * m).sum(1) / m.sum(1)), dim=-1)

    def log_mel(self, audio):
        """Stereo audio (B, 2, N) -> log-mel of the mono mix (B, n_mels, N / mel_hop + 1)."""
        mono = audio.float().mean(1)           # STFT in float32 even under autocast
        spec = torch.stft(mono, self.config.n_fft, self.config.mel_hop, window=self.window,
                          return_complex=True).abs().pow(2)
        return torch.log(self.mel @ spec + 1e-5)

    def embed_audio(self, audio):
        """Unit-norm audio embedding: log-mel -> patches -> transformer -> mean. (B, D)
        Not the paper's (CLAP audio tower): HTSAT with feature fusion there (31 M); the diffusion
        model reads only the text tower, so a small transformer that trains on a CPU serves."""
        h = self.patchify(self.log_mel(audio)).transpose(1, 2)     # (B, S, A)
        h = h + sinusoids(h.shape[1], h.shape[2]).to(h)
        for layer in self.audio_layers:
            h = layer(h)
        return F.normalize(self.audio_proj(self.audio_norm(h).mean(1)), dim=-1)

    def loss(self, text_emb, audio_emb):
        """Symmetric InfoNCE: caption i should pick clip i and vice versa. text_emb, audio_emb
        (B, D), unit rows; logits = min(exp(logit_scale), 100) T A^T (B, B) -> the mean of the row-
        and column-wise F.cross_entropy (stable in float32): 0-d, with gradient to logit_scale."""
        logits = self.logit_scale.exp().clamp(max=100) * text_emb @ audio_emb.T   # (B, B)
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# -------------------------------------------------------------------------------------------------
# §3.2 Timing conditioning: seconds_start (where the window begins in the source file) and
# seconds_total (the file's length) each index a learned per-second embedding, 0..512 s, and join
# the text features as two extra cross-attention tokens (the paper: 77 + 2 = 79 x 768). Asking for
# seconds_total = 30 in a 95 s window makes the model end the content at 30 s, then silence.
class TimingEmbedding(nn.Module):
    def __init__(self, config: TimingConfig, features):
        super().__init__()
        self.max_seconds = config.max_seconds
        self.start = nn.Embedding(config.max_seconds + 1, features)
        self.total = nn.Embedding(config.max_seconds + 1, features)
        # Released: N(0, 1) rows. Not the paper's (initialisation), `tiny` only: sinusoids of the
        # second: neighbouring seconds start close, so what a short run learns at 20 s holds at 21.
        if config.sinusoid_init:
            for table in (self.start, self.total):
                table.weight.data.copy_(sinusoids(config.max_seconds + 1, features))

    def forward(self, seconds_start, seconds_total):
        """seconds_start, seconds_total (B,) tensors, float or int -> two tokens (B, 2, C), start's
        then total's, each from its own table; whole seconds (fractions dropped, as .long()),
        clamped to 0..max_seconds."""
        index = lambda s: s.long().clamp(0, self.max_seconds)
        return torch.stack([self.start(index(seconds_start)), self.total(index(seconds_total))], 1)


# -------------------------------------------------------------------------------------------------
# §3.3 The U-Net (after Mousai / audio-diffusion-pytorch), 906.7 M parameters, predicting v (§4.4).
# UNetConfig.widths, the released 256 x (4, 4, 4, 5, 5): to_in's 1024, then each level's output,
# 1024, 1024, 1280, 1280, at downsampling 1, 2, 2, 4 (the paper's "1024, 1024, 1024, 1280" are the
# levels' inputs), then a 1280 bottleneck. A level: 2 residual blocks (FiLM brings t), then 1, 3, 3,
# 3 transformer blocks (self-, cross-attention to text + timing, feed-forward; 16 heads), 3 in the
# bottleneck. No positional encoding: the timing tokens and zero padding mark the end.
def content_mask(content_frames, L, device):
    """content_frames (B,) -> (B, L) bool, True at each row's first content_frames[b] latent frames
    (the released data pipeline's padding mask). Not the paper's (padding mask channel), `tiny`
    only (UNetConfig.padding_mask), all of it here and in the two lines that call this: CPU-sized
    models never learned from the timing tokens alone where content ends, so the mask is one more
    U-Net input (as Stable Audio Open feeds its inpainting mask); and in guided_v frames past the
    end take v_c: both branches see the mask and agree on silence there, and guidance would only
    multiply their disagreement (the paper's unconditional branch knows no timing)."""
    return torch.arange(L, device=device) < content_frames.to(device)[:, None]


class NoiseLevelEmbedding(nn.Module):
    """t in [0, 1] (§4.4 noise level) -> [t, sin 2pi w t, cos 2pi w t], learned w ~ N(0, 1)."""
    def __init__(self, features, frequencies=128):
        super().__init__()
        self.w = nn.Parameter(torch.randn(frequencies))
        self.linear = nn.Sequential(nn.Linear(2 * frequencies + 1, features), nn.GELU())

    def forward(self, t):
        t = t.float()[:, None]                                     # angles in float32
        angles = 2 * math.pi * t * self.w.float()
        features = torch.cat([t, angles.sin(), angles.cos()], dim=-1)
        return self.linear(features.to(self.linear[0].weight.dtype))   # (B, M)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, statistics from var_mean on a GPU (same function): PyTorch's CUDA kernel gives
    each (sample, group) one thread block, B x 16 blocks idling most of a large GPU on these long
    sequences; var_mean spreads the work. On CPUs the fused kernel is faster."""
    def forward(self, x):
        return self.spread(x) if x.is_cuda else super().forward(x)

    def spread(self, x):
        (B, C, _), G = x.shape, self.num_groups
        var, mean = torch.var_mean(x.reshape(B, G, -1), dim=-1, keepdim=True, correction=0)
        a = torch.rsqrt(var + self.eps) * self.weight.view(G, C // G)    # (B, G, C / G)
        b = self.bias.view(G, C // G) - mean * a
        return torch.addcmul(b.reshape(B, C, 1), x, a.reshape(B, C, 1))   # x a + b per channel


class Checkpointed(nn.Module):
    """A block whose `_forward` UNet.set_checkpointing can have recomputed in the backward pass."""
    checkpoint = False

    def forward(self, *args):
        if self.checkpoint and self.training:
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class ResnetBlock(Checkpointed):
    """GroupNorm -> SiLU -> conv, then GroupNorm -> FiLM(t) -> SiLU -> conv, plus a skip."""
    def __init__(self, c_in, c_out, mapping_features, groups):
        super().__init__()
        self.block1 = nn.Sequential(GroupNorm(groups, c_in), nn.SiLU(),
                                    nn.Conv1d(c_in, c_out, 3, padding=1))
        self.to_film = nn.Sequential(nn.SiLU(), nn.Linear(mapping_features, 2 * c_out))
        self.norm2 = GroupNorm(groups, c_out)
        self.block2 = nn.Sequential(nn.SiLU(), nn.Conv1d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def _forward(self, x, mapping):
        h = self.block1(x)                                           # (B, C_out, L)
        scale, shift = self.to_film(mapping)[..., None].chunk(2, dim=1)   # (B, C_out, 1) each
        h = self.block2(self.norm2(h) * (scale + 1) + shift)
        return h + self.skip(x)


class TransformerBlock(Checkpointed):
    def __init__(self, features, heads, context_features, multiplier=4):
        super().__init__()
        self.self_attn = Attention(features, heads)
        self.cross_attn = Attention(features, heads, context_features)
        # The released block has no norm before its feed-forward; we keep that.
        self.ff = nn.Sequential(nn.Linear(features, multiplier * features), nn.GELU(),
                                nn.Linear(multiplier * features, features))

    def _forward(self, x, context, mask):
        x = x + self.self_attn(x)
        x = x + self.cross_attn(x, context, mask)
        return x + self.ff(x)


class Transformer1d(nn.Module):
    """GroupNorm -> 1x1 conv -> transformer blocks over the L frames -> 1x1 conv."""
    def __init__(self, features, blocks, config: UNetConfig, context_features):
        super().__init__()
        self.to_in = nn.Sequential(GroupNorm(32, features, eps=1e-6), nn.Conv1d(features, features, 1))
        self.blocks = nn.ModuleList(TransformerBlock(features, config.heads, context_features,
                                                     config.ff_multiplier) for _ in range(blocks))
        self.to_out = nn.Conv1d(features, features, 1)

    def forward(self, x, context, mask):
        h = self.to_in(x).transpose(1, 2)                            # (B, L, C)
        for block in self.blocks:
            h = block(h, context, mask)
        return self.to_out(h.transpose(1, 2))                        # (B, C, L)


class DownLevel(nn.Module):
    """Strided conv (kernel 2f + 1), residual blocks, transformer (if any); each output a skip."""
    def __init__(self, c_in, c_out, factor, attentions, config: UNetConfig, context_features):
        super().__init__()
        # Kernel 2f + 1, stride f: f + 1 zeros of padding keep L / f frames, ceil((f + 1) / 2)
        # of them on the left as released (format 1 padded f on each side: upgrade_format_1).
        self.pad = (factor, factor) if config.symmetric_downsample else (
            (factor + 2) // 2, (factor + 1) // 2)
        self.downsample = nn.Conv1d(c_in, c_out, 2 * factor + 1, stride=factor)
        self.resnets = nn.ModuleList(ResnetBlock(c_out, c_out, config.mapping_features,
                                                 config.resnet_groups)
                                     for _ in range(config.resnet_blocks))
        self.transformer = (Transformer1d(c_out, attentions, config, context_features)
                            if attentions else None)

    def forward(self, x, mapping, context, mask, skips):
        x = self.downsample(F.pad(x, self.pad))                      # (B, C_out, L / f)
        for resnet in self.resnets:
            x = resnet(x, mapping)
            skips.append(x)
        if self.transformer is not None:
            x = self.transformer(x, context, mask)
        skips.append(x)
        return x


class UpLevel(nn.Module):
    """Residual blocks on [x, skip / sqrt 2], transformer, then upsampling to the next width."""
    def __init__(self, c_in, c_out, factor, attentions, config: UNetConfig, context_features):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(2 * c_in, c_in, config.mapping_features,
                                                 config.resnet_groups)
                                     for _ in range(config.resnet_blocks + 1))
        self.transformer = (Transformer1d(c_in, attentions, config, context_features)
                            if attentions else None)
        self.upsample = (nn.Conv1d(c_in, c_out, 3, padding=1) if factor == 1 else
                         nn.ConvTranspose1d(c_in, c_out, 2 * factor, stride=factor,
                                            padding=factor // 2))

    def forward(self, x, mapping, context, mask, skips):
        for resnet in self.resnets:
            x = resnet(torch.cat([x, skips.pop() * 2 ** -0.5], dim=1), mapping)   # (B, C, L)
        if self.transformer is not None:
            x = self.transformer(x, context, mask)
        return self.upsample(x)                                      # (B, C_out, L * f)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig, io_channels, context_features, context_len):
        super().__init__()
        ch, M = config.widths, config.mapping_features
        self.downsampling = math.prod(config.factors)
        self.to_time = NoiseLevelEmbedding(M, config.time_frequencies)
        self.to_mapping = nn.Sequential(nn.Linear(M, M), nn.GELU(), nn.Linear(M, M), nn.GELU())
        # §3.4, §4.4: the learned "null" context that replaces text and timing for guidance.
        self.null_context = nn.Parameter(torch.randn(context_len, context_features))
        self.padding_mask = config.padding_mask
        self.to_in = ResnetBlock(io_channels + config.padding_mask, ch[0], M, groups=1)
        levels = range(len(config.factors))
        self.down = nn.ModuleList(DownLevel(ch[i], ch[i + 1], config.factors[i],
                                            config.attentions[i], config, context_features)
                                  for i in levels)
        self.mid1 = ResnetBlock(ch[-1], ch[-1], M, config.resnet_groups)
        self.mid_transformer = Transformer1d(ch[-1], config.attentions[-1], config,
                                             context_features)
        self.mid2 = ResnetBlock(ch[-1], ch[-1], M, config.resnet_groups)
        self.up = nn.ModuleList(UpLevel(ch[i + 1], ch[i], config.factors[i], config.attentions[i],
                                        config, context_features) for i in reversed(levels))
        self.to_out = ResnetBlock(ch[0], io_channels, M, groups=1)
        # Released: its wrapper (UNetCFG1DWrapper) halves every initial parameter; paper: silent.
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(0.5)

    def set_checkpointing(self, on):
        """Gradient checkpointing of every Checkpointed block: less memory, a third more time."""
        for m in self.modules():
            if isinstance(m, Checkpointed):
                m.checkpoint = on

    def forward(self, x, t, context, mask, content_frames=None):
        """v-prediction: x (B, 64, L), t (B,), context (B, S, 768), mask (B, S) -> (B, 64, L), L a
        multiple of self.downsampling; content_frames (B,): padding_mask only (None: all)."""
        mapping = self.to_mapping(self.to_time(t))                   # (B, M)
        if self.padding_mask:                         # Not the paper's, `tiny` only: content_mask
            frames = content_frames if content_frames is not None else torch.full(
                (len(x),), x.shape[-1])                              # None: every frame
            inside = content_mask(frames, x.shape[-1], x.device)[:, None].to(x.dtype)  # (B, 1, L)
            x = torch.cat([x, inside], dim=1)                        # (B, 64 + 1, L)
        x = self.to_in(x, mapping)                                   # (B, 1024, L)
        outer, skips = x, []   # outer (released): a long skip past all levels, for full-rate detail
        for level in self.down:
            x = level(x, mapping, context, mask, skips)              # (B, 1280, L / 16) at end
        x = self.mid2(self.mid_transformer(self.mid1(x, mapping), context, mask), mapping)
        for level in self.up:
            x = level(x, mapping, context, mask, skips)              # (B, 1024, L) at end
        return self.to_out(x + outer, mapping)                       # (B, 64, L)


class StableAudio(nn.Module):
    """The three parts of the paper in one module: `.vae`, `.clap` (+ `.timing`), `.unet`."""
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vae = VAE(config.vae)
        self.clap = CLAP(config.clap, config.sample_rate)
        self.timing = TimingEmbedding(config.timing, config.clap.text_width)
        self.unet = UNet(config.unet, config.vae.latent_dim, config.clap.text_width,
                         config.context_len)
        self.latent_frames = config.window // self.vae.hop                # L of the whole window

    def content_frames(self, seconds_start, seconds_total):
        """Seconds (B,) -> latent frames (B,) before the silence; L or more: the whole window."""
        seconds = torch.as_tensor(seconds_total) - torch.as_tensor(seconds_start)
        return (seconds.double() * self.config.sample_rate / self.vae.hop).ceil().long()

    def condition(self, prompts, seconds_start, seconds_total):
        """Prompts and seconds (B,) -> context (B, S + 2, C) and mask (B, S + 2). prompts: list of B
        str; seconds_start, seconds_total: Python lists of ints (as generate passes) or tensors.
        context: the text features (S = clap.text_len, C = clap.text_width), then the start and
        total tokens in the text's dtype; mask bool: the tokenizer's (True = a real token), then
        True, True. With config.timing.enabled False: the text features and mask alone."""
        tokens, mask = self.clap.tokenize(prompts)
        text = self.clap.text_features(tokens, mask)                 # (B, S, C)
        if not self.config.timing.enabled:                              # the ablation: text only
            return text, mask
        timing = self.timing(torch.as_tensor(seconds_start, device=text.device),
                             torch.as_tensor(seconds_total, device=text.device))   # (B, 2, C)
        ones = torch.ones(len(prompts), 2, dtype=torch.bool, device=text.device)
        return torch.cat([text, timing.to(text.dtype)], 1), torch.cat([mask, ones], 1)


def build_model(size="full"):
    """The whole model for a size name in SIZES or a ModelConfig."""
    if isinstance(size, str) and size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    config = copy.deepcopy(SIZES[size] if isinstance(size, str) else size)
    if not (isinstance(config.latent_scale, (int, float)) and 0 < config.latent_scale < math.inf):
        raise ValueError(f"latent_scale must be a positive number, got {config.latent_scale!r}")
    hop, down = math.prod(config.vae.strides), math.prod(config.unet.factors)
    if config.window % (hop * down):
        raise ValueError(f"window {config.window} samples is not a multiple of {hop * down} "
                         f"(VAE hop {hop} x U-Net downsampling {down}); pick a window that is")
    return StableAudio(config)


# -------------------------------------------------------------------------------------------------
# §4.4 Diffusion objective: t ~ U[0, 1], cosine schedule (alpha, sigma) = (cos, sin)(pi t / 2),
# z_t = alpha z + sigma eps; the network predicts v = alpha eps - sigma z (mean squared error).
# 10 % of samples see the null context, teaching the unconditional model guidance needs; the
# schedule assumes unit-variance latents, as released (see latent_scale).
def alpha_sigma(t):
    """(alpha, sigma) = (cos, sin)(pi t / 2): t a tensor, any shape -> two tensors of t's shape."""
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)


def randn(shape, generator, like):
    """Gaussian noise from an explicit (CPU) generator, so a seed gives the same noise anywhere."""
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


def diffusion_loss(unet, z, context, mask, generator, cond_dropout=0.1, content_frames=None):
    """v-objective loss for clean latents z (B, 64, L); context (B, S, C), mask (B, S) bool as
    StableAudio.condition gives; content_frames as in UNet.forward. t (B,), eps (B, 64, L) and the
    dropout all come from `generator` (randn), never the global RNG. With probability cond_dropout
    a sample's context becomes unet.null_context (S, C), its mask all True (not in place).
    -> the float32 mean squared error of unet(z_t, t, context, mask, content_frames) against v.
    Not the paper's (noise levels in training): t ~ U[0, 1]; released: scrambled Sobol, 1 % at 1."""
    B = z.shape[0]
    t = torch.rand(B, generator=generator).to(z.device)
    eps = randn(z.shape, generator, z)
    alpha, sigma = (a[:, None, None].to(z.dtype) for a in alpha_sigma(t))
    z_t = alpha * z + sigma * eps
    v = alpha * eps - sigma * z
    drop = (torch.rand(B, generator=generator) < cond_dropout).to(z.device)
    context = torch.where(drop[:, None, None], unet.null_context.to(context.dtype), context)
    mask = mask | drop[:, None]              # the null context is attended in full
    return F.mse_loss(unet(z_t, t, context, mask, content_frames).float(), v.float())


# -------------------------------------------------------------------------------------------------
# §3.4 Sampling. Samplers see a variance-exploding denoiser: x = x0 + sigma eps, D(x, sigma) ~ x0;
# a v-model, (alpha, sigma) = (cos, sin), maps onto it: sigma_VE = sigma / alpha, x_VE = z / alpha.
# Guidance (scale 6) mixes conditional and unconditional v in one batched forward.
def get_sigmas(steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX):
    """`steps` noise levels spaced evenly in log sigma, then a final 0: a float64 tensor
    (steps + 1,), descending from sigma_max to sigma_min (both included), last 0."""
    sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).double()


def guided_v(unet, context, mask, uncond, uncond_mask, scale, rescale=CFG_RESCALE,
             content_frames=None):
    """Classifier-free guidance v = v_u + scale (v_c - v_u), then Lin et al.'s CFG rescale (phi =
    `rescale`), pulling each frame's std over channels (dim 1) toward v_c's lest large scales blow
    up: v <- phi v std(v_c) / std(v) + (1 - phi) v. context, mask; uncond, uncond_mask: (B, S, C),
    (B, S) as StableAudio.condition gives. -> v_fn(z, t): z (B, 64, L), t (B,), a noise level per
    row -> v (B, 64, L), one U-Net call on 2B rows (conditional first); at scale 1 the conditional
    one alone on B rows. content_frames (B,): `tiny` only, past them v_c alone (content_mask)."""
    if scale == 1:
        return lambda z, t: unet(z, t, context, mask, content_frames)
    pair, pair_mask = torch.cat([context, uncond]), torch.cat([mask, uncond_mask])
    pair_frames = None if content_frames is None else torch.cat([content_frames, content_frames])

    def v_fn(z, t):
        v_c, v_u = unet(torch.cat([z, z]), torch.cat([t, t]), pair, pair_mask, pair_frames).chunk(2)
        v = v_u + scale * (v_c - v_u)
        v_rescaled = v * (v_c.std(dim=1, keepdim=True) / v.std(dim=1, keepdim=True))  # Lin et al.
        v = rescale * v_rescaled + (1 - rescale) * v
        if content_frames is None:
            return v                                                 # (B, 64, L)
        return torch.where(content_mask(content_frames, z.shape[-1], z.device)[:, None], v, v_c)
    return v_fn


def v_to_denoiser(v_fn):
    """Wrap a v-model v_fn(z, t) as a VE denoiser(x, sigma) -> x0 = alpha_t z - sigma_t v (B, C, L),
    for x (B, C, L), sigma a Python float: v_fn gets z = alpha_t x, t (B,) on x's device, each row
    (2 / pi) atan(sigma): (alpha_t, sigma_t) = (cos, sin)(pi t / 2), sigma_t / alpha_t = sigma."""
    def denoiser(x, sigma):
        alpha_t, sigma_t = 1 / math.sqrt(1 + sigma ** 2), sigma / math.sqrt(1 + sigma ** 2)
        t = torch.full((x.shape[0],), 2 / math.pi * math.atan(sigma), device=x.device)
        z = alpha_t * x                                              # back to the VP latent
        return alpha_t * z - sigma_t * v_fn(z, t)                    # x0 = alpha z - sigma v
    return denoiser


def dpmpp_multistep(denoiser, x, sigmas, step, callback=None):
    """The loop the samplers share, in lam = -log sigma (DPM-Solver++, Lu et al. 2022). The
    probability-flow ODE dx/dlam = D(x, lam) - x integrates exactly over a step of size h to
        x_{i+1} = e^{-h} x_i + int_0^h e^{-(h - tau)} D(lam_i + tau) dtau,
    and a sampler's `step(x, denoised, lam, h, history)` approximates it from D_i and past (lam, D)
    pairs, newest last. The step to sigma = 0 (h = inf) returns D_i: first order, as Lu et al."""
    sigmas, history = sigmas.tolist(), []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam, h = -math.log(sigmas[i]), math.log(sigmas[i] / sigmas[i + 1])
            x = step(x, denoised, lam, h, history)
            history = history[-1:] + [(lam, denoised)]               # 3M needs two past values
        if callback is not None:
            callback(i, len(sigmas) - 1)
    return x


def ddim_step(x, denoised, h):
    """D held at D_i over the step: x_{i+1} = e^{-h} x_i + (1 - e^{-h}) D_i (first order)."""
    return math.exp(-h) * x - math.expm1(-h) * denoised


def dpm_derivatives(history, lam, denoised):
    """p'(lam) and p'' of the polynomial through history + (lam, denoised); 0 where too short.
    history: a list of (lam, D) pairs (float, tensor of denoised's shape), newest last; lam a
    float. No history: (0, 0); one pair: (p', 0), the line's slope; two or more: the last two
    and (lam, denoised) fix a quadratic, p'(lam) and p'' both tensors of denoised's shape."""
    if not history:
        return 0, 0
    lam_1, D_1 = history[-1]
    h_1 = lam - lam_1
    d1_0 = (denoised - D_1) / h_1                                    # divided difference
    if len(history) == 1:
        return d1_0, 0
    lam_2, D_2 = history[-2]
    h_2 = lam_1 - lam_2
    f = (d1_0 - (D_1 - D_2) / h_2) / (h_1 + h_2)                     # second divided difference
    return d1_0 + h_1 * f, 2 * f


def sample_dpmpp_2m(denoiser, x, sigmas, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): D held at the step's midpoint value, extrapolated
    through D_{i-1}, D_i: D(lam_i + h/2) ~ D_i + (h/2) (D_i - D_{i-1}) / h_{i-1}; r = h_{i-1} / h:
        x_{i+1} = e^{-h} x_i + (1 - e^{-h}) [(1 + 1/(2r)) D_i - 1/(2r) D_{i-1}].
    Off by O(h^3) per step, the error falls as h^2; the first step (no D_{i-1}) is first order.
    denoiser(x, sigma float) -> x0 estimate; x (B, C, L) noised at sigmas[0]; sigmas as get_sigmas
    gives; callback(i, steps) after each step. The step to sigma = 0 returns D_i. -> x (B, C, L)"""
    def step(x, denoised, lam, h, history):
        if not history:
            return ddim_step(x, denoised, h)
        lam_1, D_1 = history[-1]
        r = (lam - lam_1) / h
        return ddim_step(x, (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * D_1, h)
    return dpmpp_multistep(denoiser, x, sigmas, step, callback)


def sample_dpmpp_3m(denoiser, x, sigmas, callback=None):
    """DPM-Solver++(3M): D replaced by the quadratic p through the last three denoised values.
    With p = D_i + tau p' + tau^2/2 p'' the integral is exact:
        x_{i+1} = e^{-h} x_i + I0 D_i + I1 p' + I2 p'',
        I0 = 1 - e^{-h},  I1 = h - I0,  I2 = h^2/2 - I1   (e^{-(h - tau)} against 1, tau, tau^2/2),
    and the error falls as h^3 (k-diffusion and diffusers weight p'' by I2 / 2: order 2). Order 3
    fixes the weights only up to O(h^4): tapering the p'' weight by 1 / (1 + h) keeps the order and
    stops the quadratic overshooting on a short schedule's long steps, where D settles onto x0
    (h ~ 1-2 at 10 steps; docs/samplers.md). Step 1 runs at order 1 (no history), step 2 at order 2
    (one past value, p'' = 0), from step 3 order 3; to sigma = 0 it returns D_i. Arguments: as 2M.
    Not the paper's (sampler): the paper names no variant; released: 2M SDE; this 3M ODE is ours."""
    def step(x, denoised, lam, h, history):
        I0 = -math.expm1(-h)
        I1 = h - I0
        I2 = h * h / 2 - I1
        d1, d2 = dpm_derivatives(history, lam, denoised)
        return math.exp(-h) * x + I0 * denoised + I1 * d1 + I2 / (1 + h) * d2
    return dpmpp_multistep(denoiser, x, sigmas, step, callback)


def sample_euler(denoiser, x, sigmas, callback=None):
    """Euler on dx/dsigma = (x - D) / sigma: the DDIM step, e^{-h} = sigma_{i+1} / sigma_i."""
    return dpmpp_multistep(denoiser, x, sigmas, lambda x, D, lam, h, history: ddim_step(x, D, h),
                           callback)


SAMPLERS = {"dpmpp-2m": sample_dpmpp_2m, "dpmpp-3m": sample_dpmpp_3m, "euler": sample_euler}


# -------------------------------------------------------------------------------------------------
# §3.4 generate: prompts + requested seconds -> stereo audio. The latent always spans the whole
# window; the timing tokens tell the model where to stop, and the silent tail is trimmed.
@torch.inference_mode()
def generate(model, prompts, seconds_total, seconds_start=0, steps=100, cfg_scale=CFG_SCALE,
             cfg_rescale=CFG_RESCALE, negative_prompt=None, seed=0, sampler="dpmpp-3m",
             sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, init_audio=None, init_strength=1.0,
             inpaint=None, trim=True, decode_chunk=None, dtype=torch.float32, callback=None,
             laps=None, latents=False):
    """Audio (B, 2, N), N = min(seconds_total - seconds_start, window) * sample_rate. Arguments:
        model: a StableAudio, as build_model or load_checkpoint gives
        prompts: a list of B strings
        seconds_total: the whole piece's length in seconds (§3.2), at most timing.max_seconds, 512
        seconds_start: where the clip begins within that piece, in seconds
        steps: sampler steps, the paper's 100
        cfg_scale: the guidance scale, the paper's 6
        cfg_rescale: guided_v's phi, the released 0.4 (0: plain guidance)
        negative_prompt: a prompt to guide away from, in place of the null context
        seed: sample i of the batch starts from the noise of seed + i
        sampler: a name in SAMPLERS
        sigma_min, sigma_max: the schedule's ends (get_sigmas)
        init_audio: (2, N) or (B, 2, N) at the model's rate: start from it, not from noise
        init_strength: in (0, 1], how much of the schedule runs from init_audio (1: all of it)
        inpaint: (start, end) in seconds: regenerate that gap of init_audio only
        trim: cut to the content; False: the whole window
        decode_chunk: latent frames per decoder pass (None: default_decode_chunk)
        dtype: bf16/fp16: autocast, or a U-Net cast to it runs as is
        callback: callback(i, steps) after each sampler step
        laps: a dict that receives the seconds of "text", "sampling", "decoding"
        latents: True: return z (B, 64, L) as sampled (x latent_scale), not decoded"""
    config, device = model.config, next(model.parameters()).device
    check_request(config, seconds_total, seconds_start, cfg_rescale, decode_chunk, init_audio,
                  init_strength, inpaint)
    # Training sees whole seconds: start rounded down, total rounded up (sound_world.crop_or_pad).
    B = len(prompts)
    start, total = [math.floor(seconds_start)] * B, [math.ceil(seconds_total)] * B
    clock = Stopwatch(device, laps)
    with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
        # 1. Condition on the text and the two timing tokens; guidance's other branch.
        context, mask = model.condition(prompts, start, total)
        uncond, uncond_mask = unconditional(model, context, negative_prompt, start, total)
        clock.lap("text")
        content_frames = (model.content_frames(start, total).to(device)   # `tiny`: the padding
                          if config.unet.padding_mask else None)           # mask (content_mask)
        denoiser = v_to_denoiser(guided_v(unet_at_its_precision(model, device), context, mask,
                                          uncond, uncond_mask, cfg_scale, cfg_rescale,
                                          content_frames))
        # 2. The initial latent: the seeds' noise at the first sigma, or the init audio noised.
        sigmas = init_sigmas(steps, init_strength, sigma_min, sigma_max)
        x = sigmas[0].item() * seeded_noise(model, seed, B, device)
        if init_audio is not None:
            x, denoiser = from_init_audio(model, x, denoiser, init_audio, init_strength, inpaint)
        # 3. Solve the probability-flow ODE down the schedule.
        z = SAMPLERS[sampler](denoiser, x, sigmas, callback)
    clock.lap("sampling")
    check_finite(z, "latent")
    if latents:
        return z
    # 4. Decode. Not the paper's (output length): trimmed to the content, from seconds_start to
    # seconds_total at most (the paper trims silence for presentation only).
    content = min(seconds_total - seconds_start, config.window / config.sample_rate)
    audio = decode_content(model, z, round(content * config.sample_rate) if trim else config.window,
                           decode_chunk)
    check_finite(audio, "audio")                                     # decoded in float32
    clock.lap("decoding")
    return audio


def check_request(config, seconds_total, seconds_start, cfg_rescale, decode_chunk, init_audio,
                  init_strength, inpaint):
    """generate's argument checks, each a ValueError that says what to pass instead."""
    window_seconds = config.window / config.sample_rate
    if not 0 < seconds_total <= config.timing.max_seconds:
        raise ValueError(f"seconds_total must be in (0, {config.timing.max_seconds}], the timing "
                         f"embedding's range, got {seconds_total}; it is the whole piece's length")
    if not 0 <= seconds_start < seconds_total:
        raise ValueError(f"seconds_start must be in [0, seconds_total = {seconds_total}), got "
                         f"{seconds_start}; it is where the clip begins within the piece")
    if not 0 <= cfg_rescale <= 1:
        raise ValueError(f"cfg_rescale must be in [0, 1] (0: no rescale), got {cfg_rescale}")
    if decode_chunk is not None and decode_chunk <= DECODE_OVERLAP:
        raise ValueError(f"decode_chunk must be more than {DECODE_OVERLAP} latent frames")
    if not 0 < init_strength <= 1:
        raise ValueError(f"init_strength must be in (0, 1], got {init_strength}")
    if (init_strength < 1 or inpaint is not None) and init_audio is None:
        raise ValueError("init_strength < 1 and inpaint need init_audio")
    if init_audio is not None and init_audio.shape[-1] > config.window:
        raise ValueError(f"init_audio is longer than the model's window of {window_seconds:.1f} s")


def unconditional(model, context, negative_prompt, start, total):
    """Guidance's other branch (§3.4): the null context or a negative prompt's, same timing.
    Not the paper's (null context under guidance): fully attended, as it has no padding."""
    if negative_prompt is None:
        null = model.unet.null_context.expand_as(context).to(context.dtype)
        return null, torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    return model.condition([negative_prompt] * len(start), start, total)


def unet_at_its_precision(model, device):
    """The U-Net as a function. Weights already cast to half precision (model.unet.to(dtype))
    run as they are: autocast would keep every norm, and the casts around it, in float32."""
    half = model.unet.null_context.dtype
    if half == torch.float32:
        return model.unet

    def unet(z, t, context, mask, content_frames):
        with torch.autocast(device.type, enabled=False):
            return model.unet(z.to(half), t, context.to(half), mask, content_frames).float()
    return unet


def init_sigmas(steps, strength, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX):
    """The tail of the `steps`-step schedule run from init audio: all of it at strength 1."""
    return get_sigmas(steps, sigma_min, sigma_max)[round((1 - strength) * steps):]


def seeded_noise(model, seed, B, device):
    """Sample i of a batch starts from the noise of seed + i, so any one file can be remade."""
    shape = (model.config.vae.latent_dim, model.latent_frames)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
                        for i in range(B)]).to(device)                       # (B, 64, L)


def from_init_audio(model, x, denoiser, init_audio, init_strength, inpaint):
    """Variations and inpainting (§3.4 in the VE form): a clip noised to the schedule's first
    sigma is x = z0 + sigma eps. At strength 1 only the kept part of an inpainting starts there."""
    config, L = model.config, model.latent_frames
    audio = init_audio.to(x.device, torch.float32).expand(len(x), config.vae.channels, -1)
    z0 = model.vae.encode(F.pad(audio, (0, config.window - audio.shape[-1])))[0]
    z0 = z0 * config.latent_scale                                            # (B, 64, L)
    keep = (torch.zeros(L) if inpaint is None else                    # keep-mask (L,)
            inpaint_mask(L, inpaint, config.sample_rate / model.vae.hop)).to(x.device)
    x = x + (z0 if init_strength < 1 else keep * z0)
    if inpaint is None:
        return x, denoiser
    # Holding the denoised estimate at z0 where the input is kept makes every solver step map
    # z0 + sigma eps to z0 + sigma_next eps there, so the kept region ends as z0.
    return x, lambda x, sigma: keep * z0 + (1 - keep) * denoiser(x, sigma)


def inpaint_mask(frames, gap, frame_rate, ramp=4):
    """Inpainting's keep-mask (L,): 1 where the input latent is kept, 0 in the gap (start, end) s,
    a linear ramp over the gap's first and last `ramp` frames so the seams blend, not click."""
    a, b = math.floor(gap[0] * frame_rate), min(frames, math.ceil(gap[1] * frame_rate))
    f = torch.arange(frames)
    depth = torch.minimum(f - a + 1, b - f).clamp(min=0)           # frames into the gap
    return (1 - depth / (ramp + 1)).clamp(min=0)


def decode_content(model, z, N, decode_chunk):
    """Latent -> the first N audio samples. Not the paper's (decoding): in overlapping chunks
    (VAE.decode); released: one pass. Only kept frames (+ DECODE_OVERLAP) are decoded; past the
    window the last frame repeats, keeping the decoder's right-edge tick outside."""
    z = F.pad(z.float() / model.config.latent_scale, (0, DECODE_OVERLAP), mode="replicate")
    z = z[..., :math.ceil(N / model.vae.hop) + DECODE_OVERLAP]
    return model.vae.decode(z, chunk=decode_chunk or default_decode_chunk(z.device))[..., :N]


def default_decode_chunk(device):
    """Latent frames per decode chunk: 128 keep a CPU's memory low; a GPU is faster with 512."""
    return 128 if device.type == "cpu" else 512


# -------------------------------------------------------------------------------------------------
# Checkpoints: plain tensors and values, loaded with weights_only=True: a stranger's runs no code.
def save_checkpoint(path, model, **extra):
    """Atomically write {format, size, config, model, **extra} (ema, optimizer, step...); an "ema"
    entry may cover only what a stage trained: loading puts it over "model"."""
    atomic_save({"format": CHECKPOINT_FORMAT, "size": model.config.size,
                 "config": asdict(model.config), "model": model.state_dict(), **extra}, path)


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: an interrupted save never leaves a broken file."""
    tmp = f"{path}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:                                     # a full disk or Ctrl-C: leave no half file
        if os.path.exists(tmp):
            os.remove(tmp)


def upgrade_format_1(ckpt):
    """Format 1 -> 2, same function: self-attention's shared query/key-value LayerNorm becomes two
    equal ones; its f zeros on each side (factor 4 shifts a sample) stay: symmetric_downsample."""
    split = lambda w: {**w, **{k.replace(".norm.", ".norm_context."): v for k, v in w.items()
                               if ".self_attn.norm." in k or ".attn.norm." in k}}
    config = {**ckpt["config"], "unet": {**ckpt["config"]["unet"], "symmetric_downsample": True}}
    return {**ckpt, "format": CHECKPOINT_FORMAT, "upgraded_from": FORMAT_1, "config": config,
            **{k: split(ckpt[k]) for k in ("model", "ema") if ckpt.get(k)}}


def load_checkpoint(path, size=None, ema=True, device="cpu"):
    """Rebuild the model a checkpoint describes -> (model, checkpoint dict), EMA weights if any."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found; train one with train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is damaged or not a checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT_1:
        ckpt = upgrade_format_1(ckpt)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint written by train.py")
    if not all(isinstance(ckpt.get(k), dict) for k in ("config", "model")):
        raise ValueError(f"checkpoint {path} lacks its config or its weights; it is damaged")
    if size is not None and ckpt.get("size") != size:
        raise ValueError(f"checkpoint {path} is size {ckpt.get('size')!r}, not {size!r}; "
                         f"use a {size} checkpoint or --size {ckpt.get('size')}")
    try:
        config = ModelConfig.from_dict(ckpt["config"])
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"checkpoint {path} has a config this code cannot build: {e}") from None
    weights = {**ckpt["model"], **(ckpt.get("ema") or {} if ema else {})}
    model = build_checked(config, lambda m: [(m, weights, None)], f"checkpoint {path}", device)
    return model.eval(), ckpt


def check_config(config, name="config"):
    """Refuse by name a file's config whose field is not of its default's type or |n| >= 2^26."""
    for f in fields(config):
        value, where = getattr(config, f.name), f"{name}.{f.name}"
        default = f.default_factory() if f.default is MISSING else f.default
        if is_dataclass(default):
            if type(value) is not type(default):
                raise ValueError(f"{where} must be a section of fields, got {value!r}")
            check_config(value, where)
            continue
        items = value if isinstance(default, tuple) else (value,)
        kind = int if isinstance(default, tuple) else type(default)
        ok = (isinstance(value, tuple) or not isinstance(default, tuple)) and all(
            isinstance(v, (int, float) if kind is float else kind) and
            (kind is bool or not isinstance(v, bool)) for v in items)
        if not ok or not all(kind is str or abs(v) < 2 ** 26 for v in items):
            expected = f"{'a tuple of ' if isinstance(default, tuple) else 'a '}{kind.__name__}"
            raise ValueError(f"{where} is {value!r}; expected {expected} of sensible size")


SKELETONS = {}        # (build, config) -> its model on the meta device, built once per process


def build_checked(config, parts, where, device="cpu", build=build_model):
    """Build `config`'s model on the meta device (no memory), check the weights fit and its fixed
    tables are of sensible size, then build it and load them: a stranger's file is refused in one
    line before anything large is allocated. parts(model): [(module, weights, what)]."""
    key = (build, repr(config))           # the meta build costs as much as the real one: kept
    try:
        check_config(config)
        if key not in SKELETONS:
            with torch.device("meta"):
                SKELETONS[key] = build(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{where}: cannot build its config ({str(e).splitlines()[0]})") from None
    skeleton = SKELETONS[key]
    tables = sum(b.numel() * b.element_size() for b in skeleton.buffers())
    if tables > 2 ** 30:
        raise ValueError(f"{where}: its config asks for {tables / 2 ** 30:.0f} GiB of fixed "
                         f"tables (e.g. clap.n_fft); it is damaged or not meant for this code")
    for module, weights, what in parts(skeleton):
        check_weights(module.state_dict(), weights, f"{where}'s {what}" if what else where)
    with torch.device(device):                     # no slow CPU initialisation first
        model = build(config)
    for module, weights, what in parts(model):
        module.load_state_dict({k: weights[k].reshape(v.shape).to(v.dtype)
                                for k, v in module.state_dict().items()})
    return model


def named_tensors(weights):
    """Whether a file's content is a state dict: tensors under string names, nothing else."""
    return isinstance(weights, dict) and all(isinstance(k, str) and torch.is_tensor(v)
                                             for k, v in weights.items())


def check_weights(mine, weights, what):
    """Refuse weights not exactly the module's (a same-size reshape passes: SnakeBeta's (C,))."""
    if not named_tensors(weights):
        raise ValueError(f"{what} holds weights that are not a dictionary of named tensors")
    missing, unexpected = sorted(set(mine) - set(weights)), sorted(set(weights) - set(mine))
    wrong = [k for k in mine if k in weights and weights[k].numel() != mine[k].numel()]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not match its config: {len(missing)} missing "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                         f"{len(wrong)} of another shape {wrong[:3]}")


# -------------------------------------------------------------------------------------------------
# What generate reports: the seconds of each stage, and NaN/inf refused instead of written.
class Stopwatch:
    """Seconds between laps into a dict (nothing when it is None); waits for the GPU first."""
    def __init__(self, device, laps):
        self.device, self.laps, self.t = device, laps, time.perf_counter()

    def lap(self, name):
        if self.laps is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            self.laps[name], self.t = now - self.t, now


def check_finite(x, what):
    """Fail loudly instead of writing silence when low precision overflowed (NaN in fp16)."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"the generated {what} has NaN/inf values; run in float32 "
                                 f"(dtype=torch.float32 / --dtype float32) or check the checkpoint")


# -------------------------------------------------------------------------------------------------
# python stable_audio.py: a shape trace of the tiny model, with parameter counts per component.
count = lambda module: sum(p.numel() for p in module.parameters())


def main():
    with torch.device("meta"):
        full = build_model("full")
    torch.manual_seed(0)
    model, prompt = build_model("tiny").eval(), ["ambient rain"]
    for size, m in (("full", full), ("tiny", model)):
        print(f"{size} size: " + ", ".join(f"{part} {count(getattr(m, part)) / 1e6:.2f} M"
                                           for part in ("vae", "clap", "timing", "unet")))
    with torch.inference_mode():
        audio = torch.randn(1, 2, 5 * model.vae.hop * model.unet.downsampling) * 0.1
        z, (tokens, mask) = model.vae.encode(audio)[0], model.clap.tokenize(prompt)
        context, context_mask = model.condition(prompt, [0], [30])
        rows = [(f"audio ({audio.shape[-1] / model.config.sample_rate:.2f} s)", audio),
                (f"VAE.encode -> z (L = N / {model.vae.hop})", z),
                ("VAE.decode -> audio", model.vae.decode(z)),
                (f"tokenize ({int(mask.sum())} real tokens)", tokens),
                ("CLAP text features", model.clap.text_features(tokens, mask)),
                ("CLAP audio embedding", model.clap.embed_audio(audio)),
                ("context (text+timing)", context),
                ("U-Net v", model.unet(z, torch.tensor([0.5]), context, context_mask)),
                ("generate 3 s, 2 steps", generate(model, prompt, seconds_total=3, steps=2))]
    for label, x in rows:
        print(f"{label:<30} {tuple(x.shape)}")


if __name__ == "__main__":
    main()
