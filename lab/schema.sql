-- The Eagle Alert application schema, as the sample app and the runbooks see it.
-- updated_at is maintained by a trigger so that conflict resolution can compare versions
-- by time whatever the client sent.

CREATE TABLE IF NOT EXISTS alerts (
    id          bigint PRIMARY KEY,
    region      text NOT NULL,
    payload     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS alert_rules (
    id          bigint PRIMARY KEY,
    name        text NOT NULL,
    threshold   numeric,
    enabled     boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS subscriptions (
    id          bigint PRIMARY KEY,
    user_id     text NOT NULL,
    channel     text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS audit_log (
    id          bigint PRIMARY KEY,
    actor       text NOT NULL,
    action      text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS metrics_snapshots (
    id          bigint PRIMARY KEY,
    metric      text NOT NULL,
    value       double precision,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE OR REPLACE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END $$;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['alerts', 'alert_rules', 'subscriptions', 'audit_log', 'metrics_snapshots'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = t || '_touch') THEN
            EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON %I FOR EACH ROW EXECUTE FUNCTION touch_updated_at()',
                           t || '_touch', t);
        END IF;
    END LOOP;
END $$;
