"""``python -m sae_lens_multimodal ...`` is the ``sae-lens-mm`` command (so ``torchrun -m sae_lens_multimodal cache ...``
runs it on every rank; see docs/distributed.md)."""

import sys

from sae_lens_multimodal.cli import main

if __name__ == "__main__":
    sys.exit(main())
