"""The daemon refuses placeholder and weak bearer tokens at start-up, and accepts random ones."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import pytest

from forkd.api.auth import load_token, token_problem
from forkd.errors import InvalidInput

PLACEHOLDERS = [
    "REPLACE_ME_WITH_32_BYTES_BASE64",
    "replace-me-with-32-bytes-base64",
    "CHANGE_ME_TO_A_RANDOM_SECRET",
    "CHANGE_ME_0123456789",
    "changeme",
    "changemechangeme",
    "your-token-here",
    "your-token-here-please",
    "<your-token-here-123>",
    "put-your-api-key-here",
    "FORKD_API_TOKEN_VALUE",
    "INSERT_YOUR_TOKEN",
    "placeholder-0123456789",
    "secret-password-123456",
    "x7",  # too short
    "0123456789abcde",  # 15 bytes
    "aaaaaaaaaaaaaaaaaaaaaaaa",
]


@pytest.mark.parametrize("token", PLACEHOLDERS)
def test_placeholders_are_refused(token: str) -> None:
    assert token_problem(token) is not None


@pytest.mark.parametrize("token", ["REPLACE_ME_WITH_32_BYTES_BASE64", "your-token-here"])
def test_start_up_error_names_the_file_and_the_fix(tmp_path: Path, token: str) -> None:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    os.chmod(path, 0o600)
    with pytest.raises(InvalidInput) as info:
        load_token(path)
    message = str(info.value)
    assert str(path) in message and "openssl rand -hex 32" in message
    assert "placeholder" in message or "at least 16" in message


def test_random_tokens_are_accepted() -> None:
    for _ in range(2000):
        for token in (
            secrets.token_hex(16),
            secrets.token_hex(32),
            secrets.token_urlsafe(32),
            base64.b64encode(os.urandom(32)).decode(),
            base64.b32encode(os.urandom(20)).decode().rstrip("="),
        ):
            assert token_problem(token) is None, token
