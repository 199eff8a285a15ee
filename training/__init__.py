"""Training of prototype networks (PrototypeDL, ProtoPNet) with PyTorch; imports nothing of the serving side."""
