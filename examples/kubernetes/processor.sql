-- A sample processor row for the Postgres config source (dory-pg's `processors` table, in the
-- schema named by `?schema=` in config.yaml's [store] url). `spec` holds every ProcessorSpec
-- field but the id as JSON (dory-core/src/model.rs); a missing field takes its default. The
-- orchestrator is nudged by the table's trigger and starts the processor within a round.
--
--   psql "postgres://dory@postgres.dory.svc.cluster.local:5432/dory" -f processor.sql
--
-- The image is a processor image built FROM docker/python-processor.Dockerfile (README.md).
INSERT INTO dory.processors (id, spec) VALUES (
    'counter',
    '{
        "workload": {
            "image": "registry.example.com/dory/counter:0.1.0",
            "version": "0.1.0",
            "env": {"COUNTER_STEP": "1"}
        },
        "site": "cloud",
        "fallback": true,
        "resources": {"cpu_millis": 250, "memory_mib": 256},
        "checkpoint_interval": 5000,
        "restart": {"mode": "on-failure", "crash_loop_failures": 5},
        "config": {"greeting": "hello"}
    }'::jsonb
)
ON CONFLICT (id) DO UPDATE SET spec = EXCLUDED.spec;
