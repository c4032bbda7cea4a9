"""prefill-bootstrap: the bootstrap server and rank client for multi-node disaggregated prefill.

The server lives in :mod:`prefill_bootstrap.service` (needs the ``[server]`` extra), the rank
side in :mod:`prefill_bootstrap.client` (torch only for the port broadcast, imported lazily).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
