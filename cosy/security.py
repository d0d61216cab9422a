"""CURVE encryption and authentication for tcp endpoints.

Layout of a key directory (``--curve-dir`` / ``COSY_CURVE_DIR``):

  broker:          server.key_secret   its own key pair (ZPL certificate, 0600)
                   authorized/*.key    public keys of the clients and workers let in
  client / worker: client.key_secret   its own key pair (0600)
                   server.key          the broker's public key

``cosy keys generate --dir D --name N`` writes ``N.key`` and ``N.key_secret``.
ipc endpoints do not use CURVE: the runtime directory's permissions guard them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


class KeyError_(ValueError):
    """A missing or unreadable key file; the message says which and what to do."""


@dataclass(frozen=True)
class CurveKeys:
    public: bytes
    secret: bytes
    server_public: bytes | None = None  # clients: the broker's key
    authorized_dir: Path | None = None  # broker: who may connect


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeyError_(f"key file {path} is missing (create keys with `cosy keys generate`)")
    if need_secret and path.stat().st_mode & 0o077:
        raise KeyError_(f"secret key {path} is readable by others: chmod 600 {path}")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read key file {path}: {exc}") from None
    if need_secret and not secret:
        raise KeyError_(f"{path} holds no secret key")
    return public, secret


def server_keys(curve_dir: Path) -> CurveKeys:
    public, secret = _load(curve_dir / "server.key_secret", need_secret=True)
    authorized = curve_dir / "authorized"
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise KeyError_(f"no authorized public keys in {authorized}: copy each client's and worker's .key file there")
    return CurveKeys(public, secret or b"", authorized_dir=authorized)


def client_keys(curve_dir: Path) -> CurveKeys:
    public, secret = _load(curve_dir / "client.key_secret", need_secret=True)
    server_public, _ = _load(curve_dir / "server.key", need_secret=False)
    return CurveKeys(public, secret or b"", server_public=server_public)


def secure_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


def start_authenticator(ctx: zmq.Context, keys: CurveKeys):  # -> ThreadAuthenticator
    """ZAP handler: only the public keys in authorized/ get in (without it, anyone with the server key would)."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized_dir))
    return auth


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = (directory / f"{name}.key", directory / f"{name}.key_secret")
    if public.exists() or secret.exists():
        raise KeyError_(f"{public} or {secret} exists already; not overwriting keys")
    old = os.umask(0o077)
    try:
        pub, sec = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old)
    os.chmod(sec, 0o600)
    os.chmod(pub, 0o644)
    return Path(pub), Path(sec)


def prepare_client(sock: zmq.Socket, curve_dir: Path | None) -> None:
    """Apply the client keys of ``curve_dir`` to a socket about to connect (no-op without keys)."""
    if curve_dir is not None:
        secure_client(sock, client_keys(curve_dir))
