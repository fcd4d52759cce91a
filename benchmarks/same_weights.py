"""Whether a change of code changed what it trains: the `tiny`, `cpu` and `cpu-ddpm` recipes
(short runs on 512 MNIST digits, so that they cross epoch boundaries, save mid-epoch and draw
their grids) and a LoRA run on the last of them, each trained by the code at a given folder,
their weights written to a file; then two such files compared tensor by tensor.

  python benchmarks/same_weights.py train OLD_CODE_FOLDER /tmp/old.pt
  python benchmarks/same_weights.py train . /tmp/new.pt
  python benchmarks/same_weights.py compare /tmp/old.pt /tmp/new.pt

Run both on one machine, one after the other (float kernels differ between machines)."""
import subprocess
import sys
from pathlib import Path

TRAIN = r'''
import sys, tempfile, torch
from pathlib import Path
from diffusion101.dataset import ImageData, load_mnist
try:
    from diffusion101.train_run import train
except ImportError:  # the code before the training job had its own module
    from diffusion101.train import train
try:
    from diffusion101.presets import get_preset
except ImportError:  # the presets lived in config.py
    from diffusion101.config import get_preset
from diffusion101.lora_finetune import finetune
torch.set_num_threads(1)
mnist = load_mnist(train=True, img_size=28)
results = {}
with tempfile.TemporaryDirectory() as tmp:
    for preset in ("tiny", "cpu", "cpu-ddpm"):
        cfg = get_preset(preset)
        data = mnist if preset != "tiny" else load_mnist(train=True, img_size=16)
        data = ImageData(data.images[:512], data.labels[:512])
        cfg.train.epochs, cfg.train.max_steps, cfg.train.save_every = 3, 11, 5
        cfg.train.batch_size, cfg.train.grid_every = 128, 1
        out = Path(tmp) / f"{preset}.pt"
        saved = train(cfg, preset, out, Path(tmp) / "runs", "cpu", data=data, log=lambda *a: None)
        for part in ("model", "ema"):
            for k, v in saved.get(part, {}).items():
                results[f"{preset}/{part}/{k}"] = v
    lora = {"epochs": 1, "max_steps": 6, "batch_size": 64}
    saved = finetune(Path(tmp) / "cpu-ddpm.pt", Path(tmp) / "lora.pt", "cpu", lora=lora,
                     data=ImageData(mnist.images[:256], mnist.labels[:256]), log=lambda *a: None)
    for k, v in saved["lora"].items():
        results[f"lora/{k}"] = v
torch.save(results, sys.argv[1])
print(f"{len(results)} tensors written to {sys.argv[1]}")
'''


def main(argv) -> int:
    if argv[0] == "train":
        code, out = Path(argv[1]).resolve(), argv[2]
        return subprocess.run([sys.executable, "-c", TRAIN, out], cwd=code,
                              env={"PYTHONPATH": str(code), "OMP_NUM_THREADS": "1",
                                   "PATH": "/usr/bin:/bin"}).returncode
    import torch
    a, b = (torch.load(p, weights_only=True) for p in argv[1:3])
    same = [k for k in a if k in b and torch.equal(a[k], b[k])]
    print(f"{len(same)} of {len(a)} tensors bitwise equal ({len(b)} in the second file)")
    for k in sorted(set(a) | set(b)):
        if k not in same:
            print("  differs:", k)
    return 0 if len(same) == len(a) == len(b) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
