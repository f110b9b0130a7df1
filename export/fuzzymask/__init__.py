"""Fuzzy-mask inpainter (``../shared/seeds/001_spec.md``): training side.

``masking`` (random fuzzy masking, spec §2.3), ``torch_model`` (ResNet34-style encoder-decoder
with shallow-fusion skips, §3.1), ``loss`` (weighted SSIM, the dissimilarity map D and eq. (5),
§3.2-§3.3), ``data`` (native-scale normal crops), ``train`` (``inspector train fuzzymask``) and
``export`` (the ``fuzzymask`` model bundle). The runtime side is ``inspector.models.fuzzymask``.
"""
