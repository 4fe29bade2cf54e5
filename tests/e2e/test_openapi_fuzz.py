"""Schemathesis against the running stack, from the stack's own `/openapi.json`: every default
check, every phase (coverage, fuzzing and the stateful phase following the description's
links), authenticated with the admin key, a fixed seed. The stack runs with its inbound limits
off (the fuzzer sends thousands of requests); everything else is the default.

Two kinds of finding are dropped, each for a reason the hooks (`fuzz_hooks.py`) state: a URL
that fits the published pattern but that the egress guard refuses (where a name points is in no
schema), and a "schema-violating" request that sent no body to an operation whose body is
optional. Schema-valid bodies name the stack's fake provider as their URL, so that what they
make exists for the stateful phase's next calls.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Receiver

from .conftest import ROOT, Stack, running_stack

SEED = 1
MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_stack(services: None, receiver_server: Receiver) -> Iterator[Stack]:
    with running_stack(receiver_server, "fuzz", 11, INBOUND_PER_S="0", INBOUND_WRITES="0") as running:
        yield running


def test_the_api_keeps_to_its_openapi_description(fuzz_stack: Stack, tmp_path: Path) -> None:
    described = fuzz_stack.call("GET", "/openapi.json").json()
    operations = sum(len(methods) for methods in described["paths"].values())
    command = [
        str(Path(sys.executable).with_name("st")),
        "--no-color",
        "run",
        f"{fuzz_stack.api}/openapi.json",
        "--header",
        f"Authorization: Bearer {fuzz_stack.key}",
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SCHEMATHESIS_HOOKS": "tests.e2e.fuzz_hooks",
        "FUZZ_REACHABLE_URL": fuzz_stack.fake,
    }
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    print(run.stdout[-30_000:], run.stderr[-5_000:])
    assert run.returncode == 0, "schemathesis found failures (above)"
    # It tested every operation (but `GET /openapi.json`, the description itself, which
    # Schemathesis leaves out), in every phase that has something to run, and found nothing.
    assert f"Selected: {operations - 1}/{operations - 1}" in run.stdout
    assert f"Tested: {operations - 1}" in run.stdout
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ {phase}", run.stdout), f"the {phase} phase did not pass"
    generated = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert generated is not None and generated[1] == generated[2] and int(generated[1]) > 20 * operations
