"""Static checks of the SAM template and the compose file (no Docker engine or AWS here)."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from ai_rate_limiter.config import Settings

from local import functions

ROOT = Path(__file__).resolve().parents[2]


class CfnLoader(yaml.SafeLoader):
    pass


def intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    """`!Ref X` -> {"Ref": "X"}, `!GetAtt A.B` -> {"Fn::GetAtt": ["A", "B"]}, `!Sub s` -> ..."""
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


CfnLoader.add_multi_constructor("!", intrinsic)


def load(name: str) -> Any:
    return yaml.load((ROOT / name).read_text(), Loader=CfnLoader)


def test_every_api_route_is_an_api_gateway_event() -> None:
    app = functions.load("api", "app").app  # the routes as Chalice registered them
    routes = {(path, method) for path, entries in app.routes.items() for method in entries}
    events = load("template.yaml")["Resources"]["ApiFunction"]["Properties"]["Events"].values()
    declared = {(e["Properties"]["Path"], e["Properties"]["Method"].upper()) for e in events}
    assert routes and declared == routes


def test_handlers_in_the_template_exist() -> None:
    resources = load("template.yaml")["Resources"]
    for name in ("ApiFunction", "WorkerFunction", "SweeperFunction"):
        props = resources[name]["Properties"]
        module, attr = props["Handler"].split(".")
        source = (ROOT / props["CodeUri"] / f"{module}.py").read_text()
        assert re.search(rf"^(def {attr}\(|{attr} = )", source, re.M), name
    assert resources["CommonLayer"]["Properties"]["ContentUri"] == "layers/common"
    assert (ROOT / "layers/common/ai_rate_limiter/__init__.py").exists()


def statements(props: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for policy in props.get("Policies", []) for s in policy["Statement"]]


def actions(statement: dict[str, Any]) -> set[str]:
    action = statement["Action"]
    return {action} if isinstance(action, str) else set(action)


def test_the_api_makes_the_worker_mappings_at_run_time() -> None:
    template = load("template.yaml")
    resources = template["Resources"]
    worker, api = resources["WorkerFunction"]["Properties"], resources["ApiFunction"]["Properties"]
    # No static mapping: no queue list to deploy, no MQ event anywhere.
    assert "WorkerQueues" not in template["Parameters"]
    assert "Events" not in worker
    assert all(
        e["Type"] != "MQ"
        for r in resources.values()
        for e in r.get("Properties", {}).get("Events", {}).values()
    )
    assert (worker["Timeout"], worker["MemorySize"]) == (900, 1024)

    # The mappings run with the worker's role: broker, secret, VPC.
    granted = {a: s["Resource"] for s in statements(worker) for a in actions(s)}
    assert granted["mq:DescribeBroker"] == {"Ref": "BrokerArn"}
    assert granted["secretsmanager:GetSecretValue"] == {"Ref": "BrokerCredentialsSecretArn"}
    assert {
        "ec2:CreateNetworkInterface",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DeleteNetworkInterface",
    } <= set(granted)

    env = api["Environment"]["Variables"]
    assert env["WORKER_FUNCTION_NAME"] == {"Ref": "WorkerFunction"}
    assert env["BROKER_ARN"] == {"Ref": "BrokerArn"}
    assert env["BROKER_SECRET_ARN"] == {"Ref": "BrokerCredentialsSecretArn"}
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert (shared["WORKER_BATCH_SIZE"], shared["WORKER_BATCHING_WINDOW_S"]) == ("1", "0")

    # Exactly the five mapping actions, each as narrow as Lambda's IAM reference allows.
    lambda_statements = [s for s in statements(api) if any(a.startswith("lambda:") for a in actions(s))]
    by_action = {a: s for s in lambda_statements for a in actions(s)}
    assert set(by_action) == {
        "lambda:CreateEventSourceMapping",
        "lambda:ListEventSourceMappings",
        "lambda:UpdateEventSourceMapping",
        "lambda:DeleteEventSourceMapping",
        "lambda:GetEventSourceMapping",
    }
    assert all(s["Effect"] == "Allow" for s in lambda_statements)
    only_the_worker = {"StringEquals": {"lambda:FunctionArn": {"Fn::GetAtt": ["WorkerFunction", "Arn"]}}}
    mapping_arn = {
        "Fn::Sub": "arn:${AWS::Partition}:lambda:${AWS::Region}:${AWS::AccountId}:event-source-mapping:*"
    }
    create = by_action["lambda:CreateEventSourceMapping"]
    assert (create["Resource"], create["Condition"]) == ("*", only_the_worker)
    assert by_action["lambda:ListEventSourceMappings"]["Resource"] == "*"
    for action in ("lambda:UpdateEventSourceMapping", "lambda:DeleteEventSourceMapping"):
        assert (by_action[action]["Resource"], by_action[action]["Condition"]) == (
            mapping_arn,
            only_the_worker,
        )
    assert by_action["lambda:GetEventSourceMapping"]["Resource"] == mapping_arn


def test_neither_the_worker_nor_the_globals_refer_to_the_api() -> None:
    """The API refers to the worker, so neither the worker nor the Globals every function gets may
    refer to the API Gateway (whose definition refers to ApiFunction)."""
    template = load("template.yaml")
    worker = template["Resources"]["WorkerFunction"]
    for part in (template["Globals"], worker):
        text = repr(part)
        assert "${Api}" not in text and "{'Ref': 'Api'}" not in text


def test_every_variable_the_template_sets_is_a_setting() -> None:
    template = load("template.yaml")
    known = {f.name.upper() for f in fields(Settings)}
    variables = set(template["Globals"]["Function"]["Environment"]["Variables"])
    for resource in template["Resources"].values():
        variables |= set(resource.get("Properties", {}).get("Environment", {}).get("Variables", {}))
    assert variables <= known


def test_compose_runs_the_stack_with_known_settings() -> None:
    compose = load("docker-compose.local.yml")
    assert set(compose["services"]) == {"postgres", "redis", "rabbitmq", "app"}
    app = compose["services"]["app"]
    known = {f.name.upper() for f in fields(Settings)}
    assert set(app["environment"]) <= known
    assert (ROOT / app["build"]["dockerfile"]).exists()
    assert {"8501:8501", "8600:8600"} <= set(app["ports"])
    # local.up keeps the admin key and the provider-key secret in /app/.local: on a volume,
    # so that recreating the container neither changes the key nor strands the stored keys.
    assert "airl-local:/app/.local" in app["volumes"] and "airl-local" in compose["volumes"]


def test_every_function_opens_the_sealed_keys_with_kms_and_the_api_reads_the_admin_key() -> None:
    template = load("template.yaml")
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert shared["KMS_KEY_ID"] == {"Ref": "ProviderKeyKmsKeyArn"}
    assert shared["KMS_DATA_KEY"] == {"Ref": "ProviderKeyDataKeys"}
    assert template["Parameters"]["ProviderKeyDataKeys"]["NoEcho"] is True
    resources = template["Resources"]
    functions = {k: r["Properties"] for k, r in resources.items() if r["Type"] == "AWS::Serverless::Function"}
    assert set(functions) == {"ApiFunction", "WorkerFunction", "SweeperFunction"}
    for name, props in functions.items():
        granted = {a: s["Resource"] for s in statements(props) for a in actions(s)}
        assert granted["kms:Decrypt"] == {"Ref": "ProviderKeyKmsKeyArn"}, name
        assert not any(a.startswith("kms:") and a != "kms:Decrypt" for a in granted), name
    api = functions["ApiFunction"]
    assert api["Environment"]["Variables"]["ADMIN_API_KEY_SECRET_ARN"] == {"Ref": "AdminApiKeySecretArn"}
    granted = {a: s["Resource"] for s in statements(api) for a in actions(s)}
    assert granted["secretsmanager:GetSecretValue"] == {"Ref": "AdminApiKeySecretArn"}
    # API Gateway's own answers are problem+json too.
    responses = resources["Api"]["Properties"]["GatewayResponses"]
    for kind, status in (("MISSING_AUTHENTICATION_TOKEN", 404), ("THROTTLED", 429)):
        body = json.loads(responses[kind]["ResponseTemplates"]["application/json"])
        assert body["status"] == status and responses[kind]["StatusCode"] == str(status)
        headers = responses[kind]["ResponseParameters"]["Headers"]
        assert headers["Content-Type"] == "'application/problem+json'"
