"""dpokit vs TRL DPOTrainer: `python benchmarks/bench_dpo.py [dpokit bench options]`.

The same as `dpokit bench`; see `dpokit bench --help` and benchmarks/README.md.
"""

import sys

from dpokit.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
