"""``python -m probeserve_client``: the ``probeserve-client`` command."""

from probeserve_client.cli import main

main()
