"""Static checks of the SAM template and the compose file (no Docker engine or AWS here)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from ai_rate_limiter.config import Settings

ROOT = Path(__file__).resolve().parents[2]


class CfnLoader(yaml.SafeLoader):
    pass


CfnLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def load(name: str) -> Any:
    return yaml.load((ROOT / name).read_text(), Loader=CfnLoader)


def test_every_api_route_is_an_api_gateway_event() -> None:
    routes = set(re.findall(r'@route\("([^"]+)", "([A-Z]+)"', (ROOT / "functions/api/app.py").read_text()))
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
    assert resources["WorkerFunction"]["Properties"]["Events"]["Queue"]["Type"] == "MQ"


def test_compose_runs_the_stack_with_known_settings() -> None:
    compose = load("docker-compose.local.yml")
    assert set(compose["services"]) == {"postgres", "redis", "rabbitmq", "app"}
    app = compose["services"]["app"]
    known = {f.name.upper() for f in fields(Settings)}
    assert set(app["environment"]) <= known
    assert (ROOT / app["build"]["dockerfile"]).exists()
    assert {"8501:8501", "8600:8600"} <= set(app["ports"])
