"""Train the evaluation classifier on MNIST's training set; store it with the test-set feature
statistics and real-data FID floors in diffusion101/weights/classifier.pt."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from diffusion101.cli import Parser, check_number, check_outputs, check_seed, run_cli


def main(argv=None):
    from diffusion101.classifier import CLASSIFIER_PATH, train_classifier
    p = Parser(description=__doc__)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(CLASSIFIER_PATH))
    a = p.parse_args(argv)
    check_number("--epochs", a.epochs, 1, 1000, integer=True)
    check_number("--batch-size", a.batch_size, 1, 100_000, integer=True)
    check_number("--lr", a.lr, 1e-8, 10.0)
    check_seed(a.seed)
    check_outputs({"--out": a.out})
    train_classifier(a.epochs, a.batch_size, a.lr, a.seed, a.out)


if __name__ == "__main__":
    sys.exit(run_cli(main))
