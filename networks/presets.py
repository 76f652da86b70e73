"""Named configurations: network width/variant plus the training hyperparameters that go with it (spec §2.1).

One table, one small record per preset. `edm2-*` are EDM2's presets (CONFIG A); `edm2plus-*` are the EDM2+ models
of the paper (CONFIG G*, e = 4; paper §3.3 and Table 3).
"""

import dataclasses

Ki, Mi, Gi = 2 ** 10, 2 ** 20, 2 ** 30

@dataclasses.dataclass(frozen=True)
class Preset:
    channels:   int                 # base width (model_channels)
    duration:   int                 # training images
    lr:         float               # reference learning rate alpha_ref
    decay:      float               # t_ref: start of the 1/sqrt decay, in batches (0 = none)
    dropout:    float = 0.0
    P_mean:     float = -0.4        # log-normal noise distribution of training (EDM2 §2.6)
    P_std:      float = 1.0
    batch:      int = 2048
    block:      str = 'A'           # block variant (networks.edm2plus.BLOCK_VARIANTS)
    expansion:  float = None        # None: the variant's default
    kernel:     int = None          # None: the variant's default
    resolution: int = 64            # network input size (ImageNet-512 runs on 64x64 latents)
    img_channels: int = 3           # 3 = RGB pixels, 4 = Stable Diffusion VAE latents
    label_dim:  int = 1000
    channel_mult: tuple = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple = (16, 8)
    rampup_Mimg: float = 10         # learning-rate warm-up, millions of images (spec §2.4)
    status:     int = None          # default status/snapshot/checkpoint intervals in images (None: EDM2's
    snapshot:   int = None          #   128Ki / 8Mi / 128Mi); train_edm2plus.py options override them
    checkpoint: int = None

_img512 = dict(resolution=64, img_channels=4, P_mean=-0.4, P_std=1.0, decay=70000)
_img64 = dict(resolution=64, img_channels=3, P_mean=-0.8, P_std=1.6, decay=35000)
_plus64 = dict(resolution=64, img_channels=3, P_mean=-0.8, P_std=1.6, decay=70000, block='G*', expansion=4)

PRESETS = {
    # EDM2, ImageNet-512 (latent), CONFIG A.
    'edm2-img512-xxs':  Preset(channels=64,  duration=2048 * Mi, lr=0.0170, **_img512),
    'edm2-img512-xs':   Preset(channels=128, duration=2048 * Mi, lr=0.0120, **_img512),
    'edm2-img512-s':    Preset(channels=192, duration=2048 * Mi, lr=0.0100, **_img512),
    'edm2-img512-m':    Preset(channels=256, duration=2048 * Mi, lr=0.0090, dropout=0.10, **_img512),
    'edm2-img512-l':    Preset(channels=320, duration=1792 * Mi, lr=0.0080, dropout=0.10, **_img512),
    'edm2-img512-xl':   Preset(channels=384, duration=1280 * Mi, lr=0.0070, dropout=0.10, **_img512),
    'edm2-img512-xxl':  Preset(channels=448, duration=896 * Mi,  lr=0.0065, dropout=0.10, **_img512),
    # EDM2, ImageNet-64 (pixels), CONFIG A.
    'edm2-img64-xs':    Preset(channels=128, duration=1024 * Mi, lr=0.0120, **_img64),
    'edm2-img64-s':     Preset(channels=192, duration=1024 * Mi, lr=0.0100, **_img64),
    'edm2-img64-m':     Preset(channels=256, duration=2048 * Mi, lr=0.0090, dropout=0.10, **_img64),
    'edm2-img64-l':     Preset(channels=320, duration=1024 * Mi, lr=0.0080, dropout=0.10, **_img64),
    'edm2-img64-xl':    Preset(channels=384, duration=640 * Mi,  lr=0.0070, dropout=0.10, **_img64),
    # EDM2+, ImageNet-64, CONFIG G* (paper §3.3: peak lr ~0.01, lower lr and more dropout for larger models,
    # decay after 70K iterations, 2048Mi or 640Mi images). XS is the natural autoguidance guide.
    'edm2plus-img64-xs': Preset(channels=128, duration=1024 * Mi, lr=0.0120, **_plus64),
    'edm2plus-img64-s':  Preset(channels=192, duration=2048 * Mi, lr=0.0100, **_plus64),
    'edm2plus-img64-l':  Preset(channels=320, duration=2048 * Mi, lr=0.0080, dropout=0.10, **_plus64),
    'edm2plus-img64-xl': Preset(channels=384, duration=640 * Mi,  lr=0.0070, dropout=0.10, **_plus64),
    # Demo: Fashion-MNIST (dataset_tool at 16x16 RGB, 10 classes) on 2 CPU cores in 15 minutes, CONFIG G*.
    # Sized by FLOPs: 0.64 M parameters, 46 MFLOP per evaluation. On 2 idle cores training runs at ~230 img/s
    # (15 minutes: ~200K images, ~6000 steps; ~90 img/s on a loaded machine) and sampling (63 evaluations per
    # image) at ~7 img/s. The time limit ends the run: the duration (1Mi) is only a cap. Small data and a short run
    # want their own schedule (spec §9 #19): batch 32 (more steps per image), a high peak lr (0.04 beat 0.02 and 0.01
    # throughout a 15-minute run) with a 125-step warm-up and 1/sqrt decay after 400 steps, and EDM's CIFAR-10 noise
    # distribution for small images.
    'demo': Preset(channels=32, duration=1 * Mi, lr=0.0400, decay=400, batch=32, P_mean=-1.2, P_std=1.2,
                   block='G*', expansion=4, resolution=16, img_channels=3, label_dim=10, channel_mult=(1, 2, 2),
                   num_blocks=1, attn_resolutions=(8,), rampup_Mimg=0.004, status=4 * Ki, snapshot=8 * Ki,
                   checkpoint=16 * Ki),
}

def get(name):
    """The preset record called `name`, or a ValueError naming the choices."""
    if name not in PRESETS:
        raise ValueError(f'Invalid configuration preset "{name}"; choose from {", ".join(PRESETS)}')
    return PRESETS[name]

def network_kwargs(preset, **overrides):
    """Keyword arguments of networks.edm2plus.Precond for a preset (name or record); None overrides are ignored."""
    p = get(preset) if isinstance(preset, str) else preset
    kwargs = dict(img_resolution=p.resolution, img_channels=p.img_channels, label_dim=p.label_dim,
                  model_channels=p.channels, channel_mult=list(p.channel_mult), num_blocks=p.num_blocks,
                  attn_resolutions=list(p.attn_resolutions), dropout=p.dropout, block=p.block,
                  expansion=p.expansion, kernel=p.kernel)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs
