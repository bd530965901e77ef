"""`python -m search.bench NAME ...`: run the benchmark module search/bench/NAME.py."""
import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    """Benchmark names: the modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    """Dispatch to a benchmark's main(argv)."""
    if not argv or argv[0] not in available():
        print(f"usage: python -m search.bench NAME [options]; NAME is one of: {', '.join(available())}",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"search.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
