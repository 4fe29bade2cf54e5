"""In the cloud the admin key is a Secrets Manager secret, read once per cold start."""

from __future__ import annotations

from dataclasses import replace

import boto3
import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.config import Settings
from ai_rate_limiter.errors import DependencyUnavailable
from botocore.stub import Stubber

ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:airl-admin-AbCdEf"


def stubbed(monkeypatch: pytest.MonkeyPatch) -> Stubber:
    client = boto3.client(
        "secretsmanager", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    monkeypatch.setattr(boto3, "client", lambda service, **_: client)
    return Stubber(client)


def test_the_admin_key_is_read_from_its_secret_once(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = stubbed(monkeypatch)
    stub.add_response("get_secret_value", {"ARN": ARN, "SecretString": "airl_admin-key\n"}, {"SecretId": ARN})
    c = Container(replace(Settings(), admin_api_key_secret_arn=ARN))
    with stub:
        assert c.admin_key == "airl_admin-key"
        assert c.admin_key == "airl_admin-key"  # a second read would find no stubbed answer
    stub.assert_no_pending_responses()


def test_the_environment_wins_and_no_setting_means_no_admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = stubbed(monkeypatch)
    with stub:  # neither asks Secrets Manager
        assert (
            Container(replace(Settings(), admin_api_key="airl_env", admin_api_key_secret_arn=ARN)).admin_key
            == "airl_env"
        )
        assert Container(Settings()).admin_key == ""


def test_a_secret_that_cannot_be_read_is_a_dependency_down(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = stubbed(monkeypatch)
    stub.add_client_error(
        "get_secret_value", "AccessDeniedException", "no", expected_params={"SecretId": ARN}
    )
    c = Container(replace(Settings(), admin_api_key_secret_arn=ARN))
    with stub, pytest.raises(DependencyUnavailable) as err:
        c.admin_key  # noqa: B018
    assert "admin key could not be read" in err.value.detail
