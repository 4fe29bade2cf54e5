-- Provider API keys are stored sealed (layers/common/ai_rate_limiter/adapters/secrets_box.py):
-- `sealed1$<tail>$<Fernet token>`, where the tail is what the API shows of the key and the token
-- is the key encrypted under a data key that is not in the database (PROVIDER_KEY_SECRETS
-- locally, KMS in the cloud). No column is added: the stored value says what it is.
--
-- From here on Postgres itself refuses to store a key that is not sealed. NOT VALID: the check
-- holds for every row written from now on, while rows written before this migration may still
-- hold plaintext keys. Every process seals those as it starts (Container.keys ->
-- rotate_keys.seal_unsealed), before it reads or writes a key, and so does
-- `python -m ai_rate_limiter.rotate_keys`; a database migrated while no process runs has them
-- sealed by the first one to start. Until then an UPDATE of such a row fails the check, so start
-- the service (or run rotate_keys) right after migrating. Once they are sealed,
-- `ALTER TABLE providers VALIDATE CONSTRAINT providers_api_key_sealed` makes the check cover
-- every row.
ALTER TABLE providers
    ADD CONSTRAINT providers_api_key_sealed CHECK (left(api_key, 8) = 'sealed1$') NOT VALID;
