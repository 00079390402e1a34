"""What the tests share: the tiny models (``support.models``) and the ways a test runs flame-ext
(``support.cli``: a command in a fresh interpreter; ``support.torchrun``: N ranks under torchrun).

Imported as ``from support.models import ...`` (``tests/`` is on the path, as pytest puts it there for the
conftest): a plain ``from conftest import ...`` would resolve to whichever of the folders' conftests came first.
"""
