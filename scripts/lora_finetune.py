"""Fine-tune LoRA adapters on a trained model's cross-attention; save only the adapters.

The same as the `diffusion101-finetune` command; `python scripts/lora_finetune.py --help` lists the flags."""
import sys

from diffusion101.entry import finetune_command as main

if __name__ == "__main__":
    sys.exit(main())
