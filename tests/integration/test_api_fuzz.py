"""A bounded schemathesis run over the API's own OpenAPI schema, against the real Serve
deployment: whatever it sends, no answer is a 5xx. (Driven by hand with hypothesis: the
schemathesis pytest plugin does not run under this pytest.)"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.integration.conftest import API_TOKEN

EXAMPLES_PER_OPERATION = 15


def test_no_input_makes_the_api_fail_with_a_5xx(api):
    schema = schemathesis.openapi.from_url(
        f"{api}/openapi.json", headers={"Authorization": f"Bearer {API_TOKEN}"}
    )
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/events"):
            continue  # a stream that never ends; its bad input is tested in test_monitoring

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def call(case):
            if case.query and "follow" in case.query:
                case.query["follow"] = "false"  # one answer per example, not a stream
            response = case.call(headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=30)
            tried.append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.query} -> "
                f"{response.status_code} {response.text[:300]}"
            )

        call()
    assert len(tried) >= 5 * EXAMPLES_PER_OPERATION  # every operation was exercised
