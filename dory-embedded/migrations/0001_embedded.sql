-- Every table of the embedded store in one SQLite file. Times are milliseconds since the Unix
-- epoch from the wall clock: every process using the file runs on the same machine, so they
-- share one clock. STRICT tables refuse values of the wrong type, as Postgres would.

-- One row per processor: the ground truth of which epoch may write its state.
CREATE TABLE ownership (
    processor       TEXT PRIMARY KEY,
    -- The owning epoch; NULL when no epoch owns the processor (never assigned, or released).
    owner           INTEGER,
    -- The highest epoch ever claimed; claims allocate highest + 1.
    highest         INTEGER NOT NULL DEFAULT 0,
    -- The newest epoch that ever owned the processor: ownership only moves above it.
    newest_owner    INTEGER NOT NULL DEFAULT 0,
    lease_expires   INTEGER,
    committed_epoch INTEGER,
    committed_seq   INTEGER,
    committed_at    INTEGER,
    CHECK (owner IS NULL OR (owner = newest_owner AND owner <= highest)),
    CHECK ((committed_epoch IS NULL) = (committed_seq IS NULL)),
    CHECK ((committed_seq IS NULL) = (committed_at IS NULL))
) STRICT;

-- Encoded snapshots (header + zstd body), filed under the epoch that owns them.
CREATE TABLE snapshots (
    processor  TEXT    NOT NULL,
    epoch      INTEGER NOT NULL,
    sequence   INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    body       BLOB    NOT NULL,
    PRIMARY KEY (processor, epoch, sequence)
) STRICT;

-- The orchestrator leadership term: a single row. A new leader increments it (holding the
-- lock file), and every orchestrator write compares it inside its write transaction.
CREATE TABLE leadership (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    term   INTEGER NOT NULL,
    holder TEXT,
    since  INTEGER
) STRICT;
INSERT INTO leadership (id, term) VALUES (1, 0);

-- Operator intents. kind 'pin': `subject` is a processor id and `node` where to run it
-- (`dory move`); kind 'cordon': `subject` is a node to place nothing new on (`dory drain`).
-- They live here, never in the user's TOML file.
CREATE TABLE intents (
    kind        TEXT    NOT NULL CHECK (kind IN ('pin', 'cordon')),
    subject     TEXT    NOT NULL,
    node        TEXT,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (kind, subject),
    CHECK ((kind = 'pin') = (node IS NOT NULL))
) STRICT;

-- Bumped by every change to `intents`, whoever makes it (a `dory move` in another process, a
-- hand edit): the config source polls it to nudge its subscribers.
CREATE TABLE intents_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
) STRICT;
INSERT INTO intents_version (id, version) VALUES (1, 0);
CREATE TRIGGER intents_inserted AFTER INSERT ON intents
    BEGIN UPDATE intents_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER intents_updated AFTER UPDATE ON intents
    BEGIN UPDATE intents_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER intents_deleted AFTER DELETE ON intents
    BEGIN UPDATE intents_version SET version = version + 1 WHERE id = 1; END;

-- Observed status per processor, for users to read (`sqlite3 dory.db 'SELECT ...'`). `body`
-- is the whole ProcessorStatus as JSON (what Dory reads back); the other columns copy the
-- fields worth querying. `processor` is the id as written in the config.
CREATE TABLE status (
    processor  TEXT    PRIMARY KEY,
    phase      TEXT    NOT NULL,
    node       TEXT,
    site       TEXT,
    epoch      INTEGER,
    last_error TEXT,
    updated_at INTEGER NOT NULL,
    body       TEXT    NOT NULL
) STRICT;
