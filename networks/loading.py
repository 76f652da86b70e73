"""Load a network snapshot from a path or URL: `load_snapshot` gives the whole dict, `load_network` the net.

Pickles (.pkl) execute embedded code when loaded: load only files you trust.
"""

import os
import pickle

import dnnlib


def load_snapshot(path_or_url, verbose=True):
    """Return the snapshot dict (EasyDict with at least `ema`) stored at path_or_url."""
    if verbose:
        print(f'Loading network from {path_or_url} ...')
    if not dnnlib.util.is_url(path_or_url) and not os.path.isfile(path_or_url):
        raise FileNotFoundError(f'{path_or_url}: no such network file')
    with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
        try:
            data = pickle.load(f)
        except Exception as e:
            raise ValueError(f'{path_or_url}: not a network pickle ({type(e).__name__}: {e})') from None
    if not isinstance(data, dict) or 'ema' not in data:
        raise ValueError(f'{path_or_url}: not a network snapshot (expected a dict with key "ema")')
    return dnnlib.EasyDict(data)


def load_network(path_or_url, device=None, verbose=True):
    """Return the EMA network of a snapshot (or the module itself, when given a module)."""
    if not isinstance(path_or_url, str):
        return path_or_url
    net = load_snapshot(path_or_url, verbose=verbose).ema
    return net.to(device) if device is not None else net
