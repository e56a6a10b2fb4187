"""Synthetic datasets in each reader's on-disk format (``vlpbench synth``), one module per dataset.

Every image is drawn on real lung anatomy (:mod:`vlpbench.synthetic.chest`) with its lesions where
the written label files put them, so models can learn from the data and the readers in
:mod:`vlpbench.data` read it as they read the real dataset. The readers never import this package.
"""
