"""The shipped configs (ml-collections), one recipe per file; each sets only the fields
where it differs from `default.py` (which documents every field).

Three ways to name one on the command line, from any directory:

    --config=cifar10                       # a shipped config by name
    --config=configs/cifar10.py            # from a checkout (configs/ links here)
    --config=/any/path/my_config.py        # your own; it may import these, e.g.
                                           #   from resa_jax.configs import cifar10
"""
