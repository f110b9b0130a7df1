"""CLGAN (``../shared/seeds/002_spec.md``): a CUT-style contrastive GAN trained on defect-free
images only; defects are found as reconstruction residuals at run time (``inspector.models.clgan``).

Modules: ``torch_model`` (generator, PatchGAN discriminator, projection heads), ``loss``
(PatchNCE, GAN loss), ``data`` (training crops from the shared data layouts), ``train`` (the
training loop, ``inspector train clgan``), ``export`` (generator to ONNX with a parity check, into a
model bundle of kind ``clgan``).
"""
