"""The editing methods, one package each; importing this package registers them all.

Each package holds a method's hyperparameters (``hparams.py``), what it
supplies to the one edit loop (``method.py``, an
:class:`~alphaedit_plugin.methods.base.EditMethod`) and its own math, and
ends with one :func:`~alphaedit_plugin.registry.register_method` call.
"""

from . import alphaedit, memit, prune, rect, sphere  # noqa: F401  (each registers itself)
