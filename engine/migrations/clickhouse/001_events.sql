-- One row per event per recipient (sent, failed, delivered, bounced, ...). No addresses:
-- only the recipient's domain. ReplacingMergeTree folds the rare duplicate that an
-- at-least-once writer can leave after a crash. Runs on ClickHouse 18.16 and current.
CREATE TABLE IF NOT EXISTS {db}.events (
    ts                   DateTime,
    tenant_id            String,
    batch_id             String,
    seq                  UInt32,
    event                String,
    provider             String,
    email_domain         String,
    latency_ms           UInt32,
    attempts             UInt8,
    error                String,
    provider_message_id  String
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant_id, batch_id, event, seq);

-- Per-minute counts, kept up to date by ClickHouse on every insert into events.
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.events_per_minute
ENGINE = SummingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (tenant_id, provider, event, minute, batch_id)
AS SELECT
    toStartOfMinute(ts) AS minute,
    tenant_id,
    batch_id,
    provider,
    event,
    count() AS events,
    sum(latency_ms) AS latency_ms_sum
FROM {db}.events
GROUP BY minute, tenant_id, batch_id, provider, event;
