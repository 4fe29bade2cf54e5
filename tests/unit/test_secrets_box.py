"""Provider keys at rest: sealing, rotation, tampering and where the data keys come from.

KMS is an in-memory implementation of the calls the box makes (it keeps each data key it made
and checks the key and encryption context on Decrypt, as KMS does), so no test here does I/O.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import replace
from typing import Any

import pytest
from ai_rate_limiter import rotate_keys
from ai_rate_limiter.adapters import secrets_box
from ai_rate_limiter.adapters.secrets_box import (
    ALIAS,
    KeyStoreUnavailable,
    KeyUnreadable,
    SecretBox,
    fernet_keys,
    from_settings,
    masked,
    new_data_key,
    new_secret,
)
from ai_rate_limiter.config import Settings
from ai_rate_limiter.errors import DependencyUnavailable
from botocore.exceptions import ClientError, EndpointConnectionError

PID = "6f1c1d9e-7a8b-4c3d-9e0f-123456789abc"
OTHER = "0b7e2f4a-1c2d-4e5f-8a9b-abcdef012345"


def key() -> str:
    return f"sk-test-{uuid.uuid4().hex}"


def box(*secrets: str) -> SecretBox:
    return SecretBox(fernet_keys(",".join(secrets)), "test")


def settings(**env: str) -> Settings:
    return Settings.from_env({k.upper(): v for k, v in env.items()})


class MemoryKms:
    """KMS in memory: keys, aliases, descriptions, and the data keys it wrapped."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.keys: dict[str, str] = {}  # key id -> description
        self.aliases: dict[str, str] = {}
        self.wrapped: dict[bytes, tuple[str, dict[str, str], bytes]] = {}
        self.deleted: list[str] = []
        self.decrypts = 0
        self.stale_describe = False  # the next describe_key misses (another process's alias lands)

    def _up(self, op: str) -> None:
        if self.down:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:4566/")

    @staticmethod
    def _error(code: str, op: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": f"{code} (memory)"}}, op)

    def _resolve(self, key_id: str, op: str) -> str:
        key_id = self.aliases.get(key_id, key_id)
        if key_id not in self.keys:
            raise self._error("NotFoundException", op)
        return key_id

    def create_key(self, **kw: Any) -> dict[str, Any]:
        self._up("CreateKey")
        key_id = str(uuid.uuid4())
        self.keys[key_id] = kw.get("Description", "")
        return {"KeyMetadata": {"KeyId": key_id}}

    def describe_key(self, **kw: Any) -> dict[str, Any]:
        self._up("DescribeKey")
        if self.stale_describe:
            self.stale_describe = False
            raise self._error("NotFoundException", "DescribeKey")
        key_id = self._resolve(kw["KeyId"], "DescribeKey")
        return {"KeyMetadata": {"KeyId": key_id, "Description": self.keys[key_id]}}

    def update_key_description(self, **kw: Any) -> None:
        self.keys[self._resolve(kw["KeyId"], "UpdateKeyDescription")] = kw["Description"]

    def create_alias(self, **kw: Any) -> None:
        if kw["AliasName"] in self.aliases:
            raise self._error("AlreadyExistsException", "CreateAlias")
        self.aliases[kw["AliasName"]] = kw["TargetKeyId"]

    def schedule_key_deletion(self, **kw: Any) -> None:
        self.deleted.append(kw["KeyId"])

    def generate_data_key(self, **kw: Any) -> dict[str, Any]:
        self._up("GenerateDataKey")
        assert kw["KeySpec"] == "AES_256"
        key_id = self._resolve(kw["KeyId"], "GenerateDataKey")
        plaintext, blob = os.urandom(32), os.urandom(48)
        self.wrapped[blob] = (key_id, dict(kw.get("EncryptionContext") or {}), plaintext)
        return {"CiphertextBlob": blob, "Plaintext": plaintext, "KeyId": key_id}

    def decrypt(self, **kw: Any) -> dict[str, Any]:
        self._up("Decrypt")
        self.decrypts += 1
        found = self.wrapped.get(kw["CiphertextBlob"])
        if found is None or found[1] != dict(kw.get("EncryptionContext") or {}):
            raise self._error("InvalidCiphertextException", "Decrypt")
        if "KeyId" in kw and self._resolve(kw["KeyId"], "Decrypt") != found[0]:
            raise self._error("IncorrectKeyException", "Decrypt")
        return {"Plaintext": found[2], "KeyId": found[0]}


# -- sealing --------------------------------------------------------------------------------


def test_a_sealed_key_opens_to_itself_and_shows_only_its_tail() -> None:
    b, api_key = box(new_secret()), key()
    stored = b.seal(PID, api_key)
    assert b.open(PID, stored) == api_key
    assert stored.startswith("sealed1$" + api_key[-4:] + "$")
    for form in (api_key, api_key[:-4], base64.b64encode(api_key.encode()).decode()):
        assert form not in stored
    assert base64.urlsafe_b64encode(api_key.encode()).decode().rstrip("=") not in stored
    assert masked(stored) == "****" + api_key[-4:]
    assert b.seal(PID, api_key) != stored  # a fresh IV each time: equal keys do not look equal


def test_short_keys_show_no_tail_and_unsealed_keys_are_masked_alike() -> None:
    b = box(new_secret())
    assert masked(b.seal(PID, "sk-short")) == "****"
    assert masked("sk-legacy-plaintext-1234") == "****1234"
    assert b.open(PID, b.seal(PID, "k$with$dollars:and:colons")) == "k$with$dollars:and:colons"


# -- rotation -------------------------------------------------------------------------------


def test_old_ciphertext_opens_after_a_new_key_is_put_first_and_reseal_moves_it() -> None:
    old, new = new_secret(), new_secret()
    api_key = key()
    stored = box(old).seal(PID, api_key)
    rotated = box(new, old)
    assert rotated.open(PID, stored) == api_key
    resealed = rotated.reseal(PID, stored)
    assert box(new).open(PID, resealed) == api_key  # the old key is no longer needed
    with pytest.raises(KeyUnreadable):
        box(old).open(PID, resealed)
    assert box(new).open(PID, box(new).reseal(PID, "sk-was-plaintext-0000")) == "sk-was-plaintext-0000"


class Rows:
    """A `Database` whose one table is providers' (id, api_key), for rotate_keys.reseal."""

    def __init__(self, rows: dict[str, str]) -> None:
        self.rows = rows

    def tx(self) -> Any:
        rows = self.rows

        class Tx:
            def __enter__(self) -> Tx:
                return self

            def __exit__(self, *_: object) -> None:
                pass

            def execute(self, sql: str, params: Any) -> None:
                if sql.startswith("UPDATE"):
                    assert sql.startswith("UPDATE providers SET api_key")
                    rows[params[1]] = params[0]
                elif "FROM providers" not in sql:
                    self.found = []  # no webhook secrets here
                else:
                    only = params["only"]
                    self.found = [
                        {"id": i, "secret": k}
                        for i, k in sorted(rows.items())
                        if not only or not k.startswith(params["scheme"])
                    ]

            def fetchall(self) -> list[dict[str, str]]:
                return self.found

        return Tx()


def test_rotate_reseals_every_key_under_the_first_secret_and_names_the_unreadable() -> None:
    old, new = new_secret(), new_secret()
    keys = {PID: key(), OTHER: key()}
    third = str(uuid.uuid4())
    db = Rows({pid: box(old).seal(pid, k) for pid, k in keys.items()})
    db.rows[third] = box(new_secret()).seal(third, key())  # under a key nobody has any more
    done, unreadable = rotate_keys.reseal(db, box(new, old))
    assert (done, unreadable) == ({"provider key": 2}, [f"providers {third}"])
    assert {pid: box(new).open(pid, db.rows[pid]) for pid in keys} == keys


def test_the_start_step_seals_only_keys_stored_unencrypted() -> None:
    b = box(new_secret())
    sealed = b.seal(PID, key())
    db = Rows({PID: sealed, OTHER: "sk-stored-before-encryption-99"})
    assert rotate_keys.seal_unsealed(db, b) == 1
    assert db.rows[PID] == sealed
    assert b.open(OTHER, db.rows[OTHER]) == "sk-stored-before-encryption-99"
    assert rotate_keys.seal_unsealed(db, b) == 0


class DownDatabase:
    def tx(self) -> Any:
        raise DependencyUnavailable("postgres unreachable: connection refused")


def test_with_postgres_down_the_start_step_waits_for_the_next_start() -> None:
    assert rotate_keys.seal_unsealed(DownDatabase(), box(new_secret())) == 0


# -- tampering ------------------------------------------------------------------------------


def tampered(stored: str) -> str:
    head, token = stored.rsplit("$", 1)
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[30] ^= 1  # a bit of the ciphertext
    return f"{head}${base64.urlsafe_b64encode(bytes(raw)).decode()}"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(tampered, id="a flipped bit"),
        pytest.param(lambda s: s[:-6] + "AAAAAA", id="a changed end"),
        pytest.param(lambda s: s.rsplit("$", 1)[0] + "$not-a-token", id="garbage"),
        pytest.param(lambda s: box(new_secret()).seal(PID, "sk-other-key-abcd"), id="another secret's"),
    ],
)
def test_a_tampered_key_fails_clearly_as_a_dependency_error(change: Any) -> None:
    b, api_key = box(new_secret()), key()
    with pytest.raises(KeyUnreadable) as caught:
        b.open(PID, change(b.seal(PID, api_key)))
    err = caught.value
    # A 503 problem (retryable, the deployment's fault), not a 500, and it says what to do.
    assert isinstance(err, DependencyUnavailable) and err.status == 503 and err.retryable
    assert PID in err.detail and "cannot be decrypted" in err.detail and "api_key again" in err.detail
    assert api_key not in err.detail and api_key[-4:] not in err.detail


def test_a_sealed_key_moved_to_another_provider_does_not_open() -> None:
    b = box(new_secret())
    with pytest.raises(KeyUnreadable, match="sealed for another provider"):
        b.open(OTHER, b.seal(PID, key()))


def test_a_key_stored_unencrypted_is_not_opened_silently() -> None:
    with pytest.raises(KeyUnreadable, match=r"stored unencrypted.*rotate_keys"):
        box(new_secret()).open(PID, "sk-plaintext-in-the-database")


# -- configuration --------------------------------------------------------------------------


def test_provider_key_secrets_first_seals_all_open() -> None:
    a, b = new_secret(), new_secret()
    made = from_settings(settings(provider_key_secrets=f" {a} , {b} ,"))
    assert made.source == "PROVIDER_KEY_SECRETS"
    stored = made.seal(PID, "sk-abcdefghijklmnop")
    assert box(a).open(PID, stored) == "sk-abcdefghijklmnop"
    assert made.open(PID, box(b).seal(PID, "x")) == "x"


def test_a_bad_secret_is_a_clear_error_that_does_not_repeat_it() -> None:
    good, bad = new_secret(), "not-a-fernet-key-" + uuid.uuid4().hex
    with pytest.raises(KeyStoreUnavailable, match="entry 2 is not a Fernet key") as caught:
        from_settings(settings(provider_key_secrets=f"{good},{bad}"))
    assert bad not in caught.value.detail and good not in caught.value.detail
    with pytest.raises(KeyStoreUnavailable, match="holds no key"):
        from_settings(settings(provider_key_secrets=" , "))


def test_nothing_configured_and_no_emulator_refuses_to_start_the_key_store() -> None:
    with pytest.raises(KeyStoreUnavailable) as caught:
        from_settings(settings(), kms=MemoryKms(down=True))
    detail = caught.value.detail
    assert "http://127.0.0.1:4566" in detail and "unreachable" in detail
    assert "never stored unencrypted" in detail and "PROVIDER_KEY_SECRETS" in detail
    assert caught.value.status == 503


def test_a_kms_key_without_a_data_key_is_a_clear_startup_error() -> None:
    with pytest.raises(KeyStoreUnavailable, match=r"KMS_DATA_KEY is not.*new-data-key"):
        from_settings(settings(kms_key_id="arn:aws:kms:eu-west-1:111122223333:key/k"), kms=MemoryKms())


def test_the_process_has_no_box_until_the_container_gives_it_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets_box, "_box", None)
    with pytest.raises(KeyStoreUnavailable, match="no key box"):
        secrets_box.current()
    made = box(new_secret())
    assert secrets_box.use(made) is made and secrets_box.current() is made


def test_secrets_stay_out_of_reprs() -> None:
    secret = new_secret()
    s = settings(provider_key_secrets=secret, kms_data_key="d3JhcHBlZA==")
    assert secret not in repr(s) and "d3JhcHBlZA==" not in repr(s)
    assert secret not in repr(from_settings(s))


# -- KMS ------------------------------------------------------------------------------------


def test_kms_data_keys_are_opened_once_each_and_rotate_like_secrets() -> None:
    kms = MemoryKms()
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    cloud = settings(kms_key_id=key_id)
    old, new = new_data_key(cloud, kms), new_data_key(cloud, kms)
    for wrapped in (old, new):
        assert len(base64.b64decode(wrapped)) == 48  # the ciphertext, never the plaintext
    before = from_settings(replace(cloud, kms_data_key=old), kms)
    assert kms.decrypts == 1 and "KMS_DATA_KEY" in before.source and key_id in before.source
    stored = before.seal(PID, "sk-cloud-key-0001")
    after = from_settings(replace(cloud, kms_data_key=f"{new},{old}"), kms)
    assert kms.decrypts == 3
    assert after.open(PID, stored) == "sk-cloud-key-0001"
    assert from_settings(replace(cloud, kms_data_key=new), kms).open(PID, after.reseal(PID, stored))


def test_a_data_key_kms_will_not_open_is_a_clear_error() -> None:
    kms = MemoryKms()
    mine = kms.create_key()["KeyMetadata"]["KeyId"]
    theirs = kms.create_key()["KeyMetadata"]["KeyId"]
    wrapped = new_data_key(settings(kms_key_id=theirs), kms)
    with pytest.raises(KeyStoreUnavailable, match="IncorrectKeyException"):
        from_settings(settings(kms_key_id=mine, kms_data_key=wrapped), kms)
    with pytest.raises(KeyStoreUnavailable, match="not base64"):
        from_settings(settings(kms_key_id=mine, kms_data_key="%%%"), kms)
    forged = base64.b64encode(json.dumps({"not": "a kms blob"}).encode()).decode()
    with pytest.raises(KeyStoreUnavailable, match="InvalidCiphertextException"):
        from_settings(settings(kms_key_id=mine, kms_data_key=forged), kms)


def test_the_emulator_keeps_one_data_key_for_every_process() -> None:
    kms = MemoryKms()
    first = from_settings(settings(), kms)  # the first process to start makes it
    assert ALIAS in kms.aliases and "emulator" in first.source
    stored = first.seal(PID, "sk-local-key-0002")
    second = from_settings(settings(), kms)  # another process: the same data key
    assert second.open(PID, stored) == "sk-local-key-0002"
    assert len(kms.keys) == 1 and kms.deleted == []
    wrapped = new_data_key(settings(), kms)  # rotation works there too
    rotated = from_settings(settings(kms_data_key=wrapped), kms)
    assert box_opens(rotated, rotated.seal(PID, "k"))


def box_opens(b: SecretBox, stored: str) -> bool:
    return b.open(PID, stored) == "k"


def test_of_two_processes_setting_up_the_emulator_at_once_one_key_wins() -> None:
    kms = MemoryKms()
    winner = from_settings(settings(), kms)
    kms.stale_describe = True  # this process looked before the winner's alias landed
    loser = from_settings(settings(), kms)
    assert len(kms.deleted) == 1 and kms.deleted[0] != kms.aliases[ALIAS]
    assert loser.open(PID, winner.seal(PID, "sk-same-data-key-3")) == "sk-same-data-key-3"


def test_the_emulator_is_reached_through_localstack_client_at_aws_endpoint_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    client: Any = secrets_box.kms_client(settings(aws_endpoint_url="http://127.0.0.1:4599"))
    assert client.meta.endpoint_url == "http://127.0.0.1:4599"
    assert client.meta.service_model.service_name == "kms"


def test_rotate_keys_makes_new_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    assert rotate_keys.main(["new-secret"]) == 0
    made = capsys.readouterr().out.strip()
    assert box(made).open(PID, box(made).seal(PID, "k")) == "k"
    assert rotate_keys.main(["what"]) == 2
