"""Small generic helpers shared by every tool (names kept as in EDM2 for pickle compatibility)."""
from .util import EasyDict, make_cache_dir_path  # noqa: F401
