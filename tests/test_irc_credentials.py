"""fireclaw.supervisor.irc_credentials: the IRC secrets swarm.yaml names, read
from root-only files or the environment, with one-line errors that never hold
the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from fireclaw.config import IrcSpec, SaslSpec
from fireclaw.pool.runtime import IrcRoute
from fireclaw.supervisor.irc_credentials import IrcCredentials, read_irc_credentials
from fireclaw.supervisor.secretfile import SecretFileError

EXTERNAL = "irc.example:6697"


def secret(tmp_path: Path, text: str, mode: int = 0o600, name: str = "pw") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_nothing_named_nothing_read() -> None:
    assert read_irc_credentials(IrcSpec()) == IrcCredentials()


def test_the_server_password_from_a_file(tmp_path: Path) -> None:
    path = secret(tmp_path, "s3cret!\nignored second line\n")
    creds = read_irc_credentials(IrcSpec(password_file=str(path)))
    assert creds == IrcCredentials(password="s3cret!")
    assert "s3cret" not in repr(creds)


def test_the_server_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRECLAW_TEST_IRC_PASS", "from-env")
    creds = read_irc_credentials(IrcSpec(password_env="FIRECLAW_TEST_IRC_PASS"))
    assert creds.password == "from-env"


def test_sasl_from_a_file_and_the_server_password_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An external server takes a line: spaces are fine there."""
    monkeypatch.setenv("FIRECLAW_TEST_IRC_PASS", "with space")
    path = secret(tmp_path, "pa ss\n")
    spec = IrcSpec(
        server=EXTERNAL,
        password_env="FIRECLAW_TEST_IRC_PASS",
        sasl=SaslSpec(username="bot", password_file=str(path)),
    )
    creds = read_irc_credentials(spec)
    assert creds == IrcCredentials(
        password="with space", sasl_username="bot", sasl_password="pa ss"
    )
    assert "pa ss" not in repr(creds) and "with space" not in repr(creds)


@pytest.mark.parametrize(
    ("text", "mode", "what"),
    [
        ("a b\n", 0o600, "its first line must be the password: one word: 1 to 64 printable ASCII"),
        ("x" * 65 + "\n", 0o600, "its first line must be the password: one word"),
        ("\n", 0o600, "its first line must be the password"),
        ("hunter2\n", 0o640, "group or others may use it (mode 0640); chmod 600"),
        ("hunter2\n", 0o604, "group or others may use it (mode 0604); chmod 600"),
    ],
)
def test_an_unusable_managed_password_file_is_one_line_naming_field_and_file(
    tmp_path: Path, text: str, mode: int, what: str
) -> None:
    path = secret(tmp_path, text, mode)
    with pytest.raises(SecretFileError) as info:
        read_irc_credentials(IrcSpec(password_file=str(path)))
    msg = str(info.value)
    assert msg.startswith(f"irc.password_file: {path}: ") and what in msg
    assert "\n" not in msg and "hunter2" not in msg and "a b" not in msg


def test_a_missing_file_or_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "gone"
    with pytest.raises(SecretFileError, match=rf"^irc.password_file: {gone}: no such file$"):
        read_irc_credentials(IrcSpec(password_file=str(gone)))
    monkeypatch.delenv("FIRECLAW_TEST_UNSET", raising=False)
    spec = IrcSpec(server=EXTERNAL, sasl=SaslSpec(username="u", password_env="FIRECLAW_TEST_UNSET"))
    with pytest.raises(
        SecretFileError,
        match="^irc.sasl.password_env: environment variable FIRECLAW_TEST_UNSET: not set$",
    ):
        read_irc_credentials(spec)


def test_a_bad_value_in_the_environment_is_named_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRECLAW_TEST_IRC_PASS", "two words")
    with pytest.raises(SecretFileError) as info:
        read_irc_credentials(IrcSpec(password_env="FIRECLAW_TEST_IRC_PASS"))
    assert str(info.value) == (
        "irc.password_env: environment variable FIRECLAW_TEST_IRC_PASS: must be the password:"
        " one word: 1 to 64 printable ASCII characters without spaces"
    )
    monkeypatch.setenv("FIRECLAW_TEST_IRC_PASS", "ctl\x1bchar")
    with pytest.raises(SecretFileError, match="one line of 1 to 400 characters") as info:
        read_irc_credentials(IrcSpec(server=EXTERNAL, password_env="FIRECLAW_TEST_IRC_PASS"))
    assert "ctl" not in str(info.value)


def test_a_link_is_refused(tmp_path: Path) -> None:
    target = secret(tmp_path, "hunter2\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(SecretFileError, match=rf"^irc.password_file: {link}: cannot read"):
        read_irc_credentials(IrcSpec(password_file=str(link)))


def test_the_route_agents_get_keeps_the_password_out_of_its_repr() -> None:
    route = IrcRoute(upstream=("127.0.0.1", 6667), agents_channel="#agents", password="hunter2")
    assert "hunter2" not in repr(route) and route.password == "hunter2"
