"""FID and FD_DINOv2: feature detectors, feature statistics and the Fréchet distance (spec §5)."""

class MetricsError(RuntimeError):
    """A user-facing problem (missing weights, unreadable image, bad statistics file); the message is one line
    that names the file or option concerned."""

def one_line(e):
    """`Type: message` of an exception with whitespace collapsed, for one-line error messages."""
    return ' '.join(f'{type(e).__name__}: {e}'.split())
