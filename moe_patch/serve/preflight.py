"""What ``moe-patch serve`` checks before it loads a model: the serving libraries, the API key, and the
address, whose socket is bound first so that a port in use is said in a second, not after minutes of loading."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket

from ..errors import InvalidArgumentError, MoEPatchError

API_KEY_ENV = "MOE_PATCH_API_KEY"
# what the server imports (the `serve` extra)
SERVE_MODULES = ("fastapi", "uvicorn", "pydantic")


def require_serving_dependencies() -> None:
    """Refuse, in one line that says what to install, when the ``serve`` extra's libraries are missing
    (looked up, not imported: a broken module of moe-patch must not read as a missing extra)."""
    missing = [module for module in SERVE_MODULES if importlib.util.find_spec(module) is None]
    if missing:
        raise MoEPatchError(
            f"serving needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install {' '.join(missing)} (or, in moe-patch's repository, the serve extra: "
            "pip install '.[serve]')"
        )


def api_key(given: str | None) -> str | None:
    """The key every request must carry: ``given`` (``--api-key``), else ``$MOE_PATCH_API_KEY``, else None (no
    key). An empty key is refused rather than read as none."""
    key = given if given is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        where = "--api-key" if given is not None else API_KEY_ENV
        raise InvalidArgumentError(f"{where} is empty; give a key, or none to serve without one.")
    return key.strip() if key else None


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only (then serving without a key warns nobody)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is said in a second, not after
    minutes of loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise InvalidArgumentError(f"--host {host}: not an address of this machine ({exc.strerror}).") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {exc.strerror} (choose another --port).") from None
    return sock
