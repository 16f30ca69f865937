"""STEGO-Vessels: unsupervised cerebrovascular segmentation of MRA volumes.

Data flows one way through the modules::

    io -> preprocess -> slicing -> backbones/features -> stego -> reconstruction -> metrics -> tracking
"""

__version__ = "0.1.0"
