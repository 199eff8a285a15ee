"""The command line, `protoserve <verb>`: the top layer, importing every part and imported by none."""
