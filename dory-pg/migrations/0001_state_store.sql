-- The state store and the leadership term. Every table lives in the schema named by
-- PgConfig::schema: the pool's search_path points there, so nothing here names a schema.

-- One row per processor: the ground truth of which epoch may write its state.
CREATE TABLE ownership (
    processor       text PRIMARY KEY,
    -- The owning epoch; NULL when no epoch owns the processor (never assigned, or released).
    owner           bigint,
    -- The highest epoch ever claimed; claims allocate highest + 1.
    highest         bigint NOT NULL DEFAULT 0,
    -- The newest epoch that ever owned the processor: ownership only moves above it, so an
    -- epoch that was released or moved away from can never own again.
    newest_owner    bigint NOT NULL DEFAULT 0,
    lease_expires   timestamptz,
    committed_epoch bigint,
    committed_seq   bigint,
    committed_at    timestamptz,
    CHECK (owner IS NULL OR (owner = newest_owner AND owner <= highest)),
    CHECK ((committed_epoch IS NULL) = (committed_seq IS NULL)),
    CHECK ((committed_seq IS NULL) = (committed_at IS NULL))
);

-- Encoded snapshots (header + zstd body), filed under the epoch that owns them.
CREATE TABLE snapshots (
    processor  text        NOT NULL,
    epoch      bigint      NOT NULL,
    sequence   bigint      NOT NULL,
    size       bigint      NOT NULL,
    created_at timestamptz NOT NULL,
    body       bytea       NOT NULL,
    PRIMARY KEY (processor, epoch, sequence)
);
-- The body is already zstd-compressed: out-of-line storage without a second compression pass.
ALTER TABLE snapshots ALTER COLUMN body SET STORAGE EXTERNAL;

-- The orchestrator leadership term: a single row. A new leader increments it, and every
-- orchestrator write reads it FOR SHARE and compares, so a deposed leader's writes are refused.
CREATE TABLE leadership (
    id     int PRIMARY KEY CHECK (id = 1),
    term   bigint NOT NULL,
    holder text,
    since  timestamptz
);
INSERT INTO leadership (id, term) VALUES (1, 0);
