"""The methods: one registry (:mod:`.registry`), the classical baselines, the two-photon recipe, STEGO,
self-training and the synthetic-trained network (``synth``).

Every method is registered here, one line each; a method outside this package registers itself when the module
named in ``$STEGO_METHOD_PLUGINS`` is imported (:func:`~stego_core.methods.registry.load_plugins`).
"""

from stego_core.methods.classical import CLASSICAL
from stego_core.methods.registry import (
    METHODS,
    BuildContext,
    Result,
    available_methods,
    build_method,
    load_plugins,
    register_method,
)
from stego_core.methods.selftrain.method import SELFTRAIN
from stego_core.methods.stego.method import STEGO
from stego_core.methods.synth import SYNTH
from stego_core.methods.twophoton import TWOPHOTON

for _entry in CLASSICAL:
    register_method(_entry)
register_method(STEGO)
register_method(SELFTRAIN)
register_method(TWOPHOTON)
register_method(SYNTH)
load_plugins()

__all__ = ["METHODS", "BuildContext", "Result", "available_methods", "build_method", "register_method"]
