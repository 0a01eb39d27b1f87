"""The shapes-world demo, end to end and offline: load the shipped shapes CLIP and diffusion model and the
bundled SAEs by name, cache activations, label vision features (direct-path and causal labels), clamp a
feature and read the zero-shot change, generate images with and without a feature steered at chosen
timesteps, trace feature activations across timesteps, and write an HTML report with per-feature
dashboards.

    python examples/shapes_demo.py --out shapes-report          # a few minutes on 2 CPU cores
    python examples/shapes_demo.py --out shapes-report --quick  # seconds: a small configuration

Open shapes-report/report.html in a browser (it needs no network). Same as `sae-lens-mm demo --out DIR`.
"""

from __future__ import annotations

import sys

from sae_lens_multimodal.world.demo import main

if __name__ == "__main__":
    sys.exit(main())
