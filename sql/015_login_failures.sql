-- Failed logins shared by every API process (api/auth.py SharedLoginThrottle). Each process keeps
-- its own in-memory throttle as well, but alone that gives a guesser the allowance once per uvicorn
-- worker and per API host; these rows are what all of them agree on. One row per key: ('user',
-- name, address) and ('addr', '', address), as in the in-memory throttle. `seen` holds HMACs of
-- the distinct failed credentials (never the credentials): a client repeating one stale password
-- counts once. A row is forgotten after a quiet spell of twice the longest lock.
--
-- The API role stays read-only on every table, this one included: it may only call the three
-- functions below, which run as their owner (SECURITY DEFINER) and touch nothing else. Re-runnable.
CREATE TABLE IF NOT EXISTS login_failures (
    kind text NOT NULL CHECK (kind IN ('user', 'addr')),
    user_name text NOT NULL,
    address text NOT NULL,
    failures integer NOT NULL DEFAULT 0,
    seen bytea[] NOT NULL DEFAULT '{}',
    locked_until timestamptz NOT NULL DEFAULT '-infinity',
    last_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, user_name, address)
);
CREATE INDEX IF NOT EXISTS login_failures_last_at_idx ON login_failures (last_at);

-- Seconds until (user, address) and address are both unlocked; 0 when neither is locked.
CREATE OR REPLACE FUNCTION login_wait_s(p_user text, p_address text)
RETURNS double precision
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(max(extract(epoch FROM f.locked_until - clock_timestamp())), 0)::double precision
    FROM public.login_failures f
    WHERE f.address = left(p_address, 64)
      AND ((f.kind = 'addr' AND f.user_name = '') OR (f.kind = 'user' AND f.user_name = left(p_user, 64) AND p_user <> ''))
      AND f.locked_until > clock_timestamp()
$$;

-- Count one failed login (once per distinct p_digest) and lock a key past its allowance, for
-- base * 2^(failures past the allowance - 1) seconds, at most p_max_s (itself at most a day).
-- Returns the longest lock now in effect on the two keys (0: none).
CREATE OR REPLACE FUNCTION login_failed(
    p_user text, p_address text, p_digest bytea,
    p_free integer, p_address_free integer, p_base_s double precision, p_max_s double precision
)
RETURNS double precision
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    now_ timestamptz := clock_timestamp();
    k record;
    r public.login_failures%ROWTYPE;
    lock_s double precision;
    longest double precision := 0;
BEGIN
    IF p_base_s IS NULL OR p_base_s <= 0 OR p_digest IS NULL OR octet_length(p_digest) > 32 THEN
        RETURN 0;
    END IF;
    -- Bounded whatever the caller passes: a lock of at most a day, rows that always expire.
    p_max_s := least(greatest(coalesce(p_max_s, 0), p_base_s), 86400);
    p_base_s := least(p_base_s, p_max_s);
    DELETE FROM public.login_failures
    WHERE last_at < now_ - make_interval(secs => 2 * p_max_s) AND locked_until <= now_;
    FOR k IN
        SELECT * FROM (VALUES ('user', left(p_user, 64), p_free), ('addr', '', p_address_free)) AS v(kind, user_name, free)
        WHERE v.kind = 'addr' OR p_user <> ''
    LOOP
        INSERT INTO public.login_failures (kind, user_name, address, last_at)
        VALUES (k.kind, k.user_name, left(p_address, 64), now_)
        ON CONFLICT (kind, user_name, address) DO NOTHING;
        SELECT * INTO r FROM public.login_failures f
        WHERE f.kind = k.kind AND f.user_name = k.user_name AND f.address = left(p_address, 64)
        FOR UPDATE;
        r.last_at := now_;
        IF NOT p_digest = ANY (r.seen) THEN
            IF cardinality(r.seen) < 64 THEN
                r.seen := r.seen || p_digest;
            END IF;
            r.failures := r.failures + 1;
            IF r.failures > k.free THEN
                lock_s := least(p_max_s, p_base_s * 2 ^ least(30, r.failures - k.free - 1));
                r.locked_until := greatest(r.locked_until, now_ + make_interval(secs => lock_s));
            END IF;
        END IF;
        UPDATE public.login_failures f
        SET failures = r.failures, seen = r.seen, locked_until = r.locked_until, last_at = r.last_at
        WHERE f.kind = k.kind AND f.user_name = k.user_name AND f.address = left(p_address, 64);
        IF r.locked_until > now_ THEN
            longest := greatest(longest, extract(epoch FROM r.locked_until - now_));
        END IF;
    END LOOP;
    RETURN longest;
END
$$;

-- A verified login clears its (user, address) record; the address's own record stays.
CREATE OR REPLACE FUNCTION login_succeeded(p_user text, p_address text)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM public.login_failures
    WHERE kind = 'user' AND user_name = left(p_user, 64) AND address = left(p_address, 64)
$$;

REVOKE ALL ON TABLE login_failures FROM PUBLIC;
REVOKE ALL ON FUNCTION login_wait_s(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION login_failed(text, text, bytea, integer, integer, double precision, double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION login_succeeded(text, text) FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cbmflow_api') THEN
        GRANT EXECUTE ON FUNCTION login_wait_s(text, text) TO cbmflow_api;
        GRANT EXECUTE ON FUNCTION login_failed(text, text, bytea, integer, integer, double precision, double precision) TO cbmflow_api;
        GRANT EXECUTE ON FUNCTION login_succeeded(text, text) TO cbmflow_api;
    END IF;
END
$$;
