"""Write a small sampling-only copy of a checkpoint (EMA weights, config; no optimizer).

  python scripts/export_checkpoint.py model.pt diffusion101/weights/cpu.pt --set sample.guidance=3
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from diffusion101.cli import Parser, check_outputs, run_cli


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--set", action="append", default=[], metavar="sample.FIELD=VALUE",
                   help="sampler defaults to carry, e.g. --set sample.guidance=3")
    a = p.parse_args(argv)
    check_outputs({"dst": a.dst}, inputs={"src": a.src})
    from diffusion101.models import export_for_sampling
    export_for_sampling(a.src, a.dst, a.set)


if __name__ == "__main__":
    sys.exit(run_cli(main))
