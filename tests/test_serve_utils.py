"""The server-test helpers' own small pieces (``serve_helpers``): schema validation, metrics parsing."""

from __future__ import annotations

import jsonschema
import pytest

from serve.engine.metrics import Metrics
from serve_helpers import read_metrics, validate


def test_validate_rejects_missing_fields():
    validate({"error": {"message": "m", "type": "t", "param": None, "code": None}}, "ErrorResponse")
    with pytest.raises(jsonschema.ValidationError):
        validate({"error": {"message": "m", "type": "t"}}, "ErrorResponse")


def test_read_metrics_checks_and_drops_the_model_label():
    m = Metrics("tiny")
    m.http_status(404)
    values = read_metrics(m.render(), "tiny")
    assert values['dllm_http_requests_total{status="404"}'] == 1
    with pytest.raises(AssertionError):
        read_metrics(m.render(), "other")
