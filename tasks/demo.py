"""The `demo` stage: write the synthetic demo data in the three real raw layouts."""
from __future__ import annotations

import argparse
from pathlib import Path

from segpipe.atomic import Owner
from segpipe.datasets.demo import generate
from tasks import common

DEFAULT_OUT = Path("data/raw/demo")


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="demo root to (re)write (default: %(default)s)")
    return p


def main(ns: argparse.Namespace) -> None:
    generate(common.output_dir(ns.out, Owner("demo")), common.params_of(ns).demo)


if __name__ == "__main__":
    common.run(main, build_parser())
