"""Pseudonyms for identifiers that can name a patient (file names, subject ids).

Hospital file names and patient ids often carry a record number. With a secret salt (a
file of at least 16 random bytes the hospital keeps, e.g. ``head -c 32 /dev/urandom >
salt.bin``), the manifest builder and predict store ``HMAC-SHA256(salt, identifier)``
(16 hex digits) instead: the same identifier always gets the same pseudonym, so a person's
knees stay together and predictions can be matched back by whoever holds the salt, while
nobody without it can recover or test a guessed identifier.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

MIN_SALT_BYTES = 16


def read_salt(path: str | os.PathLike) -> bytes:
    """The salt file's bytes.

    Raises:
      ValueError: naming the file when it is missing or shorter than 16 bytes.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"salt file {path} does not exist (make one with: head -c 32 "
                                f"/dev/urandom > {path})")
    salt = path.read_bytes()
    if len(salt) < MIN_SALT_BYTES:
        raise ValueError(f"salt file {path} has {len(salt)} bytes; a salt needs at least "
                         f"{MIN_SALT_BYTES} random bytes (head -c 32 /dev/urandom > {path})")
    return salt


def pseudonym(identifier: str, salt: bytes) -> str:
    """16 hex digits of ``HMAC-SHA256(salt, identifier)``."""
    return hmac.new(salt, identifier.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def salt_fingerprint(salt: bytes) -> str:
    """Names the salt without revealing it (recorded with a dataset, so that two builds with
    different salts are different datasets)."""
    return hashlib.sha256(b"kpn-jax id salt:" + salt).hexdigest()[:8]
