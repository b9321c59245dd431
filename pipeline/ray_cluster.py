"""Which Ray a command uses: the one rule every command that starts Ray follows.

An address (the command's --address / --ray-address, else RAY_ADDRESS as under `ray job submit`)
joins that cluster. Without one the command starts its own local instance (address="local"),
never whichever cluster happens to run on the machine: joining a stranger's cluster would share
its resources and refuse this command's own settings (num_cpus cannot be given when connecting).
"""

from __future__ import annotations

import logging
import os


def ray_address(address: str | None = None) -> str | None:
    """The cluster to join: `address`, else RAY_ADDRESS, else None (start a local instance)."""
    return address or os.environ.get("RAY_ADDRESS") or None


class _DropDefaultAuthBanner(logging.Filter):
    """Drops Ray's notice that a new local instance uses token authentication, its default,
    printed on every command; any other message of Ray's authentication setup (a cluster
    without authentication, a missing token) still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_auth_banner() -> None:
    """Install _DropDefaultAuthBanner on Ray's authentication-setup logger (once)."""
    logger = logging.getLogger(_AUTH_SETUP_LOGGER)
    if not any(isinstance(f, _DropDefaultAuthBanner) for f in logger.filters):
        logger.addFilter(_DropDefaultAuthBanner())


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = False) -> bool:
    """Initialise Ray in this process unless it already is; True when this call did.

    num_cpus applies to a local instance only (a joined cluster has its own)."""
    import ray

    if ray.is_initialized():
        return False
    quiet_auth_banner()
    joined = ray_address(address)
    if joined:
        ray.init(address=joined, log_to_driver=log_to_driver, configure_logging=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                 configure_logging=False)
    return True
