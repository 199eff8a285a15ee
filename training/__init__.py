"""Training of prototype networks (PrototypeDL, ProtoPNet) with PyTorch; imports nothing of the serving side.

Importing the package registers the built-in model families: each family's trainer module calls
training.families.register_family with its model, trainer, evaluation and pictures, as timm's
models/__init__.py does.
The registry keeps the order of registration (PrototypeDL, the default, first).
"""

# isort: off
from training import train_prototypedl  # noqa: F401  (registers the family)
from training import train_protopnet  # noqa: F401
# isort: on
