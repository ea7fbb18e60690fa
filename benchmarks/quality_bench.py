"""Same as `diffattn bench quality` (see diffattn/bench/quality.py)."""

from diffattn.bench.quality import main

if __name__ == "__main__":
    main()
