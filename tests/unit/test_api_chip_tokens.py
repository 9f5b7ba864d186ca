"""Chip URL tokens and the chip-signing secret, without a server: a token names exactly one chip,
dies with its expiry or under another secret, and uvicorn workers of one host share one secret."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from api import chips
from api.auth import hash_password, verify
from cbmflow.errors import NotFoundError
from cbmflow.settings import ApiSettings


def test_tokens_expire_and_bind_their_secret() -> None:
    ref = chips.ChipRef("alice", 1, "B04", 11.0, 48.0, 1280.0, int(time.time()) + 60)
    token = chips.sign(b"k" * 32, ref)
    assert chips.verify_token(b"k" * 32, token) == ref
    with pytest.raises(NotFoundError):
        chips.verify_token(b"other" * 8, token)
    with pytest.raises(NotFoundError):
        chips.verify_token(b"k" * 32, token, now=time.time() + 61)


def test_altered_or_malformed_tokens_are_the_same_404() -> None:
    ref = chips.ChipRef("alice", 1, "B04", 11.0, 48.0, 1280.0, int(time.time()) + 60)
    token = chips.sign(b"k" * 32, ref)
    body, mac = token.split(".")
    other = chips.sign(b"k" * 32, chips.ChipRef("bob", 1, "B04", 11.0, 48.0, 1280.0, ref.expires))
    flipped = mac[:-1] + ("B" if mac[-1] == "A" else "A")
    for bad in (f"{other.split('.')[0]}.{mac}", f"{body}.{flipped}", "", "x" * 700, f"{body}{mac}"):
        with pytest.raises(NotFoundError, match="no such chip"):
            chips.verify_token(b"k" * 32, bad)


def test_generated_secret_is_shared_through_the_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBMFLOW_STATE_DIR", str(tmp_path))
    first = chips.load_secret(ApiSettings())
    assert chips.load_secret(ApiSettings()) == first  # a second worker process reads the same file
    assert (tmp_path / chips.SECRET_FILE).stat().st_mode & 0o077 == 0
    assert chips.load_secret(ApiSettings(chip_secret="configured")) != first


def test_hash_and_verify() -> None:
    h = hash_password("s3cret-pass")
    assert h.startswith("$argon2id$") and "s3cret" not in h
    assert verify(h, "s3cret-pass") and not verify(h, "s3cret-pasS") and not verify("not-a-hash", "x")
