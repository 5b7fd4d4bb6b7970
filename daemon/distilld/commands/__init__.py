"""The bodies of the ``distilld`` commands other than ``run`` and ``demo`` (``cli.py``
parses the arguments and calls one of them). Each module imports only what its
command needs: the commands that read state or files (status, versions, policy,
report) never import torch, transformers or evidently."""
