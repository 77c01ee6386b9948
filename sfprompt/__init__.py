"""sfprompt: split federated prompt tuning of Vision Transformers on small devices.

The parts live in their own top-level folders of the repository and import as
`sfprompt.export`, `sfprompt.protocol`, `sfprompt.edge_client` and `sfprompt.cloud_server`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sfprompt")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0"
