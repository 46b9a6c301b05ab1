"""What bf16 buys each stage on this machine, and where a training step's time goes.

    python benchmarks/throughput.py            # a few minutes: writes benchmarks/results/throughput.json
    python benchmarks/throughput.py --quick    # about a minute
    make bench-throughput                      # the same

The parts live in :mod:`dcd.bench.throughput`; this script is its command line. Run it in the project's
environment (``make install``).
"""
from dcd.bench.throughput import main

if __name__ == "__main__":
    main()
