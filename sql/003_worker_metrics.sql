-- Where each worker serves Prometheus /metrics. Workers bind an ephemeral port by default (several
-- share a machine), so the registry is how a scraper's service discovery and `cbmflow status`
-- find the endpoint: http://<host>:<metrics_port>/metrics. NULL = metrics off.
ALTER TABLE workers ADD COLUMN IF NOT EXISTS metrics_port integer CHECK (metrics_port BETWEEN 1 AND 65535);
