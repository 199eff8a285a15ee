"""Training of prototype networks (PrototypeDL; ProtoPNet in a later step)."""
