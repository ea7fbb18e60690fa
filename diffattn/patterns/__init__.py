"""Planners: pure PyTorch functions that decide which blocks (or tokens) attention computes."""


from ..kernels.layout import check_block


def check_block_size(value: int, name: str, typical: str = "64 or 128 are typical") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a power of two >= 16 (the kernels' rule,
    :func:`~diffattn.kernels.layout.check_block`, with the planners' hint)."""
    check_block(value, name, hint=typical)
