"""Reading a folder or zip of images for the metrics (docs/compatibility.md §8).

Files are found, decoded and subset by the project's `training.dataset.ImageFolderDataset` (docs/compatibility.md §9); this
module adds what the metrics need on top: labels ignored, grey images repeated to RGB (EDM2 fails on them), any
other channel count refused, and errors that name the file even when the file was read in a DataLoader worker.
"""

import numpy as np
import torch

from metrics import MetricsError
from training.dataset import ImageFolderDataset

#----------------------------------------------------------------------------

class ImageReadError(MetricsError):
    """An image file could not be used; the message names the file."""

class ImageFiles(torch.utils.data.Dataset):
    """Images of a directory tree or zip, sorted by name; item i -> (uint8 [3, H, W] or None, error or '').

    Errors are returned rather than raised so that DataLoader workers do not wrap them in tracebacks;
    `ImageBatches` raises them in the main process. With more than `max_size` files a random subset is used,
    chosen exactly as EDM2 does (shuffle with RandomState(random_seed % 2**31), keep max_size, sort).
    """

    def __init__(self, path, max_size=None, random_seed=0):
        try:
            self.dataset = ImageFolderDataset(path, use_labels=False, max_size=max_size, random_seed=random_seed)
        except (OSError, ValueError) as e:
            raise ImageReadError(str(e)) from None
        if self.dataset.image_shape[0] not in (1, 3):
            raise ImageReadError(self._bad_channels(0))

    def _file_name(self, idx):
        # The file as the dataset names it in its own errors.
        return self.dataset._describe_item(self.dataset._raw_idx[idx])  # pylint: disable=protected-access

    def _bad_channels(self, idx):
        return f'{self._file_name(idx)}: expected an RGB or grey image, got {self.dataset.image_shape[0]} channels'

    @property
    def image_shape(self):
        """[3, H, W] of every image (grey ones included, as they are read as RGB)."""
        return [3] + list(self.dataset.image_shape[1:])

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        try:
            image, _label = self.dataset[idx]
        except (OSError, ValueError) as e:
            return None, str(e)
        if image.dtype != np.uint8:
            return None, f'{self._file_name(idx)}: expected 8-bit pixels, got {image.dtype}'
        if image.shape[0] == 1:
            image = np.repeat(image, 3, axis=0)
        return image, ''

#----------------------------------------------------------------------------
# Batching identical to generation (docs/compatibility.md §7): max(ceil(n / (batch * W)), 1) * W near-equal contiguous
# chunks of the indices, rank r taking chunks r, r + W, r + 2W, ...

def rank_batches(num_items, max_batch_size, rank=0, world_size=1):
    """Index chunks of this rank, empty chunks dropped."""
    num_batches = max((num_items - 1) // (max_batch_size * world_size) + 1, 1) * world_size
    chunks = np.array_split(np.arange(num_items), num_batches)[rank::world_size]
    return [c.tolist() for c in chunks if len(c) > 0]

def _keep_items(items):
    return items      # stacked in the main process, where an error can be raised without a worker traceback

class ImageBatches:
    """Iterable of uint8 [N, 3, H, W] batches of an ImageFiles for this rank; has len(); raises ImageReadError."""

    def __init__(self, dataset, max_batch_size=64, rank=0, world_size=1, num_workers=2, prefetch_factor=2):
        self.batches = rank_batches(len(dataset), max_batch_size, rank, world_size)
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.batches, num_workers=num_workers,
                                                  collate_fn=_keep_items,
                                                  prefetch_factor=(prefetch_factor if num_workers > 0 else None),
                                                  # spawn, as EDM2: forking a process that uses CUDA is unsafe
                                                  multiprocessing_context=('spawn' if num_workers > 0 else None))

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for items in self.loader:
            for _image, error in items:
                if error:
                    raise ImageReadError(error)
            yield torch.from_numpy(np.stack([image for image, _error in items]))
