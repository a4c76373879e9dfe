"""Accuracy of 2:4 sparsity on the embedded model: magnitude pruning (rtn) vs SparseGPT (gptq).

    python bench/accuracy_2of4.py --json bench/results/2026-12-01-cpu-accuracy-2of4.json

Runs ``lowbit accuracy`` (same evaluation, same JSON) for int4-g128-2:4 and int8-channel-2:4, the
latter nearly lossless as a value format, so that its rows show the cost of the pruning itself.
The schemes are set here rather than with ``--schemes``, whose items are split at their first ':'
(``SCHEME:METHODS``), which a 2:4 scheme contains. Other options are ``lowbit accuracy``'s.
"""

import argparse
import sys

from lowbit.bench import accuracy

SCHEMES = ["int4-g128-2:4", "int8-channel-2:4"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    accuracy.add_arguments(parser)
    parser.set_defaults(methods=["rtn", "gptq"])
    argv = sys.argv[1:] if argv is None else argv
    if any(a.startswith("--schemes") for a in argv):
        parser.error(f"the schemes are fixed here ({', '.join(SCHEMES)}); edit SCHEMES to change them")
    args = parser.parse_args(argv)
    args.schemes = [(scheme, None) for scheme in SCHEMES]
    return accuracy.run_and_report(args)


if __name__ == "__main__":
    raise SystemExit(main())
