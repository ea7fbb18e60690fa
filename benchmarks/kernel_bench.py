"""Same as `diffattn bench kernel` (see diffattn/bench/kernel.py)."""

from diffattn.bench.kernel import main

if __name__ == "__main__":
    main()
