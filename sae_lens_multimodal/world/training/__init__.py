"""The scripts that made the shapes world's shipped weights, and the releases-YAML builder.

Nothing else in the package imports this subpackage (tests/test_import_boundaries.py checks it): the
shipped weights load without it. Run a script as a module, e.g.

    python -m sae_lens_multimodal.world.training.train_clip                 # the shapes CLIP
    python -m sae_lens_multimodal.world.training.train_diffusion            # the diffusion model
    python -m sae_lens_multimodal.world.training.train_saes                 # the bundled SAEs
    python -m sae_lens_multimodal.world.training.train_typographic_sae      # the typographic SAEs
    python -m sae_lens_multimodal.world.training.build_releases_yaml        # pretrained/releases.yaml

(each with ``--help``); sae_lens_multimodal/world/README.md describes what they train and how long it takes.
"""
