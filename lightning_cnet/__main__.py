"""``python -m lightning_cnet``: the ``lightning-cnet`` command line (see :mod:`lightning_cnet.launcher`)."""

from lightning_cnet.launcher import lightning_cnet_main

if __name__ == "__main__":
    lightning_cnet_main()
