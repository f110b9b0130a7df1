"""Defect-GAN (``../shared/seeds/003_spec.md``): defect synthesis by defacement/restoration."""
