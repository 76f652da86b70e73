"""The EDM2+ networks: the reference network (edm2plus), its faster paths, presets, FLOP counts, loading and export.

Importing this package, as every tool and the training loop do, also makes glibc keep freed CPU memory for reuse
(torch_utils.misc.keep_freed_cpu_memory), which the networks need for their speed on a CPU. To keep glibc's own
behaviour, set MALLOC_MMAP_MAX_ in the environment (65536 is glibc's default) before Python starts.
"""

from torch_utils import misc
from networks import fastpaths  # noqa: F401  registers the faster paths with networks.edm2plus (see there)

misc.keep_freed_cpu_memory()
