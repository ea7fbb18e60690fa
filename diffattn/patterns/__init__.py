"""Planners: pure PyTorch functions that decide which blocks (or tokens) attention computes."""


def check_block_size(value: int, name: str, typical: str = "64 or 128 are typical") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a power of two >= 16 (a block side the
    planners and kernels accept)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 ({typical}), got {value!r}")
