"""The tests' tolerances are the package's: :mod:`diffattn.kernels.tolerances` (one policy)."""

from diffattn.kernels.tolerances import (  # noqa: F401
    LSE_TOL,
    MASS_TOL,
    MODEL_TOL,
    OUTPUT_TOL,
    QUANT_LEVEL_FLIP_ROWS,
    QUANT_REL_L2,
    assert_close,
    assert_quant_close,
)
