"""The ViT pieces both stages use, the way timm's `layers/` serves every model: the token-dropping forward
(`forward`), building a timm ViT and loading checkpoints strictly (`checkpoints`), fixed sin-cos positions
(`positions`) and pixel normalisation (`pixels`). Imports store_schema only; extract and distill import it.
`checkpoint_writers` writes official-format files for tests, the demo and the benchmarks.
"""
