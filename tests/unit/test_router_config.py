"""The router's limits on work before admission (services/router/config.py)."""

from __future__ import annotations

import pytest

from services.common.channels import MAX_MESSAGE_BYTES
from services.common.settings import settings_from
from services.router.config import RouterConfig


def test_derived_prompt_limit_is_the_most_a_prompt_that_fits_can_have():
    cfg = RouterConfig(model="m")
    assert cfg.prompt_bytes_limit(context_length=512, longest_token_bytes=29) == 512 * 29


def test_derived_request_limit_leaves_room_for_an_escaped_prompt_and_the_rest():
    cfg = RouterConfig(model="m")
    assert cfg.request_bytes_limit(1000) == 6 * 1000 + (1 << 20)
    assert cfg.request_bytes_limit(10**9) == MAX_MESSAGE_BYTES  # never past the gRPC limit


def test_given_limits_win_and_come_from_flags_or_environment():
    cfg = settings_from(RouterConfig, environ={
        "EPSERVE_MODEL": "m", "EPSERVE_MAX_PROMPT_BYTES": "4096",
        "EPSERVE_MAX_REQUEST_BYTES": "65536", "EPSERVE_TOKENIZE_THREADS": "3"})
    assert cfg.prompt_bytes_limit(512, 29) == 4096
    assert cfg.request_bytes_limit(4096) == 65536
    assert cfg.tokenize_threads == 3


@pytest.mark.parametrize("changes, fragment", [
    (dict(max_prompt_bytes=-1), "--max-prompt-bytes"),
    (dict(max_request_bytes=-1), "--max-request-bytes"),
    (dict(max_request_bytes=MAX_MESSAGE_BYTES + 1), "--max-request-bytes"),
    (dict(tokenize_threads=0), "--tokenize-threads"),
])
def test_bad_limits_are_refused(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        RouterConfig(model="m", **changes)
