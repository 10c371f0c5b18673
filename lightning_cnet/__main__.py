"""``python -m lightning_cnet``: the ``lightning-cnet`` command line (see :mod:`lightning_cnet.cli`)."""

from lightning_cnet.cli import main

if __name__ == "__main__":
    main()
