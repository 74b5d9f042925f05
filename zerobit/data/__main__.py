"""`python -m zerobit.data`: find (or download and verify) Fashion-MNIST and say where it is."""

from __future__ import annotations

import sys

from zerobit.data.fashion_mnist import find_dir


def main() -> int:
    try:
        path = find_dir()
    except FileNotFoundError as exc:
        print(f"zerobit: {exc}", file=sys.stderr)
        return 1
    print(f"Fashion-MNIST: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
