"""Named configurations: network width/variant plus the training hyperparameters that go with it (EDM2 paper
Table 2 and the EDM2+ paper §3.3).

One table, one small record per preset. `edm2-*` are EDM2's presets (CONFIG A); `edm2plus-*` are the EDM2+ models
of the paper (CONFIG G*, e = 4; paper §3.3 and Table 3).

Which command reproduces which row of the EDM2+ paper's Tables 1-3 (docs/reproducing.md has the full commands):

* Tables 1 and 2 (the ablations, CONFIG A to G*): §3.3's recipe at width 192, so each row is
  `--preset=edm2plus-img64-s --block=<CONFIG>` (docs/reproducing.md explains why §3.3 rather than EDM2-S's schedule,
  which `--preset=edm2-img64-s --block=<CONFIG>` gives). Naming a variant with --block brings the paper's e, k and
  base width for it (networks.edm2plus.BLOCK_VARIANTS), e.g. --block=B trains at width 384 and --block=C with e = 6.
* Table 3, EDM2-S/M/L/XL: `--preset=edm2-img64-{s,m,l,xl}` (EDM2's own presets).
* Table 3, EDM2+-S/L/XL: `--preset=edm2plus-img64-{s,l,xl}` (the recipe of §3.3); their autoguidance row uses
  `edm2plus-img64-xs` as the guiding network.

Values of the edm2plus presets that the paper does not give, and are therefore our choice:
* per-size learning rate and dropout: §3.3 says only "peak learning rate ~0.01; larger models enjoy a moderately
  lower learning rate and higher dropout". We take EDM2's values for the same width (EDM2 paper Table 2 and its
  ImageNet-64 presets): the widths are the same, the recipe is EDM2's otherwise, and EDM2 tuned them.
* the guide (edm2plus-img64-xs): size and duration. The width 128 makes S + guide cost 73 GFLOPs, Table 3's figure;
  the duration (1024Mi images at full training; EDM2's img64 autoguidance guide is a snapshot of XS after 128Mi
  images, 0134217 kimg) is EDM2's XS preset's. Autoguidance wants a weaker guide: take an early snapshot, as EDM2 does.
* which of the two durations of §3.3 (2048Mi or 640Mi images) goes with which size: S and L get 2048Mi, XL 640Mi,
  as EDM2-XL's ImageNet-64 preset (640Mi) suggests.
"""

import dataclasses

from networks.edm2plus import BLOCK_VARIANTS

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
    rampup_Mimg: float = 10         # learning-rate warm-up, millions of images (EDM2: 10)
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
    # decay after 70K iterations, 2048Mi or 640Mi images). lr, dropout and the S/L/XL durations: our choice (EDM2's
    # values for the same width; see the module docstring). XS is the natural autoguidance guide (our choice).
    'edm2plus-img64-xs': Preset(channels=128, duration=1024 * Mi, lr=0.0120, **_plus64),
    'edm2plus-img64-s':  Preset(channels=192, duration=2048 * Mi, lr=0.0100, **_plus64),
    'edm2plus-img64-l':  Preset(channels=320, duration=2048 * Mi, lr=0.0080, dropout=0.10, **_plus64),
    'edm2plus-img64-xl': Preset(channels=384, duration=640 * Mi,  lr=0.0070, dropout=0.10, **_plus64),
    # Demo: Fashion-MNIST (dataset_tool at 16x16 RGB, 10 classes) on 2 CPU cores in 15 minutes, CONFIG G*.
    # Sized by FLOPs (0.64 M parameters, 46 MFLOP per evaluation) so that 15 minutes train about 200K images (the
    # README's main job gives the measured speeds). The time limit ends the run: the duration (1Mi) is only a cap.
    # Small data and a short run want their own schedule: batch 32 (more steps per image), a high peak lr (0.04 beat
    # 0.02 and 0.01 over a 15-minute run) with a 125-step warm-up and 1/sqrt decay after 400 steps, and EDM's
    # CIFAR-10 noise distribution for small images.
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

#----------------------------------------------------------------------------
# Block variants named on the command line. A variant brings the paper's expansion e, kernel k and base width (its
# record in networks.edm2plus.BLOCK_VARIANTS; the width is that of its row in Tables 1-2, where EDM2-S's is 192).
# Only B's width differs: it replaces both 3x3 convolutions by depthwise ones and doubles the width "to keep a
# reasonable model capacity" (paper §2.2, eq. 3).
#
# Width rule for other preset sizes: the preset's width scales by the ratio of the new variant's base width to the
# preset's own variant's, i.e. B doubles any A or G* preset's width (XS 128 -> 256, S 192 -> 384, L 320 -> 640) and
# every other variant keeps it. An explicit --channels wins, as do --expansion and --kernel.

def variant_architecture(preset, block=None, channels=None, expansion=None, kernel=None):
    """dict(block, model_channels, expansion, kernel) for a preset (name or record) with the command line's
    --block/--channels/--expansion/--kernel (None = not given). A --block other than None brings the variant's own
    e, k (None: the network takes its BLOCK_VARIANTS record's) and base width, unless given explicitly."""
    p = get(preset) if isinstance(preset, str) else preset
    if block is None:
        arch = dict(block=p.block, model_channels=p.channels, expansion=p.expansion, kernel=p.kernel)
    else:
        if block not in BLOCK_VARIANTS:
            raise ValueError(f'--block={block}: choose from {", ".join(BLOCK_VARIANTS)}')
        width = p.channels * BLOCK_VARIANTS[block].width / BLOCK_VARIANTS[p.block].width
        arch = dict(block=block, model_channels=int(round(width)), expansion=None, kernel=None)
    arch.update({k: v for k, v in dict(model_channels=channels, expansion=expansion, kernel=kernel).items() if v is not None})
    return arch

def architecture_kwargs(preset, **overrides):
    """Keyword arguments of networks.edm2plus.Precond that set its architecture (all but the data's interface) for a
    preset (name or record); None overrides are ignored. A `block` override brings the variant's e, k and width
    (variant_architecture), unless `model_channels`, `expansion` or `kernel` are overridden too."""
    p = get(preset) if isinstance(preset, str) else preset
    arch = variant_architecture(p, block=overrides.pop('block', None), channels=overrides.pop('model_channels', None),
                                expansion=overrides.pop('expansion', None), kernel=overrides.pop('kernel', None))
    kwargs = dict(model_channels=arch['model_channels'], channel_mult=list(p.channel_mult), num_blocks=p.num_blocks,
                  attn_resolutions=list(p.attn_resolutions), dropout=p.dropout, block=arch['block'],
                  expansion=arch['expansion'], kernel=arch['kernel'])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs

def network_kwargs(preset, **overrides):
    """All keyword arguments of networks.edm2plus.Precond for a preset: its data interface (img_resolution,
    img_channels, label_dim) and architecture_kwargs()."""
    p = get(preset) if isinstance(preset, str) else preset
    interface = dict(img_resolution=p.resolution, img_channels=p.img_channels, label_dim=p.label_dim)
    interface.update({k: overrides.pop(k) for k in list(interface) if overrides.get(k) is not None})
    return dict(interface, **architecture_kwargs(p, **overrides))

def check_architecture(kwargs, explicit=()):
    """One-line errors (ValueError naming the option) for Precond keyword arguments that cannot build a network, before
    anything is built. `explicit` names the options the user gave (expansion, kernel): giving one that the variant
    does not use is an error rather than silently ignored."""
    mult = list(kwargs.get('channel_mult', [1, 2, 3, 4]))
    resolution = kwargs.get('img_resolution')
    if not mult:
        raise ValueError('--channel-mult: give at least one level, e.g. 1,2,2')
    if min(mult) < 1:
        raise ValueError(f'--channel-mult={",".join(map(str, mult))}: multipliers must be 1 or more')
    if resolution is not None:
        levels = len(mult)
        if resolution < 1 or resolution & (resolution - 1) != 0:
            raise ValueError(f'--resolution={resolution}: must be a power of two (8, 16, 32, 64, ...)')
        if resolution < 2 ** (levels - 1):
            raise ValueError(f'--channel-mult={",".join(map(str, mult))}: its {levels} levels halve the resolution '
                             f'{levels - 1} times and need at least {2 ** (levels - 1)}x{2 ** (levels - 1)} images; '
                             f'got {resolution}x{resolution} (use at most {resolution.bit_length()} levels)')
    kernel = kwargs.get('kernel')
    if kernel is not None:
        lowest = resolution >> (len(mult) - 1) if resolution is not None else None
        top = 2 * lowest - 1 if lowest else None
        if kernel < 1 or kernel % 2 == 0 or (top is not None and kernel > top):
            where = f' from 1 to {top}' if top is not None else ' (1, 3, 5, ...)'
            raise ValueError(f'--kernel={kernel}: the depthwise kernel size must be odd{where}'
                             + (f' (the smallest feature map is {lowest}x{lowest})' if top is not None else ''))
    block = kwargs.get('block', 'A')
    options = BLOCK_VARIANTS[block].options
    if 'expansion' in explicit and 'expansion' not in options:
        raise ValueError(f'--expansion: block {block} has no expansion ratio (only ' +
                         ', '.join(b for b, v in BLOCK_VARIANTS.items() if 'expansion' in v.options) + ' have one)')
    if 'kernel' in explicit and 'kernel' not in options:
        raise ValueError(f'--kernel: block {block} has no depthwise convolution (its convolutions are 3x3)')
    smallest = kwargs.get('model_channels', 192) * min(mult)
    expansion = kwargs.get('expansion')
    if 'expansion' in options and expansion is not None and int(expansion * smallest) < 1:
        raise ValueError(f'--expansion={expansion:g}: the widest layer of a {smallest}-channel block would have no '
                         f'channel; give at least {1 / smallest:.3g}')
