from __future__ import annotations

import os
import stat

import pytest

from cicd_ray.errors import CicdError
from cicd_ray.tokens import (
    Grant,
    Role,
    TokenBook,
    add_token,
    digest,
    env_grants,
    match,
    new_token,
    parse_grant,
    read_tokens_file,
)


def test_tokens_from_env_and_file(tmp_path):
    t1, t2, t3, t4 = new_token(), new_token(), new_token(), new_token()
    f = tmp_path / "tokens"
    f.write_text(f"# ci tokens\n{digest(t2)}\n\n{digest(t4)} role=read project=web\n")
    grants = env_grants(
        {
            "CICD_RAY_TOKENS": f" {t1} ,",
            "CICD_RAY_TOKEN_DIGESTS": f"{digest(t3)} role=submit project=ops",
        }
    )
    grants += read_tokens_file(f)
    assert match(t1, grants) == Grant(digest=digest(t1), role=Role.ADMIN, project="default")
    assert match(t2, grants).role is Role.ADMIN  # a bare digest: what files meant before roles
    assert (match(t3, grants).role, match(t3, grants).project) == (Role.SUBMIT, "ops")
    assert (match(t4, grants).role, match(t4, grants).project) == (Role.READ, "web")
    assert match("wrong", grants) is None
    assert match("", grants) is None and match(None, grants) is None
    assert match(t1, []) is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("not-a-digest", "expected a SHA-256 hex digest"),
        (f"{'a' * 64} role=owner project=web", "the roles are read, submit and admin"),
        (f"{'a' * 64} role=read", "role=read needs a project"),
        (f"{'a' * 64} role=read project=Web!", "project=Web!: a project's name"),
        (f"{'a' * 64} role=read role=admin project=web", "each at most once"),
        (f"{'a' * 64} owner=me", "'owner=me': expected role="),
    ],
)
def test_a_bad_grant_line_says_what_is_wrong(tmp_path, line, message):
    with pytest.raises(ValueError, match=message):
        parse_grant(line)
    f = tmp_path / "tokens"
    f.write_text(f"# first\n{line}\n")
    with pytest.raises(CicdError, match=f"line 2: .*{message[:20]}"):
        read_tokens_file(f)


def test_an_unreadable_tokens_file_is_named(tmp_path):
    with pytest.raises(CicdError, match="cannot read it"):
        read_tokens_file(tmp_path / "missing")


def test_roles_are_ordered_and_grants_see_their_project():
    assert Role.ADMIN.allows(Role.SUBMIT) and Role.SUBMIT.allows(Role.READ)
    assert not Role.READ.allows(Role.SUBMIT) and not Role.SUBMIT.allows(Role.ADMIN)
    web = Grant(digest="a" * 64, role=Role.SUBMIT, project="web")
    assert web.sees("web") and not web.sees("ops")
    assert Grant(digest="b" * 64).sees("ops")  # admin
    assert web.token_id == "a" * 12
    assert parse_grant(web.line) == web


def test_a_created_token_is_added_to_a_new_private_file_and_taken_up_live(tmp_path):
    path = tmp_path / "sub" / "tokens"
    book = TokenBook([], path)
    assert book.grants() == []  # no file yet: nothing, no error
    token, grant = add_token(path, Role.SUBMIT, "web")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert token not in path.read_text() and digest(token) in path.read_text()
    assert match(token, book.grants()) == grant
    second, _ = add_token(path, Role.ADMIN, None)
    assert match(second, book.grants()).role is Role.ADMIN
    assert match(token, book.grants()) == grant
    # Issue 24, item 15: a broken file, or one deleted, grants nothing (it revokes), and
    # says so; fixed, it grants again.
    good = path.read_text()
    path.write_text(good + "garbage\n")
    assert match(second, book.grants()) is None
    path.write_text(good)
    assert match(second, book.grants()) is not None
    path.unlink()
    assert match(second, book.grants()) is None and match(token, book.grants()) is None
    # A digest with a project and no role reads that project: never an admin.
    assert parse_grant("c" * 64 + " project=web") == Grant(
        digest="c" * 64, role=Role.READ, project="web"
    )
    with pytest.raises(CicdError, match="--role read needs --project"):
        add_token(path, Role.READ, None)


def test_a_tokens_file_not_there_yet_holds_no_tokens_and_a_bad_one_stops_a_start(tmp_path):
    from cicd_ray.config import Settings
    from cicd_ray.errors import SettingsError

    path = tmp_path / "tokens"
    settings = Settings.from_env(
        {"CICD_RAY_HOME": str(tmp_path), "CICD_RAY_TOKENS_FILE": str(path)}
    )
    assert settings.tokens_file == path and settings.token_book().grants() == []
    token, grant = add_token(path, Role.READ, "web")  # made later: taken up
    assert match(token, settings.token_book().grants()) == grant
    path.write_text("not-a-digest\n")
    with pytest.raises(SettingsError, match="line 1: expected a SHA-256 hex digest"):
        Settings.from_env({"CICD_RAY_TOKENS_FILE": str(path)})


def test_cicd_ray_home_and_the_folders_made_under_it_are_private(tmp_path):
    """Issue 24, item 25: `mkdir(parents=True, mode=0o700)` made CICD_RAY_HOME 0755."""
    from cicd_ray.store.blobs import ArtifactStore
    from cicd_ray.store.sqlite import SqliteStore

    for home, make in [
        (tmp_path / "a" / "home", lambda h: ArtifactStore(f"file://{h / 'artifacts'}")),
        (tmp_path / "b" / "home", lambda h: SqliteStore(h / "cicd.sqlite3")),
        (tmp_path / "c" / "home", lambda h: add_token(h / "tokens", Role.ADMIN, None)),
    ]:
        make(home)
        for folder in (home.parent, home):
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
