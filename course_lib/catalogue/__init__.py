"""The catalogue of mechanisms: every mechanism of the course, declared once, under one name.

A :class:`Mechanism` says what the rest of the course needs to know about one mechanism: the
function that computes it (and its forms), its family (the four classes of efficient attention,
plus the exact baseline and the specialised variants), the chapter that teaches it, how to build
seeded inputs for it, how much state or KV cache it keeps per sequence, a model of its FLOPs and
bytes, and its token-mixer layer where it has one. Benchmarks, the recall study, the widgets,
the figures and the tests iterate the catalogue instead of keeping lists of their own.

The declarations live in one module per family of the course (``exact``, ``compact``, ``sparse``,
``linear``, ``recurrent``, ``specialised``); this package imports all of them, so looking a
mechanism up never depends on what was imported before::

    from course_lib import catalogue
    gla = catalogue.get("gla")
    x = gla.make_inputs(256)            # seeded inputs of one benchmark point
    o = gla.run(x, form="recurrent")    # the library function on them
    [m.name for m in catalogue.mechanisms(family="linear", has="mixer")]

A mechanism that exists only as a layer (MLA, SwitchHead) is given its functional form by
:class:`~course_lib.catalogue.layers.LayerForm`: the layer's input tokens and its seeded weights are
the inputs, ``torch.func.functional_call`` runs it, and its own cache decodes it (``decoder``).

Adding a mechanism = its algorithm file + one declaration here + its tests + its notebook section.
"""

from __future__ import annotations

# The declarations, one module per family; importing them registers them.
from . import compact, exact, linear, recurrent, sparse, specialised  # noqa: F401, I001
from .core import FAMILIES, PHASES, Gates, Geometry, Mechanism, get, mechanisms, names, register

__all__ = ["FAMILIES", "PHASES", "Gates", "Geometry", "Mechanism", "get", "mechanisms", "names", "register"]
