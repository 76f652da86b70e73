"""FID and FD_DINOv2: feature detectors, feature statistics and the Fréchet distance (EDM2 paper Sec. 5;
docs/compatibility.md §8)."""

class MetricsError(RuntimeError):
    """A user-facing problem (missing weights, unreadable image, bad statistics file); the message is one line
    that names the file or option concerned."""
