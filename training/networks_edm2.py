"""EDM2's import path of the network, kept so that EDM2 configs and class-name strings resolve here.

EDM2 names the network module `training.networks_edm2`; its `training_options.json` and hand-written configs refer
to e.g. `training.networks_edm2.Precond` (resolved by dnnlib.util.construct_class_by_name). These names are our
networks.edm2plus objects; with the default block='A' they build EDM2's network (same state_dict, same outputs).
EDM2's own pickles do not need this module: they carry their source (torch_utils/persistence.py).
"""

from networks.edm2plus import normalize, resample, mp_silu, mp_sum, mp_cat, MPFourier, MPConv, Block, UNet, Precond  # noqa: F401

__all__ = ['normalize', 'resample', 'mp_silu', 'mp_sum', 'mp_cat', 'MPFourier', 'MPConv', 'Block', 'UNet', 'Precond']
