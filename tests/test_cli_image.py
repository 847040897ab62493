"""Images built ``--with`` coding-agent CLIs, and what the supervisor checks of CLI roles.

The install itself (npm and pip against their registries) is not run here: tests
send no traffic off the machine. What is tested: the CLIs are part of the
image's key and of its record, an image without them keeps the key it had
before CLIs existed, and a role whose CLI the image lacks, or whose secret
cannot be read, is one line naming the fix or the file.
"""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import msgspec
import pytest
from fireclaw.config import load_config
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool.harness_message import PromotionError, harness_message
from fireclaw.pool.image import ImageSpec, KeyInputs, gather_inputs, image_key, kernel, load_image
from fireclaw.pool.image import build as image_build
from fireclaw.pool.image.clis import registry_packages, runtime_packages
from fireclaw.supervisor.harness_checks import (
    check_image_clis,
    check_role_secrets,
    needed_clis,
    read_role_secrets,
)
from fireclaw.supervisor.secretfile import SecretFileError
from swarmctl import NOTHING, WAIT, Swarm, role_yaml, swarm_yaml

PINS = ("msgspec==0.22.0", "trio==0.35.0")


def _gather(spec: ImageSpec, daemon_dir: Path) -> KeyInputs:
    apt = kernel.DebianKernel("linux-image-6.1.0-56-cloud-amd64", "1")
    return gather_inputs(spec, daemon_dir=daemon_dir, pins=PINS, debian_kernel=lambda: apt).inputs


@pytest.fixture
def daemon_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "guest_daemon"
    folder.mkdir()
    (folder / "__main__.py").write_text("print('hi')\n")
    return folder


def test_the_clis_are_inputs_of_the_image_key(daemon_dir: Path) -> None:
    plain = _gather(ImageSpec(), daemon_dir)
    both = _gather(ImageSpec(clis=("opencode", "aider")), daemon_dir)
    assert both.clis == ("npm:opencode-ai", "pypi:aider-chat")
    assert "nodejs" in both.packages and "nodejs" not in plain.packages
    assert image_key(both) != image_key(plain)
    aider = _gather(ImageSpec(clis=("aider",)), daemon_dir)
    assert "nodejs" not in aider.packages  # a PyPI CLI runs on the guest's own Python
    assert image_key(aider) not in (image_key(both), image_key(plain))


def test_an_image_without_clis_keeps_the_key_it_had_before(daemon_dir: Path) -> None:
    inputs = _gather(ImageSpec(), daemon_dir)
    # What the key was made of before images could hold CLIs: every other field.
    before = {
        field: getattr(inputs, field) for field in inputs.__struct_fields__ if field != "clis"
    }
    encoded = msgspec.json.encode(before, order="sorted")
    assert image_key(inputs) == hashlib.sha256(encoded).hexdigest()


def test_the_spec_sorts_the_clis_and_refuses_unknown_ones() -> None:
    assert image_build.checked(ImageSpec(clis=("opencode", "aider", "opencode"))).clis == (
        "aider",
        "opencode",
    )
    with pytest.raises(msgspec.ValidationError, match="clis"):
        msgspec.convert({"clis": ["vim"]}, ImageSpec)


def test_registry_and_runtime_packages() -> None:
    assert registry_packages(["codex", "claude-code"]) == (
        "npm:@anthropic-ai/claude-code",
        "npm:@openai/codex",
    )
    assert runtime_packages(["codex", "aider"]) == ("nodejs",)
    assert runtime_packages([]) == ()


def test_the_image_records_its_clis_and_old_records_read_as_none(tmp_path: Path) -> None:
    def write(directory: Path, extra: dict[str, object]) -> None:
        directory.mkdir()
        for name in (image_build.VMLINUX, image_build.INITRAMFS, image_build.ROOTFS):
            (directory / name).write_bytes(b"x")
        manifest = {
            "key": "k" * 64,
            "kernel_release": "6.1",
            "cmdline": image_build.BASE_CMDLINE,
            "built_at": 1.0,
            "inputs": {"kernel": "x"},
            **extra,
        }
        (directory / image_build.MANIFEST).write_bytes(msgspec.json.encode(manifest))

    write(tmp_path / "with", {"clis": ["aider", "opencode"]})
    write(tmp_path / "old", {})
    with_clis, old = load_image(tmp_path / "with"), load_image(tmp_path / "old")
    assert with_clis is not None and with_clis.clis == ("aider", "opencode")
    assert old is not None and old.clis == ()


# --- the supervisor's checks ---------------------------------------------------------


def swarm(tmp_path: Path, roles: str) -> Path:
    path = tmp_path / "swarm.yaml"
    path.write_text(
        "version: 1\nmodels: {server: managed}\nroles:\n" + textwrap.indent(roles, "  ")
    )
    return path


def test_a_role_whose_cli_the_image_lacks_names_the_build_that_has_it(tmp_path: Path) -> None:
    config = load_config(
        swarm(
            tmp_path,
            "coder: {harness: {kind: opencode}}\nreviewer: {template: coder,"
            " nick_pattern: 'rev-{n}', harness: {kind: aider}}\n",
        )
    )
    assert needed_clis(config) == ("aider", "opencode")
    assert check_image_clis(config, ("aider", "opencode", "codex")) is None
    assert check_image_clis(config, None) is None  # no image: the process backend
    assert check_image_clis(config, ("aider",)) == (
        "roles.coder.harness.kind: opencode is not in the guest image (its CLIs: aider);"
        " build one with: fireclaw-swarm image build --with aider,opencode,"
        " then restart the swarm"
    )


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    key = folder / "ANTHROPIC_API_KEY"
    key.write_text("sk-ant-test-0123456789\n")
    key.chmod(0o600)
    return folder


def test_role_secrets_are_read_from_one_file_per_variable(keys: Path) -> None:
    assert read_role_secrets(keys, ["ANTHROPIC_API_KEY"]) == {
        "ANTHROPIC_API_KEY": "sk-ant-test-0123456789"
    }


def test_a_missing_or_open_secret_is_one_line_naming_the_file(tmp_path: Path, keys: Path) -> None:
    roles = (
        "coder: {harness: {kind: claude-code, secrets_dir: keys,"
        " secrets: [ANTHROPIC_API_KEY, OTHER_KEY]}}\n"
    )
    config = load_config(swarm(tmp_path, roles))
    assert check_role_secrets(config) == (
        f"roles.coder.harness.secrets: {keys / 'OTHER_KEY'}: no such file"
    )
    (keys / "OTHER_KEY").write_text("value\n")
    (keys / "OTHER_KEY").chmod(0o644)
    problem = check_role_secrets(config)
    assert problem is not None and problem.startswith(
        f"roles.coder.harness.secrets: {keys / 'OTHER_KEY'}: group or others may use it"
    )
    (keys / "OTHER_KEY").chmod(0o600)
    assert check_role_secrets(config) is None


def test_promotion_hands_the_secrets_over_and_says_which_is_missing(keys: Path) -> None:
    config = load_config(
        swarm(
            keys.parent,
            "coder: {harness: {kind: claude-code, secrets_dir: keys,"
            " secrets: [ANTHROPIC_API_KEY], max_turns: 3}}\n",
        )
    )
    spec = config.roles["coder"].harness
    message = harness_message(
        spec, model="smollm2", gateway=("10.0.2.2", 8080), secrets=read_role_secrets
    )
    assert isinstance(message, p.CliHarness)
    assert message.gateway == "http://10.0.2.2:8080"
    assert message.max_turns == 3
    assert message.secrets.values == {"ANTHROPIC_API_KEY": "sk-ant-test-0123456789"}
    assert "sk-ant" not in repr(message)  # a log line of it never shows the key
    os.unlink(keys / "ANTHROPIC_API_KEY")
    with pytest.raises(PromotionError) as info:
        harness_message(
            spec, model="smollm2", gateway=("10.0.2.2", 8080), secrets=read_role_secrets
        )
    assert str(info.value) == f"claude-code secret: {keys / 'ANTHROPIC_API_KEY'}: no such file"
    with pytest.raises(PromotionError, match="no model gateway for its claude-code harness"):
        harness_message(spec, model="smollm2", gateway=None, secrets=read_role_secrets)


def test_secret_file_errors_never_hold_the_value(keys: Path) -> None:
    bad = keys / "BAD"
    bad.write_text("sk-value with-a-space\n")
    bad.chmod(0o600)
    with pytest.raises(SecretFileError) as info:
        read_role_secrets(keys, ["BAD"])
    assert "sk-value" not in str(info.value) and str(bad) in str(info.value)


# --- at start and reload, for real ------------------------------------------------------


def gemini_role(secrets_dir: Path) -> str:
    # gemini-cli needs no model server (it cannot use the gateway): only its own key.
    return role_yaml(
        "gem",
        min_idle=0,
        extra=f"harness: {{kind: gemini-cli, secrets_dir: {secrets_dir},"
        " secrets: [GEMINI_API_KEY]}\n",
    )


def test_a_missing_secret_stops_the_start_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "keys" / "GEMINI_API_KEY"
    swarm = Swarm(tmp_path, swarm_yaml(gemini_role(tmp_path / "keys")))
    with pytest.raises(AssertionError, match="no READY=1"):
        swarm.start(timeout=WAIT)
    assert swarm.proc is not None and swarm.proc.wait(WAIT) != 0
    assert f"fireclaw-swarm: roles.gem.harness.secrets: {missing}: no such file" in swarm.tail()
    swarm.close()
    assert swarm.leftovers() == NOTHING


def test_a_reload_to_a_role_whose_secret_is_open_is_rejected(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path, swarm_yaml(role_yaml("worker", min_idle=0)))
    swarm.start(timeout=WAIT)
    try:
        keys = tmp_path / "keys"
        keys.mkdir()
        (keys / "GEMINI_API_KEY").write_text("AIza-test\n")
        (keys / "GEMINI_API_KEY").chmod(0o640)
        swarm.config.write_text(swarm_yaml(role_yaml("worker", min_idle=0), gemini_role(keys)))
        out = swarm.cli("reload")
        assert out.returncode != 0
        error = out.stderr.decode().strip()
        assert error.startswith(
            "fireclaw-swarm: reload rejected: roles.gem.harness.secrets:"
            f" {keys / 'GEMINI_API_KEY'}: group or others may use it"
        ), error
        assert "AIza" not in error
        assert "gem" not in swarm.status()["roles"]
        (keys / "GEMINI_API_KEY").chmod(0o600)
        assert swarm.cli("reload").returncode == 0
        assert "gem" in swarm.status()["roles"]
        assert swarm.stop() == 0
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING
