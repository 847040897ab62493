"""fireclaw.supervisor.secretfile: secrets in files only their owner can read."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fireclaw.supervisor.secretfile import SecretFileError, ensure_secret, read_secret

WORD = re.compile(r"[!-~]{1,64}")


def test_a_missing_secret_is_made_once_for_its_owner_alone(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "token"
    first = ensure_secret(path, WORD, "a word")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", first)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_uid == os.geteuid()
    assert ensure_secret(path, WORD, "a word") == first  # kept, not remade
    assert ensure_secret(tmp_path / "secrets" / "other", WORD, "a word") != first


def test_a_secret_given_by_the_operator_is_read_as_is(tmp_path: Path) -> None:
    path = tmp_path / "mine"
    path.write_text("chosen-one\nsecond line ignored\n")
    path.chmod(0o400)
    assert ensure_secret(path, WORD, "a word") == "chosen-one"
    assert read_secret(path, WORD, "a word") == "chosen-one"


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        (0o640, "group or others may use it (mode 0640); chmod 600"),
        (0o604, "group or others may use it (mode 0604)"),
    ],
)
def test_a_secret_others_could_read_is_refused(tmp_path: Path, mode: int, error: str) -> None:
    path = tmp_path / "open"
    path.write_text("word\n")
    path.chmod(mode)
    with pytest.raises(SecretFileError) as info:
        read_secret(path, WORD, "a word")
    message = str(info.value)
    assert message.startswith(f"{path}: ") and error in message
    assert "word" not in message.replace(str(path), "")


def test_links_folders_and_big_files_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("word\n")
    target.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(SecretFileError, match="cannot read"):
        read_secret(link, WORD, "a word")
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_secret(tmp_path, WORD, "a word")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    big.chmod(0o600)
    with pytest.raises(SecretFileError, match="larger than 4096 bytes"):
        read_secret(big, WORD, "a word")
    with pytest.raises(SecretFileError, match="no such file"):
        read_secret(tmp_path / "none", WORD, "a word")


@pytest.mark.skipif(os.geteuid() != 0, reason="gives the file to another user")
def test_a_secret_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "theirs"
    path.write_text("word\n")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(SecretFileError, match="owned by uid 65534, not by us"):
        read_secret(path, WORD, "a word")
