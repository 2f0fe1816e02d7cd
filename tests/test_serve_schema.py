"""Property-based run of the OpenAPI schema (schemathesis): generated requests, valid or not,
never get a 5xx, and every response matches the documented status codes, content type and schema."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from canestra.config import Settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = ["POST /v1/predict", "POST /v1/predict/batch", "GET /v1/model", "GET /healthz", "GET /readyz"]


@pytest.fixture(scope="module")
def serve_schema(trained):
    from canestra.serve.app import create_app

    app = create_app(os.path.join(trained.out_dir, "model"), Settings.load(serve_threads=1, max_batch=4, rate_limit=0))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_schema_lists_every_endpoint(serve_schema):
    found = {f"{op.method.upper()} {op.path}" for op in (r.ok() for r in serve_schema.get_all_operations())}
    assert set(OPERATIONS) <= found


@pytest.mark.parametrize("operation", OPERATIONS)
def test_api_conforms_to_its_schema(serve_schema, operation):
    # pytest 9 and schemathesis' own pytest loader disagree on node ids, so drive hypothesis directly.
    method, path = operation.split(" ")
    op = serve_schema[path][method]

    @given(case=op.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(case):
        case.call_and_validate(checks=CHECKS)

    run()
