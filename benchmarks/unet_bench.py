"""Same as `diffattn bench unet` (see diffattn/bench/unet.py)."""

from diffattn.bench.unet import main

if __name__ == "__main__":
    main()
