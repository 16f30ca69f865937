"""STEGO: a frozen ViT's features, a head trained by distilling feature correspondences, clusters mapped to vessel.

``settings`` (defaults) -> ``model`` (head, probes, loss) -> ``module`` (Lightning step logic) / ``datamodule``
(crops, cached features, kNN) -> ``training`` (the Lightning wiring) -> ``mapping`` (clusters to vessel) ->
``inference`` (the trained model as one module) -> ``method`` (the registered ``stego`` method).
"""
