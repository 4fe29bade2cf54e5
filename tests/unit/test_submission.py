from __future__ import annotations

import json
import uuid

from ai_rate_limiter.services.dispatch import message_bodies, message_body
from ai_rate_limiter.services.messages import new_ids


def test_new_ids_are_distinct_canonical_version_4_uuids() -> None:
    ids = new_ids(5000)
    assert len(set(ids)) == len(ids) == 5000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_message_bodies_are_the_json_the_worker_reads() -> None:
    ids = new_ids(3)
    tenant = 'acme "eu"\\1'
    bodies = message_bodies(tenant, ids)
    assert [json.loads(b) for b in bodies] == [{"message_id": i, "tenant_id": tenant} for i in ids]
    assert message_body(tenant, ids[0]) == bodies[0]
