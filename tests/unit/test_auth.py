from __future__ import annotations

import pytest

from cicd_ray.auth import check, configured_digests, digest, new_token
from cicd_ray.errors import CicdError


def test_tokens_from_env_and_file(tmp_path):
    t1, t2, t3 = new_token(), new_token(), new_token()
    f = tmp_path / "tokens"
    f.write_text(f"# ci tokens\n{digest(t2)}\n\n")
    digests = configured_digests({"CICD_RAY_TOKENS": f" {t1} ,", "CICD_RAY_TOKENS_FILE": str(f),
                                  "CICD_RAY_TOKEN_DIGESTS": digest(t3)})
    assert all(check(t, digests) for t in (t1, t2, t3))
    assert not check("wrong", digests)
    assert not check("", digests) and not check(None, digests)
    assert not check(t1, [])


def test_bad_tokens_file_names_the_line(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("not-a-digest\n")
    with pytest.raises(CicdError, match="line 1: expected a SHA-256 hex digest"):
        configured_digests({"CICD_RAY_TOKENS_FILE": str(f)})
    with pytest.raises(CicdError, match="cannot read it"):
        configured_digests({"CICD_RAY_TOKENS_FILE": str(tmp_path / "missing")})
