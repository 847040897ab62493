"""fireclaw.config: loading, merging, validation errors, diffing and role hashes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import textwrap

import pytest
from fireclaw.config import (
    EX_CONFIG,
    Backoff,
    ChatHarnessSpec,
    CommandRateSpec,
    Config,
    ConfigError,
    HarnessSpec,
    IrcOperatorSpec,
    IrcSpec,
    ManagedIrcSpec,
    NetworkSpec,
    PoolSpec,
    RestartPolicy,
    Role,
    SaslSpec,
    diff_config,
    load_config,
    parse_config,
    parse_server,
    role_hash,
)
from fireclaw.config.llm import ManagedModelSpec
from fireclaw.config.load import MAX_FILE_BYTES

REPO = pathlib.Path(__file__).resolve().parent.parent
TEMPLATES = ("worker", "coder", "researcher", "quick", "creative")

TEMPLATE = """\
name: {name}
description: test role
nick_pattern: "{{role}}-{{n}}"
persona: You test things.
model: test-model
harness:
  kind: command
  command: ["sh", "-c", "echo hi"]
resources: {{vcpus: 1, memory_mib: 256}}
restart:
  policy: permanent
  max_restarts: 5
  backoff: {{base: 1, max: 60}}
pool: {{min_idle: 1, max_active: 4}}
channels: ["#test"]
"""


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def swarm_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory with roles/alpha.yaml and roles/beta.yaml beside where swarm.yaml goes."""
    for name in ("alpha", "beta"):
        write(tmp_path / "roles" / f"{name}.yaml", TEMPLATE.format(name=name))
    return tmp_path


def load(swarm_dir: pathlib.Path, body: str) -> Config:
    return load_config(write(swarm_dir / "swarm.yaml", body))


def error_of(swarm_dir: pathlib.Path, body: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(swarm_dir, body)
    text = str(info.value)
    assert "\n" not in text
    return text


# --- what ships --------------------------------------------------------------


def test_default_swarm_yaml_loads() -> None:
    config = load_config(REPO / "swarm.yaml")
    assert config.path == (REPO / "swarm.yaml").resolve()
    assert config.state_dir == (REPO / "state").resolve()
    assert config.backend == "auto"
    assert list(config.roles) == ["worker", "coder"]
    assert config.roles["worker"].pool.min_idle == 2
    assert config.roles["coder"].pool.min_idle == 1
    assert config.roles["worker"].nick(3) == "worker-3"
    assert config.task_max_attempts == 3
    assert EX_CONFIG == 78


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_packaged_template_loads(name: str, tmp_path: pathlib.Path) -> None:
    # No roles/ beside this file: the templates shipped in fireclaw.roles are used.
    config = load(tmp_path, f"version: 1\nmodels: {{server: managed}}\nroles:\n  {name}:\n")
    role = config.roles[name]
    assert role.name == name
    assert role.nick_pattern == f"{name}-{{n}}"
    assert role.persona and role.model and role.description
    # Every shipped role thinks with the model the managed server serves.
    assert role.harness.kind == "chat"
    assert role.model == ManagedModelSpec().name
    # Without a model server it asks for one, in one line.
    with pytest.raises(ConfigError, match=f"roles.{name}.harness.kind: chat asks a model"):
        load(tmp_path, f"version: 1\nroles:\n  {name}:\n")


def test_templates_are_distinct() -> None:
    config = parse_config(
        "version: 1\nmodels: {server: managed}\nroles: {"
        + ", ".join(f"{n}: {{}}" for n in TEMPLATES)
        + "}\n",
        path=REPO / "swarm.yaml",
    )
    assert len({r.persona for r in config.roles.values()}) == len(TEMPLATES)
    assert len({r.harness for r in config.roles.values()}) == len(TEMPLATES)


def test_the_shipped_swarm_thinks_with_the_bundled_model() -> None:
    config = load_config(REPO / "swarm.yaml")
    assert config.models is not None and config.models.is_managed
    assert config.model_path is None  # the GGUF file that ships with the install
    for role in config.roles.values():
        assert role.harness.kind == "chat"
        assert role.model == config.models.managed.name


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_echo_harness_each_template_documents_works(name: str, tmp_path: pathlib.Path) -> None:
    """Each template keeps the command harness as a commented alternative: uncommented
    in place of the chat harness, it loads and echoes the agent and the prompt."""
    text = (REPO / "roles" / f"{name}.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("harness:")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
    alternative = [
        "  " + line.removeprefix("  #   ") for line in lines[start:end] if line.startswith("  #   ")
    ]
    write(
        tmp_path / "roles" / f"{name}.yaml",
        "\n".join(lines[: start + 1] + alternative + lines[end:]),
    )
    role = load(tmp_path, f"version: 1\nroles:\n  {name}:\n").roles[name]
    assert role.harness.kind == "command"
    env = {**os.environ, "FIRECLAW_AGENT": "worker-1", "FIRECLAW_PROMPT": "hi: 100% -n"}
    out = subprocess.run(role.harness.command, env=env, capture_output=True, text=True, check=True)
    assert out.stdout == "worker-1: hi: 100% -n\n"


# --- merging and normalising -------------------------------------------------


def test_defaults_without_overrides(swarm_dir: pathlib.Path) -> None:
    config = load(swarm_dir, "version: 1\nroles:\n  alpha:\n")
    assert config.control.heartbeat_interval == 2.0
    assert config.stop.fleet_deadline == 60.0
    role = config.roles["alpha"]
    assert role.restart == RestartPolicy(policy="permanent")
    assert role.guest_command is None
    assert role.channels == ("#test",)


def test_overrides_merge_field_by_field(swarm_dir: pathlib.Path) -> None:
    config = load(
        swarm_dir,
        """\
        version: 1
        roles:
          alpha:
            pool: {min_idle: 3}
            resources: {memory_mib: 512}
            restart: {max_restarts: 9, backoff: {max: 120}}
            model: other-model
            harness: {command: [echo, "{prompt}"], timeout: 5}
            guest_command: [python3, -m, fireclaw.guest_daemon]
        """,
    )
    role = config.roles["alpha"]
    assert role.pool == PoolSpec(min_idle=3, max_active=4)
    assert (role.resources.vcpus, role.resources.memory_mib) == (1, 512)
    assert role.restart.max_restarts == 9
    assert role.restart.policy == "permanent"
    assert (role.restart.backoff.base, role.restart.backoff.max) == (1.0, 120.0)
    assert role.model == "other-model"
    assert role.persona == "You test things."
    # A harness is replaced whole, not merged.
    assert role.harness == HarnessSpec(command=("echo", "{prompt}"), timeout=5.0)
    assert role.guest_command == ("python3", "-m", "fireclaw.guest_daemon")


def test_role_with_other_template_and_file_order(swarm_dir: pathlib.Path) -> None:
    config = load(
        swarm_dir,
        """\
        version: 1
        roles:
          zeta: {template: alpha}
          beta: {}
          alpha: {}
        """,
    )
    assert list(config.roles) == ["zeta", "beta", "alpha"]
    assert config.roles["zeta"].name == "zeta"
    assert config.roles["zeta"].nick_pattern == "zeta-{n}"


@pytest.mark.parametrize(
    ("written", "policy"),
    [
        ("always", "permanent"),
        ("on-failure", "transient"),
        ("no", "temporary"),
        ('"no"', "temporary"),
        ("permanent", "permanent"),
        ("transient", "transient"),
        ("temporary", "temporary"),
    ],
)
def test_restart_policy_aliases_normalise(
    swarm_dir: pathlib.Path, written: str, policy: str
) -> None:
    config = load(swarm_dir, f"version: 1\nroles:\n  alpha:\n    restart: {{policy: {written}}}\n")
    assert config.roles["alpha"].restart.policy == policy


def test_alias_in_template_normalises(swarm_dir: pathlib.Path) -> None:
    text = TEMPLATE.format(name="alpha").replace("policy: permanent", "policy: on-failure")
    write(swarm_dir / "roles" / "alpha.yaml", text)
    assert load(swarm_dir, "version: 1\nroles: {alpha: {}}\n").roles["alpha"].restart.policy == (
        "transient"
    )


def test_ints_accepted_for_floats(swarm_dir: pathlib.Path) -> None:
    config = load(swarm_dir, "version: 1\ncontrol: {heartbeat_interval: 1}\nroles: {}\n")
    assert config.control.heartbeat_interval == 1.0
    assert isinstance(config.control.heartbeat_interval, float)


def test_state_dir_relative_to_file(
    swarm_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(swarm_dir / "roles")  # somewhere else: must not matter
    config = load(swarm_dir, "version: 1\nstate_dir: var/run\nroles: {}\n")
    assert config.state_dir == (swarm_dir / "var" / "run").resolve()
    assert config.path == (swarm_dir / "swarm.yaml").resolve()
    absolute = load(swarm_dir, f"version: 1\nstate_dir: {swarm_dir / 'abs'}\nroles: {{}}\n")
    assert absolute.state_dir == (swarm_dir / "abs").resolve()


def test_parse_config_uses_path_for_relative_dirs(swarm_dir: pathlib.Path) -> None:
    config = parse_config("version: 1\nroles: {alpha: {}}\n", path=swarm_dir / "nowhere.yaml")
    assert config.state_dir == (swarm_dir / "state").resolve()
    assert config.roles["alpha"].model == "test-model"


def test_roles_dir_setting(swarm_dir: pathlib.Path) -> None:
    write(swarm_dir / "elsewhere" / "gamma.yaml", TEMPLATE.format(name="gamma"))
    config = load(swarm_dir, "version: 1\nroles_dir: elsewhere\nroles: {gamma: {}}\n")
    assert list(config.roles) == ["gamma"]


# --- errors: one line, file and field path -----------------------------------


def test_error_out_of_range(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha:\n    pool: {min_idle: -1}\n")
    file = swarm_dir / "swarm.yaml"
    assert msg == f"{file}: roles.alpha.pool.min_idle: expected int >= 0, got -1"


def test_error_wrong_type(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha:\n    pool: {max_active: lots}\n")
    assert msg.endswith(": roles.alpha.pool.max_active: expected int, got str")
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha:\n    harness: {command: [true]}\n")
    assert msg.endswith(
        ": roles.alpha.harness.command[0]: expected str, got bool true"
        " (quote it to make it a string)"
    )
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha:\n    pool: 3\n")
    assert msg.endswith(": roles.alpha.pool: expected mapping, got int")


def test_error_list_item(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, 'version: 1\nroles:\n  alpha:\n    channels: ["#ok", "nope"]\n')
    assert ": roles.alpha.channels[1]: expected str matching regex" in msg
    assert msg.endswith("got 'nope'")


def test_error_unknown_field(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha:\n    pool: {min_idel: 2}\n")
    assert msg == (
        f"{swarm_dir / 'swarm.yaml'}: roles.alpha.pool.min_idel: unknown field;"
        " expected one of: min_idle, max_active"
    )
    msg = error_of(swarm_dir, "version: 1\nbakend: qemu\nroles: {}\n")
    assert ": bakend: unknown field; expected one of: version, backend," in msg
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha: {modle: x}\n")
    assert ": roles.alpha.modle: unknown field" in msg


def test_error_missing_field(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "roles: {}\n")
    assert msg.endswith("swarm.yaml: version: required field is missing")


def test_error_bad_choice(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\nbackend: kvm\nroles: {}\n")
    assert msg.endswith(": backend: expected one of: auto, firecracker, process, qemu; got 'kvm'")
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha:\n    restart: {policy: sometimes}\n")
    assert ": roles.alpha.restart.policy: expected one of: permanent, temporary, transient," in msg
    assert msg.endswith("always, on-failure, no; got 'sometimes'")
    msg = error_of(swarm_dir, "version: 2\nroles: {}\n")
    assert msg.endswith(": version: expected one of: 1; got 2")


def test_error_cross_field(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha:\n    restart: {backoff: {base: 90}}\n")
    assert msg.endswith(": roles.alpha.restart.backoff: max (60) must be >= base (90)")
    msg = error_of(swarm_dir, "version: 1\ncontrol: {heartbeat_timeout: 2}\nroles: {}\n")
    assert ": control: heartbeat_timeout (2) must be greater than heartbeat_interval (2)" in msg
    msg = error_of(swarm_dir, "version: 1\ncontrol: {max_message_bytes: 70000}\nroles: {}\n")
    assert msg.endswith(": control.max_message_bytes: expected int <= 65536, got 70000")


def test_error_task_max_attempts(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\ntask_max_attempts: 0\nroles: {}\n")
    assert msg.endswith("swarm.yaml: task_max_attempts: expected int >= 1, got 0")


def test_error_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert str(info.value) == f"{tmp_path / 'absent.yaml'}: cannot read: No such file or directory"


def test_error_unreadable(tmp_path: pathlib.Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.yaml: cannot read: Is a directory$"):
        load_config(tmp_path / "dir.yaml")
    bad = tmp_path / "binary.yaml"
    bad.write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not UTF-8 text"):
        load_config(bad)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match=r"big\.yaml: larger than"):
        load_config(big)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_error_permission_denied(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "swarm.yaml", "version: 1\nroles: {}\n")
    path.chmod(0)
    with pytest.raises(ConfigError, match=r"swarm\.yaml: cannot read: Permission denied$"):
        load_config(path)


def test_error_yaml_syntax(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha: {pool: [}\n")
    assert msg.startswith(f"{swarm_dir / 'swarm.yaml'}:3:")
    assert ": invalid YAML: " in msg
    msg = error_of(swarm_dir, "version: 1\nbackend: a: b\n")
    # libyaml and the pure-Python parser word this differently.
    assert msg.startswith(f"{swarm_dir / 'swarm.yaml'}:2:11: invalid YAML: mapping values are not")


def test_error_duplicate_key(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha: {}\n  alpha: {}\n")
    assert msg == f"{swarm_dir / 'swarm.yaml'}:4:3: invalid YAML: duplicate key 'alpha'"


def test_error_not_a_mapping(swarm_dir: pathlib.Path) -> None:
    assert error_of(swarm_dir, "- version\n- 1\n").endswith(
        "swarm.yaml: expected a mapping at the top level, got a list"
    )
    assert error_of(swarm_dir, "# nothing\n").endswith(
        "swarm.yaml: empty document; expected a mapping"
    )
    assert error_of(swarm_dir, "version: 1\nroles: {alpha: [1]}\n").endswith(
        "swarm.yaml: roles.alpha: expected mapping, got a list"
    )


def test_error_unknown_template(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\nroles:\n  foo: {}\n")
    file, roles = swarm_dir / "swarm.yaml", swarm_dir / "roles"
    assert msg == f"{file}: roles.foo.template: no template 'foo' in {roles}"
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha: {template: nope}\n")
    assert msg.endswith(": roles.alpha.template: no template 'nope' in " + str(swarm_dir / "roles"))
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha: {template: ../alpha}\n")
    assert ": roles.alpha.template: expected a name matching" in msg


def test_error_bad_role_name(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\nroles:\n  Alpha: {}\n")
    assert msg.endswith("swarm.yaml: roles: role name 'Alpha' must match ^[a-z][a-z0-9-]{0,30}$")
    msg = error_of(swarm_dir, "version: 1\nroles:\n  alpha: {name: x}\n")
    assert msg.endswith(": roles.alpha.name: a role's name is its key under roles")


def test_error_missing_roles_dir(swarm_dir: pathlib.Path) -> None:
    msg = error_of(swarm_dir, "version: 1\nroles_dir: gone\nroles: {}\n")
    assert msg == f"{swarm_dir / 'swarm.yaml'}: roles_dir: no such directory: {swarm_dir / 'gone'}"


def test_error_in_template_names_template_file(swarm_dir: pathlib.Path) -> None:
    template = swarm_dir / "roles" / "alpha.yaml"
    write(template, TEMPLATE.format(name="alpha").replace("max_active: 4", "max_active: 0"))
    msg = error_of(swarm_dir, "version: 1\nroles: {alpha: {}}\n")
    assert msg == f"{template}: pool.max_active: expected int >= 1, got 0"

    write(template, TEMPLATE.format(name="alpha").replace("model: test-model\n", ""))
    assert error_of(swarm_dir, "version: 1\nroles: {alpha: {}}\n") == (
        f"{template}: model: required field is missing"
    )

    write(template, TEMPLATE.format(name="other"))
    assert error_of(swarm_dir, "version: 1\nroles: {alpha: {}}\n") == (
        f"{template}: name: expected 'alpha' (the file's name), got 'other'"
    )

    write(template, "name: [alpha\n")
    assert error_of(swarm_dir, "version: 1\nroles: {alpha: {}}\n").startswith(
        f"{template}:2:1: invalid YAML: "
    )

    write(template, TEMPLATE.format(name="alpha").replace('"{role}-{n}"', '"{role}"'))
    assert error_of(swarm_dir, "version: 1\nroles: {alpha: {}}\n").startswith(
        f"{template}: nick_pattern '{{role}}' must be a nick with '{{n}}' exactly once"
    )


def test_error_same_nick_pattern(swarm_dir: pathlib.Path) -> None:
    msg = error_of(
        swarm_dir,
        "version: 1\nroles:\n  alpha: {}\n  beta: {nick_pattern: 'alpha-{n}'}\n",
    )
    assert msg.endswith(
        ": roles.beta.nick_pattern: 'alpha-{n}' is also the nick pattern of role 'alpha'"
    )


# --- diff and role_hash ------------------------------------------------------

BASE = """\
version: 1
roles:
  alpha: {}
  beta: {}
"""


def test_diff_identical_is_empty(swarm_dir: pathlib.Path) -> None:
    diff = diff_config(load(swarm_dir, BASE), load(swarm_dir, BASE))
    assert diff.is_empty
    assert diff.unchanged == ("alpha", "beta")
    assert (diff.added, diff.removed, diff.changed) == ((), (), {})


def test_diff_add_and_remove(swarm_dir: pathlib.Path) -> None:
    old = load(swarm_dir, BASE)
    new = load(swarm_dir, "version: 1\nroles:\n  beta: {}\n  gamma: {template: alpha}\n")
    diff = diff_config(old, new)
    assert diff.added == ("gamma",)
    assert diff.removed == ("alpha",)
    assert diff.unchanged == ("beta",)
    assert diff.changed == {}
    assert not diff.is_empty


def test_diff_scale(swarm_dir: pathlib.Path) -> None:
    old = load(swarm_dir, BASE)
    new = load(swarm_dir, BASE.replace("alpha: {}", "alpha: {pool: {max_active: 9}}"))
    diff = diff_config(old, new)
    change = diff.changed["alpha"]
    assert (change.scale, change.replace, change.restart_policy, change.hot) == (
        True,
        False,
        False,
        (),
    )
    assert diff.unchanged == ("beta",)


def test_diff_hot(swarm_dir: pathlib.Path) -> None:
    old = load(swarm_dir, BASE)
    new = load(
        swarm_dir,
        BASE.replace("alpha: {}", "alpha: {persona: New., model: m2, channels: ['#x']}"),
    )
    change = diff_config(old, new).changed["alpha"]
    assert change.hot == ("model", "persona", "channels")
    assert not (change.replace or change.scale or change.restart_policy)


def test_diff_replace_and_restart(swarm_dir: pathlib.Path) -> None:
    old = load(swarm_dir, BASE)
    new = load(
        swarm_dir,
        BASE.replace("alpha: {}", "alpha: {resources: {vcpus: 2}}").replace(
            "beta: {}", "beta: {restart: {policy: no}}"
        ),
    )
    diff = diff_config(old, new)
    assert diff.changed["alpha"].replace
    assert not diff.changed["alpha"].scale
    assert diff.changed["beta"].restart_policy
    assert not diff.changed["beta"].replace
    assert diff.unchanged == ()


@pytest.mark.parametrize(
    "override",
    ["harness: {command: ['true']}", "guest_command: [sh]", "nick_pattern: 'a{n}'"],
)
def test_diff_vm_fields_replace(swarm_dir: pathlib.Path, override: str) -> None:
    new = load(swarm_dir, BASE.replace("alpha: {}", f"alpha: {{{override}}}"))
    assert diff_config(load(swarm_dir, BASE), new).changed["alpha"].replace


def test_diff_global_sections(swarm_dir: pathlib.Path) -> None:
    old = load(swarm_dir, BASE)
    new = load(
        swarm_dir,
        "version: 1\nbackend: process\nstate_dir: other\ncontrol: {boot_timeout: 5}\n"
        "stop: {grace_period: 1}\ntask_max_attempts: 1\n" + BASE.removeprefix("version: 1\n"),
    )
    diff = diff_config(old, new)
    assert diff.backend_changed and diff.state_dir_changed
    assert diff.control_changed and diff.stop_changed and diff.task_max_attempts_changed
    assert diff.unchanged == ("alpha", "beta")
    assert not diff.is_empty


def test_role_hash_stable_and_selective(swarm_dir: pathlib.Path) -> None:
    first = load(swarm_dir, BASE).roles["alpha"]
    again = load(swarm_dir, BASE).roles["alpha"]
    assert role_hash(first) == role_hash(again)
    assert len(role_hash(first)) == 64
    tuned = load(
        swarm_dir,
        BASE.replace(
            "alpha: {}",
            "alpha: {pool: {min_idle: 5}, model: m2, persona: P., restart: {policy: no},"
            " channels: [], description: d}",
        ),
    ).roles["alpha"]
    assert role_hash(tuned) == role_hash(first)
    bigger = load(swarm_dir, BASE.replace("alpha: {}", "alpha: {resources: {memory_mib: 512}}"))
    assert role_hash(bigger.roles["alpha"]) != role_hash(first)


def test_role_hash_known_value() -> None:
    # Pinned: a hash that changed for an unchanged spec would replace every VM after an upgrade.
    def role(**fields: object) -> Role:
        spec: dict[str, object] = {
            "name": "r",
            "description": "",
            "nick_pattern": "r-{n}",
            "persona": "",
            "model": "m",
            "harness": HarnessSpec(command=("true",)),
        }
        spec.update(fields)
        return Role(**spec)  # type: ignore[arg-type]

    pinned = "c2bb8873a9e27b4013dab9619450a4fc29b2ea88f82df008395cda1e1f56519b"
    assert role_hash(role()) == pinned
    assert role_hash(role(name="s", description="d", persona="p", model="z")) == pinned
    assert role_hash(role(pool=PoolSpec(min_idle=0), channels=("#a",))) == pinned
    assert role_hash(role(restart=RestartPolicy(policy="temporary"))) == pinned
    assert role_hash(role(guest_command=("sh",))) != pinned
    assert role_hash(role(harness=HarnessSpec(command=("true",), timeout=1))) != pinned


# --- irc ---------------------------------------------------------------------


def test_irc_defaults(swarm_dir: pathlib.Path) -> None:
    irc = load(swarm_dir, BASE).irc
    assert irc == IrcSpec()
    assert irc.enabled and irc.is_managed and irc.server == "managed"
    assert irc.managed == ManagedIrcSpec(
        listen="127.0.0.1",
        port=6667,
        server_name="irc.fireclaw.local",
        network="fireclaw",
        max_nick_length=30,
    )
    assert irc.endpoint == ("127.0.0.1", 6667)
    assert (irc.password_file, irc.password_env, irc.sasl) == (None, None, None)
    assert (irc.overseer_nick, irc.control_channel, irc.agents_channel) == (
        "overseer",
        "#control",
        "#agents",
    )
    assert irc.operators == ("*!*@127.0.0.1", "*!*@localhost", "*!*@::1", "*!*@[0::1]")
    # The masks alone are not enough: an operator must /OPER with the password file.
    assert (irc.operator_auth, irc.operator_accounts) == ("oper", ())
    assert irc.managed.operators == (IrcOperatorSpec(name="fireclaw"),)
    assert irc.command_rate == CommandRateSpec(per_minute=20.0, burst=5)
    assert irc.agent_cooldown == 10.0
    assert irc.restart == RestartPolicy(policy="permanent", backoff=Backoff(base=1.0, max=30.0))
    # What ships says the same, spelled out.
    assert load_config(REPO / "swarm.yaml").irc == IrcSpec()


def test_irc_settings(swarm_dir: pathlib.Path) -> None:
    section = textwrap.dedent(
        """
        irc:
          enabled: false
          managed: {listen: "0.0.0.0", port: 7000, server_name: irc.example, network: net-1,
                    max_nick_length: 20}
          password_file: secrets/server.pw
          overseer_nick: boss
          control_channel: "#ops"
          agents_channel: "#crew"
          operators: ["alice!*@10.0.0.*", "*!*@[0::1]"]
          command_rate: {per_minute: 6, burst: 2}
          agent_cooldown: 2.5
        """
    )
    irc = load(swarm_dir, BASE + section).irc
    assert not irc.enabled
    assert irc.endpoint == ("127.0.0.1", 7000)  # listening everywhere: connect on loopback
    assert irc.managed.max_nick_length == 20
    assert irc.password_file == str(swarm_dir / "secrets" / "server.pw")
    assert irc.operators == ("alice!*@10.0.0.*", "*!*@[0::1]")
    assert irc.command_rate == CommandRateSpec(per_minute=6.0, burst=2)
    assert (irc.overseer_nick, irc.control_channel, irc.agents_channel) == (
        "boss",
        "#ops",
        "#crew",
    )
    assert irc.agent_cooldown == 2.5
    no_one = load(swarm_dir, BASE + "irc: {operators: []}\n").irc
    assert no_one.operators == ()


def test_irc_operator_settings(swarm_dir: pathlib.Path) -> None:
    """Password files are named, never given, and relative to swarm.yaml's folder."""
    section = textwrap.dedent(
        """
        irc:
          managed:
            operators:
              - {name: fireclaw}
              - {name: alice, password_file: secrets/alice.pw, mask: "alice!*@127.0.0.1"}
              - {name: bob, password_file: /etc/fireclaw/bob.pw}
        """
    )
    irc = load(swarm_dir, BASE + section).irc
    assert irc.managed.operators == (
        IrcOperatorSpec(name="fireclaw"),
        IrcOperatorSpec(
            name="alice",
            password_file=str(swarm_dir / "secrets" / "alice.pw"),
            mask="alice!*@127.0.0.1",
        ),
        IrcOperatorSpec(name="bob", password_file="/etc/fireclaw/bob.pw"),
    )
    external = load(
        swarm_dir,
        BASE + "irc: {server: 'irc.example:6697', operator_auth: account,"
        " operator_accounts: [Alice, bob]}\n",
    ).irc
    assert (external.operator_auth, external.operator_accounts) == ("account", ("Alice", "bob"))
    hostmask = load(
        swarm_dir, BASE + "irc: {operator_auth: hostmask, managed: {operators: []}}\n"
    ).irc
    assert (hostmask.operator_auth, hostmask.managed.operators) == ("hostmask", ())


@pytest.mark.parametrize(
    ("server", "endpoint"),
    [
        ("irc.libera.chat:6697", ("irc.libera.chat", 6697)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:6667", ("::1", 6667)),
        ("[fd00::1:2]:7000", ("fd00::1:2", 7000)),
    ],
)
def test_irc_external_server(swarm_dir: pathlib.Path, server: str, endpoint: object) -> None:
    irc = load(swarm_dir, BASE + f"irc: {{server: '{server}'}}\n").irc
    assert not irc.is_managed
    assert irc.endpoint == endpoint == parse_server(server)


def test_irc_external_server_credentials(swarm_dir: pathlib.Path) -> None:
    """Secrets are named (a file, relative to swarm.yaml, or a variable), never given."""
    irc = load(
        swarm_dir,
        BASE + "irc: {server: 'irc.example:6697', password_env: IRC_PASS,"
        " sasl: {username: bot, password_file: ~/sasl.pw}}\n",
    ).irc
    assert (irc.password_env, irc.password_file) == ("IRC_PASS", None)
    assert irc.sasl == SaslSpec(
        username="bot", password_file=str(pathlib.Path("~/sasl.pw").expanduser())
    )
    irc = load(
        swarm_dir,
        BASE + "irc: {server: 'irc.example:6697', password_file: /run/pw,"
        " sasl: {username: bot, password_env: SASL_PW}}\n",
    ).irc
    assert irc.password_file == "/run/pw"
    assert irc.sasl == SaslSpec(username="bot", password_env="SASL_PW")


INLINE = (
    "a secret is never written in swarm.yaml: put it in a file only its owner may read"
    " (chmod 600) and name it with password_file"
)


@pytest.mark.parametrize(
    ("irc", "where", "what"),
    [
        ("{password: hunter2}", "irc.password", f"{INLINE}, or an env var with password_env"),
        ("{password: ''}", "irc.password", f"{INLINE}, or an env var with password_env"),
        (
            "{server: 'x:1', sasl: {username: u, password: hunter2}}",
            "irc.sasl.password",
            f"{INLINE}, or an env var with password_env",
        ),
        (
            "{managed: {operators: [{name: op, password: hunter2}]}}",
            "irc.managed.operators[0].password",
            INLINE,
        ),
    ],
)
def test_an_inline_secret_is_refused_in_one_line_without_the_value(
    swarm_dir: pathlib.Path, irc: str, where: str, what: str
) -> None:
    msg = error_of(swarm_dir, BASE + f"irc: {irc}\n")
    assert msg == f"{swarm_dir / 'swarm.yaml'}: {where}: {what}"
    assert "hunter2" not in msg


@pytest.mark.parametrize(
    ("server", "what"),
    [
        ("irc.example", "expected 'managed' or host:port, got 'irc.example'"),
        (":6667", "expected 'managed' or host:port, got ':6667'"),
        ("host:0", "port must be a number from 1 to 65535, got '0'"),
        ("host:65536", "port must be a number from 1 to 65535, got '65536'"),
        ("host:", "port must be a number from 1 to 65535, got ''"),
        ("host:http", "port must be a number from 1 to 65535, got 'http'"),
        ("::1:6667", "an IPv6 address goes in brackets, as in [::1]:6667; got '::1:6667'"),
        ("[nope]:6667", "'nope' in brackets is not an IPv6 address"),
        ("bad host:1", "'bad host' is not a host name or an IP address"),
        ("Managed", "expected 'managed' or host:port, got 'Managed'"),
    ],
)
def test_irc_server_errors(swarm_dir: pathlib.Path, server: str, what: str) -> None:
    msg = error_of(swarm_dir, BASE + f"irc: {{server: '{server}'}}\n")
    assert msg == f"{swarm_dir / 'swarm.yaml'}: irc.server: {what}"


@pytest.mark.parametrize(
    ("irc", "where", "what"),
    [
        ("{managed: {port: 0}}", "irc.managed.port", "expected int >= 1, got 0"),
        ("{managed: {port: 70000}}", "irc.managed.port", "expected int <= 65535, got 70000"),
        ("{managed: {listen: localhost}}", "irc.managed.listen", "expected an IP address"),
        ("{managed: {server_name: nodot}}", "irc.managed.server_name", "needs a dot"),
        ("{managed: {server_name: -a.b}}", "irc.managed.server_name", "expected a server name"),
        ("{managed: {network: 'a b'}}", "irc.managed.network", "expected a network name"),
        ("{managed: {max_nick_length: 40}}", "irc.managed.max_nick_length", "<= 31"),
        ("{managed: {prot: 1}}", "irc.managed.prot", "unknown field; expected one of: listen,"),
        ("{control_channel: control}", "irc.control_channel", "expected a channel: '#'"),
        ("{agents_channel: '#a b'}", "irc.agents_channel", "got '#a b'"),
        ("{agents_channel: '#a,b'}", "irc.agents_channel", "no spaces, commas"),
        ("{agents_channel: '#CONTROL'}", "irc.agents_channel", "is also control_channel"),
        ("{overseer_nick: 1st}", "irc.overseer_nick", "expected a nick"),
        (
            "{managed: {max_nick_length: 9}, overseer_nick: overseer10}",
            "irc.overseer_nick",
            "'overseer10' is longer than managed.max_nick_length (9)",
        ),
        ("{operators: [alice]}", "irc.operators[0]", "expected a hostmask glob nick!user@host"),
        ("{operators: ['*!*@a b']}", "irc.operators[0]", "got '*!*@a b'"),
        ("{operators: '*!*@x'}", "irc.operators", "expected list, got str"),
        ("{operator_auth: password}", "irc.operator_auth", "one of: account, hostmask, oper; got"),
        ("{operator_auth: account}", "irc.operator_accounts", "'account' needs at least one"),
        (
            "{operator_auth: account, operator_accounts: [alice]}",
            "irc.operator_auth",
            "the managed server (ngircd) has no accounts; use oper",
        ),
        (
            "{operator_accounts: [alice]}",
            "irc.operator_accounts",
            "only used with operator_auth: account (it is 'oper')",
        ),
        (
            "{server: 'x:1', operator_auth: account, operator_accounts: ['a b']}",
            "irc.operator_accounts[0]",
            "expected an account name",
        ),
        (
            "{managed: {operators: []}}",
            "irc.managed",
            "operator_auth 'oper' needs at least one entry in managed.operators",
        ),
        (
            "{managed: {operators: [{name: op}, {name: OP}]}}",
            "irc.managed.operators",
            "the name 'op' is given twice",
        ),
        (
            "{managed: {operators: [{name: 'a b'}]}}",
            "irc.managed.operators[0].name",
            "expected an operator name: 1 to 30 letters",
        ),
        (
            "{managed: {operators: [{name: op, password_env: X}]}}",
            "irc.managed.operators[0].password_env",
            "unknown field; expected one of: name, password_file, mask",
        ),
        (
            "{managed: {operators: [{name: op, mask: alice}]}}",
            "irc.managed.operators[0].mask",
            "expected a hostmask glob",
        ),
        ("{password_file: ''}", "irc.password_file", "expected str of length >= 1"),
        ("{password_env: 'A B'}", "irc.password_env", "expected an environment variable name"),
        ("{password_env: 1X}", "irc.password_env", "expected an environment variable name"),
        ("{password_file: f, password_env: E}", "irc.password_file", "not both"),
        (
            "{sasl: {username: u, password_file: f}}",
            "irc.sasl",
            "has no SASL; use password_file or password_env",
        ),
        (
            "{server: 'x:1', sasl: {username: u}}",
            "irc.sasl.password_file",
            "SASL needs password_file or password_env",
        ),
        (
            "{server: 'x:1', sasl: {username: u, password_file: f, password_env: E}}",
            "irc.sasl.password_file",
            "give password_file or password_env, not both",
        ),
        ("{command_rate: {per_minute: 0}}", "irc.command_rate.per_minute", "expected float > 0"),
        ("{command_rate: {burst: 0}}", "irc.command_rate.burst", "expected int >= 1, got 0"),
        ("{agent_cooldown: -1}", "irc.agent_cooldown", "expected float >= 0"),
        ("{enabled: maybe}", "irc.enabled", "expected bool, got str"),
        ("{restart: {policy: sometimes}}", "irc.restart.policy", "expected one of: permanent,"),
        ("{restart: {backoff: {base: 40}}}", "irc.restart.backoff", "max (30) must be >= base"),
        ("{bogus: 1}", "irc.bogus", "unknown field; expected one of: enabled, server, managed,"),
        ("[]", "irc", "expected mapping, got list"),
    ],
)
def test_irc_errors(swarm_dir: pathlib.Path, irc: str, where: str, what: str) -> None:
    msg = error_of(swarm_dir, BASE + f"irc: {irc}\n")
    assert msg.startswith(f"{swarm_dir / 'swarm.yaml'}: {where}: ")
    assert what in msg


def test_irc_restart_merges_over_irc_defaults(swarm_dir: pathlib.Path) -> None:
    irc = load(swarm_dir, BASE + "irc: {restart: {policy: no, max_restarts: 9}}\n").irc
    assert irc.restart == RestartPolicy(
        policy="temporary", max_restarts=9, backoff=Backoff(base=1.0, max=30.0)
    )
    irc = load(swarm_dir, BASE + "irc: {restart: {policy: always, backoff: {base: 2}}}\n").irc
    assert irc.restart.policy == "permanent"
    assert irc.restart.backoff == Backoff(base=2.0, max=30.0)


def test_diff_irc(swarm_dir: pathlib.Path) -> None:
    old = load(swarm_dir, BASE)
    assert not diff_config(old, load(swarm_dir, BASE)).irc_changed
    same = load(swarm_dir, BASE + "irc: {server: managed, agent_cooldown: 10}\n")
    assert not diff_config(old, same).irc_changed
    for change in ("agent_cooldown: 1", "operators: ['*!*@*']", "managed: {port: 7000}"):
        diff = diff_config(old, load(swarm_dir, BASE + f"irc: {{{change}}}\n"))
        assert diff.irc_changed and not diff.is_empty
        assert diff.unchanged == ("alpha", "beta") and not diff.control_changed


def test_network_defaults_and_override(swarm_dir: pathlib.Path) -> None:
    assert load(swarm_dir, BASE).network == NetworkSpec()
    net = load(swarm_dir, BASE + "network: {subnet: 10.77.0.0/20, egress: false}\n").network
    assert (net.subnet, net.egress) == ("10.77.0.0/20", False)


@pytest.mark.parametrize(
    ("subnet", "what"),
    [
        (
            "10.0.0.300/16",
            "'10.0.0.300/16' is not an IPv4 network:"
            " Octet 300 (> 255) not permitted in '10.0.0.300'",
        ),
        ("10.1.2.3/16", "'10.1.2.3/16' is not an IPv4 network: 10.1.2.3/16 has host bits set"),
        ("10.1.2.0/25", "10.1.2.0/25 is too small (at most /24)"),
        ("127.0.0.0/8", "127.0.0.0/8 cannot be a loopback, link-local or multicast network"),
    ],
)
def test_network_errors(swarm_dir: pathlib.Path, subnet: str, what: str) -> None:
    msg = error_of(swarm_dir, BASE + f"network: {{subnet: '{subnet}'}}\n")
    assert msg == f"{swarm_dir / 'swarm.yaml'}: network.subnet: {what}"


def test_a_network_change_is_a_diff(swarm_dir: pathlib.Path) -> None:
    old = load(swarm_dir, BASE)
    new = load(swarm_dir, BASE + "network: {egress: false}\n")
    diff = diff_config(old, new)
    assert diff.network_changed and not diff.is_empty


# --- the chat harness --------------------------------------------------------


def test_chat_harness_role_loads_with_defaults(swarm_dir: pathlib.Path) -> None:
    write(
        swarm_dir / "roles" / "thinker.yaml",
        TEMPLATE.format(name="thinker").replace(
            '  kind: command\n  command: ["sh", "-c", "echo hi"]\n', "  kind: chat\n"
        ),
    )
    config = load(swarm_dir, "version: 1\nmodels: {server: managed}\nroles:\n  thinker: {}\n")
    role = config.roles["thinker"]
    assert role.harness == ChatHarnessSpec()
    assert role.harness.kind == "chat"
    assert role.harness.tools == ("run_shell", "read_file", "write_file", "save_memory")
    assert (role.harness.tool_mode, role.harness.max_steps) == ("auto", 8)
    assert (role.harness.timeout, role.harness.max_tokens, role.harness.tool_timeout) == (
        300.0,
        512,
        60.0,
    )


def test_chat_harness_override_replaces_the_command_harness(swarm_dir: pathlib.Path) -> None:
    config = load(
        swarm_dir,
        """\
        version: 1
        models: {server: managed}
        roles:
          alpha:
            harness: {kind: chat, tools: [run_shell, podman_run], tool_mode: json, max_steps: 3}
          beta:
            harness: {command: [echo, "{prompt}"]}
        """,
    )
    alpha, beta = config.roles["alpha"], config.roles["beta"]
    assert alpha.harness == ChatHarnessSpec(
        tools=("run_shell", "podman_run"), tool_mode="json", max_steps=3
    )
    assert beta.harness == HarnessSpec(command=("echo", "{prompt}"))  # no kind: a command
    assert role_hash(alpha) != role_hash(beta)


@pytest.mark.parametrize(
    ("harness", "expected"),
    [
        (
            "{kind: robot}",
            "roles.alpha.harness.kind: expected one of: command, chat, claude-code, codex,"
            " gemini-cli, opencode, aider; got 'robot'",
        ),
        (
            "{kind: chat, tools: [run_shell, rm_rf]}",
            "roles.alpha.harness.tools[1]: expected one of: podman_run, read_file, run_shell,"
            " save_memory, write_file; got 'rm_rf'",
        ),
        (
            "{kind: chat, tools: [read_file, read_file]}",
            "roles.alpha.harness.tools: ['read_file', 'read_file'] names a tool twice",
        ),
        (
            "{kind: chat, tool_mode: grammar}",
            "roles.alpha.harness.tool_mode: expected one of: auto, json, native; got 'grammar'",
        ),
        ("{kind: chat, max_steps: 0}", "roles.alpha.harness.max_steps: expected int >= 1, got 0"),
        (
            "{kind: chat, command: [sh]}",
            "roles.alpha.harness.command: unknown field; expected one of: tools, tool_mode,"
            " max_steps, timeout, max_tokens, tool_timeout",
        ),
        (
            "{kind: command, max_tokens: 5}",
            "roles.alpha.harness.max_tokens: unknown field; expected one of: command, timeout",
        ),
    ],
)
def test_chat_harness_errors_are_one_line(
    swarm_dir: pathlib.Path, harness: str, expected: str
) -> None:
    msg = error_of(swarm_dir, f"version: 1\nroles:\n  alpha:\n    harness: {harness}\n")
    assert msg.endswith(": " + expected)


def test_a_chat_role_without_a_models_section_is_one_line(swarm_dir: pathlib.Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(swarm_dir, "version: 1\nroles:\n  alpha:\n    harness: {kind: chat}\n")
    assert str(info.value).endswith(
        "swarm.yaml: roles.alpha.harness.kind: chat asks a model: add a models: section"
        " (server: managed runs one here)"
    )
