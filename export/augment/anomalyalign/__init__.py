"""AnomalyAlign (``../shared/seeds/000_spec.md``), scaled down to run offline on a CPU.

A mask-conditioned pixel-space diffusion model in the ControlNet form (diffusers'
``UNet2DConditionModel`` + ``ControlNetModel``, DDPM training, DDIM sampling), trained from
scratch on the labelled NEU-Seg subset ARCD sees (:func:`export.augment.dataset.labelled_subset`):

* ``prompts``: the semantic-aligned prompt generator: defect words x a built-in synonym table x
  templates, and a small contrastive image-text embedding ("TinyCLIP") that picks per training
  image the prompt it scores highest; the chosen prompt's text embedding is the UNet's
  cross-attention condition.
* ``nets``: the diffusion networks and the small segmentation U-Net that, frozen, computes the
  defect alignment loss.
* ``train``: ``inspector augment anomalyalign train``; ``sample``: ``... sample``.

Everything that needs torch or diffusers lives here, never in ``inspector/``.
"""
