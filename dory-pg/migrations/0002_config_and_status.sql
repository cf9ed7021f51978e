-- The config source (desired processors and operator intents) and the status table. Like
-- 0001, nothing here names a schema: the migration runs with search_path set to it.

-- One row per desired processor. `id` is deliberately unchecked text: a row a user got wrong
-- must still be listed, so Dory can report it (DesiredState::invalid) instead of the insert
-- failing somewhere nobody looks. `spec` holds the other ProcessorSpec fields as serde JSON;
-- missing fields take their defaults.
CREATE TABLE processors (
    id         text        PRIMARY KEY,
    spec       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Operator intents. kind 'pin': `subject` is a processor id and `node` where to run it
-- (`dory move`); kind 'cordon': `subject` is a node to place nothing new on (`dory drain`).
-- A pin outlives its processor row, so a config tool that rewrites `processors` keeps it.
CREATE TABLE intents (
    kind        text        NOT NULL CHECK (kind IN ('pin', 'cordon')),
    subject     text        NOT NULL,
    node        text,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, subject),
    CHECK ((kind = 'pin') = (node IS NOT NULL))
);

-- Observed status per processor, for users to SELECT. `body` is the whole ProcessorStatus as
-- serde JSON (what Dory reads back, exactly); the other columns copy the fields worth
-- querying. `processor` is the id as written in the config, which may not be a valid id.
CREATE TABLE status (
    processor  text        PRIMARY KEY,
    phase      text        NOT NULL,
    node       text,
    site       text,
    epoch      bigint,
    last_error text,
    updated_at timestamptz NOT NULL,
    body       jsonb       NOT NULL
);

-- Keeps processors.updated_at honest when a tool updates a row without setting it.
CREATE FUNCTION dory_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER processors_touch BEFORE UPDATE ON processors
    FOR EACH ROW EXECUTE FUNCTION dory_touch_updated_at();

-- Nudges the config source's listener. Channels are database-wide, so the name carries the
-- schema; it is cut to 63 bytes, the longest channel name (the Rust side cuts the same way;
-- two long schema names sharing a prefix only see each other's nudges, which cost a re-list).
-- Statement-level: a bulk load sends one nudge, and a statement that changed nothing (a
-- repeated cordon) still sends one, as the ConfigSource contract asks of every intent.
CREATE FUNCTION dory_config_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(left('dory_config_' || TG_TABLE_SCHEMA, 63), TG_TABLE_NAME);
    RETURN NULL;
END
$$;
CREATE TRIGGER processors_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON processors
    FOR EACH STATEMENT EXECUTE FUNCTION dory_config_notify();
CREATE TRIGGER intents_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON intents
    FOR EACH STATEMENT EXECUTE FUNCTION dory_config_notify();
