"""Sub-commands of the ``selfref`` CLI, one module each (see ``selfref/cli.py``)."""
