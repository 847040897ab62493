"""Accounts: the choice of an account and the rest a refused one gets
(fireclaw.pool.accounts), the book over a real state store under trio's
MockClock, and how a CLI's stream says its account was refused (recorded
streams under tests/data/cli_streams/: codex's and gemini-cli's from their
docs, claude-code's shapes from its issue tracker's reports); and the one line
``image build --with`` gives for a CLI it does not know."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import trio
from fireclaw.config import Account, Backoff, CliHarnessBase, Config, ConfigError, load_config
from fireclaw.guest_daemon.cli_run import Collector
from fireclaw.guest_daemon.cli_stream import reset_hint
from fireclaw.pool.accounts import (
    MAX_REST,
    AccountBook,
    AccountState,
    choose,
    next_return,
    rest_until,
)
from fireclaw.supervisor.harness_checks import check_role_secrets
from fireclaw.supervisor.state import CallRecord, Store
from swarmctl import FIRECLAW
from test_cli_specs import parse, recorded

BACKOFF = Backoff(base=60.0, max=3600.0)


def widest(low: float, high: float) -> float:
    """The jitter's top: the backoff's full delay, so times are exact."""
    return high


# --- the choice -------------------------------------------------------------------


def test_the_least_used_account_is_chosen() -> None:
    accounts = [AccountState("a", spent=500), AccountState("b", spent=20), AccountState("c", 90)]
    assert choose(accounts, now=0.0) == "b"


def test_among_equals_the_one_chosen_longest_ago_then_the_configs_order() -> None:
    never = [AccountState("a"), AccountState("b")]
    assert choose(never, now=0.0) == "a"
    taken = [AccountState("a", last_chosen=10.0), AccountState("b", last_chosen=5.0)]
    assert choose(taken, now=20.0) == "b"
    fresh = [AccountState("a", last_chosen=10.0), AccountState("b")]
    assert choose(fresh, now=20.0) == "b"


def test_a_resting_or_spent_account_is_not_chosen() -> None:
    accounts = [
        AccountState("a", resting_until=100.0),
        AccountState("b", spent=1000, budget=1000),
        AccountState("c", spent=5000, resting_until=50.0),
    ]
    assert choose(accounts, now=49.0) is None
    assert choose(accounts, now=50.0) == "c"  # back at its time exactly
    assert next_return(accounts, now=49.0) == 50.0
    assert next_return(accounts, now=50.0) is None  # one is usable now


def test_spent_accounts_do_not_come_back_before_the_period_turns() -> None:
    accounts = [AccountState("a", spent=10, budget=10, resting_until=30.0)]
    assert choose(accounts, now=40.0) is None
    assert next_return(accounts, now=40.0) is None


def test_a_refused_account_rests_as_its_provider_said_within_bounds() -> None:
    assert rest_until(100.0, retry_after=30.0, backoff=BACKOFF, refusals=5) == 130.0
    assert rest_until(100.0, retry_after=0.0, backoff=BACKOFF, refusals=0) == 100.0
    assert rest_until(0.0, retry_after=1e12, backoff=BACKOFF, refusals=0) == MAX_REST
    assert rest_until(0.0, retry_after=-5.0, backoff=BACKOFF, refusals=0) == 0.0


def test_without_a_time_a_refused_account_rests_by_the_swarms_backoff() -> None:
    delays = [
        rest_until(0.0, retry_after=None, backoff=BACKOFF, refusals=n, uniform=widest)
        for n in range(8)
    ]
    assert delays == [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3600.0, 3600.0]
    low = rest_until(0.0, retry_after=None, backoff=BACKOFF, refusals=3, uniform=lambda a, b: a)
    assert low == 0.0  # full jitter: anywhere from 0 to the cap
    nan = rest_until(5.0, retry_after=math.nan, backoff=BACKOFF, refusals=0, uniform=widest)
    assert nan == 65.0


# --- the book, over a real store, in virtual time -------------------------------------


def book(store: Store, *accounts: Account) -> AccountBook:
    return AccountBook(
        role="coder",
        accounts=accounts,
        backoff=BACKOFF,
        store=store,
        clock=trio.current_time,
        uniform=widest,
    )


WORK = Account(name="work", secrets_dir="/s/work")
HOME = Account(name="home", secrets_dir="/s/home")


async def test_refused_accounts_rest_until_their_time_and_come_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with Store.open(tmp_path / "swarm.db", clock=trio.current_time) as store:
        accounts = book(store, WORK, HOME)
        start = trio.current_time()
        first = accounts.take()
        assert first is WORK
        assert accounts.refused("work", retry_after=None, reason="rate_limit") == start + 60.0
        assert accounts.take() is HOME
        await trio.sleep(10.0)
        assert accounts.refused("home", retry_after=90.0, reason="rate_limit") == start + 100.0
        assert accounts.take() is None
        assert accounts.resting() == {"work": start + 60.0, "home": start + 100.0}
        back = accounts.next_return()
        assert back == start + 60.0
        await trio.sleep_until(back)
        assert accounts.take() is WORK  # at its time exactly
        # Refused again without a good run between: the backoff doubles.
        assert accounts.refused("work", retry_after=None, reason="x") == back + 120.0
        await trio.sleep_until(back + 120.0)
        assert accounts.take() is HOME  # back at start + 100, chosen longer ago than work
        accounts.served("home")
        now = trio.current_time()
        assert accounts.refused("home", retry_after=None, reason="x") == now + 60.0

        # A restarted supervisor (a new book on the same store) knows who rests.
        again = book(store, WORK, HOME)
        assert again.resting() == {"home": now + 60.0}
        assert again.take() is WORK


def spend(store: Store, account: str, tokens: int) -> None:
    """One model call of ``account`` in the ledger, as the gateway records it."""
    store.record_call(
        CallRecord(
            at=trio.current_time(),
            agent=None,
            role="coder",
            vm="coder-0",
            task=None,
            model="m",
            prompt_tokens=tokens,
            completion_tokens=0,
            duration=0.1,
            outcome="ok",
            account=account,
        )
    )


async def test_an_accounts_own_budget_is_what_the_ledger_holds_of_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    small = Account(name="small", secrets_dir="/s/small", budget=100)
    with Store.open(tmp_path / "swarm.db", clock=trio.current_time) as store:
        accounts = book(store, small, WORK)
        spend(store, "small", 95)
        assert [s.spent for s in accounts.states()] == [95, 0]
        assert accounts.take() is WORK  # least used
        assert accounts.take() is WORK  # small has 95 of 100: still more used
        spend(store, "work", 200)
        assert accounts.take() is small
        spend(store, "small", 5)
        assert accounts.take() is WORK  # small's budget is spent (100 of 100)
        assert accounts.states()[0].over_budget()


# --- what a CLI's stream says of its account ----------------------------------------------


def limited_of(events: list[object], code: int = 1, now: float = 1_000_000.0) -> object:
    seen = Collector()
    for event in events:
        seen.take(event)  # type: ignore[arg-type]
    return seen.limited(code, now)


def test_codex_out_of_its_usage_says_when_it_is_back() -> None:
    # codex's documented usage-limit failure: "Try again in 4 days 20 hours 9 minutes."
    limited = limited_of(recorded("codex", "doc-usage-limit.jsonl"))
    assert limited is not None
    assert (limited.kind, limited.retry_after) == ("exhausted", 4 * 86400 + 20 * 3600 + 9 * 60)  # type: ignore[attr-defined]


def test_gemini_out_of_quota_gives_no_time() -> None:
    limited = limited_of(recorded("gemini-cli", "doc-quota.jsonl"))
    assert limited is not None
    assert (limited.kind, limited.retry_after) == ("exhausted", None)  # type: ignore[attr-defined]


def claude(*lines: dict[str, object]) -> list[object]:
    return list(parse("claude-code", b"".join(json.dumps(x).encode() + b"\n" for x in lines)))


INIT = {"type": "system", "subtype": "init", "session_id": "s-1", "model": "m"}


def test_claude_code_rate_limited_until_its_reset() -> None:
    rejected = {
        "type": "rate_limit_event",
        "rate_limit_info": {"status": "rejected", "resetsAt": 1_000_600},
    }
    limited = limited_of(claude(INIT, rejected))
    assert limited is not None
    assert (limited.kind, limited.retry_after) == ("rate_limit", 600.0)  # type: ignore[attr-defined]


def test_claude_code_usage_limit_reached_with_its_reset_time() -> None:
    # claude-code's words when a subscription's window is spent (its issue tracker
    # is full of them): "Claude AI usage limit reached|<unix time>".
    result = {
        "type": "result",
        "subtype": "success",
        "is_error": True,
        "result": "Claude AI usage limit reached|1753088400",
    }
    limited = limited_of(claude(INIT, result), now=1753084800.0)
    assert limited is not None
    assert (limited.kind, limited.retry_after) == ("exhausted", 3600.0)  # type: ignore[attr-defined]


def test_claude_code_api_429_and_overloaded_are_rate_limits_without_a_time() -> None:
    for status, words in [
        (429, 'API Error: 429 {"type":"error","error":{"type":"rate_limit_error"}}'),
        (529, 'API Error: 529 {"type":"error","error":{"type":"overloaded_error"}}'),
    ]:
        result = {
            "type": "result",
            "subtype": "success",
            "is_error": True,
            "result": words,
            "api_error_status": status,
        }
        limited = limited_of(claude(INIT, result))
        assert limited is not None, words
        assert (limited.kind, limited.retry_after) == ("rate_limit", None)  # type: ignore[attr-defined]


def test_claude_code_out_of_credit_is_exhausted() -> None:
    result = {
        "type": "result",
        "subtype": "success",
        "is_error": True,
        "result": "Credit balance is too low",
    }
    limited = limited_of(claude(INIT, result))
    assert limited is not None
    assert (limited.kind, limited.retry_after) == ("exhausted", None)  # type: ignore[attr-defined]


def test_its_own_budget_flag_or_a_good_run_is_no_accounts_refusal() -> None:
    spent = {"type": "result", "subtype": "error_max_budget_usd", "is_error": True}
    assert limited_of(claude(INIT, spent)) is None
    assert limited_of(recorded("claude-code", "first.jsonl"), code=0) is None
    plain = {"type": "result", "subtype": "success", "is_error": True, "result": "boom"}
    assert limited_of(claude(INIT, plain)) is None


@pytest.mark.parametrize(
    ("words", "at"),
    [
        ("Claude AI usage limit reached|1753088400", 1753088400.0),
        (
            '{"type":"usage_limit_reached","resets_at":1777936568,"resets_in_seconds":1}',
            1777936568.0,
        ),
        ('{"type":"usage_limit_reached","resets_in_seconds":13872}', 1_013_872.0),
        ("Rate limit reached. Please try again in 20s.", 1_000_020.0),
        ("try again in 1 hour and 30 minutes", 1_005_400.0),
        ("try again in 5 apples", None),
        ("429 Too Many Requests", None),
    ],
)
def test_reset_times_in_a_providers_words(words: str, at: float | None) -> None:
    assert reset_hint(words, 1_000_000.0) == at


# --- image build --with: which CLIs there are -----------------------------------------------


@pytest.mark.parametrize(
    ("names", "said"),
    [
        ("nope", "nope is not a CLI it installs"),
        ("aider,nope,zed", "nope, zed are not CLIs it installs"),
    ],
)
def test_image_build_with_an_unknown_cli_names_the_ones_there_are(
    tmp_path: Path, names: str, said: str
) -> None:
    cache = tmp_path / "images"
    out = subprocess.run(
        [FIRECLAW, "image", "build", "--with", names, "--cache-dir", str(cache)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0 and out.stdout == b""
    assert out.stderr.decode().splitlines() == [
        f"fireclaw-swarm: image build --with: {said}"
        " (it installs: claude-code, codex, gemini-cli, opencode, aider)"
    ]
    assert not cache.exists()  # refused before anything was built


# --- the config ------------------------------------------------------------------------------


def load_accounts(tmp_path: Path, harness: str) -> Config:
    path = tmp_path / "swarm.yaml"
    path.write_text(
        "version: 1\nbackend: process\nmodels: {server: managed}\n"
        f"roles:\n  coder:\n    template: worker\n    harness: {harness}\n"
    )
    return load_config(path)


def config_error(tmp_path: Path, harness: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_accounts(tmp_path, harness)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{tmp_path / 'swarm.yaml'}: roles.coder")
    return text


def test_accounts_folders_are_resolved_against_swarm_yaml(tmp_path: Path) -> None:
    config = load_accounts(
        tmp_path,
        "{kind: codex, secrets: [OPENAI_API_KEY], accounts: [{name: work, secrets_dir: k/w},"
        " {name: home, secrets_dir: /abs/h, budget: 5000}]}",
    )
    harness = config.roles["coder"].harness
    assert isinstance(harness, CliHarnessBase)
    assert harness.accounts == (
        Account(name="work", secrets_dir=str((tmp_path / "k" / "w").resolve())),
        Account(name="home", secrets_dir="/abs/h", budget=5000),
    )
    assert harness.account("home") is harness.accounts[1] and harness.account("x") is None


@pytest.mark.parametrize(
    ("harness", "said"),
    [
        (
            "{kind: codex, secrets_dir: k, secrets: [OPENAI_API_KEY],"
            " accounts: [{name: a, secrets_dir: k}]}",
            "each account has its own secrets_dir; remove this one",
        ),
        (
            "{kind: codex, accounts: [{name: a, secrets_dir: k}]}",
            "name in secrets the files each account's folder holds",
        ),
        (
            "{kind: codex, secrets: [OPENAI_API_KEY],"
            " accounts: [{name: a, secrets_dir: k}, {name: a, secrets_dir: j}]}",
            "accounts: 'a' is named twice",
        ),
        (
            "{kind: codex, secrets: [OPENAI_API_KEY],"
            " accounts: [{name: 'Bad Name', secrets_dir: k}]}",
            "accounts[0].name",
        ),
    ],
)
def test_a_wrong_account_is_one_line(tmp_path: Path, harness: str, said: str) -> None:
    assert said in config_error(tmp_path, harness)


def test_a_missing_secret_of_one_account_names_that_account(tmp_path: Path) -> None:
    for name in ("work", "home"):
        (tmp_path / name).mkdir()
    (tmp_path / "work" / "OPENAI_API_KEY").write_text("sk-work\n")
    (tmp_path / "work" / "OPENAI_API_KEY").chmod(0o600)
    config = load_accounts(
        tmp_path,
        "{kind: codex, secrets: [OPENAI_API_KEY], accounts: [{name: work, secrets_dir: work},"
        " {name: home, secrets_dir: home}]}",
    )
    missing = tmp_path / "home" / "OPENAI_API_KEY"
    assert check_role_secrets(config) == (
        f"roles.coder.harness.accounts[1] (home): {missing}: no such file"
    )
    missing.write_text("sk-home\n")
    missing.chmod(0o600)
    assert check_role_secrets(config) is None
