"""Convert a pickled checkpoint (a whole nn.Module or a bare state dict, as the original
reference code saved) into a Diffusion-101 checkpoint of tensors and plain values.

Loading a pickle runs whatever code it names: only do this for a file you trust.
  python scripts/convert_checkpoint.py --trust old_model.pt model.pt [--preset reference]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from diffusion101.cli import Parser, check_outputs, run_cli


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--preset", default="reference", help="the architecture the old file holds")
    p.add_argument("--trust", action="store_true", help="required: I trust this file's code")
    a = p.parse_args(argv)
    check_outputs({"new": a.new}, inputs={"old": a.old})
    from diffusion101.models import convert_pickled
    convert_pickled(a.old, a.new, a.preset, trusted=a.trust)


if __name__ == "__main__":
    sys.exit(run_cli(main))
