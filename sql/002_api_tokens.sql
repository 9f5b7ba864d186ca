-- API tokens (`cbmflow users token NAME`): a random 256-bit secret per token, of which only the
-- SHA-256 is stored. A slow KDF is pointless for a secret that cannot be guessed, and a fast hash
-- lets every request verify its token without a cache. Deleting a user deletes their tokens.
CREATE TABLE IF NOT EXISTS api_tokens (
    id             text PRIMARY KEY CHECK (id ~ '^[a-f0-9]{12}$'),
    user_name      text NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    secret_sha256  text NOT NULL CHECK (secret_sha256 ~ '^[a-f0-9]{64}$'),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS api_tokens_user_idx ON api_tokens (user_name);
