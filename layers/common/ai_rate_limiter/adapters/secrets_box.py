"""Provider API keys at rest: envelope encryption.

A provider's key is stored sealed: Fernet (AES-128-CBC with HMAC-SHA256, so any change to the
stored text is detected) under a data key, and bound to the provider's id, so that a sealed key
copied onto another provider's row does not open there. The data keys come from one place:

- PROVIDER_KEY_SECRETS: Fernet keys, comma-separated. Local runs and tests; `make up` makes one
  on its first run and keeps it in `.local/`.
- KMS_DATA_KEY: data keys made by KMS `GenerateDataKey` under KMS_KEY_ID, as the base64 of their
  ciphertexts, comma-separated; each is opened with KMS `Decrypt` once per cold start. The
  cloud. Without KMS_KEY_ID, the KMS is the AWS emulator's.
- neither: the AWS emulator at AWS_ENDPOINT_URL (moto's server), which keeps a KMS key under
  ALIAS and, in that key's description, the data key it wrapped (made on first use). With no
  emulator answering, the key store does not start: a key is never stored unencrypted.

In each list the first key seals and every key opens (MultiFernet): a key is rotated by putting
a new one first and running `python -m ai_rate_limiter.rotate_keys`.

Stored form: `sealed1$<tail>$<Fernet token>`. The tail is what the API shows of a key (its last
four characters, for keys of twelve or more), so a view masks a key without opening it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..config import Settings
from ..domain.models import mask_key
from ..errors import DependencyUnavailable

SCHEME = "sealed1$"
ALIAS = "alias/ai-rate-limiter-provider-keys"
CONTEXT = {"purpose": "ai-rate-limiter provider API keys"}  # KMS encryption context
DESCRIPTION = "ai-rate-limiter provider API keys; wrapped data key: "
KMS_CONFIG = Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})
NO_PLAINTEXT = (
    "Provider keys are never stored unencrypted: set PROVIDER_KEY_SECRETS (`make up` makes one in "
    ".local/), or KMS_KEY_ID and KMS_DATA_KEY, or start an AWS emulator there "
    "(moto_server -H 127.0.0.1 -p 4566)."
)
T = TypeVar("T")


class KeyStoreUnavailable(DependencyUnavailable):
    """No data key to seal or open provider keys with: none configured, or KMS (or the
    emulator) unreachable or refusing. The service cannot take or use keys until it is fixed."""


class KeyUnreadable(DependencyUnavailable):
    """A stored key that none of the configured data keys opens: changed in the database, or
    sealed under a data key this deployment no longer has. Either way the fault is the
    deployment's, not the request's, and it lasts until an operator mends it: 503, and the
    worker hands its messages back rather than failing them."""


class Kms(Protocol):
    """The KMS calls used here (a boto3 KMS client has them)."""

    def generate_data_key(self, **kwargs: Any) -> dict[str, Any]: ...
    def decrypt(self, **kwargs: Any) -> dict[str, Any]: ...
    def describe_key(self, **kwargs: Any) -> dict[str, Any]: ...
    def create_key(self, **kwargs: Any) -> dict[str, Any]: ...
    def update_key_description(self, **kwargs: Any) -> Any: ...
    def create_alias(self, **kwargs: Any) -> Any: ...
    def schedule_key_deletion(self, **kwargs: Any) -> Any: ...


def is_sealed(stored: str) -> bool:
    return stored.startswith(SCHEME) and "$" in stored[len(SCHEME) :]


def tail(api_key: str) -> str:
    """What may be shown of a key, after `****`."""
    return mask_key(api_key).removeprefix("****")


def masked(stored: str) -> str:
    """How the API shows a stored key, without opening it: `****` and at most its last four."""
    if is_sealed(stored):
        return "****" + stored[len(SCHEME) : stored.rindex("$")]
    return mask_key(stored)


class SecretBox:
    """Seals and opens provider keys with MultiFernet: the first key seals, every key opens."""

    def __init__(self, keys: Sequence[bytes], source: str) -> None:
        if not keys:
            raise KeyStoreUnavailable(f"Provider keys: {source} holds no key. {NO_PLAINTEXT}")
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self.source = source

    def __repr__(self) -> str:
        return f"SecretBox(from {self.source})"

    def seal(self, provider_id: str, api_key: str) -> str:
        token = self._fernet.encrypt(f"{provider_id}:{api_key}".encode()).decode()
        return f"{SCHEME}{tail(api_key)}${token}"

    def open(self, provider_id: str, stored: str) -> str:
        if not is_sealed(stored):
            raise KeyUnreadable(
                f"Provider {provider_id}'s API key is stored unencrypted; run "
                "`python -m ai_rate_limiter.rotate_keys` (every start also seals such keys)."
            )
        try:
            plain = self._fernet.decrypt(stored.rsplit("$", 1)[1].encode()).decode()
        except (InvalidToken, UnicodeError):
            raise KeyUnreadable(
                f"Provider {provider_id}'s stored API key cannot be decrypted with the configured "
                f"data keys ({self.source}): it was changed, or sealed under a key no longer "
                "configured. Restore the key that sealed it, or set the provider's api_key again."
            ) from None
        owner, _, api_key = plain.partition(":")
        if owner != provider_id:
            raise KeyUnreadable(f"Provider {provider_id}'s stored API key was sealed for another provider.")
        return api_key

    def reseal(self, provider_id: str, stored: str) -> str:
        """The key sealed again under the first data key (a key stored unencrypted, sealed)."""
        return self.seal(provider_id, self.open(provider_id, stored) if is_sealed(stored) else stored)


# -- where the data keys come from ----------------------------------------------------------


def new_secret() -> str:
    """A new key for PROVIDER_KEY_SECRETS."""
    return Fernet.generate_key().decode()


def fernet_keys(secrets: str) -> list[bytes]:
    keys = []
    for i, raw in enumerate((s.strip() for s in secrets.split(",")), 1):
        if not raw:
            continue
        try:
            Fernet(raw.encode())
        except ValueError:
            raise KeyStoreUnavailable(
                f"PROVIDER_KEY_SECRETS: entry {i} is not a Fernet key (32 url-safe base64-encoded "
                "bytes; `python -m ai_rate_limiter.rotate_keys new-secret` makes one)."
            ) from None
        keys.append(raw.encode())
    return keys


def kms_client(settings: Settings) -> Kms:
    """KMS itself where KMS_KEY_ID names a key (boto3 finds the region and credentials as it
    does everywhere); otherwise the AWS emulator at AWS_ENDPOINT_URL, through localstack-client."""
    if settings.kms_key_id:
        import boto3

        client: Kms = boto3.client("kms", config=KMS_CONFIG)
        return client
    from localstack_client.session import Session

    host = urlsplit(settings.aws_endpoint_url).netloc or None
    emulated: Kms = Session(localstack_host=host).client("kms", config=KMS_CONFIG)
    return emulated


def kms_name(settings: Settings) -> str:
    if settings.kms_key_id:
        return f"KMS key {settings.kms_key_id}"
    return f"the AWS emulator's KMS at {settings.aws_endpoint_url}"


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "error"))


def kms_call(where: str, call: Callable[[], T]) -> T:
    """KMS errors, translated once: each says which KMS and what went wrong, never a key."""
    try:
        return call()
    except ClientError as exc:
        raise KeyStoreUnavailable(f"Provider keys: {where} refused: {exc}") from None
    except BotoCoreError as exc:  # unreachable, no credentials, no region
        raise KeyStoreUnavailable(f"Provider keys: {where} unreachable: {exc}") from None


def unwrap(kms: Kms, wrapped: str, key_id: str, where: str) -> bytes:
    """A data key's ciphertext (base64) opened by KMS, as a Fernet key."""
    try:
        blob = base64.b64decode(wrapped, validate=True)
    except binascii.Error:
        raise KeyStoreUnavailable("KMS_DATA_KEY: an entry is not base64.") from None
    args: dict[str, Any] = {"CiphertextBlob": blob, "EncryptionContext": CONTEXT}
    if key_id:
        args["KeyId"] = key_id
    plaintext = kms_call(where, lambda: kms.decrypt(**args))["Plaintext"]
    if len(plaintext) != 32:
        raise KeyStoreUnavailable(f"Provider keys: {where} gave a data key that is not 256 bits.")
    return base64.urlsafe_b64encode(plaintext)


def _emulator_description(kms: Kms) -> str | None:
    try:
        meta = kms.describe_key(KeyId=ALIAS)["KeyMetadata"]
    except ClientError as exc:
        if error_code(exc) == "NotFoundException":
            return None
        raise
    description = str(meta.get("Description") or "")
    if not description.startswith(DESCRIPTION):
        raise KeyStoreUnavailable(f"Provider keys: the emulator's {ALIAS} holds no data key.")
    return description.removeprefix(DESCRIPTION)


def emulator_data_key(kms: Kms) -> str:
    """The wrapped data key the emulator keeps with its key under ALIAS, made on first use.
    The alias is the commit point: of two processes starting at once, the one whose alias
    lands wins and the other drops the key it made."""
    found = _emulator_description(kms)
    if found is not None:
        return found
    key_id = kms.create_key(Description=DESCRIPTION, KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    made = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=CONTEXT)
    wrapped = base64.b64encode(made["CiphertextBlob"]).decode()
    kms.update_key_description(KeyId=key_id, Description=DESCRIPTION + wrapped)
    try:
        kms.create_alias(AliasName=ALIAS, TargetKeyId=key_id)
    except ClientError as exc:
        if error_code(exc) != "AlreadyExistsException":
            raise
        kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
        found = _emulator_description(kms)
        if found is None:
            raise KeyStoreUnavailable(f"Provider keys: the emulator's {ALIAS} vanished.") from None
        return found
    return wrapped


def new_data_key(settings: Settings, kms: Kms | None = None) -> str:
    """A new data key for KMS_DATA_KEY: KMS GenerateDataKey under KMS_KEY_ID (or the emulator's
    key), as the base64 of its ciphertext; its plaintext is not kept."""
    client = kms or kms_client(settings)
    where = kms_name(settings)

    def generate() -> dict[str, Any]:
        key_id = settings.kms_key_id
        if not key_id:
            emulator_data_key(client)
            key_id = ALIAS
        return client.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=CONTEXT)

    return base64.b64encode(kms_call(where, generate)["CiphertextBlob"]).decode()


def from_settings(settings: Settings, kms: Kms | None = None) -> SecretBox:
    """The box for this deployment, from the one source its settings name (see the module)."""
    if settings.provider_key_secrets.strip():
        return SecretBox(fernet_keys(settings.provider_key_secrets), "PROVIDER_KEY_SECRETS")
    where = kms_name(settings)
    if settings.kms_data_key.strip():
        client = kms or kms_client(settings)
        wrapped = [w.strip() for w in settings.kms_data_key.split(",") if w.strip()]
        keys = [unwrap(client, w, settings.kms_key_id, where) for w in wrapped]
        return SecretBox(keys, f"KMS_DATA_KEY, opened by {where}")
    if settings.kms_key_id:
        raise KeyStoreUnavailable(
            "Provider keys: KMS_KEY_ID is set but KMS_DATA_KEY is not; make one with "
            "`python -m ai_rate_limiter.rotate_keys new-data-key` and set KMS_DATA_KEY to it."
        )
    client = kms or kms_client(settings)
    try:
        wrapped_key = kms_call(where, lambda: emulator_data_key(client))
    except KeyStoreUnavailable as exc:
        raise KeyStoreUnavailable(
            f"{exc.detail.rstrip('.')}. No PROVIDER_KEY_SECRETS or KMS_DATA_KEY is set. {NO_PLAINTEXT}"
        ) from None
    return SecretBox([unwrap(client, wrapped_key, "", where)], where)


# -- the process's box ----------------------------------------------------------------------

_box: SecretBox | None = None


def use(box: SecretBox) -> SecretBox:
    """Make `box` the one this process seals and opens provider keys with (the container
    does, as it builds the store)."""
    global _box
    _box = box
    return box


def current() -> SecretBox:
    if _box is None:
        raise KeyStoreUnavailable(
            "Provider keys: this process has no key box yet (the container builds it with the store)."
        )
    return _box
