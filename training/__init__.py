"""Training of prototype networks (PrototypeDL, ProtoPNet) with PyTorch; imports nothing of the serving side.

Importing the package registers the built-in model families: each family's module calls
training.families.register_family where its model is defined, as timm's models/__init__.py does.
The registry keeps the order of registration (PrototypeDL, the default, first).
"""

# isort: off
from training import prototypedl  # noqa: F401  (registers the family)
from training import protopnet  # noqa: F401
# isort: on
