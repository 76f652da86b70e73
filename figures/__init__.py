"""Pictures drawn with numpy and Pillow only: line charts (training curves, post-hoc EMA sweeps) and image grids.

The lowest layer beside dnnlib: nothing here imports torch, networks, training or sampling, so every layer may draw.
"""
